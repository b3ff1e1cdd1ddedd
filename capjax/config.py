"""ModelConfig: the architecture capjax computes, built from (and back to) a transformers config.

Only fields that change the computation are kept. Any such field that capjax does not
implement is refused with an error naming it, so a silently wrong model is impossible.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from capjax.families import family_for
from capjax.families.base import UnsupportedConfigError, refuse

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder hyperparameters.

    Legend: L layers, H query heads, K kv heads (H % K == 0), D head dim, E hidden, F MLP width, V vocab.
    """

    model_type: str
    vocab_size: int  # V
    hidden_size: int  # E
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # K
    head_dim: int  # D
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # llama3 / linear RoPE scaling; empty for "default".
    rope_scaling: tuple[tuple[str, float], ...] = ()
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each query / key head before RoPE (Qwen3, Gemma 3)
    # Block options the Gemma families set (the defaults are Llama's block).
    hidden_act: str = "silu"  # the gated MLP's activation: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    norm_offset: float = 0.0  # RMSNorm scale is (norm_offset + w), in float32 when nonzero (Gemma: 1)
    sandwich_norms: bool = False  # norms after attention and MLP too (pre/post_feedforward_layernorm)
    query_pre_attn_scalar: float | None = None  # queries scaled by its -1/2 power instead of D^-1/2
    attn_softcap: float | None = None  # attention logits -> c tanh(logits / c)
    final_softcap: float | None = None  # LM logits -> c tanh(logits / c)
    embed_scale: bool = False  # embeddings multiplied by sqrt(E)
    # Per-layer attention types ("sliding_attention" | "full_attention"); None: every layer the
    # same, windowed by `sliding_window` when set (Mistral).
    layer_types: tuple[str, ...] | None = None
    local_rope_theta: float | None = None  # RoPE base of sliding layers (Gemma 3); None: rope_theta
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def mixed_layers(self) -> bool:
        """Whether sliding-window and global layers alternate (then layers need their index)."""
        return self.layer_types is not None and "sliding_attention" in self.layer_types

    @property
    def group_size(self) -> int:
        """G = H // K: query heads sharing one kv head (query head h uses kv head h // G)."""
        return self.num_heads // self.num_kv_heads

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def num_params(self) -> int:
        E, F, H, K, D, L, V = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.num_layers,
            self.vocab_size,
        )
        per_layer = (
            E * H * D * 2
            + E * K * D * 2
            + 3 * E * F
            + (4 if self.sandwich_norms else 2) * E
            + (2 * D if self.qk_norm else 0)
        )
        return L * per_layer + V * E * (1 if self.tie_word_embeddings else 2) + E

    # ------------------------------------------------------------------ transformers
    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Builds a ModelConfig from a transformers config (object or dict); refuses unhandled fields."""
        c = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        model_type = c.get("model_type")
        family = family_for(model_type).read_config(c)

        rope = c.get("rope_parameters") or {}
        legacy = c.get("rope_scaling") or {}
        rope = {**legacy, **rope}
        rope_theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            refuse(
                "rope_parameters.rope_type",
                rope_type,
                f"capjax implements RoPE types {', '.join(SUPPORTED_ROPE_TYPES)}",
            )
        scaling: dict[str, float] = {}
        if rope_type == "llama3":
            for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if k not in rope:
                    refuse("rope_parameters", rope, f"llama3 RoPE needs {k!r}")
                scaling[k] = float(rope[k])
        elif rope_type == "linear":
            scaling["factor"] = float(rope["factor"])
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            refuse("partial_rotary_factor", rope["partial_rotary_factor"], "only full rotary embeddings")

        E = int(c["hidden_size"])
        H = int(c["num_attention_heads"])
        head_dim = c.get("head_dim") or E // H
        fields = dict(
            model_type=model_type,
            vocab_size=int(c["vocab_size"]),
            hidden_size=E,
            intermediate_size=int(c["intermediate_size"]),
            num_layers=int(c["num_hidden_layers"]),
            num_heads=H,
            num_kv_heads=int(c.get("num_key_value_heads") or H),
            head_dim=int(head_dim),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_type=rope_type,
            rope_scaling=tuple(sorted(scaling.items())),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
            bos_token_id=c.get("bos_token_id"),
            eos_token_id=tuple(c["eos_token_id"]) if isinstance(c.get("eos_token_id"), list) else c.get("eos_token_id"),
            pad_token_id=c.get("pad_token_id"),
        )
        return cls(**{**fields, **family})  # the family's fields win (e.g. Gemma ties by default)

    def to_hf(self):
        """The equivalent transformers config object (for save_pretrained)."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        for k, v in self.rope_scaling:
            rope[k] = int(v) if k == "original_max_position_embeddings" else v
        kwargs: dict[str, Any] = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id,
            hidden_act="silu",
        )
        cfg = family_for(self.model_type).write_config(self, kwargs)
        if not getattr(cfg, "architectures", None):
            cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
        return cfg

    # ------------------------------------------------------------------ RoPE
    def inv_freq(self):
        """Inverse RoPE frequencies [D/2] (numpy float64), with llama3/linear scaling applied."""
        import numpy as np

        D = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, D, 2, dtype=np.float64) / D))
        s = dict(self.rope_scaling)
        if self.rope_type == "linear":
            inv = inv / s["factor"]
        elif self.rope_type == "llama3":
            factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
            old_len = s["original_max_position_embeddings"]
            low_wavelen, high_wavelen = old_len / lo, old_len / hi
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old_len / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = np.where(medium, smoothed, scaled)
        return inv
