"""Reading raw benchmark records from a data directory.

Expected layout of the data directory (see ``../shared/data/README.md``)::

    gsm8k/{train,test}.jsonl                     question, answer ("... #### 72")
    arc_challenge/ARC-Challenge-{Train,Dev,Test}.jsonl
    strategyqa/{train,dev}.json                  JSON list: qid, question, answer (bool), facts
    wikitext2/wiki.test.raw                      CRLF rows, non-empty only

The directory comes from the ``data_dir`` argument, else ``$CAPJAX_DATA``, else
``../shared/data`` relative to the working directory if that exists. When a file is
missing and the ``datasets`` package is importable, GSM8K, ARC and WikiText-2 are
loaded with ``datasets.load_dataset`` instead; otherwise a ``FileNotFoundError``
explains what was expected where.

Every task's records are normalised to one shape::

    {"id": str, "question": str, "reasoning": str, "answer": str}

ARC records also carry ``"choices": [(label, text), ...]`` and ``"answer_label"``;
their ``answer`` is the text of the correct choice and ``reasoning`` is empty (ARC
ships no chain of thought).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV_VAR = "CAPJAX_DATA"
DEFAULT_RELATIVE_DIR = Path("..") / "shared" / "data"

# task -> split -> file path relative to the data directory
FILES: dict[str, dict[str, str]] = {
    "gsm8k": {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
    "arc_challenge": {
        "train": "arc_challenge/ARC-Challenge-Train.jsonl",
        "dev": "arc_challenge/ARC-Challenge-Dev.jsonl",
        "test": "arc_challenge/ARC-Challenge-Test.jsonl",
    },
    "strategyqa": {"train": "strategyqa/train.json", "dev": "strategyqa/dev.json"},
}
WIKITEXT2_FILE = "wikitext2/wiki.test.raw"
TASKS: tuple[str, ...] = tuple(FILES)
HUB_TASKS = ("gsm8k", "arc_challenge")  # those `datasets.load_dataset` can stand in for (not StrategyQA)
# the files a missing one of which `datasets` replaces (the hub tasks' and WikiText-2's)
HUB_FILES = frozenset([WIKITEXT2_FILE, *(f for t in HUB_TASKS for f in FILES[t].values())])

LAYOUT_HELP = (
    "Pass --data-dir DIR (data_dir=DIR) or set CAPJAX_DATA=DIR, where DIR holds:\n"
    "  gsm8k/train.jsonl, gsm8k/test.jsonl\n"
    "  arc_challenge/ARC-Challenge-{Train,Dev,Test}.jsonl\n"
    "  strategyqa/train.json, strategyqa/dev.json\n"
    "  wikitext2/wiki.test.raw\n"
    "Alternatively install `datasets` to download GSM8K, ARC and WikiText-2."
)

_CALC_ANNOTATION = re.compile(r"<<[^>]*>>")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data directory: ``data_dir``, else ``$CAPJAX_DATA``, else ``../shared/data``
    (relative to cwd) if it exists, else None. An explicit path is returned as given
    even if it does not exist, so that errors name it."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    if DEFAULT_RELATIVE_DIR.is_dir():
        return DEFAULT_RELATIVE_DIR
    return None


def _check_task_split(task: str, split: str) -> None:
    if task not in FILES:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if split not in FILES[task]:
        raise ValueError(f"unknown split {split!r} for task {task!r}; known splits: {', '.join(FILES[task])}")


def _missing(what: str, rel: str, root: Path | None) -> FileNotFoundError:
    where = (
        f"expected {root / rel}"
        if root is not None
        else f"no data directory set (expected <DIR>/{rel}; ../shared/data does not exist)"
    )
    return FileNotFoundError(f"{what} not found: {where}.\n{LAYOUT_HELP}")


def _load_dataset() -> Callable[..., Any] | None:
    """``datasets.load_dataset`` if the package is importable, else None."""
    try:
        import datasets  # noqa: PLC0415  (optional dependency)
    except ImportError:
        return None
    return datasets.load_dataset


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _normalise_gsm8k(raw: dict, rid: str) -> dict:
    solution, _, final = raw["answer"].rpartition("####")
    reasoning = _CALC_ANNOTATION.sub("", solution).strip()
    return {
        "id": rid,
        "question": raw["question"].strip(),
        "reasoning": reasoning,
        "answer": final.strip().replace(",", ""),
    }


def _normalise_arc(rid: str, stem: str, choices: list[tuple[str, str]], key: str) -> dict:
    texts = dict(choices)
    if key not in texts:
        raise ValueError(f"ARC record {rid}: answerKey {key!r} not among labels {list(texts)}")
    return {
        "id": rid,
        "question": stem.strip(),
        "reasoning": "",
        "answer": texts[key],
        "choices": choices,
        "answer_label": key,
    }


def _normalise_strategyqa(raw: dict) -> dict:
    return {
        "id": raw["qid"],
        "question": raw["question"].strip(),
        "reasoning": " ".join(f.strip() for f in raw["facts"]),
        "answer": "yes" if raw["answer"] else "no",
    }


def _from_files(task: str, split: str, path: Path) -> list[dict]:
    if task == "gsm8k":
        return [_normalise_gsm8k(r, f"gsm8k/{split}/{i}") for i, r in enumerate(_read_jsonl(path))]
    if task == "arc_challenge":
        return [
            _normalise_arc(
                r["id"],
                r["question"]["stem"],
                [(c["label"], c["text"]) for c in r["question"]["choices"]],
                r["answerKey"],
            )
            for r in _read_jsonl(path)
        ]
    with path.open(encoding="utf-8") as f:
        return [_normalise_strategyqa(r) for r in json.load(f)]


def _from_hub(task: str, split: str, load_dataset: Callable[..., Any]) -> list[dict]:
    if task == "gsm8k":
        rows = load_dataset("gsm8k", "main", split=split)
        return [_normalise_gsm8k(r, f"gsm8k/{split}/{i}") for i, r in enumerate(rows)]
    hub_split = {"dev": "validation"}.get(split, split)
    rows = load_dataset("ai2_arc", "ARC-Challenge", split=hub_split)
    return [
        _normalise_arc(
            r["id"],
            r["question"],
            list(zip(r["choices"]["label"], r["choices"]["text"])),
            r["answerKey"],
        )
        for r in rows
    ]


def load_records(task: str, split: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Normalised records of ``task`` ("gsm8k", "strategyqa", "arc_challenge") and
    ``split`` (gsm8k: train/test; arc_challenge: train/dev/test; strategyqa: train/dev),
    in file order. See the module docstring for the record shape.

    GSM8K: ``reasoning`` is the solution without ``<<...>>`` calculator annotations and
    without the ``#### N`` line; ``answer`` is N with commas removed; ids are
    ``"gsm8k/{split}/{line index}"``. StrategyQA: ``reasoning`` is the facts joined with
    spaces; ``answer`` is "yes" or "no".
    """
    _check_task_split(task, split)
    rel = FILES[task][split]
    root = resolve_data_dir(data_dir)
    if root is not None and (root / rel).is_file():
        return _from_files(task, split, root / rel)
    load_dataset = _load_dataset()
    if load_dataset is not None and task in HUB_TASKS:
        return _from_hub(task, split, load_dataset)
    raise _missing(f"{task} {split} split", rel, root)


def load_wikitext2_text(data_dir: str | os.PathLike | None = None) -> str:
    """WikiText-2 raw test split as one string: non-empty rows with CRLF normalised to
    ``\\n``, joined with ``"\\n\\n"`` (close to, not byte-identical with, the usual
    ``"\\n\\n".join(dataset["text"])``)."""
    root = resolve_data_dir(data_dir)
    if root is not None and (root / WIKITEXT2_FILE).is_file():
        raw = (root / WIKITEXT2_FILE).read_bytes().decode("utf-8")
        rows = raw.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    else:
        load_dataset = _load_dataset()
        if load_dataset is None:
            raise _missing("WikiText-2 test text", WIKITEXT2_FILE, root)
        rows = [r.rstrip("\n") for r in load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]]
    return "\n\n".join(r for r in rows if r.strip())
