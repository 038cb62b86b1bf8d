"""The qa report: gate results, the JSON document, the text table, and the saved history.

Every run is saved as `$APR_HOME/qa-reports/<model sha256>/<timestamp>.json`; performance_regression
reads its baseline from there.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PERF_GATE = "performance_regression"


@dataclass
class GateResult:
    name: str
    passed: bool
    skipped: bool
    message: str
    value: Any = None
    threshold: Any = None
    duration_ms: float = 0.0

    @property
    def status(self) -> str:
        return "SKIP" if self.skipped else ("PASS" if self.passed else "FAIL")


@dataclass
class QAReport:
    model: str
    model_sha256: str | None
    gates: list[GateResult]
    total_duration_ms: float
    system_info: dict
    min_executed: int = 0
    timestamp: str = field(default_factory=lambda: now_iso())

    @property
    def executed(self) -> list[GateResult]:
        return [g for g in self.gates if not g.skipped]

    @property
    def passed(self) -> bool:
        """Every executed gate passed (and enough executed); a skip is neither a pass nor a failure."""
        return all(g.passed for g in self.executed) and len(self.executed) >= self.min_executed

    @property
    def summary(self) -> str:
        ex, failed = self.executed, [g.name for g in self.executed if not g.passed]
        skipped = [g.name for g in self.gates if g.skipped]
        head = f"{len(ex)}/{len(self.gates)} gates executed, " + (
            f"{len(failed)} failed: {', '.join(failed)}" if failed else "all passed")
        if len(ex) < self.min_executed:
            head += f"; fewer than --min-executed {self.min_executed}"
        return head + (f"; skipped: {', '.join(skipped)}" if skipped else "")

    def to_dict(self) -> dict:
        return {
            "model": self.model, "model_sha256": self.model_sha256, "passed": self.passed,
            "gates": [_clean(asdict(g)) for g in self.gates],
            "gates_executed": len(self.executed), "gates_skipped": len(self.gates) - len(self.executed),
            "gates_passed": sum(g.passed for g in self.executed),
            "gates_failed": sum(not g.passed for g in self.executed),
            "skipped_gates": [g.name for g in self.gates if g.skipped],
            "total_duration_ms": round(self.total_duration_ms, 1), "timestamp": self.timestamp,
            "summary": self.summary, "system_info": self.system_info,
        }


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _clean(d: dict) -> dict:
    # JSON has no NaN/inf: a non-finite measurement is written as its string
    for k in ("value", "threshold"):
        if isinstance(d[k], float):
            d[k] = round(d[k], 6) if math.isfinite(d[k]) else str(d[k])
    d["duration_ms"] = round(d["duration_ms"], 1)
    return d


def system_info(ctx) -> dict:
    import torch

    from apr import __version__

    lm = ctx.loaded
    info = {"apr": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda_available": torch.cuda.is_available(),
            "dtype": lm.dtype if lm else ctx.options.dtype, "backend": lm.backend if lm else ctx.options.backend,
            "backend_chain": lm.backend_chain if lm else [], "load_s": round(ctx.load_s, 3) if ctx.load_s else None}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


# ---- text table ----

def format_table(report: QAReport) -> str:
    rows = [(g.name, g.status, _fmt(g.value), _fmt(g.threshold), f"{g.duration_ms / 1000:.1f}s", g.message)
            for g in report.gates]
    head = ("gate", "result", "value", "threshold", "time", "message")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    lines = [f"apr qa {report.model}", f"sha256 {report.model_sha256}", ""]
    for r in [head, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
    verdict = "PASS" if report.passed else "FAIL"
    load = report.system_info.get("load_s")
    where = f"{report.system_info.get('backend')}, {report.system_info.get('dtype')}"
    lines += ["", f"{verdict}: {report.summary} ({report.total_duration_ms / 1000:.1f}s"
                  + (f", of which loading {load:.1f}s on {where})" if load else ")")]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ---- history ----

def reports_dir(sha256: str) -> Path:
    from apr.hub import apr_home

    return apr_home() / "qa-reports" / sha256


def save(report: QAReport) -> Path | None:
    """Write the report into the history; a read-only home only loses the baseline (never the run)."""
    if not report.model_sha256:
        return None
    d = reports_dir(report.model_sha256)
    stamp = report.timestamp[:23].replace("-", "").replace(":", "")  # 20260101T120000.123 (UTC)
    tmp = d / f".{stamp}Z-{os.getpid()}.tmp"
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(report.to_dict(), indent=1))
        # two runs within one millisecond (a fast box, or a test) must not replace each other: a link never
        # overwrites, so the second one takes the next free suffix
        for n in range(1000):
            final = d / f"{stamp}Z-{os.getpid()}{f'-{n}' if n else ''}.json"
            try:
                os.link(tmp, final)
                return final
            except FileExistsError:
                continue
        return None
    except OSError:
        return None
    finally:
        tmp.unlink(missing_ok=True)


def history(sha256: str) -> list[dict]:
    """Saved reports for this model, newest first (unreadable files are ignored)."""
    docs = []
    for p in sorted(reports_dir(sha256).glob("*.json")):
        try:
            docs.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(docs, key=lambda d: str(d.get("timestamp", "")), reverse=True)


def baseline(sha256: str, dtype: str | None, backend: str | None) -> dict | None:
    """The newest saved run of this model, dtype and backend whose performance_regression gate passed.

    A run that failed the gate is not a baseline: otherwise a regression would become the new normal on
    the next run. Speeds depend on dtype and backend, so only like is compared with like.
    To start over (new machine), delete $APR_HOME/qa-reports/<sha256>."""
    for doc in history(sha256):
        info = doc.get("system_info") or {}
        if info.get("dtype") != dtype or info.get("backend") != backend:
            continue
        gate = next((g for g in doc.get("gates", []) if g.get("name") == PERF_GATE), None)
        if gate and gate.get("passed") and not gate.get("skipped") and isinstance(gate.get("value"), (int, float)):
            return {"decode_tok_s": float(gate["value"]), "timestamp": doc.get("timestamp")}
    return None
