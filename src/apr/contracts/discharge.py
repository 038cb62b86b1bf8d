"""`pv discharge`: run a criterion's live check on the real artifact and record what happened.

Order of work, and why: the contract must validate and the artifact's sha256 must match the contract
before anything runs (a check on the wrong file proves nothing); the evidence folder is written before
the contract is touched (evidence is never lost, even if the contract write fails); the contract is
re-read just before the update so a concurrent discharge of another criterion is not clobbered.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.scalarstring import ScalarString

from apr.contracts import evidence as ev
from apr.contracts.loader import ContractError, dump, load_for_update, put_trailer, take_trailer, write_atomic
from apr.contracts.schema import Criterion, bump_patch
from apr.contracts.validate import base_dir, validate_file
from apr.provenance import hash_file

DEFAULT_TIMEOUT_S = 3600.0
_MODULES = {"apr": "apr.cli", "pv": "apr.contracts.cli"}


@dataclass
class Run:
    argv: list[str]
    exit_code: int
    stdout: str
    stderr: str
    wall_time_s: float


@dataclass
class Outcome:
    criterion: str
    previous_status: str
    status: str
    holds: bool
    evidence_dir: str
    contract_version: str
    steps: list[dict] = field(default_factory=list)
    observed: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def program(name: str) -> list[str]:
    """apr/pv run through this Python's console scripts (or its modules); python is this Python."""
    if name in ("python", "python3"):
        return [sys.executable]
    script = Path(sys.executable).parent / name
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", _MODULES[name]]


def build_argv(command: str, model: Path, ray: str | None = None) -> list[str]:
    # substitute after splitting, so a path with spaces or quotes stays one argument
    first, *rest = shlex.split(command)
    argv = program(first) + [arg.replace("{model}", str(model)) for arg in rest]
    if ray and first == "apr" and rest[:1] == ["eval"] and "--ray" not in rest:
        argv += ["--ray", ray]  # `pv discharge --ray`: an eval spread over the cluster (recorded in argv)
    return argv


def run_check(command: str, model: Path, cwd: Path, timeout_s: float, ray: str | None = None) -> Run:
    argv = build_argv(command, model, ray)
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, errors="replace", timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ContractError(f"check timed out after {timeout_s:g}s: {command}") from None
    except OSError as e:
        raise ContractError(f"cannot run check {command!r}: {e}") from None
    return Run(argv, proc.returncode, proc.stdout, proc.stderr, round(time.perf_counter() - start, 3))


def last_json_object(text: str) -> dict | None:
    """The last top-level JSON object in `text` (pretty-printed or one line, after any log lines).

    Candidates are `{` at the start of a line (after blanks); an object that decodes swallows the
    candidates inside it, so the inner `{` of pretty-printed JSON is never mistaken for the answer.
    """
    decoder, found, skip_until = json.JSONDecoder(), None, -1
    offset = 0
    for line in text.splitlines(keepends=True):
        start = offset + len(line) - len(line.lstrip())
        offset += len(line)
        if start < skip_until or not text.startswith("{", start):
            continue
        try:
            obj, end = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(obj, dict):
            found, skip_until = obj, end
    return found


def _step(name: str, ok: bool, detail: str, **extra: Any) -> dict:
    return {"step": name, "verdict": "PASS" if ok else "FAIL", "detail": detail, **extra}


def json_problems(stdout: str, doc: dict) -> list[str]:
    """Why the command's JSON answer cannot be trusted as its result (empty when it can): NaN or
    Infinity anywhere (not JSON, and a broken measurement), or more output after the object."""
    problems = []
    try:
        json.dumps(doc, allow_nan=False)
    except ValueError:
        problems.append("the JSON holds NaN or Infinity")
    tail = stdout[stdout.rfind("}") + 1 :].strip()
    if tail:
        problems.append(f"stdout goes on after the JSON object: {tail[:60]!r}")
    return problems


def verification_chain(crit: Criterion, expected: str, actual: str, run: Run, doc: dict,
                       facts: dict | None = None) -> tuple[list[dict], dict]:
    facts = facts or {}
    problems = json_problems(run.stdout, doc)
    steps = [
        _step("sha256", actual == expected, f"artifact sha256 {actual} (hashed from its bytes) vs contract {expected}"),
        _step("command_exit", run.exit_code == 0, f"exit code {run.exit_code}"),
        _step("json_parse", not problems, "; ".join(problems) or f"last JSON object in stdout has keys {sorted(doc)[:20]}"),
    ]
    isa = (facts.get("provenance") or {}).get("isa_class")
    steps += _isa_step(crit, isa)
    steps += _isolation_step(doc, facts.get("allow_weak_isolation", False))
    observed = {}
    for i, clause in enumerate(crit.check.verdict):
        if clause.isa_class and clause.isa_class != isa:
            steps.append({"step": f"verdict[{i}]", "verdict": "N/A", "detail": f"{clause.describe()}: not for a run "
                          f"on {isa}", "path": clause.path, "op": clause.op, "value": clause.value})
            continue
        holds, value = clause.evaluate(doc)
        observed[clause.path] = value
        steps.append(_step(f"verdict[{i}]", holds, clause.detail(value),
                           path=clause.path, op=clause.op, value=clause.value, observed=value))
    return steps, observed


