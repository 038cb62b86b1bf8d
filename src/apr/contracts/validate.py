"""`pv validate`: schema errors and consistency checks, each with a code and `file:line`.

Schema problems come from pydantic (schema.py); the checks that need the whole file or the disk (duplicate
ids, evidence that must exist) run here over the raw round-trip tree, so they still run when the schema
check fails elsewhere and every problem is reported in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from apr.contracts.evidence_checks import CODES as EVIDENCE_CODES
from apr.contracts.loader import ContractError, Diagnostic, Loaded, line_of, read_contract, to_plain
from apr.contracts.schema import Contract

# code -> meaning; PV-E* are errors (exit 1), PV-W* warnings. docs/contracts.md carries the same table.
CODES: dict[str, str] = {
    "PV-E001": "file missing, unreadable, empty or not valid YAML",
    "PV-E002": "duplicate YAML key",
    "PV-E003": "unknown key",
    "PV-E004": "missing required key",
    "PV-E005": "wrong type or value",
    "PV-E006": "metadata.version is not semver",
    "PV-E007": "duplicate criterion id",
    "PV-E008": "empty prediction",
    "PV-E009": "DISCHARGED criterion without evidence_discharged_by",
    "PV-E010": "evidence path does not exist",
    "PV-E011": "bad verdict clause (path, op or value)",
    "PV-E012": "bad check command (does not parse, or not an apr/pv/python command)",
    "PV-E013": "criterion id is not like SHIP-001",
    "PV-E014": "artifact_sha256 is not 64 lowercase hex digits",
    "PV-E015": "test binding is not a pytest node id",
    "PV-E016": "test binding does not resolve to a collected test (pv lint --strict-test-binding)",
    **EVIDENCE_CODES,  # PV-E017..E022: the evidence checks' own table
    "PV-E023": "criterion names no falsified_by test (pv lint --strict-test-binding)",
    "PV-W001": "BLOCKED criterion without a reason in if_fails",
    "PV-W002": "criterion has no test binding",
    "PV-W003": "DISCHARGED/FALSIFIED criterion without a live_discharge record",
    "PV-W004": "check runs python, not an apr/pv command",
    "PV-W005": "check command has no {model} placeholder",
    "PV-W006": "test binding does not resolve to a collected test (pv lint)",
    "PV-W007": "live_discharge was run on a different artifact than metadata.model.artifact_sha256",
    "PV-W008": "FALSIFIED criterion without evidence",
}

_PYDANTIC_CODES = {
    "extra_forbidden": "PV-E003",
    "missing": "PV-E004",
    "semver": "PV-E006",
    "empty_prediction": "PV-E008",
    "verdict": "PV-E011",
    "command": "PV-E012",
    "criterion_id": "PV-E013",
    "sha256": "PV-E014",
    "test_binding": "PV-E015",
}


def diag(file: Path | str, line: int, code: str, message: str) -> Diagnostic:
    return Diagnostic(str(file), line, code, "error" if code.startswith("PV-E") else "warning", message)


@dataclass
class Result:
    path: Path
    diagnostics: list[Diagnostic] = field(default_factory=list)
    contract: Contract | None = None
    loaded: Loaded | None = None

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "warning"]


def base_dir(contract_path: Path) -> Path:
    """Where relative evidence paths start: the folder above the contract's folder
    (`contracts/x.yaml` -> `.`, so `evidence/...` sits next to `contracts/`)."""
    return Path(contract_path).resolve().parent.parent


def resolve_evidence(contract_path: Path, evidence: str) -> Path:
    p = Path(evidence)
    return p if p.is_absolute() else base_dir(contract_path) / p


def validate_file(path: str | Path) -> Result:
    result = Result(Path(path))
    try:
        loaded = read_contract(path)
    except ContractError as e:
        result.diagnostics.append(diag(path, e.line, "PV-E001", str(e)))
        return result
    result.loaded = loaded
    result.diagnostics += [diag(path, line, "PV-E002", msg) for line, msg in loaded.duplicates]
    result.contract, schema_diags = _schema(loaded)
    result.diagnostics += schema_diags
    result.diagnostics += _cross_checks(loaded)
    result.diagnostics = _dedupe(result.diagnostics)
    return result


def _dedupe(diags: list[Diagnostic]) -> list[Diagnostic]:
    seen, out = set(), []
    for d in diags:
        if (d.line, d.code, d.message) not in seen:
            seen.add((d.line, d.code, d.message))
            out.append(d)
    return sorted(out, key=lambda d: (d.line, d.code))


def _schema(loaded: Loaded) -> tuple[Contract | None, list[Diagnostic]]:
    try:
        return Contract.model_validate(to_plain(loaded.data)), []
    except ValidationError as e:
        return None, [_from_pydantic(loaded, err) for err in e.errors()]


def _from_pydantic(loaded: Loaded, err: dict) -> Diagnostic:
    loc = tuple(err["loc"])
    line, where = line_of(loaded.data, loc)
    code = _PYDANTIC_CODES.get(err["type"], "PV-E005")
    parent = where.rpartition(".")[0] or "top level"
    if code == "PV-E003":
        message = f"unknown key '{loc[-1]}' in {parent}"
    elif code == "PV-E004":
        message = f"missing required key '{loc[-1]}' in {parent}"
    else:
        message = f"{where or 'contract'}: {err['msg']}"
        if code == "PV-E005" and "input" in err and not isinstance(err["input"], (dict, list)):
            message += f" (got {err['input']!r})"
    return diag(loaded.path, line, code, message)


def _key_line(node: Any, key: str, default: int = 1) -> int:
    if isinstance(node, CommentedMap) and key in node:
        return node.lc.key(key)[0] + 1
    return default


def criteria_nodes(data: CommentedMap) -> list[tuple[int, CommentedMap]]:
    seq = data.get("criteria")
    if not isinstance(seq, CommentedSeq):
        return []
    return [(seq.lc.item(i)[0] + 1, c) for i, c in enumerate(seq) if isinstance(c, CommentedMap)]


def _cross_checks(loaded: Loaded) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    meta = loaded.data.get("metadata")
    model = meta.get("model") if isinstance(meta, CommentedMap) else None
    expected_sha = model.get("artifact_sha256") if isinstance(model, CommentedMap) else None
    seen: dict[str, int] = {}
    folders: dict[Path, str] = {}
    for line, crit in criteria_nodes(loaded.data):
        cid = str(crit.get("id", "?"))
        id_line = _key_line(crit, "id", line)
        if cid in seen:
            out.append(diag(loaded.path, id_line, "PV-E007", f"duplicate criterion id {cid} (first at line {seen[cid]})"))
        seen.setdefault(cid, id_line)
        out += _criterion_checks(loaded, cid, line, crit, expected_sha)
        out += _evidence_checks(loaded, cid, crit, expected_sha, folders)
    return out


def _evidence_checks(loaded: Loaded, cid: str, crit: CommentedMap, expected_sha: Any, folders: dict) -> list[Diagnostic]:
    """What the cited evidence says (evidence_checks.py): whose it is, and whether it agrees."""
    from apr.contracts import evidence_checks as ec

    out, cited = [], ec.evidence_folders(crit.get("evidence_discharged_by"), lambda e: resolve_evidence(loaded.path, e))
    for i, (line, folder) in enumerate(cited):
        if folder in folders:
            out.append((line, "PV-E022", f"{cid}: evidence folder {folder.name} is also cited by {folders[folder]}"))
        folders.setdefault(folder, cid)
        file = resolve_evidence(loaded.path, crit["evidence_discharged_by"][i])
        if not file.exists():
            continue  # PV-E010
        found, doc = ec.check_evidence(loaded.path, cid, file, line, expected_sha)
        out += found
        if doc is not None and i == len(cited) - 1:
            out += ec.agree_with_yaml(cid, file, line, doc, crit.get("discharge_status"), crit.get("live_discharge"))
    return ec.diags(loaded.path, out, diag)


def _criterion_checks(loaded: Loaded, cid: str, line: int, crit: CommentedMap, expected_sha: Any) -> list[Diagnostic]:
    path, out = loaded.path, []
    status = crit.get("discharge_status", "UNTESTED")
    status_line = _key_line(crit, "discharge_status", line)
    evidence = crit.get("evidence_discharged_by") or []
    if status == "DISCHARGED" and not evidence:
        out.append(diag(path, status_line, "PV-E009", f"{cid} is DISCHARGED but lists no evidence_discharged_by"))
    if status == "FALSIFIED" and not evidence:
        out.append(diag(path, status_line, "PV-W008", f"{cid} is FALSIFIED but lists no evidence"))
    if isinstance(evidence, CommentedSeq):
        for i, item in enumerate(evidence):
            if isinstance(item, str) and not resolve_evidence(path, item).exists():
                out.append(diag(path, evidence.lc.item(i)[0] + 1, "PV-E010", f"{cid}: evidence path does not exist: {item}"))
    if status == "BLOCKED" and not str(crit.get("if_fails") or "").strip():
        out.append(diag(path, status_line, "PV-W001", f"{cid} is BLOCKED but if_fails gives no reason"))
    if not crit.get("test"):
        out.append(diag(path, line, "PV-W002", f"{cid} has no test binding"))
    live = crit.get("live_discharge")
    if status in ("DISCHARGED", "FALSIFIED") and not live:
        out.append(diag(path, status_line, "PV-W003", f"{cid} is {status} but has no live_discharge record"))
    if isinstance(live, CommentedMap) and expected_sha and live.get("artifact_sha256") not in (None, expected_sha):
        out.append(diag(path, _key_line(live, "artifact_sha256", line), "PV-W007",
                        f"{cid} was discharged on artifact {str(live.get('artifact_sha256'))[:12]}..., not the contract's"))
    out += _command_checks(path, cid, line, crit.get("check"))
    return out


def _command_checks(path: Path, cid: str, line: int, check: Any) -> list[Diagnostic]:
    if not isinstance(check, CommentedMap) or not isinstance(check.get("command"), str):
        return []
    command, cline = check["command"], _key_line(check, "command", line)
    out = []
    if command.split()[:1] in (["python"], ["python3"]):
        out.append(diag(path, cline, "PV-W004", f"{cid}: check runs python; ship checks should be apr/pv commands"))
    if "{model}" not in command:
        out.append(diag(path, cline, "PV-W005", f"{cid}: check command has no {{model}} placeholder"))
    return out


def shared_folders(results: list[Result]) -> None:
    """PV-E022 across files: two contracts citing one evidence folder (added to the later file's result)."""
    from apr.contracts.evidence_checks import evidence_folders

    owner: dict[Path, str] = {}
    for r in results:
        if r.loaded is None:
            continue
        mine: set[Path] = set()
        for _, crit in criteria_nodes(r.loaded.data):
            for line, folder in evidence_folders(crit.get("evidence_discharged_by"), lambda e: resolve_evidence(r.path, e)):
                mine.add(folder)
                if folder in owner and owner[folder] != str(r.path):
                    r.diagnostics.append(diag(r.path, line, "PV-E022", f"evidence folder {folder.name} is also cited by "
                                              f"{owner[folder]}"))
        for folder in mine:
            owner.setdefault(folder, str(r.path))
