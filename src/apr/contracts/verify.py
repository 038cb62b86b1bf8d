"""`pv verify CONTRACT --id ID`: does the recorded verdict reproduce?

The newest evidence of the criterion is read; its recorded command runs again on its recorded artifact
(whose bytes must still hash to the recorded sha256), and the recorded check's verdict is evaluated on
the new output. The result is appended to the evidence folder as `verify-<date>[-N].json` (a new file,
created exclusively: nothing is ever overwritten); the contract is not touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from apr.contracts import evidence as ev
from apr.contracts.discharge import DEFAULT_TIMEOUT_S, _find, checked, holds, last_json_object, run_check, verification_chain
from apr.contracts.fresh import newest_evidence
from apr.contracts.loader import ContractError
from apr.contracts.schema import Criterion
from apr.contracts.validate import base_dir
from apr.provenance import hash_file


def _recorded(contract: Path, cid: str) -> tuple[Path, dict, Criterion]:
    result = checked(contract)
    crit = _find(result.contract.criteria, cid, contract)
    path, doc, why = newest_evidence(contract, crit)
    if doc is None:
        raise ContractError(f"{cid}: nothing to verify: {why}")
    try:
        recorded = Criterion.model_validate(doc["criterion"])
    except (KeyError, ValueError) as e:
        raise ContractError(f"{cid}: evidence {path} holds no usable criterion: {str(e).splitlines()[0]}") from None
    return path, doc, recorded


def verify(contract: Path, cid: str, timeout_s: float | None = None) -> dict:
    contract = Path(contract)
    path, doc, crit = _recorded(contract, cid)
    artifact = Path((doc.get("artifact") or {}).get("path") or "")
    want = (doc.get("artifact") or {}).get("sha256")
    if not artifact.is_file():
        raise ContractError(f"{cid}: the recorded artifact is not there: {artifact}")
    actual = hash_file(artifact)
    if actual != want:
        raise ContractError(f"{cid}: {artifact} now has sha256 {actual}, the evidence recorded {want}")
    run = run_check(crit.check.command, artifact.resolve(), base_dir(contract),
                    timeout_s or crit.check.timeout_s or DEFAULT_TIMEOUT_S)
    out = last_json_object(run.stdout)
    if out is None:
        raise ContractError(f"{cid}: the recorded command printed no JSON object (exit {run.exit_code})")
    facts = {**ev.run_facts(out), "date": ev.now().isoformat(),
             "allow_weak_isolation": any(s.get("allow_weak_isolation") for s in doc.get("verification_chain") or [])}
    steps, observed = verification_chain(crit, want, actual, run, out, facts)
    verdict = "PASS" if holds(steps) else "FAIL"
    record = {"schema": "verify-v1", "evidence": str(path), "criterion": cid, "recorded_verdict": doc.get("verdict"),
              "verdict": verdict, "reproduced": verdict == doc.get("verdict"), "recorded_observed": doc.get("observed"),
              "observed": observed, **facts, "artifact": {"path": str(artifact), "sha256": actual},
              "command": {"template": crit.check.command, "argv": run.argv, "exit_code": run.exit_code},
              "wall_time_s": run.wall_time_s, "verification_chain": steps, "raw_output": {"json": out,
              "stderr_tail": run.stderr[-4000:]}}
    record["file"] = str(_append(path.parent if path.suffix else path, record))
    return record


def _append(folder: Path, record: dict) -> Path:
    """verify-<date>[-N].json in the evidence folder, created exclusively (the next free N)."""
    date, n = ev.today(), 1
    while True:
        target = folder / (f"verify-{date}.json" if n == 1 else f"verify-{date}-{n}.json")
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            n += 1
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(record, indent=2, default=str) + "\n")
        return target
