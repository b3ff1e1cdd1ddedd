"""The floor plan holds (docs/architecture.md): imports only point down, no import cycles, and
nothing below the CLI imports the commands, the experiment runner or the package root.

Checked twice: by import-linter's contracts in pyproject.toml (what `lint-imports` runs in CI), and
by an AST scan of every import statement here (function-level and TYPE_CHECKING imports included),
which shares nothing with import-linter but the floor list."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "capjax"
CONTRACTS = {
    c["id"]: c for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
}
TOP = {"capjax.cli", "capjax.commands", "capjax.experiment", "capjax.launch"}  # may import commands / experiment / root


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """{importer: {imported capjax module: first line}} from every import statement of every module.
    `from a import b` names the module a.b when there is one, else a (as Python binds it)."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:  # `import capjax.x.y` of a name inside a module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.setdefault(t, node.lineno)
    return graph


def _unit(module: str) -> str:
    """capjax.X: the floor plan's unit (a top-level module or sub-package); capjax for the package root."""
    return ".".join(module.split(".")[:2])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _floors() -> dict[str, tuple[int, bool]]:
    """{capjax.X: (floor, counting up from 0 at the bottom; whether its floor's packages are independent)}."""
    layers = CONTRACTS["floors"]["layers"]
    out = {}
    for level, layer in enumerate(reversed(layers)):
        independent = ":" not in layer
        for tail in layer.replace(":", "|").split("|"):
            out[f"capjax.{tail.strip()}"] = (level, independent)
    return out


@pytest.fixture(scope="module")
def graph():
    return _imports(_modules())


def test_import_linter_contracts_hold():
    """`lint-imports` on this checkout (the one CI runs after make test): every contract kept."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{len(CONTRACTS)} kept, 0 broken" in run.stdout, run.stdout


def test_no_import_cycles_between_modules_or_units(graph):
    modules = {m: set(edges) for m, edges in graph.items()}
    assert _cycles(modules) == [], "import cycles between modules"
    units: dict[str, set[str]] = {}
    for m, edges in graph.items():
        units.setdefault(_unit(m), set()).update(_unit(t) for t in edges if _unit(t) != _unit(m))
    assert _cycles(units) == [], "import cycles between capjax.X units"


def test_every_import_points_down_the_floors(graph):
    floors = _floors()
    units = {_unit(m) for m in graph} - {"capjax"}
    assert sorted(units - set(floors)) == [], "modules without a floor: add them to [tool.importlinter] layers"
    wrong = []
    for m, edges in graph.items():
        for t, line in edges.items():
            a, b = _unit(m), _unit(t)
            if a == b or "capjax" in (a, b):
                continue
            (fa, independent), (fb, _) = floors[a], floors[b]
            if fb > fa or (fb == fa and independent):
                wrong.append(f"{m} -> {t} (line {line})")
    assert wrong == [], "imports that point up or sideways"


def test_only_the_top_imports_commands_experiment_and_the_package_root(graph):
    wrong = [
        f"{m} -> {t} (line {line})"
        for m, edges in graph.items()
        for t, line in edges.items()
        if (t == "capjax" or _unit(t) in ("capjax.commands", "capjax.experiment")) and _unit(m) not in TOP
    ]
    assert wrong == []
    # the package root sits between the pipelines it re-exports and the experiment floor
    floors = _floors()
    below = {floors[_unit(t)][0] for t in graph["capjax"]}
    assert max(below) < floors["capjax.experiment"][0]


def test_families_read_only_the_config_fields_they_declare():
    """capjax.families names the ModelConfig fields it reads (a Protocol, so that it need not
    import capjax.config above it): each is a field of capjax.config.ModelConfig with the same
    type, and the family modules read no other attribute of a config they are given."""
    import dataclasses

    from capjax.config import ModelConfig
    from capjax.families import base

    declared = {
        name: v.fget.__annotations__["return"] for name, v in vars(base.ModelConfig).items() if isinstance(v, property)
    }
    fields = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    assert {k: fields.get(k) for k in declared} == declared
    read = set()
    for path in (PACKAGE / "families").glob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef):
                continue
            configs = {
                a.arg for a in fn.args.args if a.annotation is not None and "ModelConfig" in ast.unparse(a.annotation)
            }
            read |= {
                n.attr
                for n in ast.walk(fn)
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in configs
            }
    assert read and read <= set(declared), sorted(read - set(declared))


def test_moved_names_still_import():
    """Names that moved down a floor stay importable where users found them."""
    from capjax import artifacts, compressed, errors, mesh
    from capjax.cli import expected_error, one_line
    from capjax.experiment.store import atomic_write, file_digest, fingerprint, read_npz, strict_json, write_texts
    from capjax.integrations.compressed import SparsityFormatError, is_target, save_compressed
    from capjax.memory import InsufficientMemoryError
    from capjax.sharding import DATA, axis_size, batch_sharding, fit_spec

    assert (one_line, expected_error, InsufficientMemoryError) == (
        errors.one_line,
        errors.expected_error,
        errors.InsufficientMemoryError,
    )
    assert (atomic_write, file_digest, fingerprint, read_npz, strict_json, write_texts) == (
        artifacts.atomic_write,
        artifacts.file_digest,
        artifacts.fingerprint,
        artifacts.read_npz,
        artifacts.strict_json,
        artifacts.write_texts,
    )
    assert (SparsityFormatError, is_target, save_compressed) == (
        compressed.SparsityFormatError,
        compressed.is_target,
        compressed.save_compressed,
    )
    assert (DATA, axis_size, batch_sharding, fit_spec) == (
        mesh.DATA,
        mesh.axis_size,
        mesh.batch_sharding,
        mesh.fit_spec,
    )
