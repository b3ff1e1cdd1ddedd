"""Exact scoring of every head of SmolLM2-135M-Instruct: capjax vs a PyTorch hook loop, side by side.

    python scripts/bench_scoring.py [--n 12] [--seq-len 128] [--subsets 3] [--task synthetic|gsm8k] [--plain]

Both score the same calibration tokens (K subsets, median - mean). Prints wall times (with and
without compilation), their ratio, the largest score difference, and capjax's achieved GFLOP/s
against a float32 matmul peak measured in the same run. When the examples share a prefix (the chat
template's system prompt; not with --plain), capjax also runs once with share_prefix=False, so the
share of the speed-up that comes from computing that prefix once is measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import capjax
from capjax.ablation import prepare_batch
from capjax.attribution import score_heads, scoring_flops
from capjax.data import build_calibration
from capjax.io import smollm2_gguf_path


def torch_scores(hf, tokens, loss_mask, attention_mask, subsets):
    """The reference: one forward per ablated head, a pre-hook on o_proj zeroing its input slice."""
    cfg = hf.config
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    D = cfg.hidden_size // H
    groups = np.array_split(np.arange(tokens.shape[0]), subsets)
    tok, am = torch.tensor(tokens, dtype=torch.long), torch.tensor(attention_mask, dtype=torch.long)
    tgt = torch.tensor(loss_mask[:, 1:] > 0)

    def subset_losses():
        with torch.no_grad():
            logp = torch.log_softmax(hf(tok, attention_mask=am).logits[:, :-1].float(), -1)
        nll = -logp.gather(-1, tok[:, 1:, None])[..., 0] * tgt
        return np.array([nll[g].sum().item() / tgt[g].sum().item() for g in groups])

    baseline = subset_losses()
    masked = np.zeros((subsets, L, H))
    for l in range(L):
        for h in range(H):

            def hook(module, args, h=h):
                x = args[0].clone()
                x[..., h * D : (h + 1) * D] = 0
                return (x,)

            handle = hf.model.layers[l].self_attn.o_proj.register_forward_pre_hook(hook)
            masked[:, l, h] = subset_losses()
            handle.remove()
    return np.median(masked, 0) - baseline.mean(), masked


def matmul_peak_gflops(n=1024, reps=10):
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        f(a).block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--subsets", type=int, default=3)
    p.add_argument("--task", default="synthetic", help="calibration set (gsm8k needs --data-dir/CAPJAX_DATA)")
    p.add_argument(
        "--plain",
        action="store_true",
        help="'Question: ... Answer:' instead of the chat template "
        "(the chat template's system prompt alone is ~60 tokens)",
    )
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    model, params = capjax.load_pretrained("smollm2-135m-instruct")
    tokenizer = capjax.load_tokenizer("smollm2-135m-instruct")
    task = args.task
    calib = build_calibration(
        task, tokenizer, n=args.n, seq_len=args.seq_len, seed=0, chat=False if args.plain else None
    )
    path = smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    cfg = model.config
    print(
        f"SmolLM2-135M-Instruct: {cfg.num_layers * cfg.num_heads} heads; calibration {task} "
        f"N={args.n} T={args.seq_len} K={args.subsets}; jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    )

    t0 = time.perf_counter()
    s1 = score_heads(
        model, params, calib.tokens, calib.loss_mask, args.subsets, attention_mask=calib.attention_mask, progress=False
    )
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    s2 = score_heads(
        model, params, calib.tokens, calib.loss_mask, args.subsets, attention_mask=calib.attention_mask, progress=False
    )
    t_warm = time.perf_counter() - t0
    assert np.array_equal(s1.delta, s2.delta)

    t0 = time.perf_counter()
    ref_delta, ref_masked = torch_scores(hf, calib.tokens, calib.loss_mask, calib.attention_mask, args.subsets)
    t_torch = time.perf_counter() - t0

    prep = prepare_batch(model, calib.tokens, calib.loss_mask, calib.attention_mask)
    P, S = prep.packed.tokens.shape
    Pf, A = len(prep.packed.prefix), len(prep.packed_ans[1])
    flops = scoring_flops(cfg, P, S, A, prefix=Pf)
    t_alone = None
    if Pf:
        t0 = time.perf_counter()
        s3 = score_heads(
            model,
            params,
            calib.tokens,
            calib.loss_mask,
            args.subsets,
            attention_mask=calib.attention_mask,
            progress=False,
            share_prefix=False,
        )
        t_alone = time.perf_counter() - t0
        alone = prepare_batch(model, calib.tokens, calib.loss_mask, calib.attention_mask, share_prefix=False)
        flops_alone = scoring_flops(cfg, *alone.packed.tokens.shape, A)
    peak = matmul_peak_gflops()
    print(f"layout                    : {P} packed rows x {S} columns, shared prefix {Pf} tokens, {A} answer tokens")
    print(f"capjax  (compile included): {t_first:8.1f} s")
    print(f"capjax  (compile excluded): {t_warm:8.1f} s")
    print(f"pytorch hook loop         : {t_torch:8.1f} s")
    print(
        f"speed-up vs pytorch       : {t_torch / t_first:8.2f}x (compile included), "
        f"{t_torch / t_warm:.2f}x (compile excluded)"
    )
    print(f"max |delta diff|          : {np.abs(s2.delta - ref_delta).max():.2e}")
    print(f"max |masked diff|         : {np.abs(s2.masked - ref_masked).max():.2e}")
    if t_alone is not None:
        print(
            f"capjax, prefix not shared : {t_alone:8.1f} s (compile included): {t_torch / t_alone:.2f}x; "
            f"max |delta diff| to shared {np.abs(s3.delta - s2.delta).max():.2e}"
        )
        print(f"matmul work               : {flops / 1e12:.1f} TFLOP shared, {flops_alone / 1e12:.1f} TFLOP not")
    print(
        f"capjax achieved           : {flops / t_warm / 1e9:8.1f} GFLOP/s vs {peak:.1f} GFLOP/s "
        f"float32 matmul peak measured here ({100 * flops / t_warm / 1e9 / peak:.0f}%)"
    )


if __name__ == "__main__":
    main()
