"""The experiment config: one typed schema for YAML files, `key=value` overrides and CLI flags.

    model: smollm2-135m-instruct      # HF folder, .gguf, hub id
    dtype: float32                    # float32 | bfloat16
    data_dir: null                    # gsm8k/, strategyqa/, arc_challenge/, wikitext2/ (or $CAPJAX_DATA)
                                      # tasks: capjax.data.task's registry (docs/adding_a_task.md)
    out: results/NAME                 # results folder (artifacts and checkpoints live there too)
    seed: 0
    mesh: null                        # e.g. {data: -1, model: 2} (docs/scale_out.md)
    calibration: {tasks: [synthetic], n: 128, seq_len: 256, subsets: 3, aggregate: median,
                  method: ablation, kind: zero, metric: ce, chunk_size: null, chat: null,
                  bootstrap: 1000}
    pruning:     {methods: [cap, wanda], sparsities: [0.1, 0.2, 0.5], nm: null, options: {cap: {kv_rule: mean}}}
    evaluation:  {tasks: [wikitext2], limit: null, max_new_tokens: 256, batch_size: 8,
                  ppl_seq_len: 2048, skip_missing_data: false, bootstrap: 1000}
    recovery:    null                 # or {steps: 100, lr: 1e-4, mode: auto, rank: 8, data: gsm8k, ...}:
                                      # fine-tune every pruned model (capjax.recovery.RecoverySettings)

Overrides merge at every depth (`evaluation.limit.wikitext2=8` changes one task's limit,
`pruning.options.cap.kv_rule=max` one option); lists are replaced whole. `validate_run_config`
checks every field, method options, the data files the tasks need and the output folder
before anything loads. This module imports no jax.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Literal, overload

import yaml

from capjax.estimators import SCORING_METHODS

DTYPES = ("float32", "bfloat16")
DEFAULT_SPARSITIES = (0.1, 0.2, 0.5)


class ConfigError(ValueError):
    """A config that would fail later: reported, naming the field, before any compute starts."""


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    tasks: tuple[str, ...] = ("synthetic",)
    n: int = 128
    seq_len: int = 256
    subsets: int = 3
    aggregate: str = "median"
    method: str = "ablation"
    kind: str = "zero"  # what replaces an ablated head's output: zero (CAP) | mean | resample
    metric: str = "ce"  # what is measured at the answer tokens: ce (CAP) | kl | a registered metric
    chunk_size: int | None = None
    chat: bool | None = None
    bootstrap: int = 1000  # resamples for each head score's interval (0: none)


@dataclasses.dataclass(frozen=True)
class PruningConfig:
    methods: tuple[str, ...] = ("cap", "wanda")
    sparsities: tuple[float, ...] | None = None  # None: DEFAULT_SPARSITIES, or N/M with nm
    nm: str | None = None  # "2:4"
    options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def targets(self) -> tuple[float, ...]:
        """The sparsities the runs aim at: N:M fixes it to N / M."""
        if self.nm is not None:
            n, m = (int(x) for x in self.nm.split(":"))
            return (n / m,)
        return self.sparsities if self.sparsities is not None else DEFAULT_SPARSITIES


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    tasks: tuple[str, ...] = ("wikitext2",)
    limit: int | dict[str, int | None] | None = None  # examples per task (WikiText-2: windows)
    max_new_tokens: int = 256
    batch_size: int = 8
    ppl_seq_len: int = 2048
    skip_missing_data: bool = False
    bootstrap: int = 1000  # resamples for perplexity / loss intervals and paired tests

    def limit_for(self, task: str) -> int | None:
        return self.limit.get(task) if isinstance(self.limit, dict) else self.limit


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: str
    dtype: str = "float32"
    data_dir: str | None = None
    out: str | None = None
    seed: int = 0
    mesh: dict[str, int] | None = None
    calibration: CalibrationConfig = CalibrationConfig()
    pruning: PruningConfig = PruningConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    recovery: Any = None  # capjax.recovery.RecoverySettings, or None: no recovery step

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


SECTIONS = {"calibration": CalibrationConfig, "pruning": PruningConfig, "evaluation": EvaluationConfig}


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def defaults() -> dict[str, Any]:
    """The schema's defaults as a plain mapping (model: None)."""
    d = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    d["model"] = None
    for name, cls in SECTIONS.items():
        d[name] = _plain(dataclasses.asdict(cls()))
    return d