def _isa_step(crit: Criterion, isa: str | None) -> list[dict]:
    """A criterion whose clauses name machine classes holds only on one of them: a speed floor measured
    on one class proves nothing about another."""
    classes = sorted({c.isa_class for c in crit.check.verdict if c.isa_class})
    if not classes:
        return []
    return [_step("isa_class", isa in classes, f"ran on {isa}; the criterion has floors for {', '.join(classes)}")]


STRONG_ISOLATION = ("namespaces", "user-namespaces")


def _isolation_step(doc: dict, allow_weak: bool) -> list[dict]:
    """Code evaluations report their sandbox; weaker than namespaces needs --allow-weak-isolation."""
    sandbox = doc.get("sandbox")
    level = sandbox.get("isolation") if isinstance(sandbox, dict) else None
    if level is None:
        return []
    ok = level in STRONG_ISOLATION or allow_weak
    note = " (allowed by --allow-weak-isolation)" if allow_weak and level not in STRONG_ISOLATION else ""
    return [_step("sandbox_isolation", ok, f"sandbox isolation {level}{note}; needs one of {', '.join(STRONG_ISOLATION)}",
                  isolation=level, allow_weak_isolation=allow_weak)]


def holds(steps: list[dict]) -> bool:
    return all(s["verdict"] in ("PASS", "N/A") for s in steps) and any(
        s["verdict"] == "PASS" for s in steps if s["step"].startswith("verdict"))


def _resolve(spec: str) -> tuple[Path, str]:
    from apr import hub
    from apr.errors import AprError

    try:
        path = hub.resolve_model(spec)
        return path, hash_file(path)  # the bytes, now: never a marker or a cache
    except AprError as e:
        raise ContractError(str(e)) from None


def discharge(contract: Path, cid: str, model: str | None = None, evidence_root: Path | None = None,
              timeout_s: float | None = None, allow_weak_isolation: bool = False, ray: str | None = None) -> Outcome:
    contract = Path(contract)
    result = checked(contract)
    meta, crit = result.contract.metadata, _find(result.contract.criteria, cid, contract)
    artifact, actual = _resolve(model or meta.model.name)
    if actual != meta.model.artifact_sha256:
        raise ContractError(f"refusing to discharge {cid}: {artifact} has sha256 {actual}, "
                            f"the contract names {meta.model.artifact_sha256}")
    run, doc, facts, steps, observed = run_and_judge(contract, crit, meta, artifact, actual, timeout_s,
                                                     allow_weak_isolation, ray)
    ok = holds(steps)
    status = "DISCHARGED" if ok else "FALSIFIED"
    root = ev.contract_root(Path(evidence_root) if evidence_root else base_dir(contract) / "evidence", contract)
    record = _record(contract, crit, meta, status, artifact, actual, run, doc, steps, observed, facts)
    attached = ev.attached_files(doc, base_dir(contract))
    folder = ev.write_folder(root.resolve(), cid, ev.today(), lambda eid: _files(eid, record, run, doc, attached))
    rel = os.path.relpath(folder / ev.EVIDENCE_FILE, base_dir(contract)).replace(os.sep, "/")
    live = _live(facts, artifact, actual, crit.check.command, run, doc, observed, ok)
    version = update_contract(contract, cid, status, rel, live, ev.today())
    return Outcome(cid, crit.discharge_status, status, ok, str(folder), version, steps, observed)


def unfresh_ids(contract: Path) -> list[str]:
    """Every criterion of the contract that is not DISCHARGED on the current code and artifact."""
    from apr.contracts.fresh import freshness

    result = checked(Path(contract))
    sha = result.contract.metadata.model.artifact_sha256
    return [c.id for c in result.contract.criteria if freshness(Path(contract), c, sha).status != "DISCHARGED"]


def checked(contract: Path):
    result = validate_file(contract)
    if result.errors:
        first = result.errors[0]
        raise ContractError(f"{contract} has {len(result.errors)} error(s), first {first.code} at line {first.line}: "
                            f"{first.message} (run pv validate)")
    return result


