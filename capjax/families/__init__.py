"""Model families: one module each (see `capjax.families.base` for what a family declares, and
docs/adding_a_family.md for how to add one)."""

from __future__ import annotations

from capjax.families import gemma, llama, phi3, qwen3
from capjax.families.base import Family, Kernel, Rule, UnsupportedConfigError

FAMILIES: tuple[Family, ...] = (llama.FAMILY, qwen3.FAMILY, gemma.FAMILY, phi3.FAMILY)
# The params layout functions fall back to when given no config (every family shares its kernels).
DEFAULT: Family = llama.FAMILY
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str | None) -> Family:
    """The family implementing a transformers `model_type`; refuses an unknown one by name."""
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    raise UnsupportedConfigError(
        f"unsupported model_type {model_type!r}: capjax implements {', '.join(SUPPORTED_MODEL_TYPES)}. "
        "Convert the checkpoint to one of these or add the family (docs/adding_a_family.md).")


def family_of(config) -> Family:
    """The family of a ModelConfig; DEFAULT for None or an object without a model_type."""
    model_type = getattr(config, "model_type", None)
    return DEFAULT if model_type is None else family_for(model_type)


__all__ = ["DEFAULT", "FAMILIES", "Family", "Kernel", "Rule", "SUPPORTED_MODEL_TYPES", "family_for", "family_of"]
