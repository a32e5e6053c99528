"""``dicom-node``: a thin command line over the library (serve, status, admin tasks).

Every subcommand reads the same configuration file, so ``status``/``jobs``/``retry``/``purge``
see the database and data directory of the node that ``serve`` runs. Commands that only read
(``status``, ``jobs``) never create a database: with no database where the configuration points
they say so and exit 1.

Exit status (docs/operations.md "Exit status"): 0 success; 1 the command ran but found nothing
to act on, or failed (series not found, C-ECHO failed); 2 usage or configuration error; 3 the QA
gate refused (``standardize``); 4 ``serve`` cannot start (a port in use, an unusable data_dir,
another node on it). ``status --check`` answers like a monitoring plugin: 0 OK, 2 CRITICAL
(down), 3 UNKNOWN (no database).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Sequence

from dicom_node.config import ConfigError, NodeConfig, load_config

CONFIG_ENV = "DICOM_NODE_CONFIG"
LOG_LEVEL_ENV = "DICOM_NODE_LOG_LEVEL"
EXIT_CANNOT_START = 4
#: ``status --check``, as monitoring plugins answer.
CHECK_OK, CHECK_CRITICAL, CHECK_UNKNOWN = 0, 2, 3


class NoDatabase(Exception):
    """A read-only command found no database where the configuration points."""


def _config(args: argparse.Namespace) -> NodeConfig:
    return load_config(args.config or os.environ.get(CONFIG_ENV))


def _existing_database(cfg: NodeConfig) -> str:
    """The database URL of ``cfg`` if its SQLite file exists (a shared database always counts):
    reading must never create state."""
    url = cfg.db_url
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = url[len("sqlite:///"):]
        if not os.path.isfile(path):
            where = "--config FILE or $" + CONFIG_ENV if not cfg.source else str(cfg.source)
            raise NoDatabase(f"no database at {path} (node.data_dir = {cfg.data_dir}; configuration: {where}): "
                             "has a node run with this configuration?")
    return url


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.logs import setup_logging
    from dicom_node.app.service import NodeService

    from dicom_node.app.service import StartError

    cfg = _config(args)
    setup_logging(args.log_level or os.environ.get(LOG_LEVEL_ENV) or cfg.logging.level, cfg.logging.format)
    try:
        return NodeService(cfg, roles=args.roles).serve_forever()
    except StartError as exc:
        print(f"dicom-node: cannot start: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START


def _roles(value: str) -> tuple[str, ...]:
    from dicom_node.config import ROLES

    roles = tuple(r.strip() for r in value.split(",") if r.strip())
    unknown = [r for r in roles if r not in ROLES]
    if not roles or unknown:
        raise argparse.ArgumentTypeError(f"roles are a comma list of {', '.join(ROLES)} (got {value!r})")
    return roles


def cmd_db(args: argparse.Namespace) -> int:
    """``db upgrade`` / ``db current``: the schema version of the configured database."""
    from dicom_node.store import db, migrate

    cfg = _config(args)
    database = db.Database(cfg.db_url)
    try:
        if args.db_command == "upgrade":
            before, after = migrate.upgrade(database.engine)
            print(f"database {database.engine.url.render_as_string(hide_password=True)}: "
                  + (f"upgraded {before or '(unversioned)'} -> {after}" if before != after else f"at {after} (current)"))
        else:
            rev, head = migrate.current(database.engine), migrate.head()
            print(f"{rev or '(unversioned)'} (head {head}){'' if rev == head else ' -- run: dicom-node db upgrade'}")
            return 0 if rev == head else 1
    finally:
        database.dispose()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from dicom_node.admin.status import collect_status, format_status, status_json

    cfg = _config(args)
    try:
        _existing_database(cfg)
    except NoDatabase as exc:
        if args.check:
            print(f"UNKNOWN: dicom-node {cfg.ae_title}: {exc}")
            return CHECK_UNKNOWN
        raise
    st = collect_status(cfg, last=args.last, with_instances=args.instances)
    if args.check:
        print(check_line(st))
        return CHECK_OK if st["node"]["up"] else CHECK_CRITICAL
    print(status_json(st) if args.json else format_status(st))
    return 0


def check_line(st: dict) -> str:
    """One line for a monitoring plugin: OK/CRITICAL, the AE, the queue and the failures."""
    node, queue = st["node"], st.get("queue", {})
    waiting = sum(int(queue.get(k, 0) or 0) for k in ("received", "complete", "queued", "processing", "sending"))
    failed = int(queue.get("failed", 0) or 0)
    state = "OK" if node["up"] else "CRITICAL"
    how = f"up (PID {node.get('pid')})" if node["up"] else "down" + (
        f" since {node['stopped_at']}" if node.get("stopped_at") else "")
    return f"{state}: dicom-node {node.get('ae_title') or ''} {how}; {waiting} series in progress, {failed} failed"


def cmd_jobs(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from dicom_node.store import db
    from dicom_node.admin.status import anomaly_summary, job_dict

    cfg = _config(args)
    database = db.Database(_existing_database(cfg))
    database.create_all()
    with database.session() as s:
        q = select(db.Job).order_by(db.Job.id.desc()).limit(args.last)
        if args.state:
            q = q.where(db.Job.state == args.state)
        if getattr(args, "series_uid", None):
            q = q.join(db.Series).where(db.Series.series_uid == args.series_uid)
        jobs = [(j.series.series_uid, {**job_dict(j), "anomalies": anomaly_summary(j.series) or None})
                for j in s.scalars(q)]
    database.dispose()
    if args.json:
        print(json.dumps([{"series_uid": uid, **j} for uid, j in jobs], indent=2))
        return 0
    print(f"{'JOB':>5} {'V':>2} {'STATE':<11}{'SLICES':>7} {'MODEL':<18}{'MODEL_S':>8}  SERIES -> OUTPUT / ERROR")
    for uid, j in jobs:
        name = str(j["model"]["name"] or j["model"]["checkpoint"])[:17]
        ms = j["durations_s"]["model"]
        tail = j["error"] or j["output_series_uid"] or ""
        print(f"{j['job']:>5} {j['version']:>2} {j['state']:<11}{str(j['output_count'] or '-'):>7} {name:<18}"
              f"{(f'{ms:.1f}' if ms is not None else '-'):>8}  {uid} -> {tail}")
        if j["anomalies"]:
            print(f"{'':>5} !! anomalies: {j['anomalies']}")
        if getattr(args, "series_uid", None):
            from dicom_node.process.qa_gate import measures_lines

            print("\n".join(measures_lines(j.get("qa"))))
    if getattr(args, "series_uid", None) and not jobs:
        print(f"no jobs for series {args.series_uid}")
        return 1
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from dicom_node.store import db
    from dicom_node.app.pipeline import Pipeline

    cfg = _config(args)
    database = db.Database(cfg.db_url)
    database.create_all()
    pipeline = Pipeline(cfg, database)
    n = pipeline.retry(series_uid=args.series_uid, failed=args.failed, force=args.force)
    database.dispose()
    resent = len(pipeline.resent)
    if not n and args.series_uid:
        print(f"dicom-node: series {args.series_uid} not found, or still in progress", file=sys.stderr)
        return 1
    print(f"{n - resent} series queued for reprocessing"
          + (" (QA gate: flag, forced)" if n - resent and args.force else "")
          + f", {resent} re-sent from their existing output")
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    from dicom_node.store import db
    from dicom_node.admin.resend import ResendError, resend

    cfg = _config(args)
    database = db.Database(cfg.db_url)
    database.create_all()
    try:
        r = resend(cfg, database, args.series_uid, destination=args.destination, only_unsent=args.unsent)
    except ResendError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1
    finally:
        database.dispose()
    print(f"{r.instances} instances of output series {r.output_series_uid} (job {r.job}) queued for re-sending "
          f"to {r.deliveries} destination(s)")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from dicom_node.store import db

    from dicom_node.admin.retention import purge

    cfg = _config(args)
    database = db.Database(_existing_database(cfg))
    database.create_all()
    try:
        n = purge(cfg, database, args.older_than, [args.state] if args.state else None, dry_run=args.dry_run)
    finally:
        database.dispose()
    print(f"would purge {n} series (dry run)" if args.dry_run else f"purged {n} series")
    return 0


def cmd_conformance(args: argparse.Namespace) -> int:
    from dicom_node.admin.conformance import conformance_statement

    print(conformance_statement(_config(args)))
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a configured destination (or the node itself) to check the network path."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    cfg = _config(args)
    calling = args.calling_ae or cfg.ae_title
    if args.destination:
        d = cfg.destination(args.destination)
        if d.type == "stow-rs":
            from dicom_node.dispatch.stow import qido_echo

            ok, msg = qido_echo(d)
            print(msg)
            return 0 if ok else 1
        host, port, called = d.host, d.port, d.ae_title
        calling = args.calling_ae or cfg.ae_title
    else:
        host, port, called = "127.0.0.1", cfg.port, cfg.ae_title
    host, port, called = args.host or host, args.port or port, args.called_ae or called
    where = f"C-ECHO {calling} -> {called}@{host}:{port}"
    try:  # a plain TCP connect first, to tell "nothing listens" from what the peer said
        socket.create_connection((host, port), timeout=10).close()
    except OSError as exc:
        print(f"{where}: cannot connect ({exc.strerror or exc})")
        return 1
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        from dicom_node.negotiation import rejection, rejection_text

        prim = rejection(assoc)
        why = ("association aborted or timed out after the connection was accepted" if prim is None
               else rejection_text(prim))
        print(f"{where}: {why}")
        return 1
    rsp = assoc.send_c_echo()
    assoc.release()
    status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
    print(f"{where}: status {'none' if status is None else f'0x{status:04X}'}")
    return 0 if status == 0 else 1


def cmd_standardize(args: argparse.Namespace) -> int:
    from dicom_node.admin.offline import run_standardize

    return int(run_standardize(args))


#: Job states ``jobs --state`` accepts (dicom_node.store.db job states).
JOB_STATES = ("streaming", "queued", "processing", "sending", "done", "failed", "refused")


def _version() -> str:
    from dicom_node.version import SOFTWARE_VERSION

    return str(SOFTWARE_VERSION)


def _days(value: str) -> float:
    try:
        days = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of days, got {value!r}") from None
    if not days >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more days, got {value}")
    return days


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicom-node", description="DICOM node that standardizes CT kernels (Br40 -> Bl64-like).")
    p.add_argument("-c", "--config", help=f"TOML configuration file (default: ${CONFIG_ENV}, else built-in defaults)")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    # `dicom-node serve --config FILE` works as well as `dicom-node --config FILE serve`.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, help="TOML configuration file")

    sp = sub.add_parser("serve", parents=[common], help="run the node (SCP, processing, sending) until SIGTERM")
    sp.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sp.add_argument("--roles", type=_roles, metavar="ROLES",
                    help="comma list of receive,decide,process,dispatch (default: node.roles, all four)")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("db", parents=[common], help="schema version of the database (Alembic)")
    sp.add_argument("db_command", choices=["upgrade", "current"],
                    help="upgrade: to the newest revision (serve does it at start too); current: show the revision")
    sp.set_defaults(func=cmd_db)

    sp = sub.add_parser("status", parents=[common], help="up/down, queue, recent series, failures, throughput")
    sp.add_argument("--json", action="store_true", help="machine-readable output for monitoring")
    sp.add_argument("--last", type=int, default=10, metavar="N", help="show the last N series (default 10)")
    sp.add_argument("--instances", action="store_true", help="include per-instance send state (with --json)")
    sp.add_argument("--check", action="store_true",
                    help="one line and a monitoring exit status: 0 OK, 2 CRITICAL (down), 3 UNKNOWN (no database)")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("jobs", parents=[common], help="list processing jobs (with SERIES_UID: its jobs and QA measures)")
    sp.add_argument("series_uid", nargs="?", metavar="SERIES_UID", help="only this series, with its QA measures")
    sp.add_argument("--state", choices=JOB_STATES, help="only jobs in this state")
    sp.add_argument("--last", type=int, default=20, metavar="N")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_jobs)

    sp = sub.add_parser("retry", parents=[common], help="reprocess a series (new job, new output series)")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("series_uid", nargs="?", metavar="SERIES_UID")
    g.add_argument("--failed", action="store_true", help="every failed series (re-sent when its output exists)")
    sp.add_argument("--force", action="store_true",
                    help="standardize even if the QA gate refuses (the warning is recorded and written to the output)")
    sp.set_defaults(func=cmd_retry)

    sp = sub.add_parser("resend", parents=[common], help="re-send a series' existing output (no new model run)")
    sp.add_argument("series_uid", metavar="SERIES_UID")
    sp.add_argument("--destination", metavar="NAME", help="only this destination (default: all of the job's)")
    sp.add_argument("--unsent", action="store_true", help="only instances not yet acknowledged")
    sp.set_defaults(func=cmd_resend)

    sp = sub.add_parser("purge", parents=[common], help="delete finished series (files and records)")
    sp.add_argument("--older-than", type=_days, metavar="DAYS", help="default: retention.days")
    sp.add_argument("--dry-run", action="store_true", help="count what would be purged, delete nothing")
    sp.add_argument("--state", choices=["done", "failed", "ignored", "unrouted", "refused"])
    sp.set_defaults(func=cmd_purge)

    sp = sub.add_parser("conformance", parents=[common], help="print the DICOM conformance statement for this configuration")
    sp.set_defaults(func=cmd_conformance)

    sp = sub.add_parser("echo", parents=[common],
                        help="C-ECHO the node itself or a configured destination (QIDO-RS for a STOW-RS one)")
    sp.add_argument("--destination", metavar="NAME", help="a configured destination (default: the node itself)")
    sp.add_argument("-aet", "--calling-ae", metavar="AE", help="calling AE title (default: node.ae_title)")
    sp.add_argument("-aec", "--called-ae", metavar="AE", help="called AE title (default: the destination's or the node's)")
    sp.add_argument("--host", help="override the host")
    sp.add_argument("--port", type=int, help="override the port")
    sp.set_defaults(func=cmd_echo)

    sp = sub.add_parser("standardize", help="standardize a series offline (files in, files out)")
    try:
        from dicom_node.admin.offline import add_standardize_arguments

        add_standardize_arguments(sp)
    except ImportError:
        pass
    sp.set_defaults(func=cmd_standardize)
    return p


#: Commands whose output is often piped into ``head``: they end quietly when the reader goes away.
PIPED = ("status", "jobs", "conformance")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "status" and args.instances and not args.json:
        parser.error("status --instances needs --json (the table has no per-instance view)")
    try:
        return int(args.func(args))
    except BrokenPipeError:
        if args.command not in PIPED:
            raise
        # `dicom-node status | head -3`: the reader has gone; end quietly, as a C tool would
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's flush at exit must not fail again
        return 141  # 128 + SIGPIPE
    except NoDatabase as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"dicom-node: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:
        print(f"dicom-node: unknown name {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
