"""pv discharge against a fake check command and a small temp file as the "model"."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from apr.contracts import evidence
from apr.contracts.cli import main
from apr.contracts.discharge import build_argv, last_json_object
from apr.contracts.validate import validate_file

# A check that reads the model file, so the {model} substitution is exercised too.
CHECK = ('python -c "import json,sys; n=len(open(sys.argv[1],\'rb\').read()); print(\'log line\'); '
         'print(json.dumps(dict(passed=n > 0, size=n, backend=\'cpu\', text=\'def fib(n):\\\\n    return n\')))" {model}')

CONTRACT = """\
# Contract under test: comments and key order must survive pv discharge.
metadata:
  version: "1.0.0"  # bumped by pv discharge
  description: discharge fixture
  model:
    name: fake-model
    artifact_sha256: {sha}
  status: active
  changelog:
    - "1.0.0: created"

criteria:
  # the criterion we discharge
  - id: SHIP-001
    rule: the fake model is not empty
    prediction: the check reports passed false
    test: tests/test_discharge.py::test_discharge_records_evidence
    check:
      command: {check}
      verdict:
        - {{path: "$.passed", op: "==", value: true}}
        - {{path: "$.size", op: ">=", value: {min_size}}}
    if_fails: the model file is empty
    ship_blocking: true
    discharge_status: UNTESTED  # flipped by pv discharge

  # an untouched neighbour, after a blank line
  - id: SHIP-002
    rule: untouched neighbour
    prediction: nothing
    test: tests/test_discharge.py::test_discharge_records_evidence
    check:
      command: apr inspect {{model}} --json
      verdict: {{path: "$.ok", op: "==", value: true}}
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("APR_HOME", str(tmp_path / "apr_home"))  # sha256 cache
    monkeypatch.setattr(evidence, "today", lambda: "2025-01-02")
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    (tmp_path / "contracts").mkdir()
    return tmp_path, model


def make_contract(project, min_size=1, check=CHECK, sha=None) -> Path:
    root, model = project
    sha = sha or hashlib.sha256(model.read_bytes()).hexdigest()
    path = root / "contracts" / "fake.yaml"
    path.write_text(CONTRACT.format(sha=sha, check=check, min_size=min_size))
    assert validate_file(path).errors == []
    return path


def discharge(path: Path, model: Path, *extra: str) -> int:
    return main(["discharge", str(path), "--id", "SHIP-001", "--model", str(model), *extra])


def criterion(path: Path, cid: str = "SHIP-001") -> dict:
    data = YAML(typ="safe").load(path.read_text())
    return next(c for c in data["criteria"] if c["id"] == cid)


