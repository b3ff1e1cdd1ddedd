"""Calibration and evaluation data for Causal Attribution Pruning.

``sources`` reads raw benchmark records, ``synthetic`` generates arithmetic word
problems, ``templates`` turns records into (prompt, answer) text, and ``calibration``
tokenizes them into [N, T] arrays.
"""

from capjax.data.calibration import (
    CALIB_SPLITS,
    EVAL_SPLITS,
    CalibrationBatch,
    build_calibration,
    eval_records,
)
from capjax.data.sources import TASKS, load_records, load_wikitext2_text, resolve_data_dir
from capjax.data.synthetic import synthetic_problems
from capjax.data.templates import INSTRUCTIONS, build_prompt, format_example, use_chat

__all__ = [
    "CALIB_SPLITS",
    "EVAL_SPLITS",
    "INSTRUCTIONS",
    "TASKS",
    "CalibrationBatch",
    "build_calibration",
    "build_prompt",
    "eval_records",
    "format_example",
    "load_records",
    "load_wikitext2_text",
    "resolve_data_dir",
    "synthetic_problems",
    "use_chat",
]
