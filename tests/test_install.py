"""Install what you run: ``pip install .`` gives the service, ``.[research]`` adds the research tools.

Three checks. (1) A static one: every third-party module that ``dicom_node`` imports (at any depth,
lazy imports included, following the ``ltdiff_core`` modules it reaches) belongs to a distribution
in ``install_requires``, every ``install_requires`` entry is used, and the research distributions
are only in the ``research`` extra. (2) The service run as a real ``dicom-node serve`` process in
which every module of a distribution that ``pip install .`` would not install (the closure of
``install_requires`` over the installed metadata) cannot be imported, as on a machine without the
extras: it answers C-ECHO, receives a JPEG-LS series from DCMTK storescu, standardizes it with the
shipped linear model, sends it to DCMTK storescp and serves /metrics and a thumbnail; ``status``
and the offline ``standardize`` run the same way. The process reports its ``sys.modules`` and
every blocked import with the module that asked for it. (3) The wheel's metadata.
"""
from __future__ import annotations

import ast
import configparser
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fault_helpers import LINEAR, make_rig
from packaging.requirements import Requirement

from nodetools.peers import LOOPBACK, Peer, echoscu, free_port, make_ct_series, peer_env, storescu, wait_port

ROOT = Path(__file__).resolve().parents[1]
OURS = ("dicom_node", "ltdiff_core", "ltdiff_train")
#: research-only distributions -> their top-level module
RESEARCH = {"pyradiomics-bhklab": "radiomics", "simpleitk": "SimpleITK", "highdicom": "highdicom",
            "matplotlib": "matplotlib", "tqdm": "tqdm"}
#: modules of ours the service loads only when configured, and the extra that installs their imports
OPTIONAL = {"ltdiff_core.onnx_runtime": "onnx"}  # LTDIFF_RUNTIME=onnx
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements() -> dict[str, set[str]]:
    """``install_requires`` (key ``""``) and each extra of setup.cfg, as canonical distribution names."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    sections = {"": cfg["options"]["install_requires"], **cfg["options.extras_require"]}
    return {key: {canonical(Requirement(line).name) for line in text.splitlines() if line.strip()}
            for key, text in sections.items()}


@functools.cache
def top_level_modules() -> dict[str, frozenset[str]]:
    """Top-level module -> canonical names of the installed distributions that provide it."""
    return {m: frozenset(canonical(d) for d in dists) for m, dists in importlib.metadata.packages_distributions().items()}


def distributions_of(module: str) -> set[str]:
    return set(top_level_modules().get(module, ()))


# --------------------------------------------------------------------------- what dicom_node imports
def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements at any depth, except under ``if TYPE_CHECKING:`` (never executed)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in _runtime_imports(ast.Module([child], [])))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _runtime_imports(node)


def _our_member(module: str, name: str) -> str | None:
    """The module of ours that ``from module import name`` loads: a submodule, or the defining module
    of a re-exported (possibly lazily re-exported) class or function."""
    try:
        if importlib.util.find_spec(f"{module}.{name}") is not None:
            return f"{module}.{name}"
    except ModuleNotFoundError:  # module is not a package
        pass
    defined_in = getattr(getattr(importlib.import_module(module), name, None), "__module__", None)
    return defined_in if isinstance(defined_in, str) and defined_in.split(".")[0] in OURS else None


def imports_of(path: Path, module: str) -> Iterator[str]:
    """Every module the file of ``module`` imports, relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
        yield base
        if base.split(".")[0] in OURS:
            for alias in node.names:
                member = _our_member(base, alias.name)
                if member:
                    yield member


def reached_by_the_service() -> tuple[set[str], dict[str, set[str]]]:
    """(our modules that ``dicom_node`` reaches, third-party top-level module -> our modules importing it)."""
    todo = [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for p in sorted((ROOT / "dicom_node").rglob("*.py"))]
    seen: set[str] = set()
    third: dict[str, set[str]] = {}
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, module
        for imported in imports_of(Path(spec.origin), module):
            top = imported.split(".")[0]
            if top in OURS:
                parts = imported.split(".")
                todo += [".".join(parts[:k]) for k in range(1, len(parts) + 1)]  # packages run their __init__
            elif top not in sys.stdlib_module_names and top != "__future__":
                third.setdefault(top, set()).add(module)
    return seen, third


