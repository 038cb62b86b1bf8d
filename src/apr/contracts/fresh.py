"""Fresh or stale: is a criterion's evidence about the code and the artifact we have now?

A DISCHARGED criterion counts only when its newest evidence file
  - exists and is a discharge record for this contract and this criterion,
  - ran the check the contract states now (same command and verdict),
  - hashed the artifact the contract names, and
  - ran on code whose fingerprint (apr.provenance.code_fingerprint) is the installed package's now.
Anything else is STALE: it was true once, of some other code or file. Evidence written before
fingerprints were recorded has none, so it is stale by construction.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from apr.contracts import evidence as ev
from apr.contracts.schema import Criterion

STATUSES = ("DISCHARGED", "STALE", "FALSIFIED", "UNTESTED")


@functools.lru_cache(maxsize=1)
def current_fingerprint() -> str:
    from apr.provenance import code_fingerprint

    return code_fingerprint()


@dataclass
class Freshness:
    status: str  # one of STATUSES
    fresh: bool
    reason: str
    evidence: dict | None  # the newest evidence record, when readable


def check_signature(check: dict) -> dict:
    """What makes two checks the same check: the command and each clause (path, op, value, class)."""
    verdict = check.get("verdict") or []
    verdict = [verdict] if isinstance(verdict, dict) else verdict
    return {"command": check.get("command"),
            "verdict": [{k: c.get(k) for k in ("path", "op", "value", "isa_class")} for c in verdict if isinstance(c, dict)]}


def evidence_problem(doc: dict, crit: Criterion, sha: str, fingerprint: str) -> str:
    """Why `doc` does not prove `crit` on this code and artifact now ('' when it does)."""
    if (doc.get("criterion") or {}).get("id") != crit.id:
        return f"the evidence is for {(doc.get('criterion') or {}).get('id')}, not {crit.id}"
    if check_signature((doc.get("criterion") or {}).get("check") or {}) != check_signature(crit.check.model_dump()):
        return "the criterion's check changed after this evidence was written"
    if (doc.get("artifact") or {}).get("sha256") != sha:
        return "the evidence is for another artifact"
    recorded = (doc.get("provenance") or {}).get("code_fingerprint")
    if recorded is None:
        return "the evidence records no code fingerprint (written before fingerprints)"
    if recorded != fingerprint:
        return f"the code changed since (evidence fingerprint {recorded[:12]}, now {fingerprint[:12]})"
    return ""


def newest_evidence(contract: Path, crit: Criterion) -> tuple[Path | None, dict | None, str]:
    from apr.contracts.validate import resolve_evidence

    if not crit.evidence_discharged_by:
        return None, None, "no evidence listed"
    path = resolve_evidence(contract, crit.evidence_discharged_by[-1])
    try:
        return path, ev.read_evidence(path), ""
    except (OSError, ValueError) as e:
        return path, None, f"evidence unreadable: {e}"


def freshness(contract: Path, crit: Criterion, sha: str, fingerprint: str | None = None) -> Freshness:
    fingerprint = fingerprint or current_fingerprint()
    status = crit.discharge_status
    if status not in ("DISCHARGED", "FALSIFIED"):
        return Freshness("UNTESTED", False, "" if status == "UNTESTED" else f"contract says {status}", None)
    _, doc, why = newest_evidence(contract, crit)
    problem = why or evidence_problem(doc, crit, sha, fingerprint)
    if status == "FALSIFIED":
        return Freshness("FALSIFIED", not problem, problem, doc)
    if problem:
        return Freshness("STALE", False, problem, doc)
    if doc.get("verdict") != "PASS":
        return Freshness("STALE", False, f"the newest evidence's verdict is {doc.get('verdict')}", doc)
    return Freshness("DISCHARGED", True, "", doc)
