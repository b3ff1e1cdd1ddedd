"""The lm-eval model "capjax" against the harness' own `--model hf` (HFLM, transformers) on the same
exported folder, and against capjax's `arc_loglikelihood`; offline, on local task YAMLs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import capjax  # noqa: E402
from capjax.integrations.lm_eval import CapjaxLM  # noqa: E402
from conftest import DATA_DIR, HAS_DATA, char_tokenizer, make_hf_model, needs_smollm2  # noqa: E402

TASKS = Path(__file__).parent / "fixtures" / "lm_eval_tasks"


def task_dir(tmp_path: Path, data: Path, names: list[str]) -> Path:
    """Copies of the fixture task YAMLs with ${DATA} resolved to `data`."""
    out = tmp_path / "tasks"
    out.mkdir(exist_ok=True)
    for n in names:
        (out / n).write_text((TASKS / n).read_text().replace("${DATA}", str(data)))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama + char tokenizer, pruned 50% by magnitude, exported to an HF folder."""
    src = tmp_path_factory.mktemp("tiny_src")
    make_hf_model(src, "llama", seed=5, max_position_embeddings=128, eos_token_id=1, pad_token_id=0)
    tok = char_tokenizer()
    tok.save_pretrained(src)
    model, params = capjax.load_pretrained(src)
    pruned, masks = capjax.prune(model, params, "magnitude", 0.5)
    out = capjax.save_pretrained(model, pruned, tmp_path_factory.mktemp("tiny_pruned"), tok)
    from capjax.pruning.prune import flat_masks

    np.savez(out / "masks.npz", **{k: np.asarray(v) for k, v in flat_masks(masks).items()})
    return src, out, model, params, pruned, tok


def reqs(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


LL = [("Q: 2+2\nA:", " 4"), ("abc ", "def"), ("", "hello"), ("The cat", " sat on the mat."), ("x" * 20, "yz")]


def test_requests_match_hflm(tiny):
    _, out, *_ = tiny
    ours = CapjaxLM(pretrained=str(out), batch_size=3)
    hf = HFLM(pretrained=str(out), dtype="float32", batch_size=3, device="cpu")
    a, b = ours.loglikelihood(reqs("loglikelihood", LL)), hf.loglikelihood(reqs("loglikelihood", LL))
    np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], rtol=1e-5, atol=1e-4)
    assert [g for _, g in a] == [g for _, g in b]
    texts = [("some text to score, rolling " * 12,), ("short",)]  # 336 chars > max_length 128: 3 windows
    np.testing.assert_allclose(
        ours.loglikelihood_rolling(reqs("loglikelihood_rolling", texts)),
        hf.loglikelihood_rolling(reqs("loglikelihood_rolling", texts)),
        rtol=1e-5,
        atol=1e-3,
    )
    gen = [
        ("Q: 1+1\nA:", {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}),
        ("hello", {"until": ["o"], "max_gen_toks": 8}),
    ]
    assert ours.generate_until(reqs("generate_until", gen)) == hf.generate_until(reqs("generate_until", gen))


def test_masks_and_in_memory_params_agree(tiny):
    src, out, model, params, pruned, tok = tiny
    from_npz = CapjaxLM(pretrained=str(src), masks=str(out / "masks.npz"))
    in_memory = CapjaxLM(model=model, params=pruned, tokenizer=tok)
    dense = CapjaxLM(model=model, params=params, tokenizer=tok)
    r = reqs("loglikelihood", LL[:2])
    a, b, c = (m.loglikelihood(r) for m in (from_npz, in_memory, dense))
    assert a == b
    assert [x for x, _ in a] != [x for x, _ in c]  # the masks changed the model