# ---------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """YAML 1.1 without base-60 integers, so `nm: 2:4` stays the string "2:4" (not 124)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def yaml_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_overrides(overrides: list[str]) -> dict:
    """['calibration.n=16', 'evaluation.limit.wikitext2=8'] -> nested dict (values read as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. calibration.n=16)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment")
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
            node = child
        try:
            node[parts[-1]] = yaml_value(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e.__class__.__name__})") from e
    return tree


# ---------------------------------------------------------------------------- merging
def _merge(base: Any, update: Any, where: str) -> Any:
    """update merged into base at every mapping depth; lists and scalars are replaced whole."""
    if not isinstance(update, dict):
        if isinstance(base, dict) and where.rstrip(".") in {*SECTIONS, "pruning.options"}:
            raise ConfigError(f"config key {where.rstrip('.')!r} must be a mapping, got {update!r}")
        return copy.deepcopy(update)
    if where.rstrip(".") in _PER_TASK and not isinstance(base, dict):
        # a scalar is every task's value; a per-task update keeps the others
        base = {t: base for t in eval_task_names()}
    if not isinstance(base, dict):
        if _is_open(where.rstrip(".")) or base is None:
            base = {}
        else:
            raise ConfigError(f"config key {where.rstrip('.')!r} is not a mapping; got a mapping {update!r}")
    out = copy.deepcopy(base)
    for key, value in update.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {where}{key!r} must be a string")
        if not _is_open(where.rstrip(".")) and key not in base:
            raise ConfigError(
                f"unknown config key {where + key!r}; known keys at this level: {', '.join(sorted(base))}"
            )
        out[key] = _merge(base.get(key), value, f"{where}{key}.")
    return out


# mappings whose keys are the user's (open), not the schema's
_OPEN_MAPPINGS = {"mesh", "evaluation.limit", "pruning.options", "recovery"}
# fields that take one value for every task or a {task: value} mapping
_PER_TASK = {"evaluation.limit"}


def _is_open(where: str) -> bool:
    return where in _OPEN_MAPPINGS or where.startswith("pruning.options.")


def load_run_config(
    path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None, check_files: bool = True
) -> RunConfig:
    """Reads a YAML config (or none), merges overrides at every depth, fills defaults, validates.
    With check_files, also checks the data files the tasks need and that `out` is writable."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found (see configs/ for examples)")
        try:
            raw = yaml.load(p.read_text(), Loader=_Loader) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{p} must hold a YAML mapping")
    merged = _merge(defaults(), raw, "")
    if isinstance(overrides, dict):
        merged = _merge(merged, overrides, "")
    else:  # one at a time, in order: `evaluation.limit=3 evaluation.limit.synthetic=5` means both
        for item in overrides or []:
            merged = _merge(merged, parse_overrides([item]), "")
    if merged["out"] is None:
        merged["out"] = str(Path("results") / (Path(path).stem if path else "run"))
    cfg = build(merged)
    validate_run_config(cfg, check_files=check_files)
    return cfg


# ---------------------------------------------------------------------------- typing
@overload
def _int(v: Any, where: str, low: int | None = 1, none: Literal[False] = False) -> int: ...
@overload
def _int(v: Any, where: str, low: int | None = 1, *, none: bool) -> int | None: ...
def _int(v: Any, where: str, low: int | None = 1, none: bool = False) -> int | None:
    if v is None and none:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{where} must be an integer{' or null' if none else ''}, got {v!r}")
    if low is not None and v < low:
        raise ConfigError(f"{where} must be >= {low}, got {v!r}")
    return v


@overload
def _bool(v: Any, where: str, none: Literal[False] = False) -> bool: ...
@overload
def _bool(v: Any, where: str, *, none: bool) -> bool | None: ...
def _bool(v: Any, where: str, none: bool = False) -> bool | None:
    if v is None and none:
        return None
    if not isinstance(v, bool):
        raise ConfigError(f"{where} must be true or false{' (or null: automatic)' if none else ''}, got {v!r}")
    return v


def _choice(v: Any, known: tuple[str, ...], where: str) -> str:
    if v not in known:
        raise ConfigError(f"{where} must be one of {', '.join(known)}, got {v!r}")
    return v


