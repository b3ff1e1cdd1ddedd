"""Quality of structured SmolLM2-135M-Instruct at equal shapes, by the scores that chose what to remove.

Scores from GSM8K train (--n-calib examples); quality = answer loss (NLL per answer token) on
--n-eval held-out GSM8K test examples with a 95% bootstrap interval over examples, and its paired
difference to the CAP-guided model. No recovery.

    heads 25% + MLP 25%:  CAP (head deltas, gradient estimate; channel gradient)
                          CAP heads + |channel gradient| (first-order Taylor importance)
                          CAP heads + Minitron activation channels
                          random heads and channels (seed 0)
    layers (--layers):    CAP block ablation, ShortGPT block influence, random

    nice -n 10 python scripts/quality_structured.py [--n-calib 8] [--n-eval 32] [--layers 4]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import numpy as np

from capjax.model import Decoder, token_nll


CHUNK = 8  # examples per call (one compile per model)


@partial(jax.jit, static_argnames=("model",))
def example_nll(model, params, tokens, attention_mask, loss_mask):
    """Answer NLL summed per example [N] of a chunk [N, T]."""
    x, _ = model.apply({"params": params}, tokens, attention_mask=attention_mask, method=Decoder.hidden_states)
    N, T, E = x.shape
    nll = token_nll(model, params, x[:, :-1].reshape(-1, E), tokens[:, 1:].reshape(-1)).reshape(N, T - 1)
    return (nll * loss_mask[:, 1:]).sum(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-calib", type=int, default=8)
    parser.add_argument("--n-eval", type=int, default=32, help="a multiple of 8")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    import jax.numpy as jnp

    import capjax
    from capjax.stats import bootstrap_ratio, resample_weights
    from capjax.structured import choose, shrink, target_shape
    from capjax.structured import scores as S

    t0 = time.perf_counter()
    model, params = capjax.load_pretrained("smollm2-135m-instruct")
    tok = capjax.load_tokenizer("smollm2-135m-instruct")
    c = model.config
    cal = capjax.build_calibration("gsm8k", tok, n=args.n_calib, seq_len=args.seq_len, seed=0, data_dir=args.data_dir)
    ev = capjax.build_calibration("gsm8k", tok, n=args.n_eval, seq_len=args.seq_len, seed=1, data_dir=args.data_dir,
                                  split="test")
    calib = (cal.tokens, cal.loss_mask, cal.attention_mask)
    delta = capjax.score_heads(model, params, *calib[:2], attention_mask=cal.attention_mask, method="gradient",
                               subsets=1, progress=False).delta
    grad = S.channel_gradient_scores(model, params, *calib, batch_size=4)
    act = S.channel_activation_scores(model, params, cal.tokens, cal.attention_mask, batch_size=4)
    block = S.layer_ablation_scores(model, params, *calib)
    influence = S.layer_influence_scores(model, params, cal.tokens, cal.attention_mask, batch_size=4)
    print(f"scores done in {time.perf_counter() - t0:.0f} s", flush=True)
    rng = np.random.default_rng(0)
    rand_h, rand_c, rand_l = (rng.normal(size=(c.num_layers, c.num_heads)),
                              rng.normal(size=(c.num_layers, c.intermediate_size)), rng.normal(size=c.num_layers))
    hm = target_shape(c, heads=0.25, mlp=0.25)
    ly = target_shape(c, layers=args.layers)
    variants = {
        "dense": None,
        "heads+MLP: CAP heads, gradient channels": choose(c, hm, delta, grad),
        "heads+MLP: CAP heads, abs(gradient) channels (Taylor)": choose(c, hm, delta, np.abs(grad)),
        "heads+MLP: CAP heads, activation channels (Minitron)": choose(c, hm, delta, act),
        "heads+MLP: random": choose(c, hm, rand_h, rand_c),
        f"{args.layers} layers: CAP block ablation": choose(c, ly, layer_scores=block),
        f"{args.layers} layers: block influence (ShortGPT)": choose(c, ly, layer_scores=influence),
        f"{args.layers} layers: random": choose(c, ly, layer_scores=rand_l),
    }
    per_example = {}
    den = ev.loss_mask[:, 1:].sum(1).astype(np.float64)  # answer tokens per example [N]
    for name, plan in variants.items():
        m, p = (model, params) if plan is None else shrink(model, params, plan)
        num = np.concatenate([np.asarray(example_nll(m, p, *(jnp.asarray(a[i:i + CHUNK]) for a in (
            ev.tokens, ev.attention_mask, ev.loss_mask)))) for i in range(0, args.n_eval, CHUNK)])
        per_example[name] = (num.astype(np.float64), den)
        params_m = m.config.num_params()
        e = bootstrap_ratio(*per_example[name])
        print(f"{name}: {params_m / 1e6:.1f}M params, answer loss {e.value:.3f} [{e.low:.3f}, {e.high:.3f}]",
              flush=True)
    print(f"\nGSM8K answer loss, {args.n_eval} test examples, scores from {args.n_calib} train examples; "
          "95% bootstrap intervals over examples; paired difference to the first row of each group\n")
    print("| model | params | answer loss [95% CI] | diff vs group's first [95% CI] |")
    print("|---|---|---|---|")
    w = resample_weights(args.n_eval, 1000, 0)
    first = None
    for name, (num, den) in per_example.items():
        if name == "dense" or name.endswith(("gradient channels", "block ablation")):
            first = (num, den)
        e = bootstrap_ratio(num, den)
        base = first[0].sum() / first[1].sum()
        diff = (w @ num) / (w @ den) - (w @ first[0]) / (w @ first[1])
        plan = variants[name]
        size = c.num_params() if plan is None else plan.config(c).num_params()
        print(f"| {name} | {size / 1e6:.1f}M | {e.value:.3f} [{e.low:.3f}, {e.high:.3f}] | "
              f"{e.value - base:+.3f} [{np.quantile(diff, 0.025):+.3f}, {np.quantile(diff, 0.975):+.3f}] |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
