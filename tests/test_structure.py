"""The package structure: layers, no import cycles (hidden ones included), small helpers defined once.

Layers, bottom to top: common < registry < models, processors < datasets < tasks < runners < projects, benchmarks.
A module may import its own layer and the layers below it, never one above. The graph is read from the source
(``ast``), module-level and function-local imports alike, so a cycle hidden inside a function still counts.
"""
from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import tokenize
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"common": 0, "registry": 1, "models": 2, "processors": 2, "datasets": 3, "tasks": 4, "runners": 5,
          "projects": 6, "benchmarks": 6}
ORDER = "common < registry < models, processors < datasets < tasks < runners < projects, benchmarks"


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the layered packages."""
    mods = {}
    for top in LAYERS:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The longest project module that ``name`` (a module or ``module.attribute``) lies in, or None."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _imported_names(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_edges(mods: dict[str, Path]) -> dict[str, dict[str, list[int]]]:
    """module -> {imported project module: [line numbers]}; imports under ``if TYPE_CHECKING:`` are left out."""
    edges: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for module, path in mods.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
                for name in _imported_names(node, package):
                    target = _resolve(name, mods)
                    # a package importing its own submodules (``__init__`` re-exports) is not an edge of interest
                    if target and target != module and not target.startswith(module + "."):
                        edges[module][target].append(node.lineno)
    return edges


def find_cycles(edges: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return cycles


def layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


@pytest.fixture(scope="module")
def graph():
    mods = project_modules()
    return mods, import_edges(mods)


def test_no_import_cycles(graph):
    _, edges = graph
    assert find_cycles(edges) == [], "import cycles (function-local imports included)"


def test_no_upward_imports(graph):
    _, edges = graph
    upward = [f"{src} -> {dst} (line {lines[0]})" for src, targets in edges.items() for dst, lines in targets.items()
              if layer(dst) > layer(src)]
    assert upward == [], f"imports from a higher layer ({ORDER}):\n" + "\n".join(upward)


def test_cycle_finder_sees_a_cycle_through_a_function_local_import(tmp_path):
    pkg = tmp_path / "models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from models.b import g\n")
    (pkg / "b.py").write_text("def g():\n    from models import a  # hidden\n    return a\n")
    mods = {"models": pkg / "__init__.py", "models.a": pkg / "a.py", "models.b": pkg / "b.py"}
    assert find_cycles(import_edges(mods)) == [["models.a", "models.b"]]


def test_top_packages_import_in_a_fresh_process():
    code = "import common, registry, models, processors, datasets, tasks, runners"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


LAZY_IMPORT_PACKAGES = ("common", "registry", "models", "processors", "datasets", "tasks", "runners")


def function_local_imports(path: Path) -> list[tuple[int, bool]]:
    """(line, says why) of each import inside a function of ``path``. An import says why with a comment on its
    line, on the line above, or on another line of the run of imports it belongs to."""
    text = path.read_text(encoding="utf-8")
    commented = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(text).readline)
                 if tok.type == tokenize.COMMENT and re.search("[a-z]", re.sub(r"noqa(:[ \w,]*)?", "", tok.string))}
    found = {}
    for fn in ast.walk(ast.parse(text)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for body in (n.body for n in ast.walk(fn) if hasattr(n, "body") and isinstance(n.body, list)):
            run: list[ast.stmt] = []
            for stmt in body + [None]:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    run.append(stmt)
                    continue
                if run:
                    lines = set(range(run[0].lineno - 1, run[-1].end_lineno + 1))
                    for imp in run:
                        found[imp.lineno] = bool(lines & commented)
                run = []
    return sorted(found.items())


def test_function_local_imports_say_why():
    """A function-local import defers a heavy or optional dependency (or a lazy registration) and says which;
    one that defers nothing belongs at the top of the module."""
    bare = [f"{path.relative_to(ROOT)}:{line}" for top in LAZY_IMPORT_PACKAGES
            for path in sorted((ROOT / top).rglob("*.py")) for line, says_why in function_local_imports(path)
            if not says_why]
    assert bare == [], "function-local imports without a comment naming what they defer:\n" + "\n".join(bare)


def test_function_local_import_check_sees_a_bare_import(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    import json  # noqa: PLC0415\n    return json\n\n\ndef g():\n"
                    "    import decord  # optional (video extra)\n    import numpy\n    return decord, numpy\n")
    assert function_local_imports(path) == [(2, False), (7, True), (8, True)]


SMALL_HELPERS = {
    "rank / world-size query": r"^def (get_rank|get_world_size|is_dist\w*|dist_ready)\(",
    "cache-root rule": r"BLIP2_CACHE_ROOT\"?,\s*\"~|^DEFAULT_CACHE_ROOT\s*=",
    "precision-name -> dtype table": r"\"fp(16|32)\":\s*torch\.",
    "move to device": r"^def (move_to_device|to_device)\(",
    "fp16 -> fp32 upcast on CPU": r"^def _?cpu_safe_?\(",
    "HF_HUB_OFFLINE check": r"environ\.get\(\"HF_HUB_OFFLINE\"",
}


@pytest.mark.parametrize("what", sorted(SMALL_HELPERS))
def test_small_helper_defined_once(what, graph):
    mods, _ = graph
    pattern = re.compile(SMALL_HELPERS[what], re.M)
    places = sorted(str(path.relative_to(ROOT)) for path in mods.values()
                    for _ in pattern.finditer(path.read_text(encoding="utf-8")))
    assert len(places) <= 1 or all(p.startswith("common/") for p in places), f"{what} defined in {places}"


# -- comments say what the code does now: no dated measurements or history ------------------------------------
HISTORY = re.compile("|".join([
    r"\b20\d\d-[01]\d(-[0-3]\d)?\b",  # a date
    r"\bmeasured\b[^\n]{0,80}?\d+(\.\d+)?\s*(%|s\b|min\b)",  # "measured ... 12.5 %"
    r"\bmeasured (here|with)\b",
    r"\d+(\.\d+)?\s*(%|s|ms|min)?\s*(->|→)\s*\d+(\.\d+)?\s*(%|s\b|ms\b|min\b)",  # before -> after
    r"\d+(\.\d+)?\s*(s|min|%)\s+instead of\s+\d",  # "461 s instead of 137 s"
    r"\b(took|gave)\s+\d+(\.\d+)?\s*(s\b|min\b|%)",  # a run's time or score
    r"\d+(\.\d+)?(\s*/\s*\d+(\.\d+)?)+\s*%",  # a table of scores in prose
    r"\bwas once\b|\bused to be\b|\bpreviously\b|\bfirst choice\b",  # history
]), re.I)


def _comments(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a .py file, or every comment of a YAML file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        return [(i, line[line.index("#"):]) for i, line in enumerate(text.splitlines(), 1) if "#" in line]
    found = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(text).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                found.append((node.body[0].lineno, doc))
    return found


def test_no_dated_measurements_in_comments_or_yaml_headers():
    """Measurements go to benchmarks/RESULTS.md or projects/blip2/demo/RESULTS.md, history to commit messages."""
    files = [p for top in (*LAYERS, "tests") for p in sorted((ROOT / top).rglob("*"))
             if p.suffix in (".py", ".yaml", ".yml")]
    hits = [f"{path.relative_to(ROOT)}:{line}: ...{text[max(0, m.start() - 40):m.end() + 20]!r}"
            for path in files if path != Path(__file__).resolve()
            for line, text in _comments(path) for m in [HISTORY.search(text)] if m]
    assert hits == [], "measurements or history in comments (move them to a RESULTS.md):\n" + "\n".join(hits)


@pytest.mark.parametrize("text, bad", [
    ("# LLM 461 s instead of 137 s", True), ("# captions 25.0 -> 32.0 %", True), ("# measured 2026-11-29", True),
    ("# ITC R@1 55 / 65 / 69 / 72 %", True), ("# the demo took 488 s", True),
    ("# [B, T] -> [B, T, H] in the LLM dtype", False), ("# 1 + (S/p)^2 tokens", False),
])
def test_history_pattern(text, bad):
    assert bool(HISTORY.search(text)) is bad
