"""`apr qa`: the ship gates a model must pass before it ships.

    run_qa(spec, ...) -> QAReport     load once, run the selected gates in order, save the report
    GATES, GATE_NAMES                 the gates (apr.qa.gates), in their fixed order
    gibberish_reason(text)            why a text looks like a broken model's output (None: it does not)

Gates live by theme: gates_static (file and tokenizer), gates_live (generation), gates_parity
(against transformers, the other format, other backends); the report and its history in report.
"""

from __future__ import annotations

import time

from apr.qa.context import QAContext, QAOptions
from apr.qa.gates import GATE_NAMES, GATES, run_gates
from apr.qa.gibberish import gibberish_reason, is_gibberish
from apr.qa.report import QAReport, save, system_info

__all__ = ["GATES", "GATE_NAMES", "QAContext", "QAOptions", "QAReport", "gibberish_reason", "is_gibberish", "run_qa"]


def run_qa(spec=None, options: QAOptions | None = None, only=None, skip=None, min_executed: int = 0,
           progress=None, keep: bool = True, ctx: QAContext | None = None) -> QAReport:
    """Run the gates on `spec` (registry name or path), or on `ctx` (e.g. QAContext.with_model(lm));
    with `keep`, save the report into the history that performance_regression reads."""
    t0 = time.perf_counter()
    ctx = ctx or QAContext(spec, options or QAOptions())
    gates = run_gates(ctx, only, skip, progress)
    try:
        sha = ctx.sha256()
    except OSError:
        sha = None
    report = QAReport(str(ctx.path), sha, gates, (time.perf_counter() - t0) * 1000, system_info(ctx), min_executed)
    if keep:
        save(report)
    return report
