"""capjax: Causal Attribution Pruning (CAP) for decoder LLMs in JAX/Flax.

model, params = capjax.load_pretrained("smollm2-135m-instruct")
tokenizer = capjax.load_tokenizer("smollm2-135m-instruct")
calib = capjax.build_calibration("synthetic", tokenizer, n=12, seq_len=128)
scores = capjax.score_heads(model, params, calib.tokens, calib.loss_mask, attention_mask=calib.attention_mask)
pruned, masks = capjax.prune(model, params, "cap", 0.2, head_scores=scores)
"""

from capjax.attribution import HeadScores, head_ablation_losses, score_heads
from capjax.cache import run_with_cache
from capjax.config import ModelConfig, UnsupportedConfigError
from capjax.data import CalibrationBatch, build_calibration, eval_records
from capjax.evaluate import evaluate, generate, perplexity, wikitext2_perplexity
from capjax.io import load_config, load_pretrained, load_tokenizer, save_pretrained
from capjax.model import Decoder, init_cache, init_params, layer_params
from capjax.pruning import prune, sparsity_report
from capjax.recovery import recover

__all__ = [
    "CalibrationBatch",
    "Decoder",
    "HeadScores",
    "ModelConfig",
    "UnsupportedConfigError",
    "build_calibration",
    "eval_records",
    "evaluate",
    "generate",
    "head_ablation_losses",
    "init_cache",
    "init_params",
    "layer_params",
    "load_config",
    "load_pretrained",
    "load_tokenizer",
    "perplexity",
    "prune",
    "recover",
    "save_pretrained",
    "run_with_cache",
    "score_heads",
    "sparsity_report",
    "wikitext2_perplexity",
]
