"""The command line as an admin meets it: clean one-line failures with documented exit codes,
read-only commands that never create state, a monitoring-style ``status --check``, ``echo``
with echoscu's options. Every case runs the real ``dicom-node`` process."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from nodetools.peers import free_port, node_cmd, start_node, start_storescp, write_node_config

from dicom_node.store import db

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DICOM_NODE_CONFIG", None)
    return subprocess.run(node_cmd(*args), capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def config(tmp: Path, port: int | None = None, **kw) -> Path:  # type: ignore[no-untyped-def]
    return write_node_config(tmp / "node.toml", port=port or free_port(), data_dir=tmp / "data", **kw)


def test_version() -> None:
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("dicom-node ") and r.stdout.split()[1][0].isdigit()


@pytest.mark.parametrize("command", [["status"], ["jobs"], ["status", "--json"], ["purge", "--dry-run"]])
def test_read_only_commands_never_create_a_database(tmp_path: Path, command: list[str]) -> None:
    r = run(*command, cwd=tmp_path)
    assert r.returncode == 1, r
    assert "no database at" in r.stderr and "node.data_dir" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_status_check_answers_like_a_monitoring_plugin(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    r = run("--config", str(cfg), "status", "--check")
    assert (r.returncode, r.stdout.split(":")[0]) == (3, "UNKNOWN")  # never ran: no database
    port = free_port()
    cfg = config(tmp_path, port)
    node = start_node(cfg, port, tmp_path / "node.log")
    try:
        import time

        deadline = time.monotonic() + 30
        while True:
            r = run("--config", str(cfg), "status", "--check")
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.returncode == 0 and r.stdout.startswith("OK: dicom-node LTDIFF up"), r
        assert len(r.stdout.strip().splitlines()) == 1
    finally:
        assert node.stop() == 0
    r = run("--config", str(cfg), "status", "--check")
    assert r.returncode == 2 and r.stdout.startswith("CRITICAL: dicom-node LTDIFF down"), r
    assert len(r.stdout.strip().splitlines()) == 1
    log = node.log()
    assert "alembic" not in log.lower() and "Context impl" not in log  # no migration chatter at start


def test_status_piped_into_head_ends_quietly(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    database = db.Database(f"sqlite:///{tmp_path / 'data' / 'dicom-node.sqlite'}")
    database.create_all()
    with database.session() as s:
        for i in range(1500):  # more than a pipe holds (64 KiB), so the writer meets the closed pipe
            s.add(db.Series(series_uid=f"1.2.3.{i}", state=db.DONE))
    database.dispose()
    r = subprocess.run(f"{' '.join(node_cmd('--config', str(cfg), 'status', '--last', '1500'))} | head -2",
                       shell=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       timeout=60)
    assert len(r.stdout.splitlines()) == 2
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


@pytest.mark.parametrize("args,needle", [
    (["status", "--instances"], "--instances needs --json"),
    (["jobs", "--state", "bogus"], "invalid choice: 'bogus'"),
    (["purge", "--older-than", "-1"], "must be 0 or more days"),
])
def test_bad_arguments_are_usage_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    r = run("--config", str(config(tmp_path)), *args)
    assert r.returncode == 2 and needle in r.stderr, r


def test_purge_dry_run_deletes_nothing(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    database = db.Database(f"sqlite:///{tmp_path / 'data' / 'dicom-node.sqlite'}")
    database.create_all()
    old = db.utcnow() - timedelta(days=40)
    with database.session() as s:
        s.add(db.Series(series_uid="1.2.3.1", state=db.DONE, first_received_at=old, last_received_at=old))
        s.add(db.Series(series_uid="1.2.3.2", state=db.RECEIVED, first_received_at=old, last_received_at=old))
    r = run("--config", str(cfg), "purge", "--older-than", "30", "--dry-run")
    assert (r.returncode, r.stdout.strip()) == (0, "would purge 1 series (dry run)"), r
    with database.session() as s:
        assert s.query(db.Series).count() == 2
    r = run("--config", str(cfg), "purge", "--older-than", "30")
    assert (r.returncode, r.stdout.strip()) == (0, "purged 1 series")
    database.dispose()


def test_retry_and_resend_say_not_found_alike(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    database = db.Database(f"sqlite:///{tmp_path / 'data' / 'dicom-node.sqlite'}")
    database.create_all()
    database.dispose()
    for cmd in ("retry", "resend"):
        r = run("--config", str(cfg), cmd, "1.2.3.999")
        assert r.returncode == 1 and "series 1.2.3.999 not found" in r.stderr, (cmd, r)


def test_echo_takes_echoscu_options_and_names_what_failed(tmp_path: Path) -> None:
    nothing = free_port()
    cfg = config(tmp_path)
    r = run("--config", str(cfg), "echo", "--port", str(nothing))
    assert r.returncode == 1 and "cannot connect" in r.stdout and f"127.0.0.1:{nothing}" in r.stdout, r
    pacs = start_storescp(tmp_path / "pacs", "PACS")
    try:
        r = run("--config", str(cfg), "echo", "--port", str(pacs.port), "-aec", "PACS", "-aet", "ECHOER")
        assert r.returncode == 0 and "ECHOER -> PACS@127.0.0.1" in r.stdout and "status 0x0000" in r.stdout, r
    finally:
        pacs.stop()
    port = free_port()
    cfg = config(tmp_path, port, extra_node={"allowed_calling_aes": ["SCANNER"]})
    node = start_node(cfg, port, tmp_path / "node.log")
    try:
        r = run("--config", str(cfg), "echo")
        assert r.returncode == 1 and "LTDIFF -> LTDIFF@" in r.stdout and "rejected" in r.stdout, r
        assert run("--config", str(cfg), "echo", "-aet", "SCANNER").returncode == 0
    finally:
        node.stop()


def _serve_fails(cfg: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    r = run("--config", str(cfg), "serve", timeout=timeout)
    assert r.returncode == 4, r
    lines = [x for x in r.stderr.splitlines() if x.startswith("dicom-node: ")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return r


def test_serve_with_its_port_taken_names_the_key(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = _serve_fails(config(tmp_path, port))
        assert f"cannot start: node.port = {port}: cannot listen" in r.stderr
        cfg = config(tmp_path)
        cfg.write_text(cfg.read_text() + f"\n[http]\nenabled = true\nhost = \"127.0.0.1\"\nport = {port}\n")
        r = _serve_fails(cfg)
        assert f"cannot start: http.port = {port}: cannot listen" in r.stderr
    assert not (tmp_path / "data" / "dicom-node.pid").exists()  # a failed start leaves no pidfile


def test_serve_on_a_busy_or_unusable_data_dir_names_the_key(tmp_path: Path) -> None:
    port = free_port()
    cfg = config(tmp_path, port)
    node = start_node(cfg, port, tmp_path / "node.log")
    try:
        other = write_node_config(tmp_path / "second.toml", port=free_port(), data_dir=tmp_path / "data")
        r = _serve_fails(other)
        assert f"node.data_dir = {tmp_path / 'data'}: another dicom-node (PID {node.pid}) is running on it" in r.stderr
    finally:
        node.stop()
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    r = _serve_fails(write_node_config(tmp_path / "f.toml", port=free_port(), data_dir=a_file))
    assert f"node.data_dir = {a_file}: is a file, not a folder" in r.stderr
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):  # root writes anywhere: a read-only filesystem then
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]).returncode == 0
        if not mounted:
            pytest.skip("cannot mount a read-only tmpfs here")
    else:
        ro.chmod(0o555)
    try:
        r = _serve_fails(write_node_config(tmp_path / "ro.toml", port=free_port(), data_dir=ro))
        assert f"node.data_dir = {ro}: is not writable" in r.stderr or f"node.data_dir = {ro}: cannot create" in r.stderr
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=False)
        else:
            ro.chmod(0o755)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_status_shows_partial_delivery_uncut_names_and_a_received_series_destinations(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    database = db.Database(f"sqlite:///{tmp_path / 'data' / 'dicom-node.sqlite'}")
    database.create_all()
    with database.session() as s:
        done = db.Series(series_uid="1.2.3.10", state=db.FAILED, convolution_kernel="STANDARD",
                         rule_name="ge-standard-to-bl64-like", instance_count=3)
        job = db.Job(series=done, rule_name="ge-standard-to-bl64-like", model="default", destinations=["a", "b", "c"],
                     state=db.FAILED, model_name="linear-kernel-filter", model_s=0.4, output_series_uid="1.2.3.11")
        for name, state in (("a", db.SENT), ("b", db.SENT), ("c", db.FAILED)):
            s.add(db.Delivery(job=job, destination=name, state=state))
        arriving = db.Series(series_uid="1.2.3.20", state=db.RECEIVED, convolution_kernel="Br40d", rule_name="br40",
                             instance_count=5)
        s.add(db.Job(series=arriving, rule_name="br40", model="default", destinations=["pacs"], state=db.STREAMING))
        s.add_all([done, arriving])
    database.dispose()
    r = run("--config", str(cfg), "status")
    assert r.returncode == 0, r
    out = r.stdout
    assert "STANDARD " in out and "ge-standard-to-bl64-like" in out and "linear-kernel-filter," in out  # not cut
    assert "\npartial " in out and "!! delivered to a, b; failed to c" in out
    assert "to pacs (after processing)" in out and "not processed yet" in out and "None s" not in out
    r = run("--config", str(cfg), "status", "--json")
    import json

    series = {x["series_uid"]: x for x in json.loads(r.stdout)["series"]}
    assert series["1.2.3.10"]["delivery"] == {"state": "partial", "delivered_to": ["a", "b"], "failed_to": ["c"],
                                            "destinations": 3}
    assert series["1.2.3.20"]["jobs"][0]["destinations"] == ["pacs"]
