"""What a run config's `recovery:` section calls: data from the settings, then `recover`.

recovery:            # every key optional; defaults in capjax.recovery.DEFAULTS
  steps: 100
  lr: 1.0e-4
  mode: auto         # full | lora | auto (lora when full fine-tuning does not fit)
  rank: 8
  data: gsm8k        # a calibration task's train split, or text:PATH
  n: 256
  seq_len: 256
  batch_size: 8
  grad_accum: 1
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from capjax.recovery.data import build_recovery_data
from capjax.recovery.settings import RecoverySettings
from capjax.recovery.train import recover
from capjax.token_ids import check_token_ids

Params = dict[str, Any]


def run_recovery(
    model: Any,
    params: Params,
    masks: Params,
    tokenizer: Any,
    settings: RecoverySettings | dict[str, Any] | None = None,
    checkpoint_dir: str | Path | None = None,
    mesh: Any = None,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    teacher: tuple[Any, Params] | None = None,
) -> tuple[Params, dict[str, Any]]:
    """(recovered params, history) for one pruned model: builds `settings.data` (n examples of
    seq_len tokens, seed) with `tokenizer`, then runs `recover` with checkpoints under
    `checkpoint_dir` (a rerun resumes) and the params sharded over `mesh`; with a `teacher`
    (model, params), as logit distillation (settings.distil_temperature, distil_ce_weight,
    distil_positions)."""
    if not isinstance(settings, RecoverySettings):
        settings = RecoverySettings.from_dict(settings)
    data = build_recovery_data(settings.data, tokenizer, settings.n, settings.seq_len, settings.seed, data_dir)
    check_token_ids(data.tokens, model.config.vocab_size, f"recovery data {settings.data}")
    return recover(
        model,
        params,
        masks,
        data,
        settings=settings,
        checkpoint_dir=checkpoint_dir,
        mesh=mesh,
        progress=progress,
        teacher=teacher,
        temperature=settings.distil_temperature,
        ce_weight=settings.distil_ce_weight,
        distil_positions=settings.distil_positions,
    )
