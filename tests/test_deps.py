"""Dependencies say the truth: what capjax imports is declared (core or an extra), what the core
declares is imported, and a Llama-3-RoPE export reloads under the pinned transformers."""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# import name -> distribution name, where they differ
DIST = {
    "yaml": "pyyaml",
    "orbax": "orbax-checkpoint",
    "lm_eval": "lm-eval",
    "compressed_tensors": "compressed-tensors",
    "jaxlib": "jax",
}


def _name(req: str) -> str:
    for sep in "<>=![; ":
        req = req.split(sep)[0]
    return req.strip().lower().replace("_", "-")


def third_party_imports(folder: Path) -> dict[str, set[str]]:
    """{top-level module: files importing it} over capjax's sources (any depth, lazy imports too)."""
    found: dict[str, set[str]] = {}
    for f in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                top = n.split(".")[0]
                if top != "capjax" and top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, set()).add(str(f.relative_to(folder.parent)))
    return found


def test_imported_is_declared_and_declared_is_imported():
    core = {_name(r) for r in PYPROJECT["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in PYPROJECT["optional-dependencies"].items()}
    imports = third_party_imports(ROOT / "capjax")
    imported = {DIST.get(m, m).lower().replace("_", "-") for m in imports}
    undeclared = {
        m: sorted(fs)
        for m, fs in imports.items()
        if DIST.get(m, m).lower().replace("_", "-") not in core | set().union(*extras.values())
    }
    assert not undeclared, f"imported but not declared: {undeclared}"
    assert core - imported == set(), "declared in core but never imported"
    # optional imports live in their extra
    assert {"lm-eval"} <= extras["lm-eval"] and {"compressed-tensors", "torch"} <= extras["compressed"]
    assert "datasets" in extras["hub"] and "torch" not in core
    for extra in ("lm-eval", "compressed-tensors", "datasets", "pytest", "torch"):
        assert extra in extras["test"], extra  # CI runs those tests


def test_installed_transformers_meets_the_pin():
    from packaging.requirements import Requirement

    req = next(Requirement(r) for r in PYPROJECT["dependencies"] if _name(r) == "transformers")
    assert req.specifier.contains(md.version("transformers")), (req, md.version("transformers"))


def test_llama3_rope_export_reloads_with_the_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import capjax
    from conftest import make_hf_model

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    ref = make_hf_model(tmp_path / "src", "llama", seed=7, rope_parameters=rope, max_position_embeddings=64)
    model, params = capjax.load_pretrained(tmp_path / "src")
    out = capjax.save_pretrained(model, params, tmp_path / "out")
    written = json.loads((out / "config.json").read_text())["rope_parameters"]
    assert written["rope_type"] == "llama3" and written["rope_theta"] == 500000.0
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert back.config.rope_parameters["rope_theta"] == 500000.0
    tokens = torch.tensor(np.random.default_rng(0).integers(0, 101, (2, 48)))  # past original_max 16
    with torch.no_grad():
        a, b = ref(tokens).logits, back(tokens).logits
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_demo_installs_no_torch():
    """The demo extra and the Makefile's demo stage leave torch out (capjax.gguf_reader needs none)."""
    import re

    assert "torch" not in {_name(r) for r in PYPROJECT["optional-dependencies"]["demo"]}
    make = (ROOT / "Makefile").read_text()
    demo_stage = re.search(r"^\$\(DEMO\):.*?(?=^\S)", make, re.M | re.S).group(0)
    assert "pip install" in demo_stage and "torch" not in demo_stage.split("\n", 1)[1]
