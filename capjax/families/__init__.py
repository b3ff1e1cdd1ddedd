"""Model families: one module each (see `capjax.families.base` for what a family declares, and
docs/adding_a_family.md for how to add one). `register_family(FAMILY)` files a family under each
of its transformers `model_types`; `family_for` looks one up."""

from __future__ import annotations

from capjax.families import gemma, llama, phi3, qwen3
from capjax.families.base import Family, Kernel, Rule, UnsupportedConfigError
from capjax.plugins import load_plugins
from capjax.registry import Registry

# transformers model_type -> Family
FAMILIES: Registry[Family] = Registry(
    "model_type",
    error=UnsupportedConfigError,
    on_read=load_plugins,
    unknown="unsupported model_type {name!r}: capjax implements {known}. Convert the checkpoint to one of these "
    "or add the family (docs/adding_a_family.md).",
)
# The params layout functions fall back to when given no config (every family shares its kernels).
DEFAULT: Family = llama.FAMILY


def register_family(family: Family, replace: bool = False) -> Family:
    """Registers `family` under each of its `model_types` (a taken type: ValueError unless `replace`)."""
    for model_type in family.model_types:
        if model_type in FAMILIES.names(read=False) and not replace:
            raise ValueError(
                f"model_type {model_type!r} is already registered (family "
                f"{FAMILIES[model_type].name}); pass replace=True to override it"
            )
    for model_type in family.model_types:
        FAMILIES.register(model_type, family, replace=True)
    return family


def unregister_family(family: Family) -> None:
    """Removes `family`'s model types (tests, or replacing a plugin's)."""
    for model_type in family.model_types:
        FAMILIES.unregister(model_type, builtins=True)


for _family in (llama.FAMILY, qwen3.FAMILY, gemma.FAMILY, phi3.FAMILY):
    register_family(_family)


def family_for(model_type: str | None) -> Family:
    """The family implementing a transformers `model_type`; refuses an unknown one by name."""
    return FAMILIES.lookup(str(model_type))


def family_of(config) -> Family:
    """The family of a ModelConfig; DEFAULT for None or an object without a model_type."""
    model_type = getattr(config, "model_type", None)
    return DEFAULT if model_type is None else family_for(model_type)


def __getattr__(name: str):
    if name == "SUPPORTED_MODEL_TYPES":  # every registered model_type, read when asked
        return FAMILIES.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT",
    "FAMILIES",
    "Family",
    "Kernel",
    "Rule",
    "SUPPORTED_MODEL_TYPES",
    "family_for",
    "family_of",
    "register_family",
    "unregister_family",
]
