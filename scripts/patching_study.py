"""A patching study on SmolLM2-135M-Instruct: which heads and positions carry the answer of a one-digit sum.

    python scripts/patching_study.py [--out docs/interventions_study.png]

Clean prompts "a + b = s\\nc + d = " and corrupted ones with d changed (so the sum changes); the metric is
the logit difference between the clean and the corrupted answer digit at the last position,
normalized (1 = clean behaviour, 0 = corrupted). Noising patches: attn.z per head [L, H], the residual
stream per layer and position [L, T], and each MLP block [L]; prints the strongest units and the
attribution-patching correlation, and saves a figure.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import capjax
from capjax.patching import attribution_patch, logit_diff, patch

EXAMPLES = [
    (2, 3, 3, 4, 1),
    (1, 5, 2, 6, 0),
    (4, 1, 3, 3, 2),
    (2, 2, 1, 7, 1),
    (3, 1, 4, 4, 1),
    (1, 1, 5, 2, 3),
    (2, 4, 6, 1, 2),
    (3, 3, 2, 5, 1),
]  # a, b, c, d, corrupted d


def prompts(tok):
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    clean = np.array([enc(f"{a} + {b} = {a + b}\n{c} + {d} = ") for a, b, c, d, _ in EXAMPLES])
    corrupted = np.array([enc(f"{a} + {b} = {a + b}\n{c} + {e} = ") for a, b, c, d, e in EXAMPLES])
    answer = np.array([enc(str(c + d))[0] for a, b, c, d, e in EXAMPLES])
    wrong = np.array([enc(str(c + e))[0] for a, b, c, d, e in EXAMPLES])
    return clean, corrupted, answer, wrong


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/interventions_study.png")
    args = p.parse_args()
    model, params = capjax.load_pretrained("smollm2-135m-instruct")
    tok = capjax.load_tokenizer("smollm2-135m-instruct")
    clean, corrupted, answer, wrong = prompts(tok)
    metric = logit_diff(answer, wrong)
    t = time.perf_counter()
    heads = patch(model, params, clean, corrupted, "attn.z", metric, read_at=[-1] * len(clean))
    t_heads = time.perf_counter() - t
    resid = patch(model, params, clean, corrupted, "resid.pre", metric, positions=True, read_at=[-1] * len(clean))
    mlp = patch(model, params, clean, corrupted, "mlp.out", metric, read_at=[-1] * len(clean))
    approx = attribution_patch(
        model, params, clean, corrupted, "attn.z", metric, read_at=[-1] * len(clean), exact=heads
    )
    print(
        f"logit diff clean {heads.clean:.3f}, corrupted {heads.corrupted:.3f}; "
        f"{heads.values.size} heads patched in {t_heads:.1f} s (compile included)"
    )
    drop = 1 - heads.normalized()  # how much of the clean behaviour each head's corrupted output removes
    order = np.argsort(drop.ravel())[::-1][:5]
    print(
        "heads whose corrupted output removes most of the answer (layer, head, share):",
        [(int(i // drop.shape[1]), int(i % drop.shape[1]), round(float(drop.ravel()[i]), 3)) for i in order],
    )
    print(
        "MLP blocks (layer, share):",
        [(int(l), round(float(v), 3)) for l, v in sorted(enumerate(1 - mlp.normalized()), key=lambda x: -x[1])[:3]],
    )
    print(f"attribution patching vs exact over the {heads.values.size} heads: correlation {approx['correlation']:.3f}")
    tokens = [tok.decode([int(i)]) for i in clean[0]]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), gridspec_kw={"width_ratios": [1, 1.3]})
    im = axes[0].imshow(drop, aspect="auto", cmap="RdBu_r", vmin=-np.abs(drop).max(), vmax=np.abs(drop).max())
    axes[0].set(xlabel="head", ylabel="layer", title="attn.z per head: share of the answer removed")
    fig.colorbar(im, ax=axes[0])
    r = 1 - resid.normalized()
    im = axes[1].imshow(r, aspect="auto", cmap="RdBu_r", vmin=-np.abs(r).max(), vmax=np.abs(r).max())
    axes[1].set(xlabel="position (row 0's tokens)", ylabel="layer", title="resid.pre per layer and position")
    axes[1].set_xticks(range(len(tokens)), [repr(s)[1:-1] for s in tokens], rotation=90)
    fig.colorbar(im, ax=axes[1])
    fig.suptitle("SmolLM2-135M-Instruct, noising: clean 'c + d = ' with d from the corrupted prompt")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
