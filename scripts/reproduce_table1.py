"""Reproduce the paper's Table 1 (CAP vs Wanda at 10/20/50% on Llama-3-8B-Instruct and Mistral-7B-Instruct-v0.2).

    python scripts/reproduce_table1.py --data-dir /path/to/data \
        [--llama /path/or/hub/id] [--mistral /path/or/hub/id] [--limit N] [--out results/table1]

Runs configs/paper_llama3_8b.yaml and configs/paper_mistral_7b.yaml (bfloat16; meant for a GPU or
TPU host) and prints one combined table. Reruns reuse every finished step (scores, masks,
evaluations) from the results folders. `--limit` evaluates on the first N examples per task for
a quick pass.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from capjax.experiment import Experiment, load_run_config
from capjax.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--llama", default="meta-llama/Meta-Llama-3-8B-Instruct")
    p.add_argument("--mistral", default="mistralai/Mistral-7B-Instruct-v0.2")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default="results/table1")
    args = p.parse_args()
    tables = []
    for name, model in (("paper_llama3_8b", args.llama), ("paper_mistral_7b", args.mistral)):
        overrides = {"model": model, "data_dir": args.data_dir, "out": f"{args.out}/{name}"}
        if args.limit:
            overrides["evaluation"] = {"limit": args.limit}
        cfg = load_run_config(ROOT / "configs" / f"{name}.yaml", overrides)
        results = Experiment(cfg).run()
        tables.append(f"## {model}\n\n" + markdown_table(results["runs"], relative_to=results["runs"][0]))
    text = "\n\n".join(tables)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "table1.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
