"""Task runners: WikiText-2 perplexity, GSM8K, StrategyQA, ARC-Challenge, synthetic arithmetic, the
organism's word problems (`capjax.data.organism`), and any task registered with
`capjax.data.register_task` (docs/adding_a_task.md): each `Task` says its mode, and this module runs
the mode (generation: prompts, greedy decoding, the task's `score`; loglikelihood and perplexity:
the task's `run`).

Generation tasks build prompts with `capjax.data.build_prompt` (the chat template for
instruct tokenizers, else "Question: ...\\nAnswer:") from `capjax.data.eval_records`, the
held-out splits that calibration never touches, and decode greedily with `generate`.
Prompts are tokenized as calibration does: with the tokenizer's special tokens in plain
mode, without in chat mode (the template text holds them).

Metrics per task:

    wikitext2          ppl, nll, n_tokens, n_windows, seq_len   (--limit caps windows)
    gsm8k              exact_match_strict, exact_match_flexible  (lm-eval extraction)
    strategyqa         accuracy (yes_no), n_unparsed
    arc_challenge      acc, acc_norm: multiple-choice log-likelihood as lm-eval's
                       arc_challenge (context "Question: {stem}\\nAnswer:", continuation
                       " {choice}", no chat template, no special tokens; acc_norm divides the
                       summed log-prob by len(choice text), as lm-eval does)
    arc_challenge_cot  accuracy of the letter extracted from generated CoT, n_unparsed
    synthetic,         accuracy_strict, accuracy_flexible, answer_loss (mean CE over the
    organism           reference answer tokens given the prompt, teacher-forced)

Every generation task also reports n and mean_new_tokens.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from capjax.data.task import TASKS, get_task, resolve  # TASKS: the task registry, name -> Task
from capjax.errors import NonFiniteError
from capjax.evaluate.extract import choice_letter, gsm8k_flexible, gsm8k_strict, normalize_number, yes_no
from capjax.evaluate.generate import generate
from capjax.evaluate.perplexity import continuation_logprobs, wikitext2_perplexity
from capjax.token_ids import TokenIdError

# lm-eval's gsm8k `until` list; with chat models EOS (<|im_end|>) usually ends first.
STOP: tuple[str, ...] = ("Question:", "</s>", "<|im_end|>")


def _records(task: str, limit: int | None, seed: int, data_dir: Any) -> list[dict]:
    """Evaluation records: the whole held-out split, or `limit` of them in seeded order."""
    from capjax.data import eval_records

    if get_task(task).generate is not None or limit is None:
        return eval_records(task, n=limit, seed=seed, data_dir=data_dir)
    full = eval_records(task, n=None, seed=seed, data_dir=data_dir)
    return full if limit >= len(full) else eval_records(task, n=limit, seed=seed, data_dir=data_dir)


def _prompt_ids(records: list[dict], task: str, tokenizer: Any, chat: bool | None) -> list[list[int]]:
    from capjax.data import build_prompt, use_chat

    texts = [build_prompt(r, task, tokenizer, chat) for r in records]
    return tokenizer(texts, add_special_tokens=not use_chat(tokenizer, chat))["input_ids"]


def _cut(text: str) -> str:
    """The text before the first stop string."""
    ends = [i for i in (text.find(s) for s in STOP) if i >= 0]
    return text[: min(ends)] if ends else text


def _generate_texts(
    model, params, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, progress: bool
) -> tuple[list[str], list[int]]:
    """Decoded completions (cut before any stop string) and their token counts, in input
    order. Prompts are batched longest first so batches share a length bucket."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    new = generate(
        model,
        params,
        [prompts[i] for i in order],
        max_new_tokens,
        stop=list(STOP),
        tokenizer=tokenizer,
        batch_size=batch_size,
        progress=progress,
    )
    texts: list[str] = [""] * len(prompts)
    counts: list[int] = [0] * len(prompts)
    for i, toks in zip(order, new):
        texts[i] = _cut(tokenizer.decode(toks, skip_special_tokens=False))
        counts[i] = len(toks)
    return texts, counts


