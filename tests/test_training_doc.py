"""docs/training.md runs as written: every ``bash`` block's commands, in order, in a scratch folder
holding a copy of ``conf/``, and the ``toml`` block as the node configuration it shows."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "training.md"
pytestmark = pytest.mark.slow


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_training_page_runs_as_written(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "site").mkdir()
    toml = blocks("toml")
    assert len(toml) == 1 and toml[0].startswith("# site/node.toml")
    (tmp_path / "site" / "node.toml").write_text(toml[0])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    env.pop("DICOM_NODE_CONFIG", None)
    commands = [line for block in blocks("bash") for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) >= 6
    outputs = []
    for line in commands:
        argv = shlex.split(line)
        if argv[0] == "python":
            argv[0] = sys.executable
        elif argv[0] == "dicom-node":
            argv = [sys.executable, "-m", "dicom_node", *argv[1:]]
        r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (line, r.stdout[-2000:], r.stderr[-3000:])
        outputs.append(r.stdout + r.stderr)
    fit = next(o for c, o in zip(commands, outputs) if "fit_linear" in c)
    assert "3 series" not in fit or "warning: the QA envelope comes from 3 series" in fit
    assert "Br40 -> Bl64; envelope: noise_hu" in fit and "kernel boundary sharpness" in fit
    assert (tmp_path / "site" / "runs" / "site-linear.safetensors").is_file()
    assert (tmp_path / "site" / "report" / "report.md").is_file()
    assert len(list((tmp_path / "site" / "out").rglob("*.dcm"))) == 2
    assert "site-br40" in outputs[-1] and "`site-linear.safetensors` (site checkpoint)" in outputs[-1]
    assert not (tmp_path / "ltdiff_core").exists()  # nothing next to the shipped weights
