"""`pv status`: the ship % of each model, computed from its contracts, never typed by hand.

ship % = fresh discharged ship-blocking criteria / ship-blocking criteria. A DISCHARGED criterion counts
only when its newest evidence ran on the code and the artifact we have now (apr.contracts.fresh); otherwise
it is STALE, counted beside the %. A contract that does not validate is listed as invalid and counts for
nothing. The report (render_markdown/render_html) lives in report.py.
"""

from __future__ import annotations

import datetime as dt
import html
import os
from pathlib import Path

from apr.contracts.fresh import freshness
from apr.contracts.loader import ContractError
from apr.contracts.schema import Contract, Criterion
from apr.contracts.validate import resolve_evidence, validate_file


def _criterion_row(path: Path, crit: Criterion, sha: str) -> dict:
    f = freshness(path, crit, sha)
    evidence = [resolve_evidence(path, e) for e in crit.evidence_discharged_by]
    doc = f.evidence or {}
    prov = doc.get("provenance") or {}
    folder = evidence[-1].parent if evidence and evidence[-1].suffix else (evidence[-1] if evidence else None)
    return {
        "id": crit.id, "contract": str(path), "rule": crit.rule, "ship_blocking": crit.ship_blocking, "gate": crit.gate,
        "status": f.status, "fresh": f.fresh, "contract_status": crit.discharge_status,
        "counted": f.status == "DISCHARGED", "note": f.reason, "if_fails": crit.if_fails or "",
        "evidence": [str(e.parent if e.suffix else e) for e in evidence],  # link the folder, not the JSON
        "evidence_date": doc.get("date"), "code_fingerprint": prov.get("code_fingerprint"),
        "git_commit": doc.get("git_commit"), "git_dirty": doc.get("git_dirty"),
        "isa_class": prov.get("isa_class"),
        "thresholds": [c.describe() for c in crit.check.verdict], "observed": doc.get("observed") or {},
        "raw_output": [str(folder / n) for n in ("stdout.txt", "stderr.txt") if folder and (folder / n).exists()],
        "falsified_by": crit.falsified_by or [],
    }


def _add_contract(models: dict, path: Path, contract: Contract) -> None:
    meta = contract.metadata
    entry = models.setdefault(meta.model.name, {"model": meta.model.name, "contracts": [], "criteria": []})
    entry["contracts"].append({"file": str(path), "version": meta.version, "status": meta.status,
                               "artifact_sha256": meta.model.artifact_sha256})
    entry["criteria"] += [_criterion_row(path, c, meta.model.artifact_sha256) for c in contract.criteria]


def _finish(entry: dict) -> dict:
    blocking = [c for c in entry["criteria"] if c["ship_blocking"]]
    shut = [c["id"] for c in blocking if c.get("gate") and not c["counted"]]
    if shut:  # a gate not passed on fresh evidence: nothing else counts
        for c in blocking:
            if c["counted"] and not c.get("gate"):
                c["counted"], c["note"] = False, f"held back: gate {', '.join(shut)} is not discharged on fresh evidence"
    entry["gates_shut"] = shut
    done = [c for c in blocking if c["counted"]]
    entry["ship_blocking"], entry["discharged"] = len(blocking), len(done)
    entry["stale"] = sum(c["status"] == "STALE" for c in entry["criteria"])
    entry["ship_pct"] = round(100.0 * len(done) / len(blocking), 1) if blocking else None  # fresh evidence only
    entry["left"] = [{k: c[k] for k in ("id", "status", "if_fails", "note", "rule", "contract")}
                     for c in blocking if not c["counted"]]
    return entry


def summarize(paths: list[Path]) -> dict:
    models: dict[str, dict] = {}
    invalid = []
    for path in paths:
        result = validate_file(path)
        if result.errors or result.contract is None:
            invalid.append({"file": str(path), "errors": len(result.errors), "first_error": result.errors[0].format()})
            continue
        _add_contract(models, path, result.contract)
    return {"models": [_finish(m) for _, m in sorted(models.items())], "invalid": invalid}


def pct_text(entry: dict) -> str:
    if entry["ship_pct"] is None:
        return "n/a (no ship-blocking criteria)"
    gates = f"; gate {', '.join(entry['gates_shut'])} not passed, so nothing else counts" if entry.get("gates_shut") else ""
    return (f"{entry['ship_pct']:g}% ({entry['discharged']}/{entry['ship_blocking']} ship-blocking discharged on "
            f"this code and artifact; {entry['stale']} stale{gates})")


def render_text(summary: dict) -> str:
    lines = []
    for m in summary["models"]:
        lines.append(f"{m['model']}: {pct_text(m)}")
        for c in m["left"]:
            why = c["note"] or c["if_fails"] or "no if_fails given"
            lines.append(f"  left {c['id']:<10} {c['status']:<24} {why}")
    for bad in summary["invalid"]:
        lines.append(f"invalid contract ({bad['errors']} errors): {bad['first_error']}")
    return "\n".join(lines) if lines else "no contracts"


def write_report(summary: dict, report: Path) -> None:
    report = Path(report)
    if report.suffix.lower() not in (".md", ".html", ".htm"):
        raise ContractError(f"--report must end in .md or .html, not {report.name}")
    report.parent.mkdir(parents=True, exist_ok=True)
    from apr.contracts.report import render_html, render_markdown

    render = render_markdown if report.suffix.lower() == ".md" else render_html
    report.write_text(render(summary, report.parent.resolve()), encoding="utf-8")
