"""What structured compression removes: the kept layers, kv heads, query heads and MLP channels.

Legend: L layers, H query heads, K kv heads, G = H // K query heads per kv head, F MLP width.
Primed letters (L', H', K', G', F') are the kept counts, the same in every kept layer so that the
result is a standard config (stacked params, one `num_attention_heads` for all layers).

    shape = target_shape(config, heads=0.25, mlp=0.25, layers=2)   # counts; refused before compute
    plan = choose(config, shape, head_scores, channel_scores, layer_scores)   # which ones
    small_config = plan.config(config)

Heads are removed uniformly per kv group: every kept kv head keeps G' of its G query heads (or,
`head_groups="kv"`, whole kv groups go: K' < K, G' = G). A kept query head h' = k' G' + g' of the
small model reads kv head k' (transformers' repeat_kv order), so the kept heads of kv group k come
in a block.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from capjax.config import ModelConfig
from capjax.families.base import UnsupportedConfigError

HEAD_GROUPS = ("auto", "query", "kv")


class PlanError(ValueError):
    """A structured target the model cannot take (one line naming the field and the fix)."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """Kept counts per layer: L' layers, K' kv heads of G' query heads each, F' MLP channels."""

    num_layers: int
    num_kv_heads: int
    group_size: int
    intermediate_size: int

    @property
    def num_heads(self) -> int:
        return self.num_kv_heads * self.group_size

    def config(self, config: ModelConfig, layer_types: tuple[str, ...] | None = None) -> ModelConfig:
        """The smaller ModelConfig (head_dim kept); layer_types: the kept layers' types (Gemma)."""
        if config.layer_types is not None and layer_types is None:
            layer_types = config.layer_types[: self.num_layers]  # counts only (num_params); `Plan` passes the kept ones
        return dataclasses.replace(
            config,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            layer_types=layer_types,
        )

    def describe(self, config: ModelConfig) -> str:
        """One line: old -> new counts and parameters."""
        small = self.config(config)
        return (
            f"layers {config.num_layers} -> {self.num_layers}, heads {config.num_heads} -> {self.num_heads} "
            f"(kv {config.num_kv_heads} -> {self.num_kv_heads}, head_dim {config.head_dim} kept), "
            f"MLP {config.intermediate_size} -> {self.intermediate_size}, "
            f"parameters {config.num_params():,} -> {small.num_params():,} "
            f"({small.num_params() / config.num_params():.1%})"
        )


def _round(x: float) -> int:
    """Nearest integer, halves up (0.5 * 3 heads -> 2 removed), not Python's round-half-even."""
    return int(np.floor(x + 0.5 + 1e-9))


def _fraction(name: str, value: float) -> float:
    value = float(value)
    if not (np.isfinite(value) and 0.0 <= value < 1.0):
        raise PlanError(f"{name}={value:g}: the fraction removed must be in [0, 1)")
    return value


def _kept_heads(config: ModelConfig, heads: float, num_heads: int | None, head_groups: str) -> tuple[int, int]:
    """(K', G') from a removed fraction or a kept count of query heads per layer."""
    K, G, H = config.num_kv_heads, config.group_size, config.num_heads
    if head_groups not in HEAD_GROUPS:
        raise PlanError(f"head_groups={head_groups!r}: use one of {', '.join(HEAD_GROUPS)}")
    if num_heads is not None:
        n = int(num_heads)
        if not 1 <= n <= H:
            raise PlanError(f"num_heads={n}: keep between 1 and {H} query heads per layer")
        if head_groups != "kv" and n % K == 0:
            return K, n // K
        if head_groups != "query" and n % G == 0:
            return n // G, G
        raise PlanError(
            f"num_heads={n} does not keep GQA groups equal: with K={K} kv heads of G={G} query heads, "
            f"keep a multiple of K (query heads per group) or of G (whole kv groups)"
        )
    f = _fraction("heads", heads)
    mode = head_groups if head_groups != "auto" else ("kv" if G == 1 else "query")
    if mode == "query" and G == 1:
        raise PlanError(
            f"heads={f:g} with head_groups='query': each kv head has one query head (G=1); "
            "use head_groups='kv' (whole kv groups)"
        )
    unit, count = (G, "G") if mode == "query" else (K, "K")
    removed = _round(f * unit)
    if f > 0 and removed == 0:
        raise PlanError(
            f"heads={f:g} removes no head: {'query heads per kv group' if mode == 'query' else 'kv groups'}"
            f" come in steps of 1/{count} = {1 / unit:.3g}; ask for at least {0.5 / unit:.3g}"
        )
    if removed >= unit:
        raise PlanError(
            f"heads={f:g} leaves a layer with no heads ({count}={unit}); ask for at most {(unit - 1) / unit:.3g}"
        )
    return (K, G - removed) if mode == "query" else (K - removed, G)