def _generation_task(
    task: str,
    records,
    model,
    params,
    tokenizer,
    score: Callable[[str, dict], dict],
    max_new_tokens,
    batch_size,
    chat,
    progress,
):
    """Runs generation over records; score(text, record) -> per-example dict of floats."""
    prompts = _prompt_ids(records, task, tokenizer, chat)
    texts, counts = _generate_texts(model, params, tokenizer, prompts, max_new_tokens, batch_size, progress)
    rows = [score(t, r) for t, r in zip(texts, records)]
    # "n_*" flags are counted, the other per-example values averaged; "_*" are samples only.
    metrics: dict[str, Any] = {
        k: int(sum(row[k] for row in rows)) if k.startswith("n_") else float(np.mean([row[k] for row in rows]))
        for k in rows[0]
        if not k.startswith("_")
    }
    metrics["n"] = len(records)
    metrics["mean_new_tokens"] = float(np.mean(counts))
    samples = [
        {"id": r.get("id"), "target": r.get("answer_label", r["answer"]), "output": t, **row}
        for t, r, row in zip(texts, records, rows)
    ]
    return metrics, samples


def score_gsm8k(text: str, record: dict) -> dict:
    """gsm8k's scorer: lm-eval's strict and flexible number extraction against the answer."""
    target = normalize_number(record["answer"])
    strict, flexible = gsm8k_strict(text), gsm8k_flexible(text)
    return {
        "exact_match_strict": float(strict == target),
        "exact_match_flexible": float(flexible == target),
        "_strict": strict,
        "_flexible": flexible,
    }


def score_strategyqa(text: str, record: dict) -> dict:
    """strategyqa's scorer: the yes / no read from the text."""
    pred = yes_no(text)
    return {"accuracy": float(pred == record["answer"]), "n_unparsed": float(pred is None), "_pred": pred}


def score_arc_cot(text: str, record: dict) -> dict:
    """arc_challenge_cot's scorer: the choice letter read from the text."""
    pred = choice_letter(text, [lab for lab, _ in record["choices"]])
    return {"accuracy": float(pred == record["answer_label"]), "n_unparsed": float(pred is None), "_pred": pred}


def score_answer(text: str, record: dict) -> dict:
    """synthetic's and organism's scorer: strict and flexible number extraction."""
    target = normalize_number(record["answer"])
    strict, flexible = gsm8k_strict(text), gsm8k_flexible(text)
    return {
        "accuracy_strict": float(strict == target),
        "accuracy_flexible": float(flexible == target),
        "_strict": strict,
        "_flexible": flexible,
    }


def arc_loglikelihood(
    model, params, tokenizer, records: list[dict], batch_size: int = 8, progress: bool = False
) -> tuple[dict, list[dict]]:
    """ARC multiple choice by log-likelihood, as lm-evaluation-harness' arc_challenge.

    Each choice is scored as the sum of log p(" {text}" | "Question: {stem}\\nAnswer:");
    the continuation's tokens are those of the whole string after the context's tokens
    (lm-eval's `_encode_pair`). acc = argmax of the sums, acc_norm = argmax of the sums
    divided by len(text). Ties go to the first choice (numpy argmax, as lm-eval).
    Returns ({"acc", "acc_norm", "n"}, per-item samples).
    """
    requests, owners = [], []
    for i, r in enumerate(records):
        context = f"Question: {r['question']}\nAnswer:"
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        for label, text in r["choices"]:
            whole = tokenizer(context + " " + text, add_special_tokens=False)["input_ids"]
            requests.append((ctx, whole[len(ctx) :]))
            owners.append((i, label, text))
    scores = continuation_logprobs(model, params, requests, batch_size=batch_size, progress=progress)
    acc, acc_norm, samples = [], [], []
    start = 0
    for r in records:
        k = len(r["choices"])
        ll = np.array([s[0] for s in scores[start : start + k]])
        lengths = np.array([float(len(text)) for _, text in r["choices"]])
        labels = [lab for lab, _ in r["choices"]]
        pred, pred_norm = labels[int(np.argmax(ll))], labels[int(np.argmax(ll / lengths))]
        acc.append(float(pred == r["answer_label"]))
        acc_norm.append(float(pred_norm == r["answer_label"]))
        samples.append(
            {
                "id": r.get("id"),
                "target": r["answer_label"],
                "loglikelihoods": ll.tolist(),
                "pred": pred,
                "pred_norm": pred_norm,
            }
        )
        start += k
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)), "n": len(records)}, samples


