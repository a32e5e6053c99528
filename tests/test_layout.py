"""Package boundaries: the service (``dicom_node``) never imports the local peers and the demo
(``nodetools``), so a production install runs without test tooling, and ``ltdiff_core`` stays
free of the service."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(source: str) -> set[str]:
    """Every module a source imports: ``import``/``from`` statements at any depth (also lazy imports
    inside functions) and string literals passed to ``importlib.import_module`` / ``__import__``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in ("import_module", "__import__"):
                found.add(node.args[0].value)
    return found


def is_within(module: str, package: str) -> bool:
    """``package`` itself or one of its submodules (not a package that merely starts the same)."""
    return module == package or module.startswith(package + ".")


def offenders(package: str, forbidden: str) -> list[str]:
    """``path: module`` for each import of ``forbidden`` (or a submodule) under ``package``."""
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    return [f"{f.relative_to(ROOT)}: {m}" for f in files
            for m in sorted(imported_modules(f.read_text(encoding="utf-8")))
            if is_within(m, forbidden)]


@pytest.mark.parametrize("source", [
    "from nodetools import peers",
    "import nodetools.peers as p",
    "def demo():\n    from nodetools.demo import main\n    return main()",
    "import importlib\nmod = importlib.import_module('nodetools.demo')",
])
def test_import_finder_sees_every_import_form(source: str) -> None:
    assert any(is_within(m, "nodetools") for m in imported_modules(source))


def test_import_finder_ignores_look_alikes() -> None:
    assert not any(is_within(m, "nodetools") for m in imported_modules(
        "import nodetoolsx\nfrom dicom_node.store import spool\nx = 'nodetools.peers'\n"))


def test_service_does_not_import_nodetools() -> None:
    assert offenders("dicom_node", "nodetools") == []


def test_ltdiff_core_does_not_import_the_service_or_tools() -> None:
    assert offenders("ltdiff_core", "dicom_node") + offenders("ltdiff_core", "nodetools") == []


def test_demo_entry_point_parses_its_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m nodetools.demo`` (what ``scripts/main.sh`` runs) resolves from the repository root."""
    from nodetools import demo

    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    assert exc.value.code == 0
    assert "python -m nodetools.demo" in capsys.readouterr().out


def test_benchmarks_import_only_what_exists() -> None:
    """Every ``from PKG import NAME`` of the project's packages in bench/ names a module or an
    attribute that exists (a benchmark is run by hand, so a moved module would otherwise break it
    unseen)."""
    import ast
    import importlib
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    ours = ("dicom_node", "ltdiff_core", "nodetools", "ltdiff_train", "bench")
    missing = []
    for path in sorted((root / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] in ours:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if importlib.util.find_spec(node.module) is None:
                        missing.append(f"{path.name}: {node.module}")
                    elif importlib.util.find_spec(node.module).submodule_search_locations is not None \
                            and importlib.util.find_spec(full) is not None:
                        continue
                    elif not hasattr(importlib.import_module(node.module), alias.name):
                        missing.append(f"{path.name}: {full}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in ours and importlib.util.find_spec(alias.name) is None:
                        missing.append(f"{path.name}: {alias.name}")
    assert missing == []


def test_benchmarks_run_as_modules_without_editing_sys_path() -> None:
    """bench/ is a package run from the repository root as ``python -m bench.NAME``: the root is then
    on ``sys.path`` and the scripts import the installed packages. No script touches ``sys.path``
    (an edit would import another tree than the installed one), sibling scripts are imported as
    ``bench.NAME``, and the documentation shows that command form."""
    assert (ROOT / "bench" / "__init__.py").is_file()
    siblings = {p.stem for p in (ROOT / "bench").glob("*.py")}
    found = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                    and node.value.id == "sys":
                found.append(f"{path.name}:{node.lineno}: sys.path")
            elif isinstance(node, ast.Attribute) and node.attr == "addsitedir":
                found.append(f"{path.name}:{node.lineno}: site.addsitedir")
        found += [f"{path.name}: import {m}" for m in sorted(imported_modules(source)) if m.split(".")[0] in siblings]
        found += [f"{path.name}: {m.group(0)}" for m in re.finditer(r"python3? bench/\S+", source)]
    for doc in [ROOT / "README.md", ROOT / "DEVELOPERS.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        found += [f"{doc.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(r"python3? bench/\S+", text)]
    assert found == []


def test_a_benchmark_runs_as_a_module_from_the_repository_root() -> None:
    """``python -m bench.bench_reactor --help`` imports its siblings (bench.bench_node, bench.bench_receive)
    and nodetools with nothing added to the path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "bench.bench_reactor", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--associations" in proc.stdout


# --------------------------------------------------------------------------- stages as packages
STAGES = ("receive", "store", "decide", "process", "derive", "dispatch", "admin", "observe", "app")


def service_import_graph() -> dict[str, set[str]]:
    """Module -> the service modules it imports (at any depth, lazy imports included; imports
    under ``if TYPE_CHECKING:`` left out: they never run)."""
    base = ROOT / "dicom_node"
    names = {}
    for path in base.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and is_within(node.module, "dicom_node"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in names else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in names)
        graph[name] = {d for d in deps if d in names and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def stage_of(module: str) -> str:
    parts = module.split(".")
    if module == "dicom_node.__main__":
        return "app"  # ``python -m dicom_node`` is the command line
    return parts[1] if len(parts) > 2 and parts[1] in STAGES else "leaves"


def test_each_stage_is_a_package_and_the_top_level_holds_only_shared_leaves() -> None:
    for stage in STAGES:
        assert (ROOT / "dicom_node" / stage / "__init__.py").is_file(), stage
    top = sorted(p.stem for p in (ROOT / "dicom_node").glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert top == ["attributes", "audit", "config", "logs", "negotiation", "tls", "version"]


def test_no_import_circle_between_modules_or_stages() -> None:
    graph = service_import_graph()
    assert cycles(graph) == []
    stages: dict[str, set[str]] = {}
    for module, deps in graph.items():
        for d in deps:
            if stage_of(d) != stage_of(module):
                stages.setdefault(stage_of(module), set()).add(stage_of(d))
    assert cycles(stages) == [], stages
    assert "leaves" not in {s for s in stages if stages[s] - {"leaves"}}, stages["leaves"]  # leaves import no stage


def test_cycle_finder_sees_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
