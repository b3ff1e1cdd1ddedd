"""compressed-tensors export: the library decompresses it bit for bit and capjax reads it back; masks with
HF names and shapes. (transformers 5 needs compressed-tensors >= 0.15, which has no sparsity
decompressors, so it cannot load these folders; see docs/using.md.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors.compressors.sparse_compressors")  # compressed-tensors <= 0.13

import capjax  # noqa: E402
from capjax.convert import iter_hf_tensors  # noqa: E402
from capjax.integrations.compressed import SparsityFormatError, is_target, save_compressed  # noqa: E402
from capjax.io import hf_masks  # noqa: E402
from conftest import make_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_ct")
    make_hf_model(folder, "llama", seed=3)
    return capjax.load_pretrained(folder)


@pytest.fixture(scope="module", params=["2:4", "unstructured"])
def exported(request, tiny, tmp_path_factory):
    model, params = tiny
    nm = "2:4" if request.param == "2:4" else None
    pruned, masks = capjax.prune(model, params, "magnitude", 0.5, nm=nm)
    dense = capjax.save_pretrained(model, pruned, tmp_path_factory.mktemp("dense"))
    comp = capjax.save_pretrained(model, pruned, tmp_path_factory.mktemp("ct"), sparsity_format="compressed-tensors")
    return request.param, model, pruned, masks, dense, comp


def test_library_decompresses_bit_for_bit(exported):
    structure, model, pruned, _, dense, comp = exported
    from compressed_tensors.compressors import ModelCompressor

    q = json.loads((comp / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"
    expect_fmt = "sparse-24-bitmask" if structure == "2:4" else "sparse-bitmask"
    assert q["sparsity_config"]["format"] == expect_fmt
    assert q["sparsity_config"]["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    mc = ModelCompressor.from_pretrained(str(comp))  # the library's own reader of config.json
    got = dict(mc.sparsity_compressor.decompress(str(comp)))
    want = dict(iter_hf_tensors(model.config, pruned))
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name].numpy()
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert np.array_equal(g.view(np.uint32), w.view(np.uint32)), name  # bit for bit
    assert sum(is_target(n) for n in want) == 7 * model.config.num_layers


def test_capjax_reads_it_back(exported):
    _, model, pruned, _, _, comp = exported
    _, back = capjax.load_pretrained(comp)
    for (n1, a), (n2, b) in zip(iter_hf_tensors(model.config, pruned), iter_hf_tensors(model.config, back)):
        assert n1 == n2 and np.array_equal(a, b), n1


def test_hf_masks_match_the_zeros_of_the_export(exported):
    _, model, pruned, masks, _, _ = exported
    from capjax.pruning.prune import flat_masks

    weights = dict(iter_hf_tensors(model.config, pruned))
    for m in (masks, {k: np.asarray(v) for k, v in flat_masks(masks).items()}):  # tree and masks.npz form
        named = hf_masks(model.config, m)
        assert set(named) == {n for n in weights if is_target(n)}
        for name, keep in named.items():
            assert keep.shape == weights[name].shape  # HF [out, in]
            assert np.array_equal(~keep, weights[name] == 0), name


def test_2to4_request_on_unstructured_weights_is_refused(tiny, tmp_path):
    model, params = tiny
    pruned, _ = capjax.prune(model, params, "magnitude", 0.5)
    with pytest.raises(SparsityFormatError, match=r"model\.layers\.\d+\..*is not 2:4"):
        save_compressed(model, pruned, tmp_path, structure="2:4")
    with pytest.raises(ValueError, match="sparsity_format='zip'"):
        capjax.save_pretrained(model, pruned, tmp_path, sparsity_format="zip")


def test_prune_cli_writes_compressed_folder_and_hf_masks(tmp_path):
    from compressed_tensors.compressors import ModelCompressor

    from capjax import cli

    make_hf_model(tmp_path / "src", "llama", seed=4)
    rc = cli.main(
        [
            "prune",
            "--model",
            str(tmp_path / "src"),
            "--method",
            "magnitude",
            "--nm",
            "2:4",
            "--sparsity-format",
            "compressed-tensors",
            "--hf-masks",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    out = tmp_path / "out"
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["sparsity_config"]["format"] == "sparse-24-bitmask"
    weights = dict(ModelCompressor.from_pretrained(str(out)).sparsity_compressor.decompress(str(out)))
    with np.load(out / "masks_hf.npz") as z:
        assert len(z.files) == 7 * 2
        for name in z.files:
            assert np.array_equal(~z[name], weights[name].numpy() == 0), name


def test_transformers_5_refuses_the_folder_with_compressed_tensors_0_13(exported):
    """The documented conflict (docs/using.md): transformers 5 asks for compressed-tensors >= 0.15
    (transformers/utils/import_utils.py COMPRESSED_TENSORS_MIN_VERSION), and the installed release
    that has the sparsity compressors is older. When a release has both, this fails: then test the
    load (AutoModelForCausalLM on `comp`, same logits as `dense`) instead."""
    import compressed_tensors
    from packaging.version import Version

    *_, comp = exported
    assert Version(compressed_tensors.__version__) < Version("0.15")
    with pytest.raises(ImportError, match=r"compressed-tensors>=0\.15"):
        transformers.AutoModelForCausalLM.from_pretrained(comp)
