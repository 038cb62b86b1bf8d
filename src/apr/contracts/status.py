"""`pv status`: the ship % of each model, computed from its contracts, never typed by hand.

ship % = discharged ship-blocking criteria / ship-blocking criteria. A DISCHARGED criterion whose live
discharge ran on another artifact than the contract names does not count (the evidence is stale). A
contract that does not validate is listed as invalid and counts for nothing.
"""

from __future__ import annotations

import datetime as dt
import html
import os
from pathlib import Path

from apr.contracts.loader import ContractError
from apr.contracts.schema import Contract, Criterion
from apr.contracts.validate import resolve_evidence, validate_file


def _counted(crit: Criterion, sha: str) -> tuple[bool, str]:
    if crit.discharge_status != "DISCHARGED":
        return False, ""
    if crit.live_discharge and crit.live_discharge.artifact_sha256 != sha:
        return False, "discharged on a different artifact; discharge it again"
    return True, ""


def _criterion_row(path: Path, crit: Criterion, sha: str) -> dict:
    counted, note = _counted(crit, sha)
    evidence = [resolve_evidence(path, e) for e in crit.evidence_discharged_by]
    return {
        "id": crit.id, "contract": str(path), "rule": crit.rule, "ship_blocking": crit.ship_blocking,
        "status": crit.discharge_status, "counted": counted, "note": note, "if_fails": crit.if_fails or "",
        "evidence": [str(e.parent if e.suffix else e) for e in evidence],  # link the folder, not the JSON
    }


def _add_contract(models: dict, path: Path, contract: Contract) -> None:
    meta = contract.metadata
    entry = models.setdefault(meta.model.name, {"model": meta.model.name, "contracts": [], "criteria": []})
    entry["contracts"].append({"file": str(path), "version": meta.version, "status": meta.status,
                               "artifact_sha256": meta.model.artifact_sha256})
    entry["criteria"] += [_criterion_row(path, c, meta.model.artifact_sha256) for c in contract.criteria]


def _finish(entry: dict) -> dict:
    blocking = [c for c in entry["criteria"] if c["ship_blocking"]]
    done = [c for c in blocking if c["counted"]]
    entry["ship_blocking"], entry["discharged"] = len(blocking), len(done)
    entry["ship_pct"] = round(100.0 * len(done) / len(blocking), 1) if blocking else None
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
    return f"{entry['ship_pct']:g}% ({entry['discharged']}/{entry['ship_blocking']} ship-blocking discharged)"


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


def _link(target: str, report_dir: Path) -> str:
    return os.path.relpath(target, report_dir).replace(os.sep, "/")


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(summary: dict, report_dir: Path) -> str:
    out = ["# Ship status", "", f"Computed by `pv status` on {dt.date.today().isoformat()} from the contracts; "
           "ship % = discharged ship-blocking criteria / ship-blocking criteria.", ""]
    for m in summary["models"]:
        out += [f"## {m['model']}: {pct_text(m)}", ""]
        out += [f"- contract [{Path(c['file']).name}]({_link(c['file'], report_dir)}) v{c['version']} ({c['status']}), "
                f"artifact sha256 `{c['artifact_sha256']}`" for c in m["contracts"]]
        out += ["", "| ID | Rule | Ship-blocking | Status | Evidence | If it fails |", "|---|---|---|---|---|---|"]
        for c in m["criteria"]:
            links = ", ".join(f"[{Path(e).name}]({_link(e, report_dir)})" for e in c["evidence"]) or "-"
            status = c["status"] + (f" ({c['note']})" if c["note"] else "")
            out.append(f"| {c['id']} | {_md_cell(c['rule'])} | {'yes' if c['ship_blocking'] else 'no'} | {status} "
                       f"| {links} | {_md_cell(c['if_fails'])} |")
        left = [f"- **{c['id']}** {c['status']}: {_md_cell(c['note'] or c['if_fails'] or 'no if_fails given')}" for c in m["left"]]
        out += ["", "Left to ship:" if left else "Nothing left: every ship-blocking criterion is discharged.", *left, ""]
    if summary["invalid"]:
        out += ["## Invalid contracts (not counted)", ""] + [f"- `{_md_cell(b['first_error'])}`" for b in summary["invalid"]]
    return "\n".join(out) + "\n"


def render_html(summary: dict, report_dir: Path) -> str:
    e = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>Ship status</title>",
           "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}.DISCHARGED{color:#060}"
           ".FALSIFIED{color:#a00}</style></head><body><h1>Ship status</h1>",
           f"<p>Computed by <code>pv status</code> on {dt.date.today().isoformat()}; ship % = discharged "
           "ship-blocking criteria / ship-blocking criteria.</p>"]
    for m in summary["models"]:
        out.append(f"<h2>{e(m['model'])}: {e(pct_text(m))}</h2><ul>")
        out += [f"<li>contract <a href='{e(_link(c['file'], report_dir))}'>{e(Path(c['file']).name)}</a> v{e(c['version'])}, "
                f"artifact sha256 <code>{e(c['artifact_sha256'])}</code></li>" for c in m["contracts"]]
        out.append("</ul><table><tr><th>ID</th><th>Rule</th><th>Ship-blocking</th><th>Status</th><th>Evidence</th><th>If it fails</th></tr>")
        for c in m["criteria"]:
            links = ", ".join(f"<a href='{e(_link(x, report_dir))}'>{e(Path(x).name)}</a>" for x in c["evidence"]) or "-"
            note = f" ({e(c['note'])})" if c["note"] else ""
            out.append(f"<tr><td>{e(c['id'])}</td><td>{e(c['rule'])}</td><td>{'yes' if c['ship_blocking'] else 'no'}</td>"
                       f"<td class='{c['status']}'>{c['status']}{note}</td><td>{links}</td><td>{e(c['if_fails'])}</td></tr>")
        out.append("</table>")
    for b in summary["invalid"]:
        out.append(f"<p class='FALSIFIED'>invalid contract, not counted: <code>{e(b['first_error'])}</code></p>")
    return "\n".join(out + ["</body></html>"]) + "\n"


def write_report(summary: dict, report: Path) -> None:
    report = Path(report)
    if report.suffix.lower() not in (".md", ".html", ".htm"):
        raise ContractError(f"--report must end in .md or .html, not {report.name}")
    report.parent.mkdir(parents=True, exist_ok=True)
    render = render_markdown if report.suffix.lower() == ".md" else render_html
    report.write_text(render(summary, report.parent.resolve()), encoding="utf-8")