def _kept_layers(config: ModelConfig, layers: float) -> int:
    L = config.num_layers
    layers = float(layers)
    if not np.isfinite(layers) or layers < 0:
        raise PlanError(f"layers={layers:g}: give a count of layers to remove (>= 1) or a fraction in [0, 1)")
    if layers >= 1:
        if layers != int(layers):
            raise PlanError(f"layers={layers:g}: a count of layers to remove must be an integer (or a fraction < 1)")
        removed = int(layers)
    else:
        removed = _round(layers * L)
        if layers > 0 and removed == 0:
            raise PlanError(f"layers={layers:g} removes no layer of {L}; ask for at least {0.5 / L:.3g} or a count")
    if removed >= L:
        raise PlanError(f"layers={layers:g} removes all {L} layers; remove at most {L - 1}")
    return L - removed


def target_shape(
    config: ModelConfig,
    heads: float = 0.0,
    mlp: float = 0.0,
    layers: float = 0,
    num_heads: int | None = None,
    head_groups: str = "auto",
    check: bool = True,
) -> Shape:
    """The kept counts for removed fractions (heads, mlp in [0, 1)) and layers (a count >= 1 or a
    fraction); num_heads: a kept count of query heads per layer instead of `heads`. Refuses (PlanError,
    one line) what the result cannot be, and checks that the family's config can express it."""
    K2, G2 = _kept_heads(config, heads, num_heads, head_groups)
    F = config.intermediate_size
    f = _fraction("mlp", mlp)
    removed = _round(f * F)
    if f > 0 and removed == 0:
        raise PlanError(f"mlp={f:g} removes no MLP channel of {F}; ask for at least {0.5 / F:.3g}")
    if removed >= F:
        raise PlanError(f"mlp={f:g} leaves no MLP channel of {F}; ask for at most {(F - 1) / F:.3g}")
    shape = Shape(_kept_layers(config, layers), K2, G2, F - removed)
    if check:
        check_expressible(config, shape)
    return shape


def layer_params(config: ModelConfig) -> int:
    """Parameters of the L decoder layers (everything but the embeddings, LM head and final norm)."""
    return (
        config.num_params()
        - config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
        - config.hidden_size
    )


def budget_shape(config: ModelConfig, budget: float, layers: float = 0, head_groups: str = "auto") -> Shape:
    """The largest shape whose decoder layers keep at most `budget` parameters (a count, or a
    fraction < 1 of the layers' parameters; embeddings and LM head are not counted: nothing removes
    them) that removes `layers` layers, then the same fraction of heads and MLP channels."""
    total = layer_params(config)
    target = float(budget) * total if 0 < budget < 1 else float(budget)
    if not np.isfinite(target) or target <= 0:
        raise PlanError(f"budget={budget:g}: give a parameter count or a fraction in (0, 1) of the layers' {total:,}")
    _kept_layers(config, layers)  # its own refusal first
    best = None
    for f in np.arange(0.0, 1.0, 1.0 / (4 * config.intermediate_size)):  # finer than one MLP channel
        try:
            shape = target_shape(config, heads=f, mlp=f, layers=layers, head_groups=head_groups, check=False)
        except PlanError:
            continue
        if layer_params(shape.config(config)) <= target:
            best = shape
            break
    if best is None:
        raise PlanError(
            f"budget={budget:g} ({target:,.0f} layer parameters of {total:,}) is below every shape that "
            "removes heads and MLP channels alike; remove layers too, or raise the budget"
        )
    check_expressible(config, best)
    return best


def check_expressible(config: ModelConfig, shape: Shape) -> None:
    """The family's transformers config can write the smaller model and read it back unchanged."""
    from huggingface_hub.errors import StrictDataclassError  # transformers' config validation

    small = shape.config(config)
    try:
        back = ModelConfig.from_hf(small.to_hf().to_dict())
    except (UnsupportedConfigError, StrictDataclassError, ValueError) as e:
        why = str(getattr(e, "__cause__", None) or e).strip().splitlines()[-1].strip()
        raise PlanError(
            f"{config.model_type}'s config cannot express {shape.num_heads} heads, "
            f"{shape.num_kv_heads} kv heads ({why}); choose another heads fraction or num_heads"
        ) from None
    if back != small:
        diff = [f.name for f in dataclasses.fields(small) if getattr(back, f.name) != getattr(small, f.name)]
        raise PlanError(
            f"{config.model_type}'s config does not keep {', '.join(diff)} of the smaller model; "
            "keep every head, or use a family with a free head_dim"
        )


