"""The read-only status page: the facts of ``dicom-node status`` as one server-side HTML page.

It renders :func:`dicom_node.admin.status.collect_status` (so the page and the command never disagree)
and adds a before/after thumbnail for each done series. No patient name, ID or birth date is
part of that report, so none can appear here; every value is HTML-escaped, since UIDs, AE titles,
descriptions and reasons come from the network. No scripts.
"""
from __future__ import annotations

from html import escape
from typing import Any

from dicom_node.process.qa_gate import summary as qa_summary

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3}.up{color:#070}.down{color:#b00}.uid{font-family:monospace;font-size:12px}
.done{color:#070}.failed,.refused{color:#b00}.note{color:#666;font-size:12px}
img.thumb{width:96px;height:96px;background:#000;margin-right:4px}td.thumbs{white-space:nowrap}
"""


def e(value: Any) -> str:
    """Escaped text of any value ("-" for None)."""
    return escape("-" if value is None else str(value), quote=True)


def _secs(v: Any) -> str:
    return "-" if v is None else f"{float(v):.2f} s" if float(v) < 10 else f"{float(v):.0f} s"


def done_job(series: dict[str, Any]) -> dict[str, Any] | None:
    """The job whose output a done series delivered (its latest done job with an output)."""
    if series["state"] != "done":
        return None
    for job in reversed(series["jobs"]):
        if job["state"] == "done" and job["output_series_uid"]:
            return job
    return None


def _series_rows(st: dict[str, Any]) -> list[str]:
    rows = []
    for s in st["series"]:
        job = s["jobs"][-1] if s["jobs"] else None
        notes = []
        if job:
            d = job["durations_s"]
            model = job["model"]["name"] or job["model"]["checkpoint"]
            sends = ", ".join(f"{x['destination']} {x['state']} {x['sent']}/{x['total']}" for x in job["deliveries"])
            notes.append(f"job {e(job['job'])} v{e(job['version'])} → <span class=uid>{e(job['output_series_uid'])}</span>")
            notes.append(f"{e(model)}; read {e(_secs(d['read']))}, model {e(_secs(d['model']))}, derive "
                         f"{e(_secs(d['derive']))}, sending {e(_secs(d['sending']))}; {e(sends or 'no destinations')}")
        if s.get("qa"):
            notes.append("qa " + e(qa_summary(s["qa"])))
        counts = s.get("anomalies", {}).get("counts", {})
        if counts:
            notes.append("anomalies: " + e(", ".join(f"{k} {v}" for k, v in sorted(counts.items()))))
        if s["grown_after_processing"]:
            notes.append(f"grew after processing ({e(s['late_instances'])} late instances)")
        if s["error"]:
            notes.append(f"<span class=failed>{e(s['error'])}</span>")
        dj = done_job(s)
        thumbs = ""
        if dj:
            thumbs = "".join(
                f'<img class=thumb src="thumb/{int(dj["job"])}/{w}.png" width=96 height=96 alt="{w}" '
                f'title="{w}: middle slice, soft-tissue window">' for w in ("before", "after"))
        rows.append(
            f"<tr class=series data-series-uid=\"{e(s['series_uid'])}\">"
            f"<td class=\"{e(s['state'])}\">{e(s['state'])}</td><td>{e(s['instances'])}</td>"
            f"<td>{e(s['kernel'])}</td><td>{e(s['rule'])}</td><td>{e(s['description'])}</td>"
            f"<td>{e(_secs(s['durations_s']['complete_to_done']))}</td>"
            f"<td><span class=uid>{e(s['series_uid'])}</span><div class=note>{'<br>'.join(notes)}</div></td>"
            f"<td class=thumbs>{thumbs}</td></tr>")
    return rows


def render_page(st: dict[str, Any]) -> str:
    """The whole page for a :func:`~dicom_node.admin.status.collect_status` report."""
    n = st["node"]
    up = "UP" if n["up"] else "DOWN"
    queue = ("<tr>" + "".join(f"<th>{e(k)}</th>" for k in st["queue"]) + "<th>pending deliveries</th></tr><tr>"
             + "".join(f"<td>{e(v)}</td>" for v in st["queue"].values()) + f"<td>{e(st['pending_deliveries'])}</td></tr>")
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>dicom-node {e(n['ae_title'])} {up}</title><style>{STYLE}</style></head><body>",
        f"<h1>dicom-node <span class={up.lower()}>{up}</span> — AE {e(n['ae_title'])}, port {e(n['port'])}</h1>",
        f"<p>PID {e(n['pid'])} on {e(n['host'])}; heartbeat {e(n['heartbeat_at'])}; started {e(n['started_at'])}; "
        f"version {e(n['version'])}<br>model {e(n['model'] or '(none loaded yet)')} on {e(n['device'])}</p>",
        "<h2>Queue</h2><table id=queue>", queue, "</table>",
        f"<p>throughput {e(st['throughput']['slices_per_min_last_hour'])} slices/min (last hour); received "
        f"{e(st['throughput']['received_images_last_hour'])} images (last hour); spool "
        f"{e(round(st['spool']['spool_bytes'] / 1e6, 1))} MB, outputs {e(round(st['spool']['output_bytes'] / 1e6, 1))} MB</p>",
        "<h2>Last series</h2><table id=series><tr><th>state</th><th>inst.</th><th>kernel</th><th>rule</th>"
        "<th>description</th><th>complete→done</th><th>series / output</th><th>before / after</th></tr>",
        *_series_rows(st), "</table>",
    ]
    ref = st.get("refusals", {})
    if ref.get("recent"):
        parts += [f"<h2>Refused instances</h2><p>{e(ref['last_hour'])} in the last hour; latest first.</p>",
                  "<table id=refusals><tr><th>at</th><th>status</th><th>calling AE</th><th>peer</th>"
                  "<th>SOP Instance UID</th><th>reason</th></tr>"]
        parts += [f"<tr><td>{e(r['at'])}</td><td>{e(r['status'])}</td><td>{e(r['calling_ae'])}</td><td>{e(r['peer'])}</td>"
                  f"<td class=uid>{e(r['sop_instance_uid'])}</td><td>{e(r['reason'])}</td></tr>" for r in ref["recent"]]
        parts.append("</table>")
    if st["failures"]:
        parts += ["<h2>Failures</h2><table id=failures><tr><th>failed at</th><th>series</th><th>reason</th></tr>"]
        parts += [f"<tr><td>{e(f['failed_at'])}</td><td class=uid>{e(f['series_uid'])}</td>"
                  f"<td class=failed>{e(f['error'])}</td></tr>" for f in st["failures"]]
        parts.append("</table>")
    parts.append("<p class=note>Read-only. Metrics: <a href=metrics>/metrics</a>; health: "
                 "<a href=healthz>/healthz</a>.</p></body></html>")
    return "".join(parts)
