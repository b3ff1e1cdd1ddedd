"""scripts/quality_structured.py's scores and rows: its CAP head scores are `capjax.score_heads`'
exact ablation scores (median over subsets), which equal a plain loop over transformers' model with
each head's o_proj input zeroed; its CAP rows keep what `cap_structured` keeps (`structured_plan`).
README's and docs/structured.md's quality and speed tables are the saved runs' tables."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import numpy as np
import pytest

import capjax
from capjax.structured import target_shape
from capjax.structured.method import structured_plan
from conftest import make_hf_model, padded_tokens, torch_subset_losses

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "quality_structured.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_structured", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # about 25 s: compiles every score of the script for a tiny model
def test_script_scores_are_exact_cap_scores_and_rows_match_cap_structured(quality, tmp_path):
    folder = tmp_path / "tiny"
    hf = make_hf_model(folder, "llama", randomize_norms=True, num_hidden_layers=3, initializer_range=0.1)
    model, params = capjax.load_pretrained(folder)
    c = model.config
    tokens, am = padded_tokens(B=6, T=16)  # rows 2-5: 9 real tokens
    loss_mask = np.zeros(tokens.shape, np.float32)
    loss_mask[:, 5:] = am[:, 5:]
    cal = types.SimpleNamespace(tokens=tokens, loss_mask=loss_mask, attention_mask=am)
    size = c.intermediate_size // 4 + 1  # 4 groups (13, 13, 13, 9): keeping 24 channels splits a group
    sc = quality.compute_scores(model, params, cal, "ablation", subsets=3, mlp_group=size)

    # the scores are capjax.score_heads' (a direct call) ...
    direct = capjax.score_heads(
        model, params, tokens, loss_mask, attention_mask=am, method="ablation", subsets=3, progress=False
    )
    np.testing.assert_array_equal(sc["heads"].delta, direct.delta)
    # ... and CAP's exact score: per subset token-level loss with one head zeroed, median over the 3
    # subsets, minus the mean intact subset loss (a plain loop over transformers' model)
    ones = np.ones((c.num_layers, c.num_heads))
    baseline = torch_subset_losses(hf, tokens, loss_mask, am, 3).mean()
    want = np.zeros((c.num_layers, c.num_heads))
    for l in range(c.num_layers):
        for h in range(c.num_heads):
            mask = ones.copy()
            mask[l, h] = 0.0
            want[l, h] = np.median(torch_subset_losses(hf, tokens, loss_mask, am, 3, mask)) - baseline
    np.testing.assert_allclose(sc["heads"].delta, want, atol=5e-5)
    assert np.abs(want).max() > 1e-3  # heads matter: the comparison is not between zeros

    # the CAP rows keep what cap_structured keeps with the same head scores
    shape = target_shape(c, heads=0.5, mlp=0.5)
    plans = quality.row_plans(c, shape, sc)
    rows = (("CAP heads + Minitron channels", "activation"), ("CAP heads + CAP channel groups", "ablation"))
    for name, mlp_score in rows:
        ref = structured_plan(
            model, params, shape, sc["heads"], tokens, loss_mask, am, mlp_score=mlp_score, mlp_group=size
        )
        assert plans[name].to_json() == ref.to_json(), name
    assert plans["CAP heads + CAP channel groups"].to_json() != plans["CAP heads + Minitron channels"].to_json()


def _block(path, name: str) -> str:
    text = path.read_text()
    assert f"<!-- {name} -->" in text, f"{path.name} has no {name}"
    return text.split(f"<!-- {name} -->", 1)[1].split(f"<!-- /{name} -->", 1)[0].strip()


def test_docs_tables_are_the_saved_runs_tables(quality, capsys):
    """README's and docs/structured.md's quality table is what `quality_structured.py --table
    docs/structured_quality.json` prints from the run's JSON, and their speed table's rows are what
    bench_structured.py prints from docs/structured_speed.json (one run behind every cell; an edited
    cell or a stale JSON fails)."""
    import argparse
    import json

    root = SCRIPT.parents[1]
    saved = json.loads((root / "docs" / "structured_quality.json").read_text())
    quality.print_table(saved["rows"], argparse.Namespace(**saved["args"]))
    printed = capsys.readouterr().out.strip()
    assert len([l for l in printed.splitlines() if l.startswith("| ")]) == len(saved["rows"]) + 1  # header + rows
    spec = importlib.util.spec_from_file_location("bench_structured", root / "scripts" / "bench_structured.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    speed = bench.table_lines(json.loads((root / "docs" / "structured_speed.json").read_text()))
    for doc in (root / "README.md", root / "docs" / "structured.md"):
        assert _block(doc, "quality table") == printed, doc.name
        assert [l for l in _block(doc, "speed table").splitlines() if l.startswith("|")] == speed, doc.name
