"""pv validate / lint / status, and the verdict language (docs/contracts.md)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from apr.contracts.cli import main
from apr.contracts.fresh import current_fingerprint
from apr.contracts.lint import resolves
from apr.contracts.schema import Clause, parse_path
from apr.contracts.report import render_markdown
from apr.contracts.status import summarize
from apr.contracts.validate import validate_file

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "contracts" / "valid.yaml"
TEXT = FIXTURE.read_text()


def codes(path: Path) -> list[str]:
    return [d.code for d in validate_file(path).diagnostics]


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    folder = tmp_path / "contracts"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def test_valid_fixture_has_no_errors(capsys):
    result = validate_file(FIXTURE)
    assert result.diagnostics == [] and result.contract is not None
    assert [c.id for c in result.contract.criteria] == ["SHIP-001", "SHIP-002", "SHIP-003", "SHIP-010"]
    assert main(["validate", str(FIXTURE)]) == 0
    assert "0 error(s), 0 warning(s)" in capsys.readouterr().out


BROKEN = {
    "unknown key": (("    ship_blocking: false\n", "    ship_blocking: false\n    colour: red\n"), "PV-E003", 50),
    "duplicate top-level key": (("\ncriteria:\n", "\nmetadata: {}\ncriteria:\n"), "PV-E002", 14),
    "bad semver": (('version: "1.2.0"', "version: 1.2"), "PV-E006", 3),
    "duplicate id": (("id: SHIP-003", "id: SHIP-001"), "PV-E007", 39),
    "empty prediction": (("prediction: apr bench reports decode_tok_s below 20", 'prediction: "  "'), "PV-E008", 41),
    "discharged without evidence": (("discharge_status: UNTESTED", "discharge_status: DISCHARGED"), "PV-E009", 37),
    "missing evidence": (("discharge_status: UNTESTED", "discharge_status: DISCHARGED\n    evidence_discharged_by: [evidence/x/e.json]"), "PV-E010", 38),
    "bad yaml": (("rule: The artifact loads", "rule: [The artifact loads"), "PV-E001", 17),
    "wrong type": (("ship_blocking: false", "ship_blocking: 'no'"), "PV-E005", 49),
    "bad op": (('op: "==", value: 290', 'op: "=~", value: 290'), "PV-E011", 22),
    "not an apr command": (("apr bench {model}", "rm -rf {model}"), "PV-E012", 45),
    "missing key": (("    rule: The artifact's sha256 matches the registry\n", ""), "PV-E004", 52),
    "blocked without reason": (('if_fails: "blocked: apr bench does not exist yet"', 'if_fails: ""'), "PV-W001", 50),
    "no test binding": (("    test: tests/test_contracts.py::test_status_percentage\n", ""), "PV-W002", 52),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_broken_copies_are_rejected_with_codes(tmp_path, case):
    (old, new), code, line = BROKEN[case]
    assert old in TEXT
    path = write(tmp_path, TEXT.replace(old, new, 1))
    found = validate_file(path).diagnostics
    assert (code, line) in [(d.code, d.line) for d in found], [d.format() for d in found]
    expected_rc = 1 if code.startswith("PV-E") else 0
    assert main(["validate", "--json", str(path)]) == expected_rc


def test_duplicate_nested_key_and_json_output(tmp_path, capsys):
    path = write(tmp_path, TEXT.replace("    ship_blocking: true\n    discharge_status: UNTESTED",
                                        "    ship_blocking: true\n    ship_blocking: false\n    discharge_status: UNTESTED"))
    assert main(["validate", "--json", str(path)]) == 1
    report = json.loads(capsys.readouterr().out)
    (d,) = report["files"][0]["diagnostics"]
    assert (d["code"], d["line"], d["severity"]) == ("PV-E002", 37, "error") and "ship_blocking" in d["message"]


def test_verdict_language():
    doc = {"passed": True, "n": 290, "ratio": 0.5, "tags": ["cpu", "q4_k"], "text": "def fib(n):", "a b": [{"c": 1}]}
    assert parse_path('$.tags[-1]') == ["tags", -1] and parse_path("$['a b'][0].c") == ["a b", 0, "c"]
    cases = [("$.passed", "==", True, True), ("$.passed", "==", 1, False), ("$.n", ">=", 290, True),
             ("$.n", "<", 290, False), ("$.ratio", "!=", 0.4, True), ("$.tags", "contains", "cpu", True),
             ("$.text", "contains", "fib", True), ("$.text", "matches", r"^def \w+\(", True),
             ('$["a b"][0].c', "==", 1, True), ("$.missing", "==", None, False), ("$.text", ">", 1, False)]
    for path, op, value, holds in cases:
        assert Clause(path=path, op=op, value=value).evaluate(doc)[0] is holds, (path, op, value)
    for bad in [dict(path="passed", op="==", value=1), dict(path="$.a", op="eval", value=1),
                dict(path="$.a", op=">=", value="1"), dict(path="$.a", op="matches", value="(")]:
        with pytest.raises(ValueError):
            Clause(**bad)


def test_resolves_prefixes():
    ids = {"tests/t.py::test_a[1]", "tests/t.py::TestK::test_b"}
    assert all(resolves(b, ids) for b in ["tests/t.py::test_a", "tests/t.py::TestK", "./tests/t.py", "tests/t.py::test_a[1]"])
    assert not any(resolves(b, ids) for b in ["tests/t.py::test_ab", "tests/t.py::test_c", "tests/u.py"])


def test_lint_strict_binding(tmp_path, capsys):
    """One pytest --collect-only run over this file: real bindings resolve, a made-up one does not."""
    good = TEXT.replace("    check:\n", "    falsified_by: tests/test_contracts.py::test_verdict_language\n    check:\n")
    write(tmp_path, good, "good.yaml")
    bad = good.replace("tests/test_contracts.py::test_status_percentage", "tests/test_contracts.py::test_does_not_exist")
    write(tmp_path, bad, "bad.yaml")
    rc = main(["lint", str(tmp_path / "contracts"), "--strict-test-binding", "--rootdir", str(REPO), "--json"])
    files = {Path(f["file"]).name: f for f in json.loads(capsys.readouterr().out)["files"]}
    assert rc == 1 and files["good.yaml"]["ok"] and files["good.yaml"]["diagnostics"] == []
    (d,) = files["bad.yaml"]["diagnostics"]
    assert (d["code"], d["line"]) == ("PV-E016", 58) and "test_does_not_exist" in d["message"]


def test_lint_strict_needs_falsified_by(tmp_path, capsys):
    path = write(tmp_path, TEXT)  # the fixture names no falsified_by test
    assert main(["lint", str(path), "--strict-test-binding", "--rootdir", str(REPO)]) == 1
    assert capsys.readouterr().out.count("PV-E023") == 4
    assert main(["lint", str(path), "--rootdir", str(REPO)]) == 0  # without --strict it is not required


def test_lint_missing_file_is_a_warning_without_strict(tmp_path, capsys):
    path = write(tmp_path, TEXT.replace("tests/test_contracts.py::", "tests/nope.py::"))  # no pytest run needed
    assert main(["lint", str(path), "--rootdir", str(REPO)]) == 0
    out = capsys.readouterr().out
    assert out.count("PV-W006") == 4 and "no file tests/nope.py" in out


DOCS = {"SHIP-001": {"tensor_count": 290, "parameter_count": 490000000}, "SHIP-003": {"decode_tok_s": 20.5}}


def _discharged(text: str, cid: str, tmp_path: Path, sha: str | None = None, fingerprint: str | None = None) -> str:
    """`text` with criterion `cid` DISCHARGED and a coherent evidence record on disk (as pv discharge writes
    it, for artifact `sha` and code `fingerprint`, default: the contract's and the current code's); a
    live_discharge when sha is given."""
    from apr.contracts import discharge as dis
    from apr.contracts.schema import Contract

    contract = Contract.model_validate(YAML(typ="safe").load(text))
    crit = next(c for c in contract.criteria if c.id == cid)
    doc, art = DOCS[cid], sha or contract.metadata.model.artifact_sha256
    run = dis.Run(["apr"], 0, json.dumps(doc) + "\n", "", 1.0)
    facts = {"date": "2025-01-01T00:00:00+00:00", "git_commit": "c0ffee", "git_dirty": False,
             "provenance": {"code_fingerprint": fingerprint or current_fingerprint(), "isa_class": "avx2"}}
    steps, observed = dis.verification_chain(crit, contract.metadata.model.artifact_sha256, art, run, doc, facts)
    record = dis._record(Path("contracts/c.yaml"), crit, contract.metadata, "DISCHARGED", Path(__file__), art, run, doc,
                         steps, observed, facts)
    record["artifact"]["sha256"] = art
    folder = tmp_path / "evidence" / "c" / f"{cid}-2025-01-01"
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in dis._files(folder.name, record, run, doc).items():
        (folder / name).write_text(body)
    yaml = YAML()
    data = yaml.load(text)
    (node,) = [c for c in data["criteria"] if c["id"] == cid]
    node["discharge_status"] = "DISCHARGED"
    node["evidence_discharged_by"] = [f"evidence/c/{cid}-2025-01-01/discharge-evidence-v1.json"]
    if sha:
        node["live_discharge"] = {"date": "2025-01-01", "host": "h", "artifact": "a", "artifact_sha256": sha,
                                  "command": "c", "wall_time_s": 1.0, "observed": observed, "verdict": "PASS"}
    buf = io.StringIO()
    yaml.dump(data, buf)
    return buf.getvalue()


def test_status_percentage(tmp_path, capsys):
    sha = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    text = _discharged(_discharged(TEXT, "SHIP-001", tmp_path, sha), "SHIP-003", tmp_path)  # SHIP-003 is not blocking
    path = write(tmp_path, text)
    assert codes(path) == ["PV-W003"]  # SHIP-003 has no live_discharge record
    (model,) = summarize([path])["models"]
    assert (model["ship_blocking"], model["discharged"], model["ship_pct"]) == (3, 1, 33.3)
    assert [c["id"] for c in model["left"]] == ["SHIP-002", "SHIP-010"]
    assert main(["status", str(path.parent), "--report", str(tmp_path / "reports" / "ship.md")]) == 0
    assert "33.3% (1/3 ship-blocking discharged on this code and artifact; 0 stale)" in capsys.readouterr().out
    report = (tmp_path / "reports" / "ship.md").read_text()
    assert "| SHIP-001 |" in report and "(../evidence/c/SHIP-001-2025-01-01)" in report and "Left to ship:" in report
    assert "(../evidence/c/SHIP-001-2025-01-01/stdout.txt)" in report and "$.tensor_count = 290" in report
    assert main(["status", str(path.parent), "--report", str(tmp_path / "ship.html")]) == 0
    assert "<table>" in (tmp_path / "ship.html").read_text()


def test_status_stale_and_invalid(tmp_path, capsys):
    path = write(tmp_path, _discharged(TEXT, "SHIP-001", tmp_path, "0" * 64))
    write(tmp_path, TEXT.replace('"1.2.0"', "1.2"), "broken.yaml")
    summary = summarize(sorted(path.parent.glob("*.yaml")))
    assert len(summary["invalid"]) == 2  # evidence for another artifact is refused (PV-E020)
    assert "PV-E006" in summary["invalid"][0]["first_error"] and "PV-E020" in summary["invalid"][1]["first_error"]
    assert main(["status", str(path.parent), "--json"]) == 1
    assert "PV-E020" in render_markdown(summary, tmp_path)


@pytest.mark.parametrize("args", [["validate", "{dir}/broken.yaml"], ["discharge", "{dir}/missing.yaml", "--id", "SHIP-001"],
                                  ["discharge", "{dir}/valid.yaml", "--id", "SHIP-999"], ["status", "{dir}/nowhere"],
                                  ["status", "{dir}", "--report", "{dir}/r.pdf"]])
def test_errors_are_one_line(tmp_path, args):
    (tmp_path / "broken.yaml").write_text("metadata: [unclosed\n")
    (tmp_path / "valid.yaml").write_text(TEXT)
    argv = [a.format(dir=tmp_path) for a in args]
    proc = subprocess.run([sys.executable, "-m", "apr.contracts.cli", *argv], capture_output=True, text=True)
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines() if proc.returncode == 2 else proc.stdout.strip().splitlines()[:1]
    assert len(lines) == 1 and ("pv: error:" in lines[0] or "PV-E001" in lines[0]), proc.stderr + proc.stdout
