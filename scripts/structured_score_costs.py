"""Seconds of the structured quality table's scores on SmolLM2-135M-Instruct, one process: CAP head
scores (exact ablation of every head, or the gradient estimate) and exact channel-group ablation at
each group width, on the same GSM8K calibration examples as scripts/quality_structured.py (seed 0).
Each score is run twice (the first call compiles); both times are printed.

    nice -n 10 python scripts/structured_score_costs.py --data-dir ../shared/data --n-calib 4 --groups 128,256
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-calib", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--heads", default="ablation,gradient", help="head score methods to time ('' for none)")
    parser.add_argument("--subsets", type=int, default=3)
    parser.add_argument("--groups", default="128", help="channel group widths to time ('' for none)")
    parser.add_argument("--repeats", type=int, default=2, help="calls per score (the first one compiles)")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    import capjax
    from capjax.structured import scores as S

    model, params = capjax.load_pretrained("smollm2-135m-instruct")
    tok = capjax.load_tokenizer("smollm2-135m-instruct")
    cal = capjax.build_calibration("gsm8k", tok, n=args.n_calib, seq_len=args.seq_len, seed=0, data_dir=args.data_dir)
    c = model.config
    answers = int((cal.loss_mask[:, 1:] > 0).sum())
    print(f"calibration: {args.n_calib} examples, {int(cal.attention_mask.sum())} real tokens, {answers} answers")

    def timed(name, fn, **info):
        seconds = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            seconds.append(round(time.perf_counter() - t, 1))
        print(json.dumps({"score": name, "seconds": seconds, "load": os.getloadavg()[0], **info}), flush=True)

    for method in filter(None, args.heads.split(",")):
        timed(
            f"heads ({method})",
            lambda method=method: capjax.score_heads(
                model,
                params,
                cal.tokens,
                cal.loss_mask,
                attention_mask=cal.attention_mask,
                method=method,
                subsets=args.subsets,
                progress=False,
            ),
            ablations=c.num_layers * c.num_heads if method == "ablation" else 0,
        )
    act = S.channel_activation_scores(model, params, cal.tokens, cal.attention_mask, batch_size=4)
    for size in (int(g) for g in args.groups.split(",") if g):
        groups = S.rank_groups(act, size)
        timed(
            f"channel groups of {size}",
            lambda groups=groups: S.channel_group_ablation_scores(
                model, params, cal.tokens, cal.loss_mask, groups, cal.attention_mask
            ),
            ablations=c.num_layers * (int(groups.max()) + 1),
        )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
