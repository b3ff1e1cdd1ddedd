"""Masked full fine-tuning step throughput: capjax.recover against a PyTorch AdamW loop, one run.

    python scripts/bench_recovery.py [--batch 4] [--seq-len 128] [--steps 3] [--remat]

Same model (SmolLM2-135M-Instruct, float32, pruned 50% by magnitude), same batch (B chunks of
seq_len WikiText-2 tokens, every token in the loss; throughput only, nothing is evaluated), same
optimizer (AdamW, constant lr after one step, no clipping, no weight decay). The torch loop is
what a user writes: forward, mean NLL, backward, grad *= mask, optimizer.step(). Both run one
untimed step first (compilation / allocator warm-up), then `--steps` timed steps. Prints the
seconds per step, tokens per second, their ratio, and the first-step loss of both, and the
machine's load average (os.getloadavg) at start and end, so a run on a loaded machine shows.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
import torch
import transformers

import capjax
from capjax.convert import iter_hf_tensors
from capjax.data import load_wikitext2_text
from capjax.io import smollm2_gguf_path
from capjax.pruning.importance import PRUNABLE, get_path
from capjax.recovery import recover
from capjax.recovery.data import text_examples
from capjax.recovery.lora import set_path


def hf_masks(config, masks, params):
    tree = jax.tree.map(lambda a: np.ones(a.shape, np.float32), params)
    for p in PRUNABLE:
        tree = set_path(tree, p, np.asarray(get_path(masks, p)).astype(np.float32))
    return {k: torch.as_tensor(v) for k, v in iter_hf_tensors(config, tree)}


def load_line(when: str) -> str:
    one, five, fifteen = os.getloadavg()
    cores = os.cpu_count() or 1
    note = f" (loaded: 1-min load >= {cores / 2:g} = half the cores)" if one >= cores / 2 else ""
    return f"load average at {when}: {one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min) on {cores} cores{note}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--remat", action="store_true", help="capjax recomputes layer activations in backward")
    args = ap.parse_args()
    start_load = load_line("start")
    print(start_load, flush=True)

    model, params = capjax.load_pretrained("smollm2-135m-instruct")
    tokenizer = capjax.load_tokenizer("smollm2-135m-instruct")
    pruned, masks = capjax.prune(model, params, "magnitude", 0.5)
    text = load_wikitext2_text()[: args.batch * args.seq_len * 8]
    data = text_examples(tokenizer, text, args.seq_len, args.batch)
    assert data["tokens"].shape == (args.batch, args.seq_len), data["tokens"].shape
    tokens_per_step = args.batch * args.seq_len
    n = args.steps + 1

    t = time.perf_counter()
    _, hist = recover(
        model,
        pruned,
        masks,
        data,
        steps=n,
        mode="full",
        batch_size=args.batch,
        lr=args.lr,
        warmup_steps=0,
        final_lr_fraction=1.0,
        grad_clip=None,
        remat=args.remat,
        progress=False,
    )
    cj_total = time.perf_counter() - t
    cj_step = hist["seconds"] / args.steps

    path = smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    hf.train()
    with torch.no_grad():  # the same pruned weights
        state = dict(iter_hf_tensors(model.config, pruned))
        for name, p in hf.named_parameters():
            p.copy_(torch.as_tensor(state[name]))
    m = hf_masks(model.config, masks, pruned)
    named = dict(hf.named_parameters())
    opt = torch.optim.AdamW(named.values(), lr=args.lr, weight_decay=0.0)
    tok = torch.as_tensor(data["tokens"]).long()
    w = torch.as_tensor(data["loss_mask"][:, 1:])

    def step():
        opt.zero_grad(set_to_none=True)
        logits = hf(tok).logits
        nll = -torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tok[:, 1:, None])[..., 0]
        loss = (nll * w).sum() / w.sum()
        loss.backward()
        with torch.no_grad():
            for name, p in named.items():
                p.grad *= m[name]
        opt.step()
        return float(loss.detach())

    t = time.perf_counter()
    first_torch = step()
    warm = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    th_step = (time.perf_counter() - t) / args.steps

    print(
        f"batch {args.batch} x {args.seq_len} tokens, float32, remat={args.remat}, {args.steps} timed steps, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), torch threads {torch.get_num_threads()}"
    )
    print(
        f"capjax: {cj_step:.3f} s/step ({tokens_per_step / cj_step:.0f} tok/s); whole call incl. compile "
        f"{cj_total:.1f} s; first loss {hist['loss'][0]:.5f}"
    )
    print(
        f"torch:  {th_step:.3f} s/step ({tokens_per_step / th_step:.0f} tok/s); first step {warm:.1f} s; "
        f"first loss {first_torch:.5f}"
    )
    print(f"ratio (torch s/step / capjax s/step): {th_step / cj_step:.2f}x")
    print(start_load)
    print(load_line("end"))


if __name__ == "__main__":
    main()