def test_the_import_walk_follows_lazy_and_re_exported_imports() -> None:
    """The walk sees function-level imports, skips ``if TYPE_CHECKING:`` bodies, and follows a name
    that a package re-exports on first use (``ltdiff_core.dicomio.list_cases`` lives in ``cases``)."""
    assert _our_member("ltdiff_core.dicomio", "list_cases") == "ltdiff_core.dicomio.cases"
    assert _our_member("ltdiff_core", "qa") == "ltdiff_core.qa"
    assert _our_member("ltdiff_core.dicomio.reader", "np") is None  # a third-party module, not ours
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import matplotlib\nelse:\n"
              "    import json\ndef f():\n    import tqdm\n")
    found = {a.name for n in _runtime_imports(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names}
    assert found == {"json", "tqdm"}
    seen, _ = reached_by_the_service()
    assert {"ltdiff_core.qa", "ltdiff_core.dicomio.reader"} <= seen  # imported inside functions of the service


def test_install_requires_cover_what_the_service_imports() -> None:
    reqs = requirements()
    seen, third = reached_by_the_service()
    uncovered = []
    for module, importers in sorted(third.items()):
        dists = distributions_of(module)
        assert dists, f"{module} (imported by {sorted(importers)}) belongs to no installed distribution"
        allowed = set(reqs[""])
        if importers <= set(OPTIONAL):
            allowed |= {d for m in importers for d in reqs[OPTIONAL[m]]}
        if not dists & allowed:
            uncovered.append(f"{module} ({'/'.join(sorted(dists))}) imported by {sorted(importers)}")
    assert uncovered == []
    assert not any(m.startswith(("ltdiff_core.radiomics", "ltdiff_core.phantom", "ltdiff_core.baselines",
                                 "ltdiff_core.dicomio.writer", "ltdiff_core.dicomio.cases", "ltdiff_train"))
                   for m in seen), sorted(seen)


def test_install_requires_hold_only_what_the_service_uses() -> None:
    """No research distribution among them, and each one is imported by the service or is pylibjpeg
    with its decoder plugins (found through their entry points), which pydicom loads to decode the
    compressed transfer syntaxes the node accepts."""
    reqs = requirements()
    assert not set(RESEARCH) & reqs[""]
    assert set(RESEARCH) <= reqs["research"]
    _, third = reached_by_the_service()
    imported = {d for module in third for d in distributions_of(module)}
    plugins = {canonical(d.metadata["Name"]) for d in importlib.metadata.distributions()
               if any(ep.group.startswith("pylibjpeg.") for ep in d.entry_points)}
    assert plugins, "no pylibjpeg decoder plugin installed"
    decoders = {"pylibjpeg"} | plugins  # pydicom's pylibjpeg decoder loads them, the node never imports them
    # MONAI declares einops optional but its DiffusionModelUNet needs it (monai.utils.optional_import at call time)
    monai_optional = {"einops"}
    assert sorted(reqs[""] - imported - decoders - monai_optional) == []


def test_every_import_of_the_project_is_declared() -> None:
    """ltdiff_core and the training commands: each third-party module is in install_requires or an extra."""
    reqs = requirements()
    declared = set().union(*reqs.values())
    missing = []
    for folder in ("ltdiff_core", "train"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if not node.level else []
                for top in {n.split(".")[0] for n in names} - set(OURS) - {"train", "__future__"}:
                    if top not in sys.stdlib_module_names and not distributions_of(top) & declared:
                        missing.append(f"{path.relative_to(ROOT)}: {top}")
    assert missing == []


# --------------------------------------------------------------------------- the service without extras
def install_closure(names: set[str]) -> set[str]:
    """The distributions ``pip install`` of ``names`` installs: their requirements, recursively
    (markers evaluated here, no extras)."""
    todo, found = list(names), set()
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        for line in importlib.metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return found


def not_installed_modules() -> set[str]:
    """Top-level modules of the installed distributions that ``pip install .`` would not bring."""
    # pip and setuptools come with every virtual environment, whatever is installed into it
    keep = install_closure(requirements()[""] | {"pip", "setuptools"}) | {canonical("dicom-node-ltdiff")}
    return {module for module, dists in top_level_modules().items()
            if module.isidentifier() and not dists & keep and module not in sys.stdlib_module_names
            and module not in OURS}


#: ``python -c PROBE BLOCKED.json REPORT.json dicom-node-args...``: the node's command line with a
#: finder in front that refuses the blocked top-level modules (as if not installed) and records who
#: asked; the report (``sys.modules`` and the blocked attempts) is written when main() returns.
PROBE = r'''
import json, sys
blocked = frozenset(json.loads(open(sys.argv.pop(1)).read()))
report = sys.argv.pop(1)
attempts = []

class NotInstalled:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] not in blocked:
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen_importlib")):
            frame = frame.f_back
        attempts.append([name, frame.f_globals.get("__name__") if frame is not None else None])
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NotInstalled)
sys.argv[0] = "dicom-node"
code = 1
try:
    from dicom_node.app.cli import main
    code = main()
finally:
    with open(report, "w") as f:
        json.dump({"modules": sorted(sys.modules), "attempts": attempts}, f)
sys.exit(code)
'''


def probe_env() -> dict[str, str]:
    env = peer_env()
    env.pop("LTDIFF_RUNTIME", None)
    return env


def run_probe(blocked: Path, report: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, str(blocked), str(report), *args], cwd=ROOT,
                          env=probe_env(), capture_output=True, text=True, timeout=300)


def assert_clean(report: Path) -> None:
    """No research module loaded, and no import of a not-installed module asked for by our code."""
    data = json.loads(report.read_text())
    loaded = {m.split(".")[0] for m in data["modules"]}
    assert not set(RESEARCH.values()) & loaded
    ours = [(name, by) for name, by in data["attempts"] if by and by.split(".")[0] in OURS]
    assert ours == []


def test_blocked_modules_are_what_pip_install_dot_leaves_out() -> None:
    blocked = not_installed_modules()
    assert set(RESEARCH.values()) <= blocked
    assert {"pytest", "onnxruntime", "psycopg", "jpeg_ls"} <= blocked  # test/onnx extras, highdicom's pyjpegls
    assert not {"torch", "monai", "pydicom", "pynetdicom", "sqlalchemy", "PIL", "requests", "numpy"} & blocked


def test_the_service_runs_without_the_extras(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked.json"
    blocked.write_text(json.dumps(sorted(not_installed_modules())))
    http_port = free_port()
    rig = make_rig(tmp_path, start=False, extra_sections=f"[http]\nenabled = true\nport = {http_port}")
    files = make_ct_series(tmp_path / "in", n=4, size=64, transfer_syntax=JPEG_LS_LOSSLESS)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    log, report = tmp_path / "node.log", tmp_path / "serve.json"
    rig.logs.append(log)
    try:
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-c", PROBE, str(blocked), str(report),
                                     "--config", str(rig.config), "serve"], stdout=out, stderr=subprocess.STDOUT,
                                    cwd=ROOT, env=probe_env(), start_new_session=True)
        rig.node = Peer(proc, rig.port, log)
        try:
            wait_port(rig.port, 60, proc)
        except RuntimeError:
            pytest.fail(f"dicom-node serve exited with {proc.returncode} before listening:\n{rig.log()[-3000:]}")
        assert echoscu(rig.port, "LTDIFF").returncode == 0
        sent = storescu(files, rig.port, "LTDIFF", extra=["--propose-jls-lossless"], timeout=60)
        assert sent.returncode == 0, sent.stderr
        series = rig.wait_state(uid, ["done", "failed", "refused"], 120)
        assert series["state"] == "done", series
        assert len(rig.pacs_files()) == 4
        job = series["jobs"][-1]["job"]
        for path, kind in (("/metrics", "text/plain"), (f"/thumb/{job}/after.png", "image/png")):
            with urllib.request.urlopen(f"http://{LOOPBACK}:{http_port}{path}", timeout=30) as r:  # noqa: S310
                assert r.status == 200 and r.headers["Content-Type"].startswith(kind), path
    finally:
        rig.stop()
    assert proc.returncode == 0, rig.log()[-3000:]
    assert_clean(report)

    status = run_probe(blocked, tmp_path / "status.json", "--config", str(rig.config), "status", "--json")
    assert status.returncode == 0, status.stderr
    assert any(s["series_uid"] == uid and s["state"] == "done" for s in json.loads(status.stdout)["series"])
    assert_clean(tmp_path / "status.json")

    offline = run_probe(blocked, tmp_path / "standardize.json", "standardize", str(tmp_path / "in"),
                        str(tmp_path / "out"), "--model", str(LINEAR), "--device", "cpu", "--quiet", "--qa", "off")
    assert offline.returncode == 0, offline.stderr
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 4
    assert_clean(tmp_path / "standardize.json")


