"""Prometheus metrics computed from the database at scrape time.

The stages may run as separate processes sharing one database, so in-process counters would
each see only their own part; this collector reads the shared tables on every scrape instead
(the same queries as ``dicom-node status`` where they exist). Counters here are counts of rows:
retention purges rows, which Prometheus sees as a counter reset.
"""
from __future__ import annotations

import bisect
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString
from sqlalchemy import func, select

from dicom_node.store import db
from dicom_node.config import NodeConfig
from dicom_node.admin.status import pending_deliveries, state_counts

PREFIX = "dicom_node"
#: Upper bounds (seconds) of the stage duration histogram: a slice batch takes well under a second
#: on a GPU, a long series on a CPU or a slow PACS many minutes.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
#: Refusal classes (label ``reason``): a fixed, short set whatever the reasons' text says.
REFUSAL_CLASSES = ("out_of_resources", "sop_class_not_supported", "data_set_mismatch", "cannot_understand", "other")
STAGES = ("read", "model", "derive", "send")


def refusal_class(status: int) -> str:
    """The class of a C-STORE failure status (PS3.4 B.2.3 / PS3.7 C): bounded label values."""
    if status == 0x0122:
        return "sop_class_not_supported"
    if status & 0xFF00 == 0xA700:
        return "out_of_resources"
    if status & 0xFF00 == 0xA900:
        return "data_set_mismatch"
    if status & 0xF000 == 0xC000:
        return "cannot_understand"
    return "other"


def histogram_buckets(values: Sequence[float], bounds: Sequence[float] = DURATION_BUCKETS) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs ending with ``+Inf``, as the text format wants them."""
    ordered = sorted(values)
    out = [(floatToGoString(b), float(bisect.bisect_right(ordered, b))) for b in bounds]
    out.append(("+Inf", float(len(ordered))))
    return out


class NodeCollector(Collector):
    """Every metric of the node, read from ``database`` (and the spool volume) per scrape."""

    def __init__(self, config: NodeConfig, database: db.Database) -> None:
        self.config = config
        self.db = database

    def collect(self) -> Iterable[Metric]:
        return list(self._collect())

    def _collect(self) -> Iterator[Metric]:
        p = PREFIX
        now = db.utcnow()
        with self.db.session() as s:
            received = s.scalar(select(func.count()).select_from(db.Instance)) or 0
            c = CounterMetricFamily(f"{p}_instances_received", "Instances received and stored (rows in the database).")
            c.add_metric([], float(received))
            yield c

            refused = {k: 0 for k in REFUSAL_CLASSES}
            for status, n in s.execute(select(db.Refusal.status, func.count()).group_by(db.Refusal.status)):
                refused[refusal_class(int(status))] += int(n)
            c = CounterMetricFamily(f"{p}_instances_refused", "Instances refused at receive, by class of the "
                                    "C-STORE failure status.", labels=["reason"])
            for k in REFUSAL_CLASSES:
                c.add_metric([k], float(refused[k]))
            yield c

            g = GaugeMetricFamily(f"{p}_series", "Series per state.", labels=["state"])
            for state, n in state_counts(s).items():
                g.add_metric([state], float(n))
            yield g

            durations: dict[str, list[float]] = {k: [] for k in STAGES}
            for read_s, model_s, derive_s in s.execute(
                    select(db.Job.read_s, db.Job.model_s, db.Job.derive_s).where(db.Job.processing_finished_at.is_not(None))):
                for k, v in (("read", read_s), ("model", model_s), ("derive", derive_s)):
                    if v is not None:
                        durations[k].append(float(v))
            for started, finished in s.execute(
                    select(db.Delivery.started_at, db.Delivery.finished_at).where(
                        db.Delivery.state == db.SENT, db.Delivery.started_at.is_not(None),
                        db.Delivery.finished_at.is_not(None))):
                durations["send"].append(max((finished - started).total_seconds(), 0.0))
            h = HistogramMetricFamily(f"{p}_stage_duration_seconds", "Duration of each stage per job (send: per "
                                      "delivery, first attempt to last acknowledgement).", labels=["stage"])
            for k in STAGES:
                h.add_metric([k], histogram_buckets(durations[k]), sum_value=float(sum(durations[k])))
            yield h

            queued = s.scalar(select(func.count()).select_from(db.Job).where(db.Job.state == db.QUEUED)) or 0
            g = GaugeMetricFamily(f"{p}_jobs_queued", "Processing jobs waiting for a worker.")
            g.add_metric([], float(queued))
            yield g
            g = GaugeMetricFamily(f"{p}_deliveries_pending", "Deliveries not yet acknowledged (incl. waiting to retry).")
            g.add_metric([], float(pending_deliveries(s)))
            yield g

            failed = s.scalar(select(func.count()).select_from(db.Delivery).where(db.Delivery.state == db.FAILED)) or 0
            c = CounterMetricFamily(f"{p}_deliveries_failed", "Deliveries given up (permanent rejection or retry "
                                    "budget spent).")
            c.add_metric([], float(failed))
            yield c
            retries = s.scalar(select(func.coalesce(func.sum(db.Delivery.attempts - 1), 0)).where(
                db.Delivery.attempts > 1)) or 0
            c = CounterMetricFamily(f"{p}_delivery_retries", "Delivery attempts after the first.")
            c.add_metric([], float(retries))
            yield c

            loaded = GaugeMetricFamily(f"{p}_model_loaded", "Model loaded by a running process (1 per model), from "
                                       "its heartbeat.", labels=["ae_title", "host", "pid", "model", "device"])
            age = GaugeMetricFamily(f"{p}_heartbeat_age_seconds", "Seconds since a running process's last heartbeat.",
                                    labels=["ae_title", "host", "pid", "roles"])
            for hb in s.scalars(select(db.Heartbeat).where(db.Heartbeat.stopped_at.is_(None))):
                who = [hb.ae_title or "", hb.hostname, str(hb.pid)]
                age.add_metric([*who, hb.roles], max((now - hb.heartbeat_at).total_seconds(), 0.0))
                if hb.model:
                    loaded.add_metric([*who, hb.model, hb.device or ""], 1.0)
            yield loaded
            yield age

        g = GaugeMetricFamily(f"{p}_spool_free_bytes", "Free bytes on the spool volume.")
        g.add_metric([], float(shutil.disk_usage(self._existing(self.config.spool_dir)).free))
        yield g

    @staticmethod
    def _existing(path: Path) -> Path:
        """The spool or, before the first start created it, its nearest existing parent."""
        p = path
        while not p.exists() and p != p.parent:
            p = p.parent
        return p


def registry_for(config: NodeConfig, database: db.Database) -> CollectorRegistry:
    """A registry holding only the node's collector (no process metrics of this one process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(config, database))
    return registry