def test_simple_evaluate_on_a_local_task_matches_hf(tiny, tmp_path):
    _, out, model, _, pruned, tok = tiny
    rng = np.random.default_rng(0)
    rows = [
        {"q": f"{a}+{b}", "choices": [str(a + b + d) for d in (0, 1, -1, 10)], "gold": int(rng.integers(4))}
        for a, b in rng.integers(0, 50, (12, 2))
    ]
    (tmp_path / "tiny_choice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tm = TaskManager(include_path=str(task_dir(tmp_path, tmp_path, ["tiny_choice.yaml"])))
    ours = lm_eval.simple_evaluate(
        model=CapjaxLM(model=model, params=pruned, tokenizer=tok), tasks=["tiny_choice"], task_manager=tm
    )
    hf = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={out},dtype=float32",
        tasks=["tiny_choice"],
        task_manager=tm,
        batch_size=4,
        device="cpu",
    )
    for metric in ("acc,none", "acc_norm,none"):
        assert abs(ours["results"]["tiny_choice"][metric] - hf["results"]["tiny_choice"][metric]) <= 1e-6


@pytest.mark.slow  # ~13 s (the harness' CLI end to end): in `make test-slow` (CI), keeping `make test` under 15 min
def test_harness_cli_runs_the_capjax_model(tiny, tmp_path):
    """`python -m capjax.integrations.lm_eval run --model capjax --model_args pretrained=...,masks=...`:
    the harness' own CLI, in-process; its acc equals simple_evaluate with the in-memory pruned tree."""
    from capjax.integrations.lm_eval import main

    src, out, model, _, pruned, tok = tiny
    rows = [{"q": f"{a}*2", "choices": [str(2 * a), str(2 * a + 1)], "gold": 0} for a in range(6)]
    (tmp_path / "tiny_choice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = task_dir(tmp_path, tmp_path, ["tiny_choice.yaml"])
    main(
        [
            "run",
            "--model",
            "capjax",
            "--model_args",
            f"pretrained={src},masks={out / 'masks.npz'}",
            "--tasks",
            "tiny_choice",
            "--include_path",
            str(tasks),
            "--output_path",
            str(tmp_path / "res"),
        ]
    )
    written = json.loads(next((tmp_path / "res").rglob("results*.json")).read_text())["results"]["tiny_choice"]
    direct = lm_eval.simple_evaluate(
        model=CapjaxLM(model=model, params=pruned, tokenizer=tok),
        tasks=["tiny_choice"],
        task_manager=TaskManager(include_path=str(tasks)),
    )["results"]["tiny_choice"]
    assert written["acc,none"] == direct["acc,none"] and written["acc_norm,none"] == direct["acc_norm,none"]


def test_clear_errors(tiny, tmp_path):
    src, out, model, params, _, tok = tiny
    # the masks file is checked before the model loads (here: a model path that does not exist)
    with pytest.raises(FileNotFoundError, match="masks file not found"):
        CapjaxLM(pretrained=str(tmp_path / "no-model"), masks=str(tmp_path / "nope.npz"))
    np.savez(tmp_path / "bad.npz", delta=np.zeros(2))
    with pytest.raises(ValueError, match=r"lacks the mask\(s\) layers/self_attn/q_proj/kernel"):
        CapjaxLM(pretrained=str(src), masks=str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="pretrained="):
        CapjaxLM()
    lm = CapjaxLM(model=model, params=params, tokenizer=tok)
    with pytest.raises(ValueError, match="decodes greedily"):
        lm.generate_until(reqs("generate_until", [("a", {"do_sample": True, "temperature": 0.7})]))
    with pytest.raises(ValueError, match="batch_size"):
        CapjaxLM(model=model, params=params, tokenizer=tok, batch_size="many")


def test_unknown_model_args_are_refused(tiny, tmp_path, capsys):
    """`--model_args pretrained=X,mask=Y` (a typo for masks=) used to evaluate the dense model with exit 0:
    an unknown key is one error naming the known ones, before the model loads; the keys the harness
    itself adds (device, max_batch_size) are still accepted."""
    from capjax.integrations.lm_eval import main

    src, out, model, params, _, tok = tiny
    with pytest.raises(ValueError, match=r"unknown key\(s\) mask; the capjax model takes pretrained, masks"):
        CapjaxLM(pretrained=str(tmp_path / "never-loaded"), mask=str(out / "masks.npz"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the harness CLI: one line and status 2, no traceback
        main(
            [
                "run",
                "--model",
                "capjax",
                "--model_args",
                f"pretrained={src},mask={out / 'masks.npz'}",
                "--tasks",
                "tiny_choice",
                "--include_path",
                str(TASKS),
            ]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and "unknown key(s) mask" in err
    assert [line for line in err.splitlines() if "error:" in line] == [
        line for line in err.splitlines() if "unknown key(s) mask" in line
    ], err
    lm = CapjaxLM(model=model, params=params, tokenizer=tok, device="cpu", max_batch_size=4)
    assert lm.batch_size == 8


@pytest.mark.data
@pytest.mark.slow
@needs_smollm2
@pytest.mark.skipif(not HAS_DATA, reason=f"reference data not found at {DATA_DIR}")
def test_smollm2_arc_matches_hf_and_capjax(smollm2, tmp_path):
    """Real SmolLM2, 24 ARC-Challenge test questions: acc / acc_norm of the capjax model equal
    `--model hf` on the exported folder (within 1e-6) and capjax's own arc_loglikelihood."""
    from capjax.data.sources import load_records
    from capjax.evaluate import arc_loglikelihood

    model, params, tok, _ = smollm2
    limit = 24
    folder = capjax.save_pretrained(model, params, tmp_path / "smollm2", tok)
    tm = TaskManager(include_path=str(task_dir(tmp_path, DATA_DIR, ["arc_challenge_local.yaml"])))
    ours = lm_eval.simple_evaluate(
        model=CapjaxLM(model=model, params=params, tokenizer=tok, batch_size=8),
        tasks=["arc_challenge_local"],
        task_manager=tm,
        limit=limit,
    )
    hf = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},dtype=float32",
        tasks=["arc_challenge_local"],
        task_manager=tm,
        limit=limit,
        batch_size=8,
        device="cpu",
    )
    records = load_records("arc_challenge", "test", DATA_DIR)[:limit]
    own, _ = arc_loglikelihood(model, params, tok, records, batch_size=8)
    a, b = ours["results"]["arc_challenge_local"], hf["results"]["arc_challenge_local"]
    print("capjax", a, "hf", b, "own", own)
    for m in ("acc", "acc_norm"):
        assert abs(a[f"{m},none"] - b[f"{m},none"]) <= 1e-6
        assert abs(a[f"{m},none"] - own[m]) <= 1e-6


@pytest.mark.data
@pytest.mark.slow
@needs_smollm2
@pytest.mark.skipif(not HAS_DATA, reason=f"reference data not found at {DATA_DIR}")
def test_smollm2_gsm8k_generations_match_hf(smollm2, tmp_path):
    """Real SmolLM2, 4 GSM8K test questions zero-shot through generate_until (64 new tokens): the
    capjax model's greedy generations and exact_match equal `--model hf` on the exported folder."""
    model, params, tok, _ = smollm2
    folder = capjax.save_pretrained(model, params, tmp_path / "smollm2", tok)
    tm = TaskManager(include_path=str(task_dir(tmp_path, DATA_DIR, ["gsm8k_local.yaml"])))
    kw = dict(tasks=["gsm8k_local"], task_manager=tm, limit=4, log_samples=True)
    ours = lm_eval.simple_evaluate(model=CapjaxLM(model=model, params=params, tokenizer=tok, batch_size=4), **kw)
    hf = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={folder},dtype=float32", batch_size=4, device="cpu", **kw
    )
    gen = [[s["resps"] for s in r["samples"]["gsm8k_local"]] for r in (ours, hf)]
    print(gen[0])
    assert gen[0] == gen[1]
    for m in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert ours["results"]["gsm8k_local"][m] == hf["results"]["gsm8k_local"][m]


def _console_script(name: str) -> list[str]:
    """The command pip's wrapper for pyproject's [project.scripts] `name` runs (the installed wrapper
    may be main's checkout, not this tree's)."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    target = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"][name]
    module, func = target.split(":")
    return [
        sys.executable,
        "-c",
        f"import sys; sys.argv[0] = {name!r}; from {module} import {func}; sys.exit({func}())",
    ]


def _cli_args(tiny, tmp_path) -> tuple[list[str], Path]:
    src, out, *_ = tiny
    rows = [{"q": f"{a}*3", "choices": [str(3 * a), str(3 * a + 2), str(a)], "gold": a % 3} for a in range(6)]
    (tmp_path / "tiny_choice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = task_dir(tmp_path, tmp_path, ["tiny_choice.yaml"])
    return [
        "run",
        "--model",
        "capjax",
        "--model_args",
        f"pretrained={src},masks={out / 'masks.npz'}",
        "--tasks",
        "tiny_choice",
        "--include_path",
        str(tasks),
    ], tasks


_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@pytest.mark.slow  # a subprocess that imports lm-eval and torch (~18 s): in `make test-slow` (CI)
def test_capjax_lm_eval_console_script(tiny, tmp_path):
    """`capjax-lm-eval run --model capjax ...` in a subprocess writes the acc of the in-memory pruned tree."""
    _, _, model, _, pruned, tok = tiny
    args, tasks = _cli_args(tiny, tmp_path)
    r = subprocess.run(
        _console_script("capjax-lm-eval") + args + ["--output_path", str(tmp_path / "res")],
        capture_output=True,
        text=True,
        env=_ENV,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    written = json.loads(next((tmp_path / "res").rglob("results*.json")).read_text())["results"]["tiny_choice"]
    direct = lm_eval.simple_evaluate(
        model=CapjaxLM(model=model, params=pruned, tokenizer=tok),
        tasks=["tiny_choice"],
        task_manager=TaskManager(include_path=str(tasks)),
    )["results"]["tiny_choice"]
    assert (written["acc,none"], written["acc_norm,none"]) == (direct["acc,none"], direct["acc_norm,none"])


@pytest.mark.slow
def test_plain_lm_eval_cli_does_not_know_capjax(tiny, tmp_path):
    """lm-eval 0.4.13 knows only the models in its own tree: `lm_eval run --model capjax` fails, which
    is why capjax-lm-eval exists (docs/using.md)."""
    args, _ = _cli_args(tiny, tmp_path)
    plain = subprocess.run([sys.executable, "-m", "lm_eval", *args], capture_output=True, text=True, env=_ENV)
    assert plain.returncode != 0 and "no model for this name found" in plain.stderr + plain.stdout


@pytest.mark.slow  # ~22 s (five harness runs): in `make test-slow` (CI), keeping `make test` under 15 min
def test_harness_cli_errors_are_one_line(tiny, tmp_path, capsys):
    """Bad model_args through the harness' CLI (which lets exceptions through): one line, status 2."""
    from capjax.integrations.lm_eval import main
    from capjax.pruning import PRUNABLE

    src, out, *_ = tiny
    args, _ = _cli_args(tiny, tmp_path)
    with np.load(out / "masks.npz") as z:
        other = {p: z[p][:, :-1] if p == "layers/mlp/up_proj/kernel" else z[p] for p in PRUNABLE}
    np.savez(tmp_path / "other.npz", **other)
    cases = [
        (
            f"pretrained={src},masks={tmp_path / 'other.npz'}",
            "mask layers/mlp/up_proj/kernel is [2, 31, 48] but this model's kernel is [2, 32, 48]",
        ),
        (f"pretrained={src},dtype=float16", "dtype 'float16' not supported"),
        (f"masks={out / 'masks.npz'}", "model_args needs pretrained="),
        (f"pretrained={tmp_path / 'no-such-model'}", f"no such file or folder: '{tmp_path / 'no-such-model'}'"),
    ]
    for model_args, message in cases:
        with pytest.raises(SystemExit) as e:
            main([*args[:4], model_args, *args[5:]])
        err = capsys.readouterr().err
        lines = [l for l in err.strip().splitlines() if "error:" in l]
        assert e.value.code == 2 and "Traceback" not in err and len(lines) == 1, err[-3000:]
        assert lines[0].startswith("capjax-lm-eval: error: ") and message in lines[0], (message, lines[0])
