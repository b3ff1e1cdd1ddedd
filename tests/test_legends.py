"""One letter per meaning: every capjax module's shape "Legend:" lines must agree with each other.

A legend is a comma-separated list of "SYMBOL meaning" entries after "Legend:" (or "Shape legend:",
"Legend (see ...):"), up to a sentence end or a blank line. Meanings are compared after
normalising (lower case, parentheticals and the words in `_FILLER` dropped); `SYNONYMS` lists the
phrasings accepted as one meaning. Any other second meaning of a symbol is a clash.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "capjax"
_START = re.compile(r"\b(?:Shape legend|Legend)\b[^:\n]{0,40}:")
_FILLER = {"a", "an", "the", "of", "per", "its"}

# symbol -> {canonical meaning: phrasings (normalised)}; one canonical meaning per symbol.
SYNONYMS: dict[str, dict[str, set[str]]] = {
    "B": {"batch": {"batch", "examples", "calibration examples", "calibration sequences", "rows"}},
    "T": {
        "time": {"time", "query time", "columns padded batch", "tokens sequence", "prompt time", "their padded length"}
    },
    # packed rows run without a cache, so their keys are their columns; with a cache the keys are
    # the cache slots: all three are the axis attention keys run over.
    "S": {"key time": {"key time", "packed columns", "= t + x cache slots"}},
    "N": {"ablations": {"ablations", "mask vectors", "batch ablation masks"}},
    "A": {"answer tokens": {"answer tokens", "answer tokens in batch"}},
    "U": {"subsets": {"subsets", "calibration subsets"}},
    "L": {"layers": {"layers"}},
    "K": {"kv heads": {"kv heads"}},
    "D": {"head dim": {"head dim"}},
    "E": {"hidden": {"hidden"}},
    "F": {"mlp width": {"mlp width"}},
    "V": {"vocab": {"vocab"}},
    "H": {"query heads": {"query heads", "heads"}},
    "G": {"query heads per kv head": {"= h // k", "= h // k query heads kv head"}},
}


def _split_top(text: str) -> list[str]:
    """Splits on commas outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch in "([") - (ch in ")]")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _legend_text(src: str, start: int) -> str:
    """The legend body from `start` to the first sentence end (outside parentheses) or blank line."""
    depth, out = 0, ""
    i = start
    while i < len(src):
        ch = src[i]
        if re.match(r'\n[ \t]*\n|"""', src[i : i + 12]):
            break
        depth += (ch == "(") - (ch == ")")
        if ch == "." and depth == 0 and (i + 1 == len(src) or src[i + 1].isspace()):
            break
        out += ch
        i += 1
    return " ".join(out.split())


def _normalise(meaning: str) -> str:
    meaning = re.sub(r"\([^)]*\)", " ", meaning.lower())
    return " ".join(w for w in re.findall(r"[a-z_]+|=|//|\+|-", meaning) if w not in _FILLER)


def legends(root: Path = ROOT) -> dict[str, dict[str, str]]:
    """module path -> {symbol: normalised meaning} for every legend under root."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        src = path.read_text()
        for m in _START.finditer(src):
            entries = {}
            for entry in _split_top(_legend_text(src, m.end())):
                words = entry.split()
                if words:
                    entries[words[0]] = _normalise(" ".join(words[1:]))
            found.setdefault(str(path.relative_to(root.parent)), {}).update(entries)
    return found


def clashes(found: dict[str, dict[str, str]]) -> list[str]:
    """One line per symbol used with two meanings (after SYNONYMS)."""
    canonical = {}
    for symbol, table in SYNONYMS.items():
        for name, phrasings in table.items():
            for ph in phrasings:
                canonical[(symbol, ph)] = name
    uses: dict[str, dict[str, list[str]]] = {}
    for module, entries in found.items():
        for symbol, meaning in entries.items():
            name = canonical.get((symbol, meaning), meaning)
            uses.setdefault(symbol, {}).setdefault(name, []).append(module)
    return [
        f"{s}: " + "; ".join(f"{name!r} in {', '.join(mods)}" for name, mods in by.items())
        for s, by in sorted(uses.items())
        if len(by) > 1
    ]


def _canonical(symbol: str, meaning: str) -> str:
    for name, phrasings in SYNONYMS.get(symbol, {}).items():
        if meaning in phrasings:
            return name
    return meaning


def test_parser_reads_legends_and_catches_a_clash(tmp_path):
    pkg = tmp_path / "capjax"
    pkg.mkdir()
    (pkg / "a.py").write_text(
        '"""Doc.\n\nLegend: B batch, S packed columns (the longest kept suffix, or Pf),\n'
        'G = H // K. Params: more text, X here is no entry.\n"""\n'
    )
    (pkg / "b.py").write_text('"""Shape legend: B calibration sequences, K subsets.\n"""\n')
    (pkg / "c.py").write_text('"""Legend (see `a`): K kv heads, E hidden\n\nE is not the legend here.\n"""\n')
    found = legends(pkg)
    assert found == {
        "capjax/a.py": {"B": "batch", "S": "packed columns", "G": "= h // k"},
        "capjax/b.py": {"B": "calibration sequences", "K": "subsets"},
        "capjax/c.py": {"K": "kv heads", "E": "hidden"},
    }
    # B's two phrasings are synonyms; K's two meanings are a clash
    assert clashes(found) == ["K: 'subsets' in capjax/b.py; 'kv heads' in capjax/c.py"]


def test_every_module_uses_one_meaning_per_letter():
    found = legends()
    assert len(found) >= 20, sorted(found)  # the parser still finds the package's legends
    problems = clashes(found)
    assert not problems, "letters with two meanings across capjax legends:\n" + "\n".join(problems)


PROJECT = {
    "B": "batch",
    "T": "time",
    "N": "ablations",
    "L": "layers",
    "H": "query heads",
    "K": "kv heads",
    "D": "head dim",
    "E": "hidden",
    "F": "mlp width",
    "V": "vocab",
    "U": "subsets",
}


def test_project_legend_letters():
    """Where a module uses a letter of the project's legend (B batch, T time, N ablations/masks,
    L layers, H query heads, K kv heads, D head dim, E hidden, F MLP width, V vocab, U subsets),
    it means that."""
    wrong = [
        f"{module}: {s} {m!r}"
        for module, entries in legends().items()
        for s, m in entries.items()
        if s in PROJECT and _canonical(s, m) != PROJECT[s]
    ]
    assert not wrong, wrong
