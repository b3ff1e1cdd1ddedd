"""N:M semi-structured sparsity: in every group of M consecutive input features of each output
row (HF's [out, in] view), the N lowest-scored weights are pruned. Masks are keep masks
(True = kept).

Ties inside a group are broken by position (the earlier feature is pruned first).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def parse_nm(nm: Any) -> tuple[int, int] | None:
    """(N, M) from a pair or a "N:M" string; None stays None. Requires 1 <= N < M."""
    if nm is None:
        return None
    if isinstance(nm, str):
        try:
            n, m = (int(v) for v in nm.split(":"))
        except ValueError:
            raise ValueError(f"N:M pattern {nm!r} must look like '2:4'") from None
    else:
        try:
            n, m = (int(v) for v in nm)
        except (TypeError, ValueError):
            raise ValueError(f"nm must be a pair (N, M) like (2, 4), got {nm!r}") from None
    if not 1 <= n < m:
        raise ValueError(f"N:M sparsity needs 1 <= N < M, got N={n}, M={m}")
    return n, m


@partial(jax.jit, static_argnames=("n", "m"))
def keep_nm(rows: Array, n: int, m: int) -> Array:
    """Keep mask (True = kept) for scores rows [..., in, out], groups along the `in` axis.

    `in` must be a multiple of m. Each weight's rank in its group is the number of group members
    that sort before it (lower score, or equal score at an earlier position); rank < n is pruned,
    the M - N others are kept.
    """
    *lead, n_in, n_out = rows.shape
    g = rows.reshape(*lead, n_in // m, m, n_out)
    rank = jnp.zeros(g.shape, jnp.int32)
    pos = jnp.arange(m).reshape(m, 1)
    for j in range(m):
        sj = g[..., j : j + 1, :]
        before = (sj < g) | ((sj == g) & (j < pos))
        rank = rank + before.astype(jnp.int32)
    return (rank >= n).reshape(rows.shape)


def check_divisible(in_features: dict[str, int], m: int) -> None:
    """ValueError unless every matrix's input width is a multiple of M."""
    bad = {p: f for p, f in in_features.items() if f % m}
    if bad:
        raise ValueError(
            f"N:M with M={m} needs input widths divisible by {m}; not: "
            + ", ".join(f"{p} ({f})" for p, f in bad.items())
        )
