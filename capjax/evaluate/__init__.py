"""Evaluation: greedy generation with the KV cache, perplexity, answer extraction, task runners.

generate(model, params, prompts, max_new_tokens, ...)   -> new token ids per prompt
perplexity / wikitext2_perplexity                       -> {"ppl", "nll", "n_tokens", "n_windows"}
evaluate(model, params, tokenizer, tasks, ...)          -> {"settings", "results"}
write_results(results, path), format_table(results)
"""

from capjax.evaluate.extract import choice_letter, gsm8k_flexible, gsm8k_strict, normalize_number, yes_no
from capjax.evaluate.generate import bucket_length, generate
from capjax.evaluate.perplexity import continuation_logprobs, perplexity, token_logprobs, wikitext2_perplexity
from capjax.evaluate.tasks import TASKS, answer_loss, arc_loglikelihood, evaluate, format_table, write_results

__all__ = [
    "TASKS",
    "answer_loss",
    "arc_loglikelihood",
    "bucket_length",
    "choice_letter",
    "continuation_logprobs",
    "evaluate",
    "format_table",
    "generate",
    "gsm8k_flexible",
    "gsm8k_strict",
    "normalize_number",
    "perplexity",
    "token_logprobs",
    "wikitext2_perplexity",
    "write_results",
    "yes_no",
]