def run_and_judge(contract: Path, crit: Criterion, meta, artifact: Path, actual: str, timeout_s: float | None,
                  allow_weak_isolation: bool = False, ray: str | None = None):
    """Run the check and evaluate its verification chain: (run, doc, facts, steps, observed)."""
    run = run_check(crit.check.command, artifact.resolve(), base_dir(contract),
                    timeout_s or crit.check.timeout_s or DEFAULT_TIMEOUT_S, ray)
    doc = last_json_object(run.stdout)
    if doc is None:
        tail = (run.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise ContractError(f"{crit.id}: check printed no JSON object (exit {run.exit_code}): {tail}")
    facts = {**ev.run_facts(doc), "date": ev.now().isoformat(), "allow_weak_isolation": allow_weak_isolation}
    steps, observed = verification_chain(crit, meta.model.artifact_sha256, actual, run, doc, facts)
    return run, doc, facts, steps, observed


def _find(criteria: list[Criterion], cid: str, contract: Path) -> Criterion:
    for c in criteria:
        if c.id == cid:
            return c
    raise ContractError(f"no criterion {cid} in {contract} (known: {', '.join(c.id for c in criteria)})")


def _record(contract, crit, meta, status, artifact, actual, run, doc, steps, observed, facts) -> dict:
    return {
        "schema": "discharge-evidence-v1",
        "contract": str(contract), "contract_name": Path(contract).stem, "contract_version": meta.version,
        "model": meta.model.name,
        "criterion": crit.model_dump(exclude={"live_discharge", "evidence_discharged_by"}),
        "previous_status": crit.discharge_status, "new_status": status,
        **facts,
        "artifact": {"path": str(artifact.resolve()), "size": artifact.stat().st_size, "sha256": actual},
        "command": {"template": crit.check.command, "argv": run.argv, "exit_code": run.exit_code},
        "wall_time_s": run.wall_time_s,
        "backend_chain": ev.backend_chain(doc),
        "raw_output": {"json": doc, "stdout": run.stdout[: ev.MAX_INLINE], "stdout_truncated": len(run.stdout) > ev.MAX_INLINE,
                       "stderr_tail": run.stderr[-4000:]},
        "observed": observed,
        "verification_chain": steps,
        "verdict": "PASS" if status == "DISCHARGED" else "FAIL",
    }


def _files(evidence_id: str, record: dict, run: Run, doc: dict, attached: dict | None = None) -> dict:
    files = {"stdout.txt": run.stdout, "stderr.txt": run.stderr, **ev.extracted_files(doc), **(attached or {})}
    body = {"evidence_id": evidence_id, **record, "files": sorted([ev.EVIDENCE_FILE, *files])}
    return {ev.EVIDENCE_FILE: json.dumps(body, indent=2, default=str) + "\n", **files}


def _live(facts: dict, artifact: Path, actual: str, command: str, run: Run, doc: dict, observed: dict, holds: bool) -> dict:
    return {
        "date": facts["date"], "host": facts["host"], "cpu": facts["cpu"], "gpu": facts["gpu"],
        "artifact": str(artifact.resolve()), "artifact_sha256": actual, "command": command,
        "wall_time_s": run.wall_time_s, "backend_chain": ev.backend_chain(doc),
        "apr_version": facts["apr_version"], "git_commit": facts["git_commit"], "git_dirty": facts["git_dirty"],
        "code_fingerprint": facts["provenance"]["code_fingerprint"], "isa_class": facts["provenance"]["isa_class"],
        "observed": observed, "verdict": "PASS" if holds else "FAIL",
    }


def _criterion_node(data: CommentedMap, cid: str) -> CommentedMap:
    for node in data.get("criteria") or []:
        if isinstance(node, CommentedMap) and node.get("id") == cid:
            return node
    raise ContractError(f"criterion {cid} disappeared from the contract while its check ran")


def _same_style(old: Any, new: str) -> Any:
    return type(old)(new) if isinstance(old, ScalarString) else new  # keep "quoted" quoted


def update_contract(path: Path, cid: str, status: str, evidence_rel: str, live: dict, date: str) -> str:
    """Round-trip update of one criterion + metadata; returns the new contract version."""
    yaml, data = load_for_update(path)
    node, meta = _criterion_node(data, cid), data["metadata"]
    trailers = take_trailer(node), take_trailer(meta)  # blank lines after them stay after them
    previous = node.get("discharge_status", "UNTESTED")
    node["discharge_status"] = status
    # the same verdict again is a reproduction: keep the earlier evidence; a flip replaces it
    old = node.get("evidence_discharged_by")
    keep = list(old) if previous == status and isinstance(old, list) else []
    node["evidence_discharged_by"] = CommentedSeq([*keep, evidence_rel])
    node["live_discharge"] = CommentedMap(live)
    version = bump_patch(str(meta["version"]))
    meta["version"] = _same_style(meta["version"], version)
    if not isinstance(meta.get("changelog"), list):
        meta["changelog"] = CommentedSeq()
    log_trailer = take_trailer(meta["changelog"])
    meta["changelog"].append(f"{version} ({date}): {cid} {previous} -> {status} by pv discharge ({evidence_rel})")
    put_trailer(meta["changelog"], log_trailer)
    put_trailer(node, trailers[0])
    put_trailer(meta, trailers[1])
    write_atomic(path, dump(yaml, data))
    return version