# ---------------------------------------------------------------------------- which ones
def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n highest scores (ties: lower index first), ascending."""
    return np.sort(np.argsort(-scores, kind="stable")[:n])


@dataclasses.dataclass(frozen=True)
class Plan:
    """layers [L'] kept layer indices; kv_heads [L', K'] kept kv heads of each kept layer; heads
    [L', H'] kept query heads (heads[i, k' G' + g'] lies in kv group kv_heads[i, k']); channels
    [L', F'] kept MLP channels. All ascending, indices of the original model."""

    layers: np.ndarray
    kv_heads: np.ndarray
    heads: np.ndarray
    channels: np.ndarray

    @property
    def shape(self) -> Shape:
        L2, K2 = self.kv_heads.shape
        return Shape(L2, K2, self.heads.shape[1] // max(K2, 1), self.channels.shape[1])

    def config(self, config: ModelConfig) -> ModelConfig:
        """The smaller ModelConfig; the kept layers keep their attention type (Gemma's sliding pattern)."""
        types = None if config.layer_types is None else tuple(config.layer_types[l] for l in self.layers)
        return self.shape.config(config, types)

    def validate(self, config: ModelConfig) -> None:
        """Indices in range, unique, ascending, and each kept query head in its kv group's block."""
        L, H, K, F, G = (
            config.num_layers,
            config.num_heads,
            config.num_kv_heads,
            config.intermediate_size,
            config.group_size,
        )
        L2 = len(self.layers)
        for name, a, n, rows in (
            ("layers", self.layers[None], L, 1),
            ("kv_heads", self.kv_heads, K, L2),
            ("heads", self.heads, H, L2),
            ("channels", self.channels, F, L2),
        ):
            if a.ndim != 2 or a.shape[0] != rows or a.shape[1] == 0:
                raise PlanError(f"plan.{name} has shape {list(a.shape)}: expected [{rows}, >0]")
            if a.min() < 0 or a.max() >= n or np.any(np.diff(a, axis=1) <= 0):
                raise PlanError(f"plan.{name} must hold ascending unique indices below {n}")
        K2 = self.kv_heads.shape[1]
        if self.heads.shape[1] % K2:
            raise PlanError(f"plan.heads keeps {self.heads.shape[1]} heads, not a multiple of {K2} kept kv heads")
        G2 = self.heads.shape[1] // K2
        if not np.array_equal(self.heads.reshape(L2, K2, G2) // G, np.repeat(self.kv_heads[:, :, None], G2, 2)):
            raise PlanError("plan.heads: each kept kv head's query heads must follow it in one block")

    # ------------------------------------------------------------------ masks of the same removal
    def layer_kept(self, config: ModelConfig) -> np.ndarray:
        """[L] bool, True = kept."""
        kept = np.zeros(config.num_layers, bool)
        kept[self.layers] = True
        return kept

    def head_mask(self, config: ModelConfig) -> np.ndarray:
        """[L, H] float32, 1 = kept (removed layers: ones, they are skipped whole)."""
        mask = np.ones((config.num_layers, config.num_heads), np.float32)
        mask[self.layers] = 0.0
        for i, l in enumerate(self.layers):
            mask[l, self.heads[i]] = 1.0
        return mask

    def channel_mask(self, config: ModelConfig) -> np.ndarray:
        """[L, F] float32, 1 = kept (removed layers: ones)."""
        mask = np.ones((config.num_layers, config.intermediate_size), np.float32)
        mask[self.layers] = 0.0
        for i, l in enumerate(self.layers):
            mask[l, self.channels[i]] = 1.0
        return mask

    # ------------------------------------------------------------------ files
    def to_json(self) -> str:
        return json.dumps(
            {k: np.asarray(getattr(self, k)).tolist() for k in ("layers", "kv_heads", "heads", "channels")}
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        return cls(*(np.asarray(d[k], np.int64) for k in ("layers", "kv_heads", "heads", "channels")))


def _check_scores(name: str, scores: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    if scores is None:
        return None
    a = np.asarray(scores, np.float64)
    if a.shape != shape:
        raise PlanError(f"{name} has shape {list(a.shape)}, expected {list(shape)}")
    if not np.all(np.isfinite(a)):
        raise PlanError(f"{name} has NaN or Inf entries: recompute them (float32, finite weights)")
    return a


def choose(
    config: ModelConfig, shape: Shape, head_scores: Any = None, channel_scores: Any = None, layer_scores: Any = None
) -> Plan:
    """Keeps the highest-scoring units (higher = more important; None: keep the first ones).

    head_scores [L, H] (e.g. CAP's delta): per layer, the K' kv groups of highest total score, and in
    each the G' highest heads; channel_scores [L, F]: the F' highest channels per layer;
    layer_scores [L]: the L' highest layers."""
    L, H, K, F, G = (
        config.num_layers,
        config.num_heads,
        config.num_kv_heads,
        config.intermediate_size,
        config.group_size,
    )
    hs = _check_scores("head_scores", head_scores, (L, H))
    cs = _check_scores("channel_scores", channel_scores, (L, F))
    ls = _check_scores("layer_scores", layer_scores, (L,))
    layers = _top(ls, shape.num_layers) if ls is not None else np.arange(shape.num_layers)
    kv_rows, head_rows, channel_rows = [], [], []
    for l in layers:
        s = hs[l].reshape(K, G) if hs is not None else -np.arange(H, dtype=np.float64).reshape(K, G)
        kv = _top(s.sum(axis=1), shape.num_kv_heads)
        kv_rows.append(kv)
        head_rows.append(np.concatenate([k * G + _top(s[k], shape.group_size) for k in kv]))
        channel_rows.append(
            _top(cs[l], shape.intermediate_size) if cs is not None else np.arange(shape.intermediate_size)
        )
    plan = Plan(
        np.asarray(layers, np.int64),
        np.asarray(kv_rows, np.int64),
        np.asarray(head_rows, np.int64),
        np.asarray(channel_rows, np.int64),
    )
    plan.validate(config)
    return plan
