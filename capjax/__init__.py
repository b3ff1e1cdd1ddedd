"""capjax: Causal Attribution Pruning (CAP) for decoder LLMs in JAX/Flax."""

from capjax.config import ModelConfig, UnsupportedConfigError
from capjax.io import load_config, load_pretrained, load_tokenizer, save_pretrained
from capjax.model import Decoder, init_cache, init_params, layer_params

__all__ = [
    "Decoder", "ModelConfig", "UnsupportedConfigError", "init_cache", "init_params", "layer_params",
    "load_config", "load_pretrained", "load_tokenizer", "save_pretrained",
]
