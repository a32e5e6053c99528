"""The physics QA gate: decide from the images whether a series may be standardized.

Used by the process stage (per rule, ``qa = "refuse" | "flag" | "off"``) and by ``dicom-node
standardize`` (``--qa``, ``--force``). The measures and the envelope are
:mod:`ltdiff_core.qa`; this module turns them into what the node does and records:

==========  ==========================================================================
verdict     meaning
==========  ==========================================================================
pass        input inside the checkpoint's training envelope (and output inside the
            target envelope)
refused     a different kind of input (a kernel on the far side of the smooth/sharp
            boundary, geometry resampling does not handle, air that is not CT air:
            ``ltdiff_core.qa.REFUSE_CHECKS``) and the mode is ``refuse``: the series
            ends ``refused`` with the measured reason, nothing is written or sent
flagged     any other measure outside its training range (noise, NPS, body size, a
            smoother kernel), a refusing finding under ``flag`` (or ``--force``), or the
            output outside the target envelope: standardized, the warning is recorded
            and appended to the output's DerivationDescription
unchecked   the checkpoint carries no envelope: standardized, said so in the output
off         the rule switched the gate off: nothing measured
==========  ==========================================================================

The record (:meth:`GateResult.record`) is stored with the job as provenance and shown by
``dicom-node status`` / ``jobs``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # ltdiff_core.qa pulls in scipy: imported where measured, not by every CLI call
    from ltdiff_core import qa
    from ltdiff_core.kernel_model import KernelModel

PASS, REFUSED, FLAGGED, UNCHECKED, OFF = "pass", "refused", "flagged", "unchecked", "off"


class QARefused(RuntimeError):
    """The gate refused a series; ``str()`` is the one-line reason."""

    def __init__(self, result: GateResult) -> None:
        super().__init__(f"QA refused: {result.reason}")
        self.result = result


@dataclass
class GateResult:
    """What the gate decided for one series (and, after the model, what the output measured)."""

    mode: str
    forced: bool = False
    verdict: qa.Verdict | None = None
    envelope: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def refused(self) -> bool:
        return self.status == REFUSED

    @property
    def status(self) -> str:
        if self.mode == "off" or self.verdict is None:
            return OFF
        if self.verdict.status == "unchecked":
            return UNCHECKED
        if self.verdict.status == "fail":
            return REFUSED if self.mode == "refuse" and not self.forced else FLAGGED
        return FLAGGED if self.verdict.flags or self.verdict.output_findings else PASS

    @property
    def reason(self) -> str:
        return self.verdict.reason if self.verdict is not None else "QA off"

    def warnings(self) -> list[str]:
        """Input finding (when processed anyway) and output findings, one line each."""
        if self.verdict is None:
            return []
        out = [f"input {self.reason}"] if self.verdict.status == "fail" else []
        out += [f"input {w}" for w in self.verdict.input_flags] if self.verdict.status == "flag" else []
        out += [f"output {w}" for w in self.verdict.output_warnings]
        return out

    def note(self) -> str | None:
        """Sentence appended to the DerivationDescription of the output (None when off)."""
        st = self.status
        if st == OFF:
            return None
        if st == UNCHECKED:
            return "QA unchecked: the checkpoint carries no training envelope."
        if st == PASS:
            return "QA pass: input and output within the training envelope."
        how = "forced" if self.forced else "flag"
        return f"QA WARNING ({how}): " + "; ".join(self.warnings()) + "."

    def record(self) -> dict[str, Any]:
        """JSON provenance stored with the job."""
        out: dict[str, Any] = {"mode": self.mode, "forced": self.forced, "verdict": self.status,
                               "reason": self.reason, "warnings": self.warnings()}
        if self.verdict is not None:
            out.update(self.verdict.to_json())
            out["verdict"] = self.status
            out["input_verdict"] = self.verdict.status
        return out


def check_input(model: KernelModel, series: Any, mode: str, forced: bool = False) -> GateResult:
    """Measure an input ``ltdiff_core.dicomio.Series`` against the model's training envelope and
    the geometry it handles."""
    from ltdiff_core import qa

    if mode == "off":
        return GateResult(mode, forced)
    env = model.qa_envelope()
    verdict = qa.assess_input(series.hu, series.spacing, env, qa.series_thickness(series.datasets),
                              model.supported_geometry())
    return GateResult(mode, forced, verdict, env)


def check_output(result: GateResult, out_hu: Any, spacing: Sequence[float]) -> GateResult:
    """Add the output measures (input's patches) and the target-envelope check."""
    from ltdiff_core import qa

    if result.verdict is not None:
        qa.assess_output(result.verdict, out_hu, spacing, result.envelope)
    return result


def annotate(datasets: Sequence[Any], note: str | None) -> None:
    """Append the QA note to each output's DerivationDescription (ST, at most 1024 characters)."""
    if not note:
        return
    for ds in datasets:
        text = str(ds.get("DerivationDescription") or "")
        ds.DerivationDescription = (text + " " + note).strip()[:1024]


def summary(record: dict[str, Any] | None) -> str:
    """``verdict: reason`` for one status line."""
    if not record:
        return "-"
    verdict = record.get("verdict", "-")
    if verdict in (PASS, OFF):
        return verdict
    return f"{verdict}: {'; '.join(record.get('warnings') or []) or record.get('reason', '')}"


def measures_lines(record: dict[str, Any] | None) -> list[str]:
    """The measures of one job, one line per measure (input, envelope, output)."""
    from ltdiff_core import qa

    if not record:
        return ["  qa: not recorded"]
    lines = [f"  qa: {summary(record)} (mode {record.get('mode')}{', forced' if record.get('forced') else ''})"]
    inp, outp = record.get("input") or {}, record.get("output") or {}
    bad_in = {f["check"] for f in record.get("input_findings", []) + record.get("input_flags", [])}
    bad_out = {f["check"] for f in record.get("output_findings", [])}
    names = list(qa.INPUT_MEASURES) + ["body_fraction"]
    for name in names:
        if name in inp:
            lines.append(f"    input  {name:<20} {_v(inp.get(name)):>10}{'  OUTSIDE' if name in bad_in else ''}")
    for name in qa.OUTPUT_MEASURES:
        if name in outp:
            lines.append(f"    output {name:<20} {_v(outp.get(name)):>10}{'  OUTSIDE' if name in bad_out else ''}")
    for name, why in (inp.get("not_measured") or {}).items():
        lines.append(f"    input  {name:<20} not measured: {why}")
    return lines


def _v(x: Any) -> str:
    return "-" if x is None else f"{float(x):.4g}"