def _names(v: Any, known: tuple[str, ...], where: str) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v:
        raise ConfigError(f"{where} must be a non-empty list, got {v!r}")
    unknown = [x for x in v if x not in known]
    if unknown:
        raise ConfigError(f"unknown {where} {unknown}; known: {', '.join(known)}")
    dup = sorted({x for x in v if v.count(x) > 1})
    if dup:
        raise ConfigError(f"{where} lists {', '.join(dup)} more than once")
    return tuple(v)


def parse_nm_text(v: Any, where: str = "pruning.nm") -> str | None:
    """ "2:4", [2, 4] or (2, 4) -> "2:4" (N kept... N zeros of every M, as capjax.pruning.nm)."""
    if v is None:
        return None
    if isinstance(v, (list, tuple)) and len(v) == 2:
        n, m = v
    elif isinstance(v, str) and re.fullmatch(r"\s*\d+\s*:\s*\d+\s*", v):
        n, m = (int(x) for x in v.split(":"))
    else:
        hint = " (an unquoted 2:4 in plain YAML 1.1 is the base-60 number 124: quote it)" if isinstance(v, int) else ""
        raise ConfigError(f"{where} must be 'N:M' such as '2:4' or a pair [2, 4], got {v!r}{hint}")
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int) or not 0 < n < m:
        raise ConfigError(f"{where}: need 0 < N < M, got {n}:{m}")
    return f"{n}:{m}"


def build(d: dict) -> RunConfig:
    """A typed RunConfig from a merged mapping; every field's type and range checked by name."""
    c, p, e = d["calibration"], d["pruning"], d["evaluation"]
    if not d["model"] or not isinstance(d["model"], (str, os.PathLike)):
        raise ConfigError("config needs `model` (an HF folder, .gguf file, hub id or 'smollm2-135m-instruct')")
    mesh = d["mesh"]
    if mesh is not None and (
        not isinstance(mesh, dict)
        or not mesh
        or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and (v >= 1 or v == -1)
            for k, v in mesh.items()
        )
    ):
        raise ConfigError(f"mesh must map axis names to sizes (one may be -1), got {mesh!r}")
    for key in ("data_dir", "out"):
        if d[key] is not None and not isinstance(d[key], (str, os.PathLike)):
            raise ConfigError(f"{key} must be a path, got {d[key]!r}")
    calib = CalibrationConfig(
        tasks=_names(c["tasks"], calibration_task_names(), "calibration.tasks"),
        n=_int(c["n"], "calibration.n"),
        seq_len=_int(c["seq_len"], "calibration.seq_len", 2),
        subsets=_int(c["subsets"], "calibration.subsets"),
        aggregate=_choice(c["aggregate"], _aggregates(c["method"]), "calibration.aggregate"),
        method=_choice(c["method"], SCORING_METHODS, "calibration.method"),
        kind=_choice(c["kind"], ablation_kind_names(), "calibration.kind"),
        metric=_choice(c["metric"], score_metric_names(), "calibration.metric"),
        chunk_size=_int(c["chunk_size"], "calibration.chunk_size", none=True),
        chat=_bool(c["chat"], "calibration.chat", none=True),
        bootstrap=_int(c["bootstrap"], "calibration.bootstrap", 0),
    )
    if calib.subsets > calib.n:
        raise ConfigError(f"calibration.subsets={calib.subsets} exceeds calibration.n={calib.n}")
    if calib.method == "gradient":
        from capjax.attribution import check_method_metric

        try:
            check_method_metric(calib.method, calib.metric)
        except ValueError as err:
            raise ConfigError(f"calibration: {err}") from None
    nm = parse_nm_text(p["nm"])
    sparsities = p["sparsities"]
    if sparsities is not None:
        if isinstance(sparsities, (int, float)) and not isinstance(sparsities, bool):
            sparsities = [sparsities]
        if not isinstance(sparsities, list) or not sparsities:
            raise ConfigError(f"pruning.sparsities must be a non-empty list, got {sparsities!r}")
        for s in sparsities:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
                raise ConfigError(f"pruning.sparsities must lie in [0, 1), got {s!r}")
        if len(set(map(float, sparsities))) != len(sparsities):
            raise ConfigError(f"pruning.sparsities lists a value more than once: {sparsities}")
        sparsities = tuple(float(s) for s in sparsities)
        if nm is not None:
            n, m = (int(x) for x in nm.split(":"))
            if sparsities != (n / m,):
                raise ConfigError(
                    f"pruning.nm={nm} fixes the sparsity at {n / m:.2f}; set pruning.sparsities=null "
                    f"(got {list(sparsities)}) or pruning.nm=null"
                )
    options = p["options"] if p["options"] is not None else {}
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise ConfigError(
            f"pruning.options maps a method name to its options, e.g. {{cap: {{kv_rule: max}}}}, got {options!r}"
        )
    prune = PruningConfig(
        methods=_names(p["methods"], prune_method_names(), "pruning.methods"),
        sparsities=sparsities,
        nm=nm,
        options=copy.deepcopy(options),
    )
    limit = e["limit"]
    if isinstance(limit, dict):
        unknown = [t for t in limit if t not in eval_task_names()]
        if unknown:
            raise ConfigError(
                f"evaluation.limit names unknown task(s) {unknown}; known: {', '.join(eval_task_names())}"
            )
        limit = {t: _int(v, f"evaluation.limit.{t}", none=True) for t, v in limit.items()}
    else:
        limit = _int(limit, "evaluation.limit", none=True)
    ev = EvaluationConfig(
        tasks=_names(e["tasks"], eval_task_names(), "evaluation.tasks"),
        limit=limit,
        max_new_tokens=_int(e["max_new_tokens"], "evaluation.max_new_tokens"),
        batch_size=_int(e["batch_size"], "evaluation.batch_size"),
        ppl_seq_len=_int(e["ppl_seq_len"], "evaluation.ppl_seq_len", 2),
        skip_missing_data=_bool(e["skip_missing_data"], "evaluation.skip_missing_data"),
        bootstrap=_int(e["bootstrap"], "evaluation.bootstrap", 0),
    )
    recovery = None
    if d["recovery"] is not None:
        from capjax.recovery.settings import RecoverySettings

        if not isinstance(d["recovery"], dict):
            raise ConfigError(f"recovery must be a mapping (e.g. {{steps: 100}}) or null, got {d['recovery']!r}")
        try:
            recovery = RecoverySettings.from_dict(d["recovery"])
        except (ValueError, TypeError) as err:
            msg = str(err)
            raise ConfigError(msg if msg.startswith("recovery") else f"recovery: {msg}") from err
    return RunConfig(
        model=str(d["model"]),
        dtype=_choice(d["dtype"], DTYPES, "dtype"),
        data_dir=None if d["data_dir"] is None else str(d["data_dir"]),
        out=None if d["out"] is None else str(d["out"]),
        seed=_int(d["seed"], "seed", 0),
        mesh=mesh,
        calibration=calib,
        pruning=prune,
        evaluation=ev,
        recovery=recovery,
    )


