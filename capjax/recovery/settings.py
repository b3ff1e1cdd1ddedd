"""The settings of a recovery run (the run config's `recovery:` section) and the memory estimate
that picks full fine-tuning or LoRA.

Memory per parameter (bytes), with float32 master weights and float32 AdamW moments:

    full   4 (float32 master) + 4 + 4 (AdamW mu, nu) + 4 (float32 gradient)  = 16
           + the caller's copy of the params (2 in bfloat16, 4 in float32) while the run lasts
    lora   the frozen params in their own dtype (2 in bfloat16, 4 in float32)
           + 16 per adapter parameter; r (in + out) adapter parameters per [in, out] matrix,
           e.g. 2.44M = 1.8% of SmolLM2-135M's 134.5M parameters at r = 8, so about
           2.3 bytes per parameter in bfloat16

Activations come on top, for one micro-batch of b rows of S tokens (gradient accumulation bounds
them): with `remat` (default) the L layer inputs, c b S E L bytes, plus one layer's internals
during its backward; without, every layer's internals are kept (roughly
b S (c (8 E + 2 (H + K) D + 3 F) + 12 H S) bytes per layer, c the compute dtype's bytes). The loss
runs over row chunks of LOSS_ROWS positions, so its float32 logits are LOSS_ROWS V 4 bytes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("full", "lora", "auto")


@dataclasses.dataclass(frozen=True)
class RecoverySettings:
    """One recovery run.

    steps: optimizer steps. lr: peak learning rate of the warmup-cosine schedule (linear warmup
    from 0 over min(warmup_steps, steps - 1) steps, cosine decay to `lr * final_lr_fraction` at
    `steps`).
    mode: "full" (every parameter trains; pruned entries stay exactly zero), "lora" (rank-`rank`
    adapters on the seven projections, scaled by alpha / rank, merged at the end), or "auto"
    (full when `memory_bytes(..., "full")` fits the available memory, else lora).
    batch_size: packed rows per step, split into `grad_accum` micro-batches of equal size.
    data: a calibration task (gsm8k, strategyqa, arc_challenge, synthetic: its train split, answer
    tokens in the loss) or "text:PATH" (a plain text file, every token in the loss; the shared
    data has WikiText-2's test split only, which evaluation uses, so it is not offered by name);
    n examples (text chunks of seq_len tokens for text) drawn with `seed`.
    checkpoint_every: steps between orbax checkpoints (with a checkpoint_dir).
    max_loss_ratio: a loss above this many times the first step's loss stops the run (diverged).
    compute_dtype: the matmul dtype; None = the model's.
    remat: recompute each layer's activations in the backward pass (jax.checkpoint) and keep only
    the layer inputs: activation memory of one layer instead of the whole stack, ~1/3 more compute.
    distil: `capjax run` also runs the same recovery as logit distillation from the dense model (a
    "+distil" row beside "+recovery"), with distil_temperature, distil_ce_weight and
    distil_positions (`recover`'s temperature, ce_weight and distil_positions: "all" = KL at every
    position that predicts a real token, "loss" = at the loss positions only).
    """

    steps: int = 100
    lr: float = 1e-4
    warmup_steps: int = 10
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    mode: str = "auto"
    rank: int = 8
    alpha: float = 16.0
    batch_size: int = 8
    grad_accum: int = 1
    data: str = "gsm8k"
    n: int = 256
    seq_len: int = 256
    seed: int = 0
    checkpoint_every: int = 50
    max_loss_ratio: float = 4.0
    compute_dtype: str | None = None
    remat: bool = True
    distil: bool = False
    distil_temperature: float = 1.0
    distil_ce_weight: float = 0.0
    distil_positions: str = "all"

    def __post_init__(self) -> None:
        check_settings(self)

    def replace(self, **changes: Any) -> RecoverySettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RecoverySettings:
        """From a config's `recovery:` mapping; unknown keys are refused by name."""
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"recovery: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)


class RecoverySettingsError(ValueError):
    """A recovery setting out of range."""


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return (
        isinstance(v, (int, float, np.integer, np.floating))
        and not isinstance(v, (bool, np.bool_))
        and bool(np.isfinite(v))
    )


# field -> (kind, test, the range in words); checked in this order, each before any other use
_INTS = {
    "steps": 1,
    "warmup_steps": 0,
    "rank": 1,
    "batch_size": 1,
    "grad_accum": 1,
    "n": 1,
    "seq_len": 2,
    "seed": 0,
    "checkpoint_every": 1,
}
_NUMBERS = {
    "lr": (lambda v: v > 0, "> 0"),
    "final_lr_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "eps": (lambda v: v > 0, "> 0"),
    "alpha": (lambda v: v > 0, "> 0"),
    "max_loss_ratio": (lambda v: v > 1, "> 1"),
}


def check_settings(s: RecoverySettings) -> None:
    """Raises RecoverySettingsError naming the field and the fix: every field's type and range
    (an integer is an int, not 2.5 or true; a number is finite), before anything loads."""

    def bad(field: str, why: str) -> None:
        raise RecoverySettingsError(f"recovery.{field}={getattr(s, field)!r}: {why}")

    for field, low in _INTS.items():
        if not _is_int(getattr(s, field)) or getattr(s, field) < low:
            bad(field, f"need an integer >= {low}")
    for field, (ok, words) in _NUMBERS.items():
        if not _is_number(getattr(s, field)) or not ok(getattr(s, field)):
            text = " (YAML 1.1 reads 1e-4 as text: write 1.0e-4)" if isinstance(getattr(s, field), str) else ""
            bad(field, f"need a finite number {words}{text}")
    if s.grad_clip is not None and not (_is_number(s.grad_clip) and s.grad_clip > 0):
        bad("grad_clip", "need a finite number > 0, or null for no clipping")
    if s.batch_size % s.grad_accum:
        bad("grad_accum", f"need a divisor of batch_size ({s.batch_size})")
    if not isinstance(s.mode, str) or s.mode not in MODES:
        bad("mode", f"use one of {', '.join(MODES)}")
    if not isinstance(s.remat, (bool, np.bool_)):
        bad("remat", "need true or false")
    from capjax.data.task import calibration_task_names

    tasks = calibration_task_names()
    if not isinstance(s.data, str) or not (s.data in tasks or (s.data.startswith("text:") and len(s.data) > 5)):
        bad("data", f"use a calibration task ({', '.join(tasks)}) or text:PATH")
    if s.compute_dtype not in (None, "float32", "bfloat16"):
        bad("compute_dtype", "use float32, bfloat16 or None (the model's)")
    if not isinstance(s.distil, bool):
        bad("distil", "use true or false")
    if not (np.isfinite(s.distil_temperature) and s.distil_temperature > 0):
        bad("distil_temperature", "need a finite temperature > 0")
    if not (np.isfinite(s.distil_ce_weight) and s.distil_ce_weight >= 0):
        bad("distil_ce_weight", "need a finite weight >= 0")
    if s.distil_positions not in DISTIL_POSITIONS:
        bad("distil_positions", "use all (every real position) or loss (the loss positions only)")


# Where distillation puts its KL: every position predicting a real token, or the loss positions only.
DISTIL_POSITIONS = ("all", "loss")
# Settings only the "+distil" run reads: left out of the "+recovery" run's fingerprints.
DISTIL_FIELDS = ("distil", "distil_temperature", "distil_ce_weight", "distil_positions")


def check_data_file(s: RecoverySettings) -> None:
    """The file of data=text:PATH exists (checked before anything loads), or one line naming it."""
    if s.data.startswith("text:") and not Path(s.data[5:]).is_file():
        raise RecoverySettingsError(
            f"recovery.data={s.data!r}: text file {s.data[5:]} not found; give an existing "
            "plain text file (relative paths are from the current folder)"
        )


# The declared defaults, read without validating (validation reads the task registry, which loads
# plugins: not at import time).
DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(RecoverySettings)}


def lora_params(config: Any, rank: int) -> int:
    """Adapter parameters for rank-r adapters on the seven projections: L r (I + O) per kernel."""
    from capjax.model import param_shapes
    from capjax.pruning.importance import PRUNABLE, get_path

    shapes = param_shapes(config)
    total = 0
    for p, n_in in PRUNABLE.items():
        shape = get_path(shapes, p).shape
        fan_in, fan_out = int(np.prod(shape[1 : 1 + n_in])), int(np.prod(shape[1 + n_in :]))
        total += shape[0] * rank * (fan_in + fan_out)
    return total


def memory_bytes(config: Any, param_dtype: Any, mode: str, rank: int = 8) -> int:
    """Estimated bytes of params, gradients and optimizer state (module docstring), no activations."""
    from capjax.memory import params_bytes

    count = params_bytes(config, np.float32)[0] // 4
    own = 2 if str(param_dtype) in ("bfloat16", "float16") else np.dtype(param_dtype).itemsize
    if mode == "full":
        return count * (16 + own)
    return count * own + 16 * lora_params(config, rank)
