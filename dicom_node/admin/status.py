"""What an admin (or a monitoring probe) needs to know, read from the same database the node
writes: up/down, queue depth per state, recent series with stage durations and provenance,
failures with reasons, throughput, spool usage, model and device in use."""
from __future__ import annotations

import json
import socket
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, object_session

from dicom_node.store import db
from dicom_node.config import ROLES, NodeConfig
from dicom_node.store.heartbeat import heartbeat_fresh, pid_alive
from dicom_node.store.spool import disk_usage


def _iso(t: datetime | None) -> str | None:
    return t.isoformat(timespec="seconds") + "Z" if t else None


def _secs(a: datetime | None, b: datetime | None) -> float | None:
    return round((b - a).total_seconds(), 2) if a and b else None


def job_dict(job: db.Job) -> dict[str, Any]:
    """Provenance of one processing run."""
    return {
        "job": job.id,
        "version": job.version,
        "state": job.state,
        "rule": job.rule_name,
        "model": {"name": job.model_name, "version": job.model_version, "sha256": job.model_sha256,
                  "method": job.method, "checkpoint": job.model},
        "destinations": list(job.destinations or []),  # frozen at routing, before any delivery exists
        "sampler": job.sampler,
        "seed": job.seed,
        "device": job.device,
        "output_series_uid": job.output_series_uid,
        "output_count": job.output_count,
        "streamed_slices": job.streamed_slices,  # outputs made while the series was arriving
        "durations_s": {
            "queued": _secs(job.created_at, job.processing_started_at),
            "read": job.read_s, "model": job.model_s, "derive": job.derive_s,
            "processing": _secs(job.processing_started_at, job.processing_finished_at),
            "sending": _secs(job.sending_started_at, job.finished_at),
        },
        "finished_at": _iso(job.finished_at),
        "error": job.error,
        "qa": job.qa,
        "deliveries": [
            {
                "destination": d.destination, "state": d.state, "attempts": d.attempts, "error": d.error,
                "sent": sum(x.state == db.SENT for x in d.sends), "total": len(d.sends),
                "started_at": _iso(d.started_at), "finished_at": _iso(d.finished_at), "resent_at": _iso(d.resent_at),
                "instances": [
                    {"sop_instance_uid": x.sop_instance_uid, "state": x.state,
                     "status": None if x.status is None else f"0x{x.status:04X}", "attempts": x.attempts,
                     "sent_at": _iso(x.sent_at), "error": x.error}
                    for x in d.sends
                ],
            }
            for d in job.deliveries
        ],
    }


def anomalies_dict(s: db.Series) -> dict[str, Any]:
    """What was odd about a series (gap, duplicate, conflict, late, localizer, mixed ...):
    counts per kind and the recorded details."""
    counts: dict[str, int] = {}
    for a in s.anomalies:
        counts[a.kind] = counts.get(a.kind, 0) + 1
    if s.late_instances:
        counts["late"] = s.late_instances
    return {"counts": counts,
            "details": [{"kind": a.kind, "sop_instance_uid": a.sop_instance_uid, "detail": a.detail,
                         "at": _iso(a.created_at)} for a in s.anomalies[-50:]],
            "excluded": _excluded_count(s)}


def _excluded_count(s: db.Series) -> int:
    """Instances kept but excluded from processing (localizers ...), counted in the database:
    loading every instance row of a 2000-slice series to count a handful is what made the
    status page slow."""
    session = object_session(s)
    if session is None:
        return sum(1 for i in s.instances if i.excluded)
    return int(session.scalar(select(func.count()).select_from(db.Instance).where(
        db.Instance.series_id == s.id, db.Instance.excluded.is_not(None), db.Instance.excluded != "")) or 0)


