"""Side-by-side time of activation patching: capjax.patching.patch vs a PyTorch forward-hook loop over
transformers' model (one hooked forward per unit, as transformer_lens.patching does), in one run.

    python scripts/bench_patching.py [--prompts 4] [--site attn.z] [--reps 2]

Both run SmolLM2-135M-Instruct in float32 on this machine's CPU, on the arithmetic prompts of
scripts/patching_study.py, patching every head of every layer (noising, logit difference at the last
position). capjax is timed cold (compile included) and warm (best of --reps); the hook loop once.
The two results must agree (max |difference| printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from patching_study import prompts

import capjax
from capjax.io import smollm2_gguf_path
from capjax.patching import logit_diff, patch
from torch_sites import hf_run


def hook_loop(hf, clean, corrupted, answer, wrong, site):
    _, src = hf_run(hf, corrupted, sites=[site])
    L, H = hf.config.num_hidden_layers, hf.config.num_attention_heads
    out = np.zeros((L, H))
    B = len(clean)
    for l in range(L):
        s = torch.tensor(src[site][l], dtype=torch.float32)
        for h in range(H):

            def edit(name, layer, v, l=l, h=h, s=s):
                if name == site and layer == l:
                    v = v.clone()
                    v[:, :, h] = s[:, :, h]
                    return v

            logits, _ = hf_run(hf, clean, edit=edit, sites=())
            z = logits[:, -1]
            out[l, h] = np.mean(z[np.arange(B), answer] - z[np.arange(B), wrong])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--site", default="attn.z")
    p.add_argument("--reps", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, params = capjax.load_pretrained("smollm2-135m-instruct")
    tok = capjax.load_tokenizer("smollm2-135m-instruct")
    path = smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    clean, corrupted, answer, wrong = (a[: args.prompts] for a in prompts(tok))
    metric = logit_diff(answer, wrong)
    read = [-1] * len(clean)

    def ours():
        return patch(model, params, clean, corrupted, args.site, metric, read_at=read).values

    print(
        f"{args.site} per head, [{len(clean)}, {clean.shape[1]}] tokens, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    t = time.perf_counter()
    want = hook_loop(hf, clean, corrupted, answer, wrong, args.site)
    loop = time.perf_counter() - t
    print(f"hook loop (transformers, torch)  {loop:8.2f} s   ({want.size} units)", flush=True)
    t = time.perf_counter()
    got = ours()
    cold = time.perf_counter() - t
    print(f"capjax patch, cold (compile)     {cold:8.2f} s   loop / capjax {loop / cold:6.2f}x", flush=True)
    warm = []
    for _ in range(args.reps):
        t = time.perf_counter()
        ours()
        warm.append(time.perf_counter() - t)
    print(f"capjax patch, warm (best of {args.reps})   {min(warm):8.2f} s   loop / capjax {loop / min(warm):6.2f}x")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print(
        f"max |capjax - hook loop| = {np.abs(got - want).max():.2e} (logit-difference units; "
        f"range of values {np.ptp(want):.2f})"
    )


if __name__ == "__main__":
    main()
