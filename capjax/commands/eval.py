"""`capjax eval`: run benchmark tasks on a model (hub id, HF folder, .gguf, pruned output folder)."""

from __future__ import annotations

import argparse

from capjax.commands.common import check_eval_data, non_negative_int, output_file, positive_int
from capjax.experiment.config import DTYPES, EvaluationConfig

_EVAL = EvaluationConfig()


def add_parser(subparsers) -> argparse.ArgumentParser:
    from capjax.experiment.config import eval_task_names

    p = subparsers.add_parser("eval", help="evaluate a (pruned) model on benchmark tasks", description=__doc__)
    p.add_argument(
        "--model",
        required=True,
        metavar="SRC_OR_PRUNED_DIR",
        help="HF folder, .gguf file, hub id, 'smollm2-135m-instruct', or a pruned model folder",
    )
    p.add_argument(
        "--tasks",
        default="wikitext2,gsm8k,strategyqa,arc_challenge",
        help=f"comma-separated, from: {','.join(eval_task_names())} (default: %(default)s)",
    )
    p.add_argument("--data-dir", default=None, help="benchmark data folder (default: $CAPJAX_DATA or ../shared/data)")
    p.add_argument("--limit", type=positive_int, default=None, help="examples per task (WikiText-2: windows)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the --limit subset")
    p.add_argument("--max-new-tokens", type=positive_int, default=_EVAL.max_new_tokens)
    p.add_argument("--batch-size", type=positive_int, default=_EVAL.batch_size)
    p.add_argument(
        "--seq-len",
        type=positive_int,
        default=_EVAL.ppl_seq_len,
        help="WikiText-2 window length (default: %(default)s)",
    )
    p.add_argument(
        "--bootstrap",
        type=non_negative_int,
        default=_EVAL.bootstrap,
        help="bootstrap resamples for the 95%% intervals (default: %(default)s)",
    )
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    chat = p.add_mutually_exclusive_group()
    chat.add_argument(
        "--chat",
        dest="chat",
        action="store_true",
        default=None,
        help="force the chat template (default: when the tokenizer has one)",
    )
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="plain 'Question: ...' prompts")
    p.add_argument("--log-samples", action="store_true", help="store per-example outputs in the JSON")
    p.add_argument("--out", required=True, help="results JSON path")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import math

    from capjax import stats
    from capjax.errors import NonFiniteError
    from capjax.evaluate.tasks import evaluate, format_table, write_results
    from capjax.experiment.config import eval_task_names
    from capjax.io import load_pretrained, load_tokenizer

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in eval_task_names()]
    if unknown or not tasks:  # before the (slow) model load
        raise ValueError(f"unknown or no task(s) {unknown}; known tasks: {', '.join(eval_task_names())}")
    out = output_file(args.out, ".json")
    check_eval_data(tasks, args.data_dir)  # every task's data, before the model loads
    model, params = load_pretrained(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    results = evaluate(
        model,
        params,
        tokenizer,
        tasks,
        data_dir=args.data_dir,
        limit=args.limit,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        chat=args.chat,
        seq_len=args.seq_len,
        model_name=str(args.model),
        log_samples=args.log_samples,
    )
    bad = [
        f"{t}/{k}={v}"
        for t, m in results["results"].items()
        for k, v in m.items()
        if isinstance(v, float) and not math.isfinite(v)
    ]
    if bad:
        raise NonFiniteError(
            f"{args.model}: non-finite result(s) {', '.join(bad)} (NaN/Inf weights or "
            "overflow: check the checkpoint, or use --dtype float32); nothing written"
        )
    results["intervals"] = {
        t: {m: stats.estimate(v, args.bootstrap, args.seed).to_dict() for m, v in ex.items()}
        for t, ex in results["examples"].items()
    }
    print(format_table(results))
    path = write_results(results, out)
    print(f"wrote {path}")
    return 0
