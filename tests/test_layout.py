"""The house (issue 20): one installed import name, no import cycle between files, a light command line."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parents[1]
ROOMS = ("store", "embedder", "classify")


def _module_files() -> dict[str, Path]:
    files = {"scdrugmap": REPO / "__init__.py", "scdrugmap.cli": REPO / "cli.py"}
    for room in ROOMS:
        for path in (REPO / room).rglob("*.py"):
            parts = ["scdrugmap", *path.relative_to(REPO).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def _imports(path: Path, modules: set[str]) -> set[str]:
    """scdrugmap modules a file imports (any level of the file; TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = []

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {r for a in node.names if (r := resolve(a.name))}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {
                r for a in node.names if (r := resolve(f"{node.module}.{a.name}") or resolve(node.module))
            }
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_files():
    files = _module_files()
    graph = {m: _imports(p, set(files)) - {m} for m, p in files.items()}
    assert _cycles(graph) == []


def test_library_never_imports_the_command_line_or_the_web_layer():
    files = _module_files()
    graph = {m: _imports(p, set(files)) for m, p in files.items()}
    shell = {"scdrugmap.cli"}
    web = {m for m in files if m.startswith("scdrugmap.classify.service")}
    core = [m for m in files if m.startswith(("scdrugmap.store", "scdrugmap.embedder")) or m in {
        "scdrugmap.classify.evaluate", "scdrugmap.classify.report", "scdrugmap.classify.report_figures",
        "scdrugmap.classify.predict", "scdrugmap.classify.grid", "scdrugmap.classify.folds"}]  # fmt: skip
    for m in core:
        assert not graph[m] & shell, f"{m} imports the command line"
        assert not graph[m] & web, f"{m} imports the web service: {graph[m] & web}"


def test_importing_the_cli_and_the_api_imports_no_torch_scanpy_or_duckdb():
    code = (
        "import sys, scdrugmap, scdrugmap.cli, scdrugmap.store.errors, scdrugmap.embedder.vocab\n"
        "heavy = [m for m in ('torch', 'scanpy', 'transformers', 'duckdb', 'zarr') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert scdrugmap.Store.__module__ == 'scdrugmap.store.catalog'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_every_lazy_command_loads_and_its_listed_help_is_its_own():
    from scdrugmap.cli import LAZY_COMMANDS, main

    ctx = click.Context(main)
    for name, (_, short) in LAZY_COMMANDS.items():
        cmd = main.get_command(ctx, name)
        assert isinstance(cmd, click.Command), name
        assert cmd.get_short_help_str(limit=200) == short, name


def test_the_public_api_is_one_namespace():
    import scdrugmap

    for name in scdrugmap.__all__:
        obj = getattr(scdrugmap, name)
        assert obj.__doc__, name
        assert obj.__module__.startswith("scdrugmap."), name


@pytest.mark.slow
def test_a_built_wheel_installs_one_top_level_name(tmp_path):
    import shutil

    src = tmp_path / "src"  # a copy: the build leaves build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "__init__.py", "cli.py"):
        shutil.copy(REPO / name, src / name)
    for room in ROOMS:
        shutil.copytree(REPO / room, src / room, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("tests", "benchmarks"):  # present in a checkout; must not be packaged
        (src / name).mkdir()
        (src / name / "x.py").write_text("")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("scdrugmap-*.whl")
    names = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    top = {n for n in names if not n.endswith((".dist-info", ".data"))}
    assert top == {"scdrugmap"}
    listed = zipfile.ZipFile(wheel).namelist()
    for data in ("scdrugmap/embedder/data/OS_scRNA_gene_index.19264.tsv", "scdrugmap/classify/service/static/index.html",
                 "scdrugmap/cli.py", "scdrugmap/store/catalog.py"):  # fmt: skip
        assert data in listed, data
    assert not any(n.startswith("scdrugmap/tests/") or n.startswith("scdrugmap/benchmarks/") for n in listed)