def anomaly_summary(s: db.Series) -> str:
    """One line, e.g. ``gap 1, duplicate 2, late 7``."""
    counts = anomalies_dict(s)["counts"]
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def qa_brief(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The QA verdict of a series' latest job (measures stay in its job entry)."""
    if not record:
        return None
    return {"verdict": record.get("verdict"), "reason": record.get("reason"), "mode": record.get("mode"),
            "forced": record.get("forced", False), "warnings": record.get("warnings", [])}


def series_dict(s: db.Series, with_instances: bool = False) -> dict[str, Any]:
    """One series with its input identity, timing and every job's provenance."""
    last_job = s.jobs[-1] if s.jobs else None
    end = last_job.finished_at if last_job and last_job.finished_at else None
    out = {
        "series_uid": s.series_uid,
        "study_uid": s.study_uid,
        "state": s.state,
        "error": s.error,
        "modality": s.modality,
        "kernel": s.convolution_kernel,
        "description": s.series_description,
        "instances": s.instance_count,
        "expected_count": s.expected_count,
        "calling_ae": s.calling_ae,
        "peer_address": s.peer_address,
        "first_received_at": _iso(s.first_received_at),
        "last_received_at": _iso(s.last_received_at),
        "completed_at": _iso(s.completed_at),
        "complete_reason": s.complete_reason,
        "rule": s.rule_name,
        "grown_after_processing": s.grown_after_processing,
        "late_instances": s.late_instances,
        "anomalies": anomalies_dict(s),
        "durations_s": {
            "receive": _secs(s.first_received_at, s.last_received_at),
            "complete_to_done": _secs(s.completed_at, end),
        },
        "jobs": [job_dict(j) for j in s.jobs],
        "qa": qa_brief(last_job.qa if last_job else None),
        "delivery": delivery_summary(last_job),
    }
    if not with_instances:
        for j in out["jobs"]:
            for d in j["deliveries"]:
                d.pop("instances")
    return out


def state_counts(s: Session) -> dict[str, int]:
    """Series per state, every state present (0 when none)."""
    counts = dict(s.execute(select(db.Series.state, func.count()).group_by(db.Series.state)).all())
    return {state: int(counts.get(state, 0)) for state in db.SERIES_STATES}


def pending_deliveries(s: Session) -> int:
    return int(s.scalar(select(func.count(db.Delivery.id)).where(db.Delivery.state == db.PENDING)) or 0)


def collect_status(config: NodeConfig, last: int = 10, with_instances: bool = False) -> dict[str, Any]:
    """The whole status report as a JSON-serialisable dict."""
    database = db.Database(config.db_url)
    try:
        database.create_all()
        now = db.utcnow()
        with database.session() as s:
            workers = workers_status(s, now)
            # The node is up when every role runs somewhere; its face is the receiver of this AE.
            up = all(any(r in w["roles"] and w["up"] for w in workers) for r in ROLES)
            hb = next((w for w in workers if "receive" in w["roles"] and w["ae_title"] == config.ae_title), None)
            hb = hb or (workers[0] if workers else None)
            pid = None
            try:
                pid = int(config.pid_file.read_text().strip())
            except (OSError, ValueError):
                pass
            recent = s.scalars(select(db.Series).order_by(db.Series.last_received_at.desc()).limit(last)).all()
            failures = s.scalars(
                select(db.Series).where(db.Series.state == db.FAILED).order_by(db.Series.state_changed_at.desc()).limit(20)
            ).all()
            hour_ago = now - timedelta(hours=1)
            slices_hour = s.scalar(
                select(func.coalesce(func.sum(db.Job.output_count), 0)).where(
                    db.Job.state == db.DONE, db.Job.finished_at >= hour_ago)
            )
            received_hour = s.scalar(select(func.count(db.Instance.id)).where(db.Instance.received_at >= hour_ago))
            refusals = s.scalars(select(db.Refusal).order_by(db.Refusal.id.desc()).limit(20)).all()
            refused_hour = s.scalar(select(func.count(db.Refusal.id)).where(db.Refusal.received_at >= hour_ago))
            return {
                "node": {
                    "up": up,
                    "pid": hb["pid"] if hb else pid,
                    "host": hb["host"] if hb else None,
                    "ae_title": config.ae_title,
                    "port": (hb["port"] if hb else None) or config.port,
                    "started_at": hb["started_at"] if hb else None,
                    "heartbeat_at": hb["heartbeat_at"] if hb else None,
                    "stopped_at": hb["stopped_at"] if hb else None,
                    "version": hb["version"] if hb else None,
                    "model": next((w["model"] for w in workers if w["model"]), None),
                    "device": next((w["device"] for w in workers if w["device"]), None) or config.processing.device,
                    "roles_down": [r for r in ROLES if not any(r in w["roles"] and w["up"] for w in workers)],
                },
                "workers": workers,
                "queue": state_counts(s),
                "pending_deliveries": pending_deliveries(s),
                "throughput": {
                    "slices_per_min_last_hour": round(float(slices_hour or 0) / 60.0, 2),
                    "received_images_last_hour": int(received_hour or 0),
                },
                "spool": {
                    "path": str(config.data_dir),
                    "spool_bytes": disk_usage(config.spool_dir),
                    "output_bytes": disk_usage(config.output_dir),
                },
                "series": [series_dict(x, with_instances) for x in recent],
                "failures": [
                    {"series_uid": x.series_uid, "failed_at": _iso(x.state_changed_at), "error": x.error}
                    for x in failures
                ],
                "refusals": {
                    "last_hour": int(refused_hour or 0),
                    "recent": [
                        {"at": _iso(r.received_at), "calling_ae": r.calling_ae, "peer": r.peer_address,
                         "sop_instance_uid": r.sop_instance_uid, "series_uid": r.series_uid,
                         "status": f"0x{r.status:04X}", "reason": r.reason, "quarantine": r.quarantine_path}
                        for r in refusals
                    ],
                },
            }
    finally:
        database.dispose()


def workers_status(s: Any, now: datetime) -> list[dict[str, Any]]:
    """Every process's heartbeat (host, pid, roles, last beat, up/down) and what it holds now.
    A row is up when its beat is fresh and it has not stopped; on this host the PID must run too."""
    here = socket.gethostname()
    claimed: dict[str, int] = {}
    for owner, n in s.execute(select(db.Job.claimed_by, func.count()).where(db.Job.state == db.PROCESSING)
                              .group_by(db.Job.claimed_by)).all():
        if owner:
            key = owner.rsplit(":", 1)[0]
            claimed[key] = claimed.get(key, 0) + int(n)
    out = []
    for hb in s.scalars(select(db.Heartbeat).order_by(db.Heartbeat.started_at.desc())):
        fresh = heartbeat_fresh(hb, now)
        alive = pid_alive(hb.pid) if hb.hostname == here else True
        out.append({
            "host": hb.hostname, "pid": hb.pid, "roles": hb.role_list, "up": bool(fresh and alive),
            "ae_title": hb.ae_title, "port": hb.port,
            "started_at": _iso(hb.started_at), "heartbeat_at": _iso(hb.heartbeat_at),
            "beat_age_s": round((now - hb.heartbeat_at).total_seconds(), 1), "stopped_at": _iso(hb.stopped_at),
            "version": hb.version, "model": hb.model, "device": hb.device,
            "jobs_processing": claimed.get(f"{hb.hostname}:{hb.pid}", 0),
        })
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def delivery_summary(job: db.Job | None) -> dict[str, Any] | None:
    """Which destinations hold the output: ``partial`` when some do and some failed (the series
    is ``failed``, but the PACS that received it hold a complete copy)."""
    if job is None or not job.deliveries:
        return None
    sent = [d.destination for d in job.deliveries if d.state == db.SENT]
    failed = [d.destination for d in job.deliveries if d.state == db.FAILED]
    state = ("delivered" if len(sent) == len(job.deliveries) else "partial" if sent and failed
             else "failed" if failed and not sent and len(failed) == len(job.deliveries) else "in progress")
    return {"state": state, "delivered_to": sent, "failed_to": failed, "destinations": len(job.deliveries)}


def _col(values: list[str], header: str, cap: int) -> int:
    """A column as wide as its longest value (at most ``cap``), never cutting what fits."""
    return min(cap, max([len(header), *(len(v) for v in values)])) + 1


def format_status(st: dict[str, Any]) -> str:
    """Human-readable rendering of :func:`collect_status`."""
    n = st["node"]
    lines = [
        f"dicom-node {'UP' if n['up'] else 'DOWN'}  AE {n['ae_title']}  port {n['port']}  PID {n['pid']}"
        f"  host {n['host']}  heartbeat {n['heartbeat_at']}",
        f"model {n['model'] or '(none loaded yet)'}  device {n['device']}  version {n['version']}",
        *(["roles without a running process: " + ", ".join(n["roles_down"])] if n.get("roles_down") else []),
        *[f"  {'up  ' if w['up'] else 'DOWN'} {','.join(w['roles']):<31} {w['host']}:{w['pid']}"
          f"  beat {w['beat_age_s']:.0f} s ago" + (f"  AE {w['ae_title']} port {w['port']}" if w["port"] else "")
          + (f"  processing {w['jobs_processing']}" if w["jobs_processing"] else "")
          + (f"  stopped {w['stopped_at']}" if w["stopped_at"] else "")
          for w in st.get("workers", [])],
        "queue: " + "  ".join(f"{k} {v}" for k, v in st["queue"].items()),
        f"pending deliveries {st['pending_deliveries']}  throughput {st['throughput']['slices_per_min_last_hour']}"
        f" slices/min (last hour)  received {st['throughput']['received_images_last_hour']} images (last hour)",
        f"spool {_mb(st['spool']['spool_bytes'])}  outputs {_mb(st['spool']['output_bytes'])}  in {st['spool']['path']}",
        "",
    ]
    kw = _col([str(s["kernel"] or "-") for s in st["series"]], "KERNEL", 16)
    rw = _col([str(s["rule"] or "-") for s in st["series"]], "RULE", 32)
    indent = " " * (11 + 6 + kw + rw)
    lines.append(f"{'STATE':<11}{'INST':>5} {'KERNEL':<{kw}}{'RULE':<{rw}}{'COMPLETE->DONE':>15}  SERIES / OUTPUT")
    for s in st["series"]:
        job = s["jobs"][-1] if s["jobs"] else None
        dur = s["durations_s"]["complete_to_done"]
        state = "partial" if (s.get("delivery") or {}).get("state") == "partial" else s["state"]
        lines.append(f"{state:<11}{s['instances']:>5} {str(s['kernel'] or '-'):<{kw}}{str(s['rule'] or '-'):<{rw}}"
                     f"{(f'{dur:.1f} s' if dur is not None else '-'):>15}  {s['series_uid']}")
        if job:
            d = job["durations_s"]
            sends = ", ".join(f"{x['destination']} {x['state']} {x['sent']}/{x['total']}" for x in job["deliveries"])
            if not sends and job.get("destinations"):
                sends = "to " + ", ".join(job["destinations"]) + " (after processing)"
            model = job["model"]["name"] or job["model"]["checkpoint"]
            took = f"model {d['model']:.1f} s" if d["model"] is not None else "not processed yet"
            lines.append(f"{indent}-> {job['output_series_uid'] or '-'} (job {job['job']} v{job['version']}, "
                         f"{model}, {took}, {sends or 'no destinations'})")
        if state == "partial":
            dl = s["delivery"]
            lines.append(f"{indent}!! delivered to {', '.join(dl['delivered_to'])}; failed to {', '.join(dl['failed_to'])}")
        if s.get("qa"):
            from dicom_node.process.qa_gate import summary

            lines.append(f"{indent}qa {summary(s['qa'])}")
        if s["grown_after_processing"]:
            lines.append(f"{indent}!! grew after processing ({s['late_instances']} late instances)")
        counts = s.get("anomalies", {}).get("counts", {})
        if counts:
            lines.append(f"{indent}!! anomalies: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        if s["state"] == "refused" and s["error"]:
            lines.append(f"{indent}!! refused: {s['error']}")
    ref = st.get("refusals", {})
    if ref.get("recent"):
        lines += ["", f"refused instances ({ref['last_hour']} in the last hour; latest first):"]
        lines += [f"  {r['at']} {r['status']} {r['calling_ae']}@{r['peer']} {r['sop_instance_uid']}: {r['reason']}"
                  for r in ref["recent"][:10]]
    if st["failures"]:
        lines += ["", "failures:"]
        lines += [f"  {f['failed_at']} {f['series_uid']}: {f['error']}" for f in st["failures"]]
    return "\n".join(lines)


def status_json(st: dict[str, Any]) -> str:
    return json.dumps(st, indent=2)
