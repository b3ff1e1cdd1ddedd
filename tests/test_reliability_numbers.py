"""No number without a computation behind it (issue 25): NaN never becomes an accuracy, significance
needs resamples, names and fingerprints say exactly what produced a result, and scores or masks
of another model are refused. Tiny random models only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import capjax
from capjax.cli import main
from conftest import char_tokenizer, make_hf_model


@pytest.fixture(scope="module")
def tiny_char(tmp_path_factory):
    """A tiny random Llama (vocab 101) with the character tokenizer, saved as an HF folder."""
    folder = tmp_path_factory.mktemp("tiny_char")
    make_hf_model(folder, "llama", seed=3, max_position_embeddings=256, eos_token_id=1, pad_token_id=0)
    char_tokenizer().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------- distinct sparsities
def _row(name: str, sparsity: float, per_layer: list[float]) -> dict:
    ex = {"kind": "proportion", "num": [1.0, 0.0, 1.0], "den": [1.0] * 3, "transform": "identity"}
    ev = {"synthetic": {"metrics": {"accuracy_flexible": 2 / 3}, "examples": {"accuracy_flexible": ex},
                        "fingerprint": name, "status": "computed"}}
    return {"name": name, "method": name.split("_")[0], "calib": None, "sparsity": sparsity, "nm": None,
            "achieved_sparsity": sparsity, "per_layer_sparsity": per_layer, "eval": ev}


def test_close_sparsities_get_distinct_names_and_figures(tmp_path):
    """sparsities [0.1, 0.104] used to give two runs named magnitude_s0.10 and one per-layer figure
    (the second overwrote the first)."""
    from capjax.experiment.config import PruningConfig, RunConfig
    from capjax.experiment.outputs import write_outputs
    from capjax.experiment.runner import plan_runs
    from capjax.provenance import environment

    cfg = RunConfig(model="m", out=str(tmp_path), pruning=PruningConfig(methods=("magnitude",),
                                                                        sparsities=(0.1, 0.104, 0.5)))
    names = [r["name"] for r in plan_runs(cfg)]
    assert names == ["magnitude_s0.10", "magnitude_s0.104", "magnitude_s0.50"]  # 2 decimals where they are exact
    rows = [_row("dense", 0.0, [])] + [_row(n, s, [s, s]) for n, s in zip(names, (0.1, 0.104, 0.5))]
    (tmp_path / "figures").mkdir()
    write_outputs(tmp_path, {"config": cfg.to_dict(), "environment": environment(), "runs": rows, "events": [],
                             "seconds": 1.0}, resamples=0)
    figures = sorted(p.name for p in (tmp_path / "figures").glob("layer_sparsity_*.png"))
    assert figures == ["layer_sparsity_s0.10.png", "layer_sparsity_s0.104.png", "layer_sparsity_s0.50.png"]
    assert "magnitude_s0.104 0.104" in (tmp_path / "report.md").read_text()
