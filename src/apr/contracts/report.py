"""`pv status --report FILE.md|FILE.html`: the ship status for people.

Per criterion: status (fresh or stale, and why), the observed values beside the thresholds, the evidence's
date, code fingerprint and commit, and links to the evidence folder and the raw output. Every link is
relative to the report's folder, so the folder (with contracts/ and evidence/) can be published as is.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
from pathlib import Path


def _link(target: str, report_dir: Path) -> str:
    return os.path.relpath(Path(target).resolve(), report_dir).replace(os.sep, "/")


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _observed(c: dict) -> list[str]:
    return [f"{p} = {json.dumps(v)}" for p, v in (c["observed"] or {}).items()]


def _provenance(c: dict) -> str:
    if not c["evidence_date"]:
        return "-"
    fp = (c["code_fingerprint"] or "none")[:12]
    commit = (c["git_commit"] or "none")[:10] + (" (dirty)" if c["git_dirty"] else "")
    return f"{c['evidence_date']}, code {fp}, commit {commit}, {c['isa_class'] or 'isa ?'}"


def _header(pct_text, m) -> str:
    return f"{m['model']}: {pct_text(m)}"


def render_markdown(summary: dict, report_dir: Path) -> str:
    from apr.contracts.status import pct_text

    out = ["# Ship status", "", f"Computed by `pv status` on {dt.date.today().isoformat()} from the contracts; ship % "
           "counts only criteria discharged on the current code fingerprint and artifact.", ""]
    for m in summary["models"]:
        out += [f"## {_header(pct_text, m)}", ""]
        out += [f"- contract [{Path(c['file']).name}]({_link(c['file'], report_dir)}) v{c['version']} ({c['status']}), "
                f"artifact sha256 `{c['artifact_sha256']}`" for c in m["contracts"]]
        out += ["", "| ID | Rule | Status | Threshold | Observed | Evidence (date, code, commit) | Raw output |",
                "|---|---|---|---|---|---|---|"]
        for c in m["criteria"]:
            links = ", ".join(f"[{Path(e).name}]({_link(e, report_dir)})" for e in c["evidence"][-1:]) or "-"
            raw = ", ".join(f"[{Path(r).name}]({_link(r, report_dir)})" for r in c["raw_output"]) or "-"
            status = c["status"] + (f" ({c['note']})" if c["note"] else "") + ("" if c["ship_blocking"] else ", not blocking")
            out.append(f"| {c['id']} | {_md(c['rule'])} | {_md(status)} | {_md('; '.join(c['thresholds']))} | "
                       f"{_md('; '.join(_observed(c)) or '-')} | {links}: {_md(_provenance(c))} | {raw} |")
        left = [f"- **{c['id']}** {c['status']}: {_md(c['note'] or c['if_fails'] or 'no if_fails given')}" for c in m["left"]]
        out += ["", "Left to ship:" if left else "Nothing left: every ship-blocking criterion is discharged on this code.",
                *left, ""]
    if summary["invalid"]:
        out += ["## Invalid contracts (not counted)", ""] + [f"- `{_md(b['first_error'])}`" for b in summary["invalid"]]
    return "\n".join(out) + "\n"


_STYLE = ("body{font-family:sans-serif;max-width:90em;margin:2em auto}table{border-collapse:collapse}"
          "td,th{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}.DISCHARGED{color:#060}"
          ".FALSIFIED{color:#a00}.STALE{color:#a60}")


def render_html(summary: dict, report_dir: Path) -> str:
    from apr.contracts.status import pct_text

    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>Ship status</title><style>{_STYLE}</style>"
           "</head><body><h1>Ship status</h1>",
           f"<p>Computed by <code>pv status</code> on {dt.date.today().isoformat()}; ship % counts only criteria "
           "discharged on the current code fingerprint and artifact.</p>"]
    for m in summary["models"]:
        out.append(f"<h2>{e(_header(pct_text, m))}</h2><ul>")
        out += [f"<li>contract <a href='{e(_link(c['file'], report_dir))}'>{e(Path(c['file']).name)}</a> v{e(c['version'])}, "
                f"artifact sha256 <code>{e(c['artifact_sha256'])}</code></li>" for c in m["contracts"]]
        out.append("</ul><table><tr><th>ID</th><th>Rule</th><th>Status</th><th>Threshold</th><th>Observed</th>"
                   "<th>Evidence</th><th>Raw output</th></tr>")
        for c in m["criteria"]:
            links = ", ".join(f"<a href='{e(_link(x, report_dir))}'>{e(Path(x).name)}</a>" for x in c["evidence"][-1:]) or "-"
            raw = ", ".join(f"<a href='{e(_link(x, report_dir))}'>{e(Path(x).name)}</a>" for x in c["raw_output"]) or "-"
            note = f" ({e(c['note'])})" if c["note"] else ""
            out.append(f"<tr><td>{e(c['id'])}</td><td>{e(c['rule'])}</td><td class='{c['status']}'>{c['status']}{note}</td>"
                       f"<td>{'<br>'.join(e(t) for t in c['thresholds'])}</td>"
                       f"<td>{'<br>'.join(e(o) for o in _observed(c)) or '-'}</td>"
                       f"<td>{links}<br>{e(_provenance(c))}</td><td>{raw}</td></tr>")
        out.append("</table>")
    for b in summary["invalid"]:
        out.append(f"<p class='FALSIFIED'>invalid contract, not counted: <code>{e(b['first_error'])}</code></p>")
    return "\n".join(out + ["</body></html>"]) + "\n"
