"""Trains an organism (capjax.organism) from its config and saves it as an HF folder with its tokenizer.

    python scripts/train_organism.py --config configs/organism_train.yaml
    python scripts/train_organism.py --config configs/organism_induction.yaml
    python scripts/train_organism.py --config configs/organism_train.yaml train.steps=100 out=/tmp/org
    python scripts/train_organism.py --config configs/organism_train.yaml out=/tmp/org \
        --compare-to capjax/organism/weights/reasoning     # retrain, then compare every tensor bit for bit

Deterministic from the config's seed. With checkpoint_dir set, an interrupted run resumes from its
newest orbax checkpoint and ends bit-identical to an uninterrupted one. Prints the held-out
accuracy (reasoning: greedy exact match on eval.n problems; induction: the repeat-token accuracy)
and the held-out WikiText-2 perplexity, and writes them to <out>/organism.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="organism config YAML (configs/organism_train.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value or section.key=value (values read as YAML)")
    ap.add_argument(
        "--compare-to",
        default=None,
        metavar="FOLDER",
        help="after saving, compare every weight tensor with this HF folder (exit 1 unless bit-identical)",
    )
    args = ap.parse_args(argv)
    from capjax.organism.train import (
        OrganismConfig,
        compare_weights,
        heldout_perplexity,
        reasoning_accuracy,
        save,
        train,
    )

    overrides = {}
    for item in args.overrides:
        if "=" not in item:
            ap.error(f"override {item!r}: use key=value")
        k, v = item.split("=", 1)
        overrides[k] = yaml.safe_load(v)
    cfg = OrganismConfig.load(args.config, overrides)
    if args.compare_to and not (Path(args.compare_to) / "model.safetensors").is_file():
        ap.error(f"--compare-to {args.compare_to}: no model.safetensors there; give an organism folder")
    t0 = time.perf_counter()
    result = train(cfg)
    model, params, tok = result["model"], result["params"], result["tokenizer"]
    t1 = time.perf_counter()
    if cfg.kind == "reasoning":
        acc = reasoning_accuracy(model, params, tok, cfg.eval.n, cfg.eval.batch_size, cfg.eval.max_new_tokens)
        ppl = heldout_perplexity(model, params, tok, result["heldout_text"], cfg.eval.ppl_seq_len)
        metrics = {
            "accuracy": acc["accuracy"],
            "n": acc["n"],
            "by_steps": acc["by_steps"],
            "answer_loss": acc["answer_loss"],
            "heldout_ppl": None if ppl is None else ppl["ppl"],
            "heldout_ppl_tokens": None if ppl is None else ppl["n_tokens"],
        }
    else:
        from capjax.organism.induction import repeat_accuracy

        metrics = repeat_accuracy(model, params, cfg.data.segment_len, cfg.data.vocab_size, n=cfg.eval.n)
    metrics["eval_seconds"] = time.perf_counter() - t1
    folder = save(result, cfg, metrics)
    print(json.dumps({k: v for k, v in metrics.items()}, indent=1))
    print(f"saved {folder} (train {result['seconds']:.0f} s, total {time.perf_counter() - t0:.0f} s)")
    if args.compare_to:
        cmp = compare_weights(folder, args.compare_to)
        print(
            f"weights vs {args.compare_to}: "
            + (
                f"bit-identical ({cmp['tensors']} tensors)"
                if cmp["identical"]
                else f"DIFFERENT: {json.dumps({k: v for k, v in cmp.items() if k != 'identical'})}"
            )
        )
        return 0 if cmp["identical"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
