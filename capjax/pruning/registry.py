"""The registry of pruning methods: one place that says what each method is and what it needs.

The CLI's `--method` choices, the config validation and the runner read it (as jaxpruner's
`ALGORITHM_REGISTRY` / `register_algorithm`), so a method in a user's own file, registered with
one call, runs through `capjax prune` and `capjax run` with no edit to capjax:

    from capjax.pruning.registry import register_method

    def smallest_rows(job):          # job: capjax.pruning.methods.Job
        ...                          # -> (new kernels, keep masks), both keyed by PRUNABLE path
        return job.kernels, masks

    register_method("smallest_rows", smallest_rows, options={"seed": 0})

This module imports no jax: built-in methods are lazy "module:function" entries, imported only
when a method runs, so building the CLI parser and validating a config stay fast.

Plugins: `CAPJAX_PLUGINS` (comma-separated module names or .py paths) and installed packages'
`capjax.plugins` entry points are imported the first time the registry is read (`capjax.plugins`),
so a shell `capjax prune --method mine` can see a user's method.

A method that changes the kept weights (as SparseGPT's updates do) registers with
`produces="masks+weights"`; `capjax run` then saves its new weights beside its masks and reuses both.
The registry is a `capjax.registry.Registry`, the shape every extension point shares.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from capjax.plugins import PluginError, load_plugins
from capjax.registry import Registry

# What a method's result holds, which the runner saves and reuses: "masks" (the kept weights are the
# model's own) or "masks+weights" (the method also changed the kept weights, e.g. SparseGPT's updates).
PRODUCES = ("masks", "masks+weights")


class UnknownMethodError(ValueError):
    """A pruning method name that is not registered; the message lists the registered ones."""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registered pruning method.

    target: the function Job -> (new kernels, keep masks: True = kept), or "module:function"
    (imported on use).
    options: the method's options and their defaults (`capjax.prune(..., **options)`, config
    `pruning.options.<name>`); choices: allowed values per option.
    needs_scores: reads head scores (`Job.importance` [L, H], `Job.delta` [L, H]).
    needs_calib: reads calibration sequences (`Job.tokens`, `Job.attention_mask` [B, T]).
    sequential: walks the layers in order on the pruned model's activations (informational: the
    function itself drives the pass, e.g. with `capjax.pruning.methods.sequential_pass`).
    produces: "masks" (the kept weights stay the model's) or "masks+weights" (the method changes the
    kept weights too): `capjax run` saves and reuses the weights of a "masks+weights" method.
    plan: fn(model config, sparsity, options) -> str, what a run will remove, said (and a target the
    model cannot take refused) before any compute; summary: fn(model config, masks) -> str, said after
    the method ran. Both optional, callables or "module:function".
    """

    name: str
    target: Callable[..., Any] | str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    choices: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    needs_scores: bool = False
    needs_calib: bool = False
    sequential: bool = False
    description: str = ""
    produces: str = "masks"
    plan: Callable[..., str] | str | None = None
    summary: Callable[..., str] | str | None = None

    @property
    def fn(self) -> Callable[..., Any]:
        """The method's function (imports "module:function" targets on first use)."""
        return _resolve(self.target)

    def planned(self, config: Any, sparsity: float, options: dict[str, Any]) -> str | None:
        """The `plan` hook's line for one run (None without a hook)."""
        return None if self.plan is None else _resolve(self.plan)(config, sparsity, options)

    def summarize(self, config: Any, masks: Any) -> str | None:
        """The `summary` hook's line for one pruned model (None without a hook)."""
        return None if self.summary is None else _resolve(self.summary)(config, masks)

    @property
    def changes_weights(self) -> bool:
        """Whether the method's result holds new kept weights (saved and reused with its masks)."""
        return self.produces == "masks+weights"

    @property
    def needs_calibration_data(self) -> bool:
        """Whether a run of this method depends on the calibration set (its own or its scores')."""
        return self.needs_calib or self.needs_scores


def _resolve(target: Callable[..., Any] | str) -> Callable[..., Any]:
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


_REGISTRY: Registry[MethodSpec] = Registry(
    "pruning method",
    error=UnknownMethodError,
    on_read=load_plugins,
    unknown="unknown pruning method {name!r}; known methods: {known} "
    "(register your own with capjax.pruning.registry.register_method)",
)