def answer_loss(
    model,
    params,
    tokenizer,
    records: list[dict],
    task: str = "synthetic",
    chat: bool | None = None,
    batch_size: int = 8,
    progress: bool = False,
    per_example: bool = False,
):
    """Mean cross-entropy (nats per token) of the reference answers given their prompts,
    teacher-forced, with the calibration tokenization (`capjax.data.format_example`).
    With per_example, (loss, [(answer NLL, answer tokens) per record])."""
    from capjax.data import format_example, use_chat

    pairs = [format_example(r, task, tokenizer, chat) for r in records]
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=not use_chat(tokenizer, chat))["input_ids"]
    answers = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
    scores = continuation_logprobs(model, params, list(zip(prompts, answers)), batch_size=batch_size, progress=progress)
    loss = -sum(s[0] for s in scores) / sum(s[1] for s in scores)
    return (loss, [(-float(s[0]), int(s[1])) for s in scores]) if per_example else loss


def _proportion(values: Sequence[float]) -> dict:
    return {
        "kind": "proportion",
        "num": [float(v) for v in values],
        "den": [1.0] * len(values),
        "transform": "identity",
    }


def _examples(metrics: dict, samples: list[dict]) -> dict[str, dict]:
    """Per-example values of the headline metrics ({"num", "den", "transform", "kind"}, see
    capjax.stats): every number the report shows can be given an interval from these."""
    keys = [k for k in metrics if k in samples[0] and not k.startswith("n_") and k not in ("n", "mean_new_tokens")]
    return {k: _proportion([s[k] for s in samples]) for k in keys}


def arc_task(
    model, params, tokenizer, records: list[dict], batch_size: int = 8, progress: bool = False
) -> tuple[dict, list[dict], dict]:
    """arc_challenge's `run` (loglikelihood mode): `arc_loglikelihood`'s (metrics, samples) and the
    per-example acc / acc_norm."""
    metrics, samples = arc_loglikelihood(model, params, tokenizer, records, batch_size, progress)
    return (
        metrics,
        samples,
        {
            "acc": _proportion([float(s["pred"] == s["target"]) for s in samples]),
            "acc_norm": _proportion([float(s["pred_norm"] == s["target"]) for s in samples]),
        },
    )


def wikitext2_task(
    model, params, tokenizer, data_dir=None, seq_len: int = 2048, limit: int | None = None, progress: bool = False
) -> tuple[dict, dict]:
    """wikitext2's `run` (perplexity mode): metrics and the per-window values of ppl and nll."""
    metrics = wikitext2_perplexity(
        model, params, tokenizer, data_dir=data_dir, seq_len=seq_len, limit_windows=limit, progress=progress
    )
    windows = cast(list[float], metrics.pop("window_nll"))
    tokens = [float(cast(int, metrics["seq_len"]) - 1)] * len(windows)
    return metrics, {
        "ppl": {"kind": "ratio", "num": windows, "den": tokens, "transform": "exp"},
        "nll": {"kind": "ratio", "num": windows, "den": tokens, "transform": "identity"},
    }


def _evaluate_task(
    task,
    model,
    params,
    tokenizer,
    data_dir,
    limit,
    seed,
    max_new_tokens,
    batch_size,
    chat,
    seq_len,
    progress,
    results: dict,
    samples: dict,
    examples: dict,
) -> None:
    """One task of `evaluate`, by its mode: fills results[task], examples[task] (and samples[task])."""
    t = get_task(task)
    if t.mode == "perplexity":
        if t.run is None:
            raise ValueError(f"task {task!r}: a perplexity task needs run=")
        results[task], examples[task] = resolve(t.run)(
            model, params, tokenizer, data_dir=data_dir, seq_len=seq_len, limit=limit, progress=progress
        )
        return
    records = _records(task, limit, seed, data_dir)
    if not records:
        raise ValueError(f"no {task} examples to evaluate (limit={limit})")
    if t.mode == "loglikelihood":
        results[task], samples[task], examples[task] = resolve(t.run or arc_task)(
            model, params, tokenizer, records, batch_size=batch_size, progress=progress
        )
        return
    assert t.score is not None  # Task refuses a generation task without score=
    results[task], samples[task] = _generation_task(
        task, records, model, params, tokenizer, resolve(t.score), max_new_tokens, batch_size, chat, progress
    )
    examples[task] = _examples(results[task], samples[task])
    if t.answer_loss:
        results[task]["answer_loss"], pairs = answer_loss(
            model, params, tokenizer, records, task, chat, batch_size, progress, per_example=True
        )
        examples[task]["answer_loss"] = {
            "kind": "ratio",
            "num": [a for a, _ in pairs],
            "den": [float(b) for _, b in pairs],
            "transform": "identity",
        }


