"""`pv validate`'s checks of the evidence a contract cites: is it this contract's, this criterion's, this
artifact's, and does what it says agree with itself and with the YAML?

An evidence record is re-judged from its own raw output: the verdict clauses it recorded are evaluated
again on `raw_output.json` (which must be the last JSON object of its `stdout.txt`), so a hand-edited
observed value, verdict or sha256 shows up as a disagreement with a PV-E code naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from apr.contracts import evidence as ev
from apr.contracts.loader import Diagnostic

CODES = {
    "PV-E017": "evidence file is not a readable discharge record",
    "PV-E018": "evidence belongs to another contract",
    "PV-E019": "evidence belongs to another criterion",
    "PV-E020": "evidence is for another artifact than metadata.model.artifact_sha256",
    "PV-E021": "evidence's verdict or observed values disagree with its raw output or with the YAML",
    "PV-E022": "the same evidence folder is cited twice (by two criteria or two contracts)",
}


def _plain(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def _rejudge(doc: dict) -> list[str]:
    """Evaluate the recorded clauses again on the recorded output; what disagrees with the record."""
    from apr.contracts.schema import Clause

    problems, raw = [], (doc.get("raw_output") or {}).get("json")
    steps = {s.get("step"): s for s in doc.get("verification_chain") or [] if isinstance(s, dict)}
    verdict = ((doc.get("criterion") or {}).get("check") or {}).get("verdict") or []
    all_pass = all(s.get("verdict") in ("PASS", "N/A") for s in steps.values())
    for i, spec in enumerate(verdict if isinstance(verdict, list) else [verdict]):
        step = steps.get(f"verdict[{i}]") or {}
        if step.get("verdict") == "N/A":
            continue
        try:
            clause = Clause.model_validate(spec)
        except ValueError:
            problems.append(f"verdict[{i}] is not a valid clause")
            continue
        ok, value = clause.evaluate(raw if isinstance(raw, dict) else {})
        recorded = (doc.get("observed") or {}).get(clause.path)
        if _plain(value) != _plain(recorded):
            problems.append(f"observed {clause.path} is {json.dumps(recorded)} but the raw output says {json.dumps(value)}")
        if step.get("verdict") != ("PASS" if ok else "FAIL"):
            problems.append(f"verdict[{i}] is recorded {step.get('verdict')} but re-evaluates to {'PASS' if ok else 'FAIL'}")
        problems += _step_agrees(i, step, clause, value)
    if doc.get("verdict") != ("PASS" if all_pass and steps else "FAIL"):
        problems.append(f"verdict {doc.get('verdict')} does not follow from its verification chain")
    sha = (doc.get("artifact") or {}).get("sha256")
    if "sha256" in steps and sha and sha not in str(steps["sha256"].get("detail")):
        problems.append(f"artifact sha256 {sha[:12]}... is not the one its sha256 step hashed")
    return problems


def _step_agrees(i: int, step: dict, clause, value: Any) -> list[str]:
    """A verdict step repeats its clause and the observed value (fields and the detail line people read):
    each copy must be what the clause and the raw output give, or a hand edit of one copy would go unseen."""
    want = {"path": clause.path, "op": clause.op, "value": clause.value, "observed": value,
            "detail": clause.detail(value)}
    return [f"verdict[{i}].{k} is recorded {json.dumps(_plain(step[k]))} but the clause and raw output give "
            f"{json.dumps(_plain(v))}" for k, v in want.items() if k in step and _plain(step[k]) != _plain(v)]


def _stdout_agrees(folder: Path, doc: dict) -> str:
    from apr.contracts.discharge import last_json_object

    out = folder / "stdout.txt"
    if not out.is_file():
        return ""
    if last_json_object(out.read_text(encoding="utf-8", errors="replace")) != (doc.get("raw_output") or {}).get("json"):
        return "raw_output.json is not the last JSON object of stdout.txt"
    return ""


def check_evidence(contract: Path, cid: str, file: Path, line: int, expected_sha: Any) -> tuple[list[tuple], dict | None]:
    """[(line, code, message)] for one cited evidence file, and the record when it could be read."""
    try:
        doc = ev.read_evidence(file)
    except (OSError, ValueError) as e:
        return [(line, "PV-E017", f"{cid}: {file} is not a readable evidence record: {str(e)[:120]}")], None
    out = []
    name = doc.get("contract_name") or Path(str(doc.get("contract", ""))).stem
    if name != Path(contract).stem:
        out.append((line, "PV-E018", f"{cid}: {file} is evidence for contract {name!r}, not {Path(contract).stem!r}"))
    got = (doc.get("criterion") or {}).get("id")
    if got != cid:
        out.append((line, "PV-E019", f"{cid}: {file} is evidence for criterion {got}, not {cid}"))
    sha = (doc.get("artifact") or {}).get("sha256")
    if expected_sha and sha != expected_sha:
        out.append((line, "PV-E020", f"{cid}: {file} was run on artifact {str(sha)[:12]}..., not the contract's"))
    folder = file.parent if file.suffix else file
    for problem in _rejudge(doc) + [p for p in [_stdout_agrees(folder, doc)] if p]:
        out.append((line, "PV-E021", f"{cid}: {file}: {problem}"))
    return out, doc


def agree_with_yaml(cid: str, file: Path, line: int, doc: dict, status: Any, live: Any) -> list[tuple]:
    """The newest evidence must say what the YAML says: its verdict, and live_discharge's values."""
    out = []
    want = {"DISCHARGED": "PASS", "FALSIFIED": "FAIL"}.get(str(status))
    if want and doc.get("verdict") != want:
        out.append((line, "PV-E021", f"{cid} is {status} but its newest evidence {file} says {doc.get('verdict')}"))
    if isinstance(live, CommentedMap):
        if live.get("verdict") not in (None, doc.get("verdict")):
            out.append((line, "PV-E021", f"{cid}: live_discharge.verdict {live.get('verdict')} but {file} says {doc.get('verdict')}"))
        observed = live.get("observed")
        if observed is not None and _plain(dict(observed)) != _plain(doc.get("observed") or {}):
            out.append((line, "PV-E021", f"{cid}: live_discharge.observed differs from {file}"))
        if live.get("artifact_sha256") not in (None, (doc.get("artifact") or {}).get("sha256")):
            out.append((line, "PV-E021", f"{cid}: live_discharge.artifact_sha256 differs from {file}"))
    return out


def evidence_folders(evidence: Any, resolve) -> list[tuple[int, Path]]:
    if not isinstance(evidence, CommentedSeq):
        return []
    out = []
    for i, item in enumerate(evidence):
        if isinstance(item, str):
            p = resolve(item)
            out.append((evidence.lc.item(i)[0] + 1, (p.parent if p.suffix else p).resolve()))
    return out


def diags(path: Path, items: list[tuple], make) -> list[Diagnostic]:
    return [make(path, line, code, msg) for line, code, msg in items]
