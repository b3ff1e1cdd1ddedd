"""Recovery after pruning: masked fine-tuning (full or sparse LoRA) that keeps the sparsity exact.

    pruned, masks = capjax.prune(model, params, "wanda", 0.5, calib=calib)
    data = capjax.build_calibration("gsm8k", tokenizer, n=256, seq_len=256)
    recovered, history = capjax.recover(model, pruned, masks, data, steps=100)

See `capjax.recovery.train` (the step), `lora`, `data`, `checkpoint`, `settings` (the `recovery:`
config section and the memory estimate), `runner` (what `capjax run` calls) and `plot`.
"""

from capjax.recovery.data import RecoveryData, RecoveryDataError, build_recovery_data, pack_for_training
from capjax.recovery.lora import LoRARankError, init_lora, lora_kernel, merge_lora
from capjax.recovery.plot import plot_loss_curves
from capjax.recovery.runner import run_recovery
from capjax.recovery.settings import DEFAULTS, RecoverySettings, RecoverySettingsError, memory_bytes
from capjax.recovery.train import (
    MaskTreeError,
    RecoveryDivergedError,
    batch_loss,
    build_optimizer,
    check_masks,
    lr_schedule,
    recover,
)

__all__ = [
    "DEFAULTS",
    "LoRARankError",
    "MaskTreeError",
    "RecoveryData",
    "RecoveryDataError",
    "RecoveryDivergedError",
    "RecoverySettings",
    "RecoverySettingsError",
    "batch_loss",
    "build_optimizer",
    "build_recovery_data",
    "check_masks",
    "init_lora",
    "lora_kernel",
    "lr_schedule",
    "memory_bytes",
    "merge_lora",
    "pack_for_training",
    "plot_loss_curves",
    "recover",
    "run_recovery",
]