def evaluate(
    model,
    params,
    tokenizer,
    tasks: Sequence[str],
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    chat: bool | None = None,
    seq_len: int = 2048,
    model_name: str | None = None,
    log_samples: bool = False,
    progress: bool = True,
) -> dict:
    """Runs `tasks` (registered names, see TASKS) and returns {"settings": {...}, "results": {task: metrics},
    "examples": {task: {metric: per-example values}}} (plus "samples": {task: [per-example
    dicts]} with log_samples). "examples" holds, per headline metric, {"num": [B], "den": [B],
    "transform", "kind"}: the metric is transform(sum num / sum den) (capjax.stats gives its
    interval); WikiText-2's examples are its windows.

    `limit` caps examples per task (a seeded random subset; WikiText-2: windows of
    `seq_len`). Raises ValueError for unknown tasks or an empty evaluation, and the
    FileNotFoundError of capjax.data when benchmark files are missing.
    """
    from capjax.data import use_chat

    tasks = [t.strip() for t in tasks if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; known tasks: {', '.join(TASKS.names())}")
    if not tasks:
        raise ValueError(f"no tasks given; known tasks: {', '.join(TASKS.names())}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} leaves nothing to evaluate (use limit >= 1, or none for all)")
    results: dict[str, dict] = {}
    samples: dict[str, list] = {}
    examples: dict[str, dict] = {}
    for task in tasks:
        try:
            _evaluate_task(
                task,
                model,
                params,
                tokenizer,
                data_dir,
                limit,
                seed,
                max_new_tokens,
                batch_size,
                chat,
                seq_len,
                progress,
                results,
                samples,
                examples,
            )
        except (NonFiniteError, TokenIdError) as e:  # every metric of the task would come from NaN
            raise type(e)(f"{model_name or model.config.model_type} on {task}: {e}") from None
    out = {
        "settings": {
            "model": model_name or model.config.model_type,
            "tasks": tasks,
            "limit": limit,
            "seed": seed,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "chat": use_chat(tokenizer, chat),
            "seq_len": seq_len,
            "dtype": str(np.dtype(model.dtype)) if model.dtype is not None else None,
            "n_examples": {t: int(m.get("n", m.get("n_windows", 0))) for t, m in results.items()},
        },
        "results": results,
        "examples": examples,
    }
    if log_samples:
        out["samples"] = {t: [{k.lstrip("_"): v for k, v in s.items()} for s in rows] for t, rows in samples.items()}
    return out


def write_results(results: dict, path: str | os.PathLike) -> Path:
    """Writes the results dict as indented JSON (creating parent folders, atomically); returns the
    path. NaN / Inf are refused: they are not JSON, and a non-finite result is an error."""
    from capjax.artifacts import strict_json, write_text

    return write_text(Path(path), strict_json(results))


def format_table(results: dict) -> str:
    """A plain-text table: one row per (task, metric), with the example count."""
    rows = [("task", "metric", "value", "n", "95% interval")]
    for task, metrics in results["results"].items():
        n = metrics.get("n", metrics.get("n_windows", ""))
        for name, value in metrics.items():
            if name in ("n", "n_windows"):
                continue
            if isinstance(value, float):
                shown = f"{value:.4f}" if math.isfinite(value) else str(value)
            else:
                shown = str(value)
            iv = results.get("intervals", {}).get(task, {}).get(name) or {}
            ci = f"[{iv['low']:.4f}, {iv['high']:.4f}]" if iv.get("low") is not None else ""
            rows.append((task, name, shown, str(n), ci))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    s = results.get("settings", {})
    head = ", ".join(f"{k}={s[k]}" for k in ("model", "limit", "seed", "max_new_tokens", "chat") if k in s)
    return (head + "\n" if head else "") + "\n".join(lines)
