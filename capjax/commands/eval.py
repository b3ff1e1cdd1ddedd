"""`capjax eval`: run benchmark tasks on a model (hub id, HF folder, .gguf, pruned output folder)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    from capjax.evaluate.tasks import TASKS

    p = subparsers.add_parser("eval", help="evaluate a (pruned) model on benchmark tasks",
                              description=__doc__)
    p.add_argument("--model", required=True, metavar="SRC_OR_PRUNED_DIR",
                   help="HF folder, .gguf file, hub id, 'smollm2-135m-instruct', or a pruned model folder")
    p.add_argument("--tasks", default="wikitext2,gsm8k,strategyqa,arc_challenge",
                   help=f"comma-separated, from: {','.join(TASKS)} (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="benchmark data folder (default: $CAPJAX_DATA or ../shared/data)")
    p.add_argument("--limit", type=int, default=None, help="examples per task (WikiText-2: windows)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048, help="WikiText-2 window length (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="force the chat template (default: when the tokenizer has one)")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="plain 'Question: ...' prompts")
    p.add_argument("--log-samples", action="store_true", help="store per-example outputs in the JSON")
    p.add_argument("--out", required=True, help="results JSON path")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from capjax.evaluate.tasks import TASKS, evaluate, format_table, write_results
    from capjax.io import load_pretrained, load_tokenizer

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:  # before the (slow) model load
        raise ValueError(f"unknown or no task(s) {unknown}; known tasks: {', '.join(TASKS)}")
    model, params = load_pretrained(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    results = evaluate(model, params, tokenizer, tasks, data_dir=args.data_dir, limit=args.limit, seed=args.seed,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, chat=args.chat,
                       seq_len=args.seq_len, model_name=str(args.model), log_samples=args.log_samples)
    print(format_table(results))
    path = write_results(results, args.out)
    print(f"wrote {path}")
    return 0
