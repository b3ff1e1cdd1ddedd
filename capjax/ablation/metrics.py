"""Metrics read at the answer positions, per answer token, summed per example afterwards.

Legend: A answer tokens, E hidden, V vocab.

A metric maps the last layer's output at the answer positions, hidden [A, E] (before the final
norm), the targets [A] and the intact reference (only for metrics that need one) to values [A]:

    "ce"   answer cross-entropy -log p(target) (vocabulary-chunked: no [A, V] logits; today's CAP loss)
    "kl"   KL(intact || ablated) of the next-token distributions, sum_v p_int (log p_int - log p_abl);
           reference: the intact log-probs [A, V], computed once
    logits_metric(fn)   any JAX function fn(logits [A, V] float32, target [A]) -> [A]
    register_metric(...)  a metric by name, for the CLI and configs too
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from capjax.model import token_nll, unembed
from capjax.plugins import load_plugins
from capjax.registry import Registry

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Metric:
    """fn(model, params, hidden [A, E], target [A], ref) -> values [A]; needs_ref: `ref` is the intact
    log-probs [A, V] (else None)."""

    name: str
    fn: Callable[..., Array]
    needs_ref: bool = False


def _ce(model, params, hidden, target, ref):
    return token_nll(model, params, hidden, target)


def _kl(model, params, hidden, target, ref):
    logp = jax.nn.log_softmax(unembed(model, params, hidden), axis=-1)
    return jnp.sum(jnp.exp(ref) * (ref - logp), axis=-1)


CE = Metric("ce", _ce)
KL = Metric("kl", _kl, needs_ref=True)
# the registry: built-ins, then `register_metric`'s
METRICS: Registry[Metric] = Registry(
    "metric",
    on_read=load_plugins,
    unknown="unknown metric {name!r}: use one of {known}, register one (capjax.ablation.register_metric), or "
    "pass capjax.ablation.logits_metric(fn) for fn(logits [A, V], target [A]) -> [A]",
)
METRICS.register("ce", CE, builtin=True)
METRICS.register("kl", KL, builtin=True)


def register_metric(
    metric: Metric | Callable[[Array, Array], Array], name: str | None = None, replace: bool = False
) -> Metric:
    """Registers a Metric, or fn(logits [A, V], target [A]) -> [A] (`logits_metric`), under its
    name, so that `metric="name"` works everywhere a name is taken: `ablate`, `score_heads`,
    `capjax score --metric`, a config's `calibration.metric` (and so from `CAPJAX_PLUGINS`)."""
    metric = metric if isinstance(metric, Metric) else logits_metric(metric, name)
    if name is not None and metric.name != name:
        metric = dataclasses.replace(metric, name=name)
    return METRICS.register(metric.name, metric, replace=replace)


def unregister_metric(name: str) -> None:
    """Removes a registered metric (tests, or replacing a plugin's); the built-ins stay."""
    METRICS.unregister(name)


def names() -> tuple[str, ...]:
    """Registered metric names (built-ins, then yours and `CAPJAX_PLUGINS`')."""
    return METRICS.names()


def logits_metric(fn: Callable[[Array, Array], Array], name: str | None = None) -> Metric:
    """A metric from a JAX function of the answer-position logits [A, V] (float32) and targets [A]
    returning [A] (e.g. lambda z, y: (z.argmax(-1) == y).astype(jnp.float32) for accuracy)."""

    def values(model, params, hidden, target, ref):
        return fn(unembed(model, params, hidden), target)

    return Metric(str(name or getattr(fn, "__name__", "custom")), values)


def get_metric(metric: str | Metric | Callable) -> Metric:
    """A Metric from a name ("ce", "kl"), a Metric, or a function of (logits [A, V], target [A])."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        return METRICS.lookup(metric)
    if callable(metric):
        return logits_metric(metric)
    raise ValueError(f"metric must be a name, a Metric or a function, got {metric!r}")
