"""The ship gates in their fixed order, and the runner.

A gate is `fn(ctx) -> Outcome`; it raises `Skip(reason)` only when a prerequisite is genuinely absent on
this machine (no GPU, transformers not installed). Any other exception fails that gate with its message,
so one broken gate never hides the others. The model is loaded once, before the first gate that runs it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from apr.errors import AprError
from apr.qa import gates_live as live
from apr.qa import gates_parity as parity
from apr.qa import gates_static as static
from apr.qa.context import Outcome, QAContext, Skip
from apr.qa.report import GateResult


@dataclass(frozen=True)
class Gate:
    name: str
    run: Callable[[QAContext], Outcome]
    needs_model: bool
    what: str


GATES: tuple[Gate, ...] = (
    Gate("capability_match", static.capability_match, False, "architecture and tensor types supported by the backend"),
    Gate("tensor_contract", static.tensor_contract, False, "shapes; no NaN/Inf, degenerate or out-of-range tensor"),
    Gate("metadata_plausibility", static.metadata_plausibility, False, "rope theta, context, epsilon, heads, vocab"),
    Gate("tokenizer_roundtrip", static.tokenizer_roundtrip, False, "decode(encode(x)) == x; specials are single ids"),
    Gate("chat_template", static.chat_template, False, "renders, ends with the assistant header, never wraps twice"),
    Gate("golden_output", live.golden_output, True, "2+2, capital of France, fib(n) through the template"),
    Gate("throughput", live.throughput, True, "decode tok/s >= --min-tps"),
    Gate("reference_parity", parity.reference_parity, True, "the default path (prefill, then one token per step) "
         "vs HF transformers float32: top-1 agreement, mean KL"),
    Gate("format_parity", parity.format_parity, True, "GGUF vs its .apr conversion: same tokens, std ratios"),
    Gate("backend_parity", parity.backend_parity, True, "each accelerator vs cpu: cosine, argmax"),
    Gate("state_isolation", live.state_isolation, True, "A, B, A again: A' == A and B != A"),
    Gate("performance_regression", live.performance_regression, True, "decode tok/s within 10% of the baseline "
         "(--baseline: a committed file per machine class; else the last saved run; none: SKIP)"),
)
GATE_NAMES = tuple(g.name for g in GATES)


def selection(only: list[str] | None, skip: list[str] | None) -> dict[str, str | None]:
    """gate name -> None (run it) or why it is left out."""
    for name in [*(only or []), *(skip or [])]:
        if name not in GATE_NAMES:
            raise AprError(f"unknown gate '{name}' (gates: {', '.join(GATE_NAMES)})")
    chosen = {}
    for name in GATE_NAMES:
        if only and name not in only:
            chosen[name] = "not selected (--only)"
        elif skip and name in skip:
            chosen[name] = "skipped on request (--skip)"
        else:
            chosen[name] = None
    return chosen


def run_gates(ctx: QAContext, only=None, skip=None, progress: Callable[[str], None] | None = None) -> list[GateResult]:
    chosen = selection(only, skip)
    if any(g.needs_model and chosen[g.name] is None for g in GATES):
        if progress:
            progress(f"loading {ctx.path.name}")
        ctx.load()  # outside the gates' timings: its time is system_info.load_s
    results = []
    for i, gate in enumerate(GATES, 1):
        if chosen[gate.name] is not None:
            results.append(GateResult(gate.name, False, True, chosen[gate.name]))
            continue
        if progress:
            progress(f"[{i}/{len(GATES)}] {gate.name}")
        results.append(run_gate(ctx, gate))
        if progress:
            progress(f"        {results[-1].status} {results[-1].message}")
    return results


def run_gate(ctx: QAContext, gate: Gate) -> GateResult:
    t0 = time.perf_counter()
    try:
        out = gate.run(ctx)
        result = GateResult(gate.name, bool(out.passed), False, out.message, out.value, out.threshold)
    except Skip as e:
        # a skipped gate never counts as passed: the report says how many executed and passed
        result = GateResult(gate.name, False, True, str(e))
    except Exception as e:  # noqa: BLE001  (a crash is this gate's failure, not the end of the report)
        result = GateResult(gate.name, False, False, _error_line(e))
    result.duration_ms = (time.perf_counter() - t0) * 1000
    return result


def _error_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, AprError) else f"{type(e).__name__}: {text}"