def register_method(
    name: str,
    fn: Callable[..., Any] | str,
    *,
    options: dict[str, Any] | None = None,
    choices: dict[str, tuple[Any, ...]] | None = None,
    needs_scores: bool = False,
    needs_calib: bool = False,
    sequential: bool = False,
    description: str = "",
    produces: str = "masks",
    plan: Callable[..., str] | str | None = None,
    summary: Callable[..., str] | str | None = None,
    replace: bool = False,
    _builtin: bool = False,
) -> MethodSpec:
    """Registers a pruning method under `name` (see `MethodSpec` for the fields); returns its spec.

    Registering a taken name raises ValueError unless `replace=True`.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"pruning method name must be an identifier-like string, got {name!r}")
    if name in _REGISTRY.names(read=False) and not replace:
        raise ValueError(f"pruning method {name!r} is already registered; pass replace=True to override it")
    if not (callable(fn) or (isinstance(fn, str) and ":" in fn)):
        raise ValueError(f"method {name!r}: fn must be a callable or 'module:function', got {fn!r}")
    if produces not in PRODUCES:
        raise ValueError(f"method {name!r}: produces must be one of {', '.join(PRODUCES)}, got {produces!r}")
    options = dict(options or {})
    choices = {k: tuple(v) for k, v in (choices or {}).items()}
    bad = [k for k in choices if k not in options]
    if bad:
        raise ValueError(f"method {name!r}: choices for {bad} have no default in options")
    spec = MethodSpec(
        name, fn, options, choices, needs_scores, needs_calib, sequential, description, produces, plan, summary
    )
    return _REGISTRY.register(name, spec, replace=True, builtin=_builtin)


# A live read-only view of the registry: name -> MethodSpec (plugins loaded on first read).
METHODS: Mapping[str, MethodSpec] = _REGISTRY


def unregister_method(name: str) -> None:
    """Removes a registered method (tests, or replacing a plugin)."""
    _REGISTRY.unregister(name, builtins=True)


def names() -> tuple[str, ...]:
    """Registered method names, built-ins first, then in registration order."""
    return _REGISTRY.names()


def spec(name: str) -> MethodSpec:
    """The spec of `name`; an unknown name raises UnknownMethodError listing the registered ones."""
    return _REGISTRY.lookup(name)


def with_run_seed(name: str, options: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """`options`, with `seed` set to the run's seed when method `name` has a `seed` option and
    `options` gives none (random pruning, and a registered method with a seed alike)."""
    out = dict(options)
    if "seed" in spec(name).options:
        out.setdefault("seed", seed)
    return out


def needing_scores() -> tuple[str, ...]:
    """Names of the methods that read head scores."""
    return tuple(n for n in names() if _REGISTRY[n].needs_scores)


def needing_calibration() -> tuple[str, ...]:
    """Names of the methods whose result depends on the calibration set (own use or via scores)."""
    return tuple(n for n in names() if _REGISTRY[n].needs_calibration_data)


# ---------------------------------------------------------------------------- built-ins
_M = "capjax.pruning.methods:"
_SEQ = {"batch_size": 8}
register_method(
    "cap",
    _M + "cap",
    options={"kv_rule": "mean", "scope": "global"},
    choices={"kv_rule": ("mean", "max"), "scope": ("global", "layer")},
    needs_scores=True,
    description="|W| x head importance of its region, global threshold",
    _builtin=True,
)
register_method(
    "cap_wanda",
    _M + "cap_wanda",
    options={"kv_rule": "mean", **_SEQ},
    choices={"kv_rule": ("mean", "max")},
    needs_scores=True,
    needs_calib=True,
    sequential=True,
    description="Wanda's score x head importance",
    _builtin=True,
)
register_method(
    "cap_heads",
    _M + "cap_heads",
    needs_scores=True,
    summary=_M + "heads_removed",
    description="structured: whole heads, lowest delta first",
    _builtin=True,
)
register_method(
    "wanda",
    _M + "wanda",
    options=dict(_SEQ),
    needs_calib=True,
    sequential=True,
    description="|W| x ||X_j||, per output row",
    _builtin=True,
)
register_method(
    "sparsegpt",
    _M + "sparsegpt",
    options={"blocksize": 128, "percdamp": 0.01, **_SEQ},
    needs_calib=True,
    sequential=True,
    produces="masks+weights",
    description="SparseGPT OBS updates",
    _builtin=True,
)
register_method(
    "magnitude",
    _M + "magnitude",
    options={"scope": "matrix"},
    choices={"scope": ("matrix", "global")},
    description="|W|",
    _builtin=True,
)
register_method("random", _M + "random", options={"seed": 0}, description="uniform random scores", _builtin=True)
register_method(
    "cap_structured",
    "capjax.structured.method:cap_structured",
    options={
        "heads": 0.0,
        "mlp": 0.0,
        "layers": 0,
        "head_groups": "auto",
        "mlp_score": "activation",
        "layer_score": "ablation",
        "batch_size": 8,
        "mlp_group": 64,
    },
    choices={
        "head_groups": ("auto", "query", "kv"),
        "mlp_score": ("gradient", "taylor", "activation", "ablation"),
        "layer_score": ("ablation", "influence"),
    },
    needs_scores=True,
    needs_calib=True,
    plan="capjax.structured.method:describe_shape",
    description="structured: heads, MLP channels, layers removed (a smaller model via capjax prune)",
    _builtin=True,
)

__all__ = [
    "METHODS",
    "PRODUCES",
    "MethodSpec",
    "PluginError",
    "UnknownMethodError",
    "names",
    "needing_calibration",
    "needing_scores",
    "register_method",
    "spec",
    "unregister_method",
]