# ---------------------------------------------------------------------------- checks beyond types
def _aggregates(method: Any) -> tuple[str, ...]:
    """Exact ablation takes any registered estimator (capjax.estimators); gradient scores have
    no per-example losses, so only the per-subset aggregates."""
    from capjax import estimators

    if method == "gradient":
        return estimators.SUBSET_AGGREGATES
    return tuple(estimators.names())


def eval_task_names() -> tuple[str, ...]:
    """The registered evaluation tasks (capjax.data.task: built-ins and plugins)."""
    from capjax.data.task import task_names

    return task_names()


def calibration_task_names() -> tuple[str, ...]:
    """The registered tasks calibration can draw from (those with a calib_split)."""
    from capjax.data.task import calibration_task_names as names

    return names()


def __getattr__(name: str):
    # CALIB_TASKS / EVAL_TASKS: the registries' names, read when asked (plugins' tasks included)
    if name == "CALIB_TASKS":
        return calibration_task_names()
    if name == "EVAL_TASKS":
        return eval_task_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ablation_kind_names() -> tuple[str, ...]:
    """The registered ablation kinds (capjax.ablation.kinds: built-ins and plugins)."""
    from capjax.ablation.kinds import names

    return names()


def score_metric_names() -> tuple[str, ...]:
    """The registered ablation metrics (capjax.ablation.metrics: built-ins and plugins)."""
    from capjax.ablation.metrics import names

    return names()


