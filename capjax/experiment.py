"""Experiment configs: YAML files with defaults, `key=value` overrides, validated before any compute.

A config (every key optional except `model`; see configs/*.yaml):

    model: smollm2-135m-instruct      # HF folder, .gguf, hub id
    dtype: float32                    # float32 | bfloat16
    data_dir: null                    # gsm8k/, strategyqa/, arc_challenge/, wikitext2/ (or $CAPJAX_DATA)
    out: results/NAME                 # results folder (checkpoints live there too)
    seed: 0
    mesh: null                        # e.g. {data: -1, model: 2}: shard params, split ablations (docs/scale_out.md)
    calibration: {tasks: [synthetic], n: 128, seq_len: 256, subsets: 3, aggregate: median,
                  method: ablation, chunk_size: null, chat: null}
    pruning:     {methods: [cap, wanda], sparsities: [0.1, 0.2, 0.5], nm: null, options: {cap: {kv_rule: mean}}}
    evaluation:  {tasks: [wikitext2, gsm8k], limit: null, max_new_tokens: 256, batch_size: 8,
                  ppl_seq_len: 2048, skip_missing_data: false}
                  # limit: examples per task (WikiText-2: windows), or {task: limit}
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

CALIB_TASKS = ("synthetic", "gsm8k", "strategyqa", "arc_challenge")
EVAL_TASKS = ("wikitext2", "gsm8k", "strategyqa", "arc_challenge", "arc_challenge_cot", "synthetic")
SECTIONS = ("calibration", "pruning", "evaluation")  # nested mappings; other values are replaced whole
# Pruning method names come from the registry (capjax.pruning.registry.names(), jax-free).

DEFAULTS: dict[str, Any] = {
    "model": None,
    "dtype": "float32",
    "data_dir": None,
    "out": None,
    "seed": 0,
    "mesh": None,
    "calibration": {"tasks": ["synthetic"], "n": 128, "seq_len": 256, "subsets": 3, "aggregate": "median",
                    "method": "ablation", "chunk_size": None, "chat": None},
    "pruning": {"methods": ["cap", "wanda"], "sparsities": [0.1, 0.2, 0.5], "nm": None, "options": {}},
    "evaluation": {"tasks": ["wikitext2"], "limit": None, "max_new_tokens": 256, "batch_size": 8,
                   "ppl_seq_len": 2048, "skip_missing_data": False},
}


class ConfigError(ValueError):
    """A config that would fail later: reported before any compute starts."""


def _merge(base: dict, update: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if key not in base:
            raise ConfigError(f"unknown config key {where + key!r}; known keys at this level: "
                              f"{', '.join(sorted(base))}")
        if not where and key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where + key!r} must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """['calibration.n=16', 'pruning.methods=[cap]'] -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. calibration.n=16)")
        key, value = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> dict:
    """Reads a YAML config (or none), applies overrides, fills defaults and validates."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} not found (see configs/ for examples)")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p} must hold a YAML mapping")
    cfg = _merge(DEFAULTS, raw)
    if overrides:
        cfg = _merge(cfg, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    if cfg["out"] is None:
        cfg["out"] = str(Path("results") / (Path(path).stem if path else "run"))
    validate(cfg)
    return cfg


def _check_list(values: Any, known: tuple[str, ...], what: str) -> None:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{what} must be a non-empty list, got {values!r}")
    unknown = [v for v in values if v not in known]
    if unknown:
        raise ConfigError(f"unknown {what} {unknown}; known: {', '.join(known)}")


def validate(cfg: dict) -> None:
    if not cfg["model"]:
        raise ConfigError("config needs `model` (an HF folder, .gguf file, hub id or 'smollm2-135m-instruct')")
    if cfg["mesh"] is not None and (not isinstance(cfg["mesh"], dict) or
                                    not all(isinstance(v, int) for v in cfg["mesh"].values())):
        raise ConfigError(f"mesh must map axis names to sizes (one may be -1), got {cfg['mesh']!r}")
    if cfg["dtype"] not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype must be float32 or bfloat16, got {cfg['dtype']!r}")
    c, p, e = cfg["calibration"], cfg["pruning"], cfg["evaluation"]
    _check_list(c["tasks"], CALIB_TASKS, "calibration.tasks")
    for key in ("n", "seq_len", "subsets"):
        if not isinstance(c[key], int) or c[key] < 1:
            raise ConfigError(f"calibration.{key} must be a positive integer, got {c[key]!r}")
    if c["subsets"] > c["n"]:
        raise ConfigError(f"calibration.subsets={c['subsets']} exceeds calibration.n={c['n']}")
    if c["aggregate"] not in ("median", "mean", "paired"):
        raise ConfigError(f"calibration.aggregate must be median, mean or paired, got {c['aggregate']!r}")
    if c["method"] not in ("ablation", "gradient"):
        raise ConfigError(f"calibration.method must be ablation or gradient, got {c['method']!r}")
    from capjax.pruning import registry

    methods = registry.names()
    _check_list(p["methods"], methods, "pruning.methods")
    if not isinstance(p["sparsities"], list) or not p["sparsities"]:
        raise ConfigError(f"pruning.sparsities must be a non-empty list, got {p['sparsities']!r}")
    for s in p["sparsities"]:
        if not isinstance(s, (int, float)) or not 0 <= s < 1:
            raise ConfigError(f"pruning.sparsities must lie in [0, 1), got {s!r}")
    if not isinstance(p["options"], dict) or any(k not in methods for k in p["options"]):
        raise ConfigError(f"pruning.options maps a method name to its options, got {p['options']!r}")
    if p["nm"] is not None:
        from capjax.pruning.nm import parse_nm

        try:
            parse_nm(p["nm"])
        except ValueError as err:
            raise ConfigError(f"pruning.nm: {err}") from err
    _check_list(e["tasks"], EVAL_TASKS, "evaluation.tasks")
    limits = e["limit"].items() if isinstance(e["limit"], dict) else [("", e["limit"])]
    for task, limit in limits:
        if task and task not in EVAL_TASKS:
            raise ConfigError(f"evaluation.limit names unknown task {task!r}; known: {', '.join(EVAL_TASKS)}")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"evaluation.limit must be a positive integer, null, or a mapping task -> "
                              f"limit (WikiText-2: windows), got {e['limit']!r}")
