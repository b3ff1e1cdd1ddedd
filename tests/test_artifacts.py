"""capjax.artifacts: the fingerprint family against hashlib by hand, and the masks / scores file
formats (written, read back, refused in one line)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from capjax import artifacts
from capjax.errors import ArtifactError


def test_fingerprints_are_sha256_of_what_they_say():
    settings = {"b": [1, 2.5, "x"], "a": np.float32(3), "t": (1, 2)}
    canonical = json.dumps({"a": 3.0, "b": [1, 2.5, "x"], "t": [1, 2]}, separators=(",", ":"))
    assert artifacts.fingerprint(settings) == hashlib.sha256(canonical.encode()).hexdigest()[:20]
    a, b = np.arange(6, dtype=np.int32).reshape(2, 3), np.ones((3, 2), np.float32)
    h = hashlib.sha256()
    for x in (a, b):
        h.update(f"{x.dtype}{x.shape}".encode())
        h.update(x.tobytes())
    assert artifacts.array_digest(a, b) == h.hexdigest()[:20]
    assert artifacts.array_digest(a, b) != artifacts.array_digest(a.reshape(3, 2), b)  # the shape counts
    assert (
        artifacts.Digest().array(a.T, layout=False).hex(64)
        == hashlib.sha256(np.ascontiguousarray(a.T).tobytes()).hexdigest()
    )


def test_masks_file_round_trip_and_one_line_refusals(tmp_path):
    flat = {"q": np.array([[True, False], [False, True]]), "o": np.array([True, True, False])}
    path = artifacts.write_masks_npz(tmp_path / "masks.npz", flat)
    back = artifacts.read_masks(path, ["q", "o"])
    assert list(back) == ["q", "o"] and all(np.array_equal(back[k], flat[k]) for k in flat)
    assert artifacts.masks_digest(back, ["q", "o"]) == artifacts.masks_digest(flat, ["q", "o"])
    assert artifacts.masks_digest({**flat, "o": ~flat["o"]}, ["q", "o"]) != artifacts.masks_digest(flat, ["q", "o"])
    with pytest.raises(ValueError, match=r"masks\.npz lacks the mask\(s\) k"):
        artifacts.read_masks(path, ["q", "k"])
    with pytest.raises(FileNotFoundError, match="masks file not found: .*nope.npz"):
        artifacts.read_masks(tmp_path / "nope.npz", ["q"])
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="bad.npz is not a readable .npz file"):
        artifacts.read_masks(tmp_path / "bad.npz", ["q"])


def test_scores_file_round_trip(tmp_path):
    arrays = {"delta": np.ones((2, 3)), "masked": np.zeros((4, 2, 3)), "baseline": np.arange(4.0)}
    path = artifacts.write_scores_npz(tmp_path / "scores", arrays, {"aggregate": "mean"})
    assert path.name == "scores.npz"
    back = artifacts.read_scores_npz(path)
    assert all(np.array_equal(back[k], v) for k, v in arrays.items())
    assert artifacts.scores_settings(back) == {"aggregate": "mean"}
    np.savez(tmp_path / "partial.npz", delta=np.ones((2, 3)))
    with pytest.raises(ArtifactError, match="partial.npz has no 'masked', 'baseline' array"):
        artifacts.read_scores_npz(tmp_path / "partial.npz")