def test_a_research_import_in_the_service_would_be_seen(tmp_path: Path) -> None:
    """The probe is not blind: a command whose import reaches a blocked module fails and is reported
    with the module that asked (here the radiomics features module, from ltdiff_core)."""
    blocked = tmp_path / "blocked.json"
    blocked.write_text(json.dumps(sorted(not_installed_modules())))
    code = PROBE.replace("from dicom_node.app.cli import main",
                         "import ltdiff_core.radiomics.features\n    from dicom_node.app.cli import main")
    proc = subprocess.run([sys.executable, "-c", code, str(blocked), str(tmp_path / "r.json"), "--help"],
                          cwd=ROOT, env=probe_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr
    attempts = json.loads((tmp_path / "r.json").read_text())["attempts"]
    assert any(by and by.startswith("ltdiff_core.radiomics") for _, by in attempts), attempts


# --------------------------------------------------------------------------- the wheel
def test_wheel_metadata_lists_the_service_and_the_research_extra(tmp_path: Path) -> None:
    """``pip wheel --no-deps`` of a copy of the sources: Requires-Dist without a marker is exactly
    install_requires; the research distributions come only with ``extra == "research"``."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "setup.py", "pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    for folder in ("dicom_node", "ltdiff_core", "train"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                dest = src / path.relative_to(ROOT)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(path.read_bytes())
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    reqs = [Requirement(v.strip()) for k, v in (line.split(":", 1) for line in metadata.splitlines() if ":" in line)
            if k == "Requires-Dist"]
    assert {canonical(r.name) for r in reqs if r.marker is None} == requirements()[""]
    research = {canonical(r.name) for r in reqs if r.marker is not None and r.marker.evaluate({"extra": "research"})
                and not r.marker.evaluate({"extra": ""})}
    assert set(RESEARCH) <= research
    assert "Provides-Extra: research" in metadata.splitlines()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == set(OURS)