def test_discharge_records_evidence(project, capsys):
    root, model = project
    path = make_contract(project)
    assert discharge(path, model) == 0
    assert "SHIP-001 UNTESTED -> DISCHARGED" in capsys.readouterr().out
    folder = root / "evidence" / "fake" / "SHIP-001-2025-01-02"
    files = {"discharge-evidence-v1.json", "stdout.txt", "stderr.txt", "completion.txt", "ast-summary.json"}
    assert {p.name for p in folder.iterdir()} == files
    ev = json.loads((folder / "discharge-evidence-v1.json").read_text())
    assert ev["evidence_id"] == "SHIP-001-2025-01-02" and (ev["previous_status"], ev["new_status"]) == ("UNTESTED", "DISCHARGED")
    assert ev["artifact"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest() and ev["artifact"]["size"] == 1028
    assert [s["step"] for s in ev["verification_chain"]] == ["sha256", "command_exit", "json_parse", "verdict[0]", "verdict[1]"]
    assert all(s["verdict"] == "PASS" for s in ev["verification_chain"]) and ev["verdict"] == "PASS"
    assert ev["observed"] == {"$.passed": True, "$.size": 1028} and ev["backend_chain"] == ["cpu"]
    assert ev["raw_output"]["json"]["size"] == 1028 and "log line" in (folder / "stdout.txt").read_text()
    assert (folder / "completion.txt").read_text() == "def fib(n):\n    return n"
    summary = json.loads((folder / "ast-summary.json").read_text())
    assert summary["ok"] is True and summary["functions"] == ["fib"]
    crit = criterion(path)
    assert crit["discharge_status"] == "DISCHARGED"
    assert crit["evidence_discharged_by"] == ["evidence/fake/SHIP-001-2025-01-02/discharge-evidence-v1.json"]
    assert crit["live_discharge"]["verdict"] == "PASS" and crit["live_discharge"]["observed"]["$.size"] == 1028
    meta = YAML(typ="safe").load(path.read_text())["metadata"]
    assert meta["version"] == "1.0.1" and meta["changelog"][-1].startswith("1.0.1 (2025-01-02): SHIP-001 UNTESTED -> DISCHARGED")
    assert [d.code for d in validate_file(path).diagnostics] == ["PV-W004"]  # python, not apr: fine in a test


def test_rerun_writes_a_new_folder_and_reproduces(project):
    root, model = project
    path = make_contract(project)
    assert discharge(path, model) == 0
    first = (root / "evidence" / "fake" / "SHIP-001-2025-01-02" / "discharge-evidence-v1.json").read_text()
    assert discharge(path, model) == 0
    second = json.loads((root / "evidence" / "fake" / "SHIP-001-2025-01-02-2" / "discharge-evidence-v1.json").read_text())
    assert (root / "evidence" / "fake" / "SHIP-001-2025-01-02" / "discharge-evidence-v1.json").read_text() == first  # untouched
    assert second["evidence_id"] == "SHIP-001-2025-01-02-2" and second["previous_status"] == "DISCHARGED"
    assert second["observed"] == json.loads(first)["observed"] and second["verdict"] == "PASS"
    assert len(criterion(path)["evidence_discharged_by"]) == 2
    assert YAML(typ="safe").load(path.read_text())["metadata"]["version"] == "1.0.2"
    assert not [p for p in (root / "evidence").iterdir() if p.name.startswith(".")]  # no temp folders left


def test_failing_verdict_is_falsified_with_evidence(project, capsys):
    root, model = project
    path = make_contract(project, min_size=10**9)
    assert discharge(path, model) == 1
    assert "-> FALSIFIED" in capsys.readouterr().out
    ev = json.loads((root / "evidence" / "fake" / "SHIP-001-2025-01-02" / "discharge-evidence-v1.json").read_text())
    assert ev["new_status"] == "FALSIFIED" and ev["verdict"] == "FAIL"
    assert [s["verdict"] for s in ev["verification_chain"]][-2:] == ["PASS", "FAIL"]
    crit = criterion(path)
    assert crit["discharge_status"] == "FALSIFIED" and crit["live_discharge"]["verdict"] == "FAIL"
    assert crit["evidence_discharged_by"] == ["evidence/fake/SHIP-001-2025-01-02/discharge-evidence-v1.json"]
    assert validate_file(path).errors == []


def test_nonzero_exit_falsifies_even_with_passing_json(project):
    root, model = project
    check = 'python -c "import json; print(json.dumps(dict(passed=True, size=5))); raise SystemExit(3)" {model}'
    path = make_contract(project, check=check)
    assert discharge(path, model) == 1
    ev = json.loads((root / "evidence" / "fake" / "SHIP-001-2025-01-02" / "discharge-evidence-v1.json").read_text())
    assert ev["verification_chain"][1] == {"step": "command_exit", "verdict": "FAIL", "detail": "exit code 3"}


def test_sha256_mismatch_is_refused_and_contract_untouched(project, capsys):
    root, model = project
    path = make_contract(project, sha="ab" * 32)
    before = path.read_bytes()
    assert discharge(path, model) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pv: error: refusing to discharge SHIP-001")
    assert path.read_bytes() == before and not (root / "evidence").exists()


def test_no_json_output_is_an_error(project, capsys):
    root, model = project
    path = make_contract(project, check='python -c "print(123)" {model}')
    before = path.read_bytes()
    assert discharge(path, model) == 2
    assert "printed no JSON object" in capsys.readouterr().err
    assert path.read_bytes() == before and not (root / "evidence").exists()


def test_comments_and_key_order_survive(project):
    root, model = project
    path = make_contract(project)
    before = path.read_text()
    for _ in range(2):  # the second run replaces live_discharge: the blank line after it must stay
        assert discharge(path, model, "--evidence-dir", str(root / "proof")) == 0
    after = path.read_text()
    for comment in ["# Contract under test", "# bumped by pv discharge", "# the criterion we discharge", "# flipped by pv discharge"]:
        assert comment in after
    assert 'version: "1.0.2"' in after  # quoting kept too
    assert '\n    - "1.0.0: created"\n    - \'1.0.1 (' in after and "\n\ncriteria:\n" in after  # blank line kept
    old, new = criterion_keys(before), criterion_keys(after)
    assert new[: len(old)] == old and new[len(old):] == ["evidence_discharged_by", "live_discharge"]
    neighbour = before[before.index("\n\n  # an untouched neighbour"):]
    assert after.endswith(neighbour)  # the other criterion is byte-identical
    assert criterion(path)["evidence_discharged_by"] == ["proof/fake/SHIP-001-2025-01-02/discharge-evidence-v1.json",
                                                         "proof/fake/SHIP-001-2025-01-02-2/discharge-evidence-v1.json"]
    assert [d.code for d in validate_file(path).diagnostics] == ["PV-W004"]


def criterion_keys(text: str) -> list[str]:
    return list(YAML().load(text)["criteria"][0].keys())


def test_unknown_id_and_missing_model(project, capsys):
    root, model = project
    path = make_contract(project)
    assert main(["discharge", str(path), "--id", "SHIP-404", "--model", str(model)]) == 2
    assert main(["discharge", str(path), "--id", "SHIP-001", "--model", str(root / "gone.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no criterion SHIP-404" in err[0] and "gone.gguf" in err[1]


def test_build_argv_substitutes_after_splitting():
    model = Path("/models/with space/m.gguf")
    argv = build_argv("apr inspect {model} --json", model)
    assert argv[-3:] == ["inspect", str(model), "--json"]
    assert argv[0].endswith("apr") or argv[:3] == [sys.executable, "-m", "apr.cli"]
    assert build_argv("python -c 'print(1)' {model}", model) == [sys.executable, "-c", "print(1)", str(model)]


def test_last_json_object():
    pretty = json.dumps({"a": [{"inner": 1}], "passed": True}, indent=2)
    assert last_json_object(f"loading...\n{pretty}\n") == {"a": [{"inner": 1}], "passed": True}
    assert last_json_object('{"n": 1}\nnoise {not json\n{"n": 2}\ndone\n') == {"n": 2}
    assert last_json_object("[1, 2]\n") is None and last_json_object("") is None


def test_ast_summary_fallback(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_evals(name, *args, **kwargs):
        if name == "apr.evals.code":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_evals)
    assert evidence.ast_summary("def f(:\n")["ok"] is False
    assert evidence.ast_summary("class K: pass")["classes"] == ["K"]
