"""What the subprocess workers (tests/sharding_worker.py, tests/multiprocess_worker.py) share: the
calibration batch, the loop that runs their checks, and a fake accelerator for the memory checks
(also used by test_io). The workers run as scripts, so each puts this folder on sys.path before
`from worker_common import ...`.

Legend: B batch, T time, N ablation masks, L layers, H query heads, V vocab.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from time import perf_counter  # (make_batch's `time` is the sequence length)

import numpy as np


def run_checks(checks: dict[str, Callable[[], None]], wanted: list[str], prefix: str = "") -> dict[str, str]:
    """Runs each wanted check: {name: "ok" or its traceback}, and one timed line per check."""
    out: dict[str, str] = {}
    for name in wanted:
        t = perf_counter()
        try:
            checks[name]()
            out[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the test
            out[name] = traceback.format_exc()
        print(f"{prefix}{name} {'ok' if out[name] == 'ok' else 'FAILED'} {perf_counter() - t:.1f}s", flush=True)
    return out


def make_batch(
    vocab: int, layers: int, heads: int, n_masks: int, batch: int = 6, time: int = 12, seed: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [B, T] int32, attention mask [B, T] int32 with rows 1 and 4 right-padded, loss mask
    [B, T] float32 over a ragged answer span of every row, ablation masks [N, L, H] float32 of
    0/1 with about 60% ones), all from one seeded generator."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, time)).astype(np.int32)
    am = np.ones((batch, time), np.int32)
    am[1, 9:] = 0
    am[4, 7:] = 0
    loss = np.zeros((batch, time), np.float32)
    for b in range(batch):
        loss[b, 4 + b % 3 : am[b].sum()] = 1
    masks = (rng.random((n_masks, layers, heads)) > 0.4).astype(np.float32)
    return tokens, am, loss, masks


class FakeAccelerator:
    """A device whose memory_stats() says `limit` bytes with `in_use` taken (memory-check tests)."""

    platform, id = "gpu", 0

    def __init__(self, limit, in_use):
        self.stats = {"bytes_limit": limit, "bytes_in_use": in_use}

    def memory_stats(self):
        return self.stats


def one_error_line(capsys, *needles: str) -> str:
    """The one "error:" line a CLI printed to stderr (no traceback), holding every needle."""
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if "error:" in l]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]