def prune_method_names() -> tuple[str, ...]:
    """The registered pruning methods (capjax.pruning.registry: built-ins and plugins)."""
    from capjax.pruning import registry

    return tuple(registry.names())


def method_options(cfg: RunConfig, method: str) -> dict[str, Any]:
    """The options a method runs with: its defaults, the config's pruning.options, and the run seed
    for a method with a `seed` option, e.g. random (a ConfigError naming the option when one is wrong)."""
    from capjax.pruning.prune import check_options
    from capjax.pruning.registry import with_run_seed

    try:
        return check_options(method, with_run_seed(method, cfg.pruning.options.get(method, {}), cfg.seed))
    except ValueError as err:
        raise ConfigError(f"pruning.options.{method}: {err}") from err


def data_files(cfg: RunConfig) -> dict[str, str]:
    """{what: file relative to the data folder} for every data file the config's tasks read."""
    from capjax.data.task import TASKS

    need: dict[str, str] = {}
    for t in cfg.calibration.tasks:
        if (file := TASKS[t].file(TASKS[t].calib_split)) is not None:
            need[f"calibration.tasks {t}"] = file
    data = cfg.recovery.data if cfg.recovery is not None else None
    if data is not None and data in TASKS and (file := TASKS[data].file(TASKS[data].calib_split)) is not None:
        need[f"recovery.data {data}"] = file
    for t in cfg.evaluation.tasks:
        if (file := eval_data_file(t)) is not None:
            need[f"evaluation.tasks {t}"] = file
    return need


def eval_data_file(task: str) -> str | None:
    """The file (relative to the data folder) that evaluating `task` reads; None: no file (synthetic)."""
    from capjax.data.task import get_task

    t = get_task(task)
    return t.file(t.eval_split)


def missing_eval_tasks(cfg: RunConfig) -> list[str]:
    """Evaluation tasks whose data file is absent (dropped when skip_missing_data is set)."""
    from capjax.data.sources import resolve_data_dir

    root = resolve_data_dir(cfg.data_dir)
    files = data_files(cfg)
    return [
        t
        for t in cfg.evaluation.tasks
        if f"evaluation.tasks {t}" in files and (root is None or not (root / files[f"evaluation.tasks {t}"]).is_file())
    ]


def validate_run_config(cfg: RunConfig, check_files: bool = True) -> None:
    """Cross-field checks: method options, and (check_files) data files and the output folder."""
    for method in cfg.pruning.methods:
        method_options(cfg, method)
    unknown = sorted(set(cfg.pruning.options) - set(prune_method_names()))
    if unknown:
        raise ConfigError(
            f"pruning.options names unknown method(s) {unknown}; known: {', '.join(prune_method_names())}"
        )
    if not check_files:
        return
    from capjax.data.sources import resolve_data_dir

    root = resolve_data_dir(cfg.data_dir)
    skipped = set(missing_eval_tasks(cfg)) if cfg.evaluation.skip_missing_data else set()
    if cfg.evaluation.skip_missing_data and not set(cfg.evaluation.tasks) - skipped:
        raise ConfigError(
            f"every evaluation task needs data that is missing ({', '.join(cfg.evaluation.tasks)}): "
            "set data_dir (or CAPJAX_DATA) or add evaluation.tasks=[synthetic]"
        )
    for what, rel in data_files(cfg).items():
        if what.startswith("evaluation") and what.split()[1] in skipped:
            continue
        if root is None or not (root / rel).is_file():
            where = (
                f"data_dir={root}" if root is not None else "no data folder (data_dir, $CAPJAX_DATA, ../shared/data)"
            )
            raise ConfigError(
                f"{what} needs {rel}, which is missing ({where}); set data_dir=DIR"
                + (" or evaluation.skip_missing_data=true" if what.startswith("evaluation") else "")
            )
    if cfg.recovery is not None:
        from capjax.recovery.settings import check_data_file

        try:
            check_data_file(cfg.recovery)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    if cfg.out is not None:  # load_run_config always sets it; Experiment refuses a RunConfig without
        check_writable_dir(Path(cfg.out), "out")


def check_writable_dir(path: Path, field: str) -> None:
    """Creates `path` (a folder) if needed and proves it writable, or a ConfigError naming `field`."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field}={path} is a file, not a folder: choose another {field}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".capjax-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{field}={path} is not a writable folder ({e.strerror or e}): choose another {field}") from e
