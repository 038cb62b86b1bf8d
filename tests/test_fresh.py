"""Evidence bound to the code and the artifact: provenance, fresh/stale status, --stale, pv verify, and
pv validate refusing evidence edited by hand. Runs pv on a fake check and a small temp "model"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apr.contracts import fresh
from apr.contracts.cli import main
from apr.contracts.status import summarize
from test_discharge import criterion, discharge, make_contract, project  # noqa: F401  (project: a fixture)


@pytest.fixture
def done(project, capsys):
    root, model = project
    path = make_contract(project)
    assert discharge(path, model) == 0
    capsys.readouterr()
    return path, model, root / "evidence" / "fake" / "SHIP-001-2025-01-02"


def _row(path: Path, cid: str = "SHIP-001") -> dict:
    (model,) = summarize([path])["models"]
    return next(c for c in model["criteria"] if c["id"] == cid), model


def test_evidence_records_provenance(done):
    path, model, folder = done
    doc = json.loads((folder / "discharge-evidence-v1.json").read_text())
    prov = doc["provenance"]
    assert prov["code_fingerprint"] == fresh.current_fingerprint() and len(prov["code_fingerprint"]) == 64
    assert prov["isa_class"] in ("amx", "avx512", "avx2", "baseline") and prov["threads"] >= 1
    assert {"git_commit", "git_dirty", "apr_version", "torch_version", "python", "cpu_model", "apr_env"} <= set(prov)
    assert prov["backend"] == "cpu"  # what the check's own JSON reported
    assert doc["contract_name"] == "fake" and doc["model"] == "fake-model"
    live = criterion(path)["live_discharge"]
    assert live["code_fingerprint"] == prov["code_fingerprint"] and live["isa_class"] == prov["isa_class"]


def test_fresh_then_stale_after_a_code_change(done, monkeypatch, capsys):
    path, model, _ = done
    row, entry = _row(path)
    assert (row["status"], row["fresh"], entry["ship_pct"], entry["stale"]) == ("DISCHARGED", True, 50.0, 0)
    monkeypatch.setattr(fresh, "current_fingerprint", lambda: "f" * 64)  # as if one line of apr changed
    row, entry = _row(path)
    assert (row["status"], row["fresh"], entry["ship_pct"], entry["stale"]) == ("STALE", False, 0.0, 1)
    assert "code changed" in row["note"]
    assert main(["status", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)["models"][0]
    assert (doc["ship_pct"], doc["stale"]) == (0.0, 1)


def test_discharge_stale_brings_it_back(done, monkeypatch, capsys):
    path, model, _ = done
    from apr.contracts import discharge as dis

    monkeypatch.setattr(fresh, "current_fingerprint", lambda: "f" * 64)
    monkeypatch.setattr("apr.provenance.code_fingerprint", lambda root=None: "f" * 64)
    assert dis.unfresh_ids(path) == ["SHIP-001", "SHIP-002"]  # SHIP-002: stale and never discharged
    # SHIP-002's check cannot run on this file (exit 2), and --stale goes on past it
    assert main(["discharge", str(path), "--stale", "--model", str(model)]) == 2
    assert "SHIP-002" in capsys.readouterr().err
    row, entry = _row(path)
    assert row["status"] == "DISCHARGED" and row["fresh"] and entry["stale"] == 0


def test_verify_reproduces_and_appends(done, capsys):
    path, model, folder = done
    before = (folder / "discharge-evidence-v1.json").read_text()
    assert main(["verify", str(path), "--id", "SHIP-001", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["reproduced"] and rec["verdict"] == "PASS" and Path(rec["file"]).parent == folder
    assert main(["verify", str(path), "--id", "SHIP-001"]) == 0
    assert sorted(p.name for p in folder.glob("verify-*.json")) == ["verify-2025-01-02-2.json", "verify-2025-01-02.json"]
    assert (folder / "discharge-evidence-v1.json").read_text() == before  # nothing overwritten
    model.write_bytes(b"other bytes")
    assert main(["verify", str(path), "--id", "SHIP-001"]) == 2  # the recorded artifact changed: refused
    assert "sha256" in capsys.readouterr().err


@pytest.mark.parametrize("edit", ["observed", "chain_observed", "chain_detail", "chain_value", "sha", "criterion",
                                  "verdict"])
def test_hand_edited_evidence_is_refused(done, edit, capsys):
    path, model, folder = done
    file = folder / "discharge-evidence-v1.json"
    doc = json.loads(file.read_text())
    step = next(s for s in doc["verification_chain"] if s.get("path") == "$.size")
    if edit == "observed":
        doc["observed"]["$.size"] = 99999
    elif edit.startswith("chain_"):  # the verdict step's own copy: what a reader sees first in the file
        key = edit[len("chain_"):]
        step[key] = step[key].replace("observed", "observed 1 +") if key == "detail" else 99999
    elif edit == "sha":
        doc["artifact"]["sha256"] = "0" * 64
    elif edit == "criterion":
        doc["criterion"]["id"] = "SHIP-002"
    else:
        doc["verdict"] = "FAIL"
    file.write_text(json.dumps(doc))
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    code = {"sha": "PV-E020", "criterion": "PV-E019"}.get(edit, "PV-E021")
    assert code in out and str(file) in out


def test_two_contracts_cannot_cite_one_folder(done, capsys):
    path, model, folder = done
    twin = path.with_name("twin.yaml")
    twin.write_text(path.read_text())
    assert main(["validate", str(path), str(twin)]) == 1
    out = capsys.readouterr().out
    assert "PV-E022" in out and "PV-E018" in out  # and the evidence names the other contract


def test_json_with_nan_does_not_pass(project, capsys):
    root, model = project
    nan = 'python -c "import json; print(json.dumps(dict(passed=True, size=float(chr(110)+chr(97)+chr(110)))))" {model}'
    path = make_contract(project, check=nan)
    assert discharge(path, model) == 1
    assert "NaN" in capsys.readouterr().out


def test_evidence_files_are_attached_compressed(project, capsys):
    import gzip

    root, model = project
    (root / "samples.jsonl").write_text('{"task_id": "t/0", "passed": true}\n')
    check = ('python -c "import json; print(json.dumps(dict(passed=True, size=1, evidence_files=[chr(115)+'
             '\'amples.jsonl\'])))" {model}')
    path = make_contract(project, check=check)
    assert discharge(path, model) == 0
    folder = root / "evidence" / "fake" / "SHIP-001-2025-01-02"
    assert gzip.decompress((folder / "samples.jsonl.gz").read_bytes()) == (root / "samples.jsonl").read_bytes()


def test_humaneval_resume_never_mixes_code_versions(tmp_path):
    from apr.errors import AprError
    from apr.evals.humaneval import check_meta, default_out

    meta = {"model_sha256": "a" * 64, "prompt_style": "chat", "temperature": 0.0, "max_tokens": 512, "seed": 0,
            "code_fingerprint": "1" * 64, "dtype": "bfloat16", "backend": "cpu"}
    check_meta(tmp_path / "run", meta)
    check_meta(tmp_path / "run", dict(meta))  # the same code and settings: resume
    for key, other in (("code_fingerprint", "2" * 64), ("dtype", "float32"), ("backend", "cuda")):
        with pytest.raises(AprError, match=key):
            check_meta(tmp_path / "run", {**meta, key: other})
        assert default_out(tmp_path, "m.gguf", meta["model_sha256"], {**meta, key: other}) != \
            default_out(tmp_path, "m.gguf", meta["model_sha256"], meta)
    old = {k: v for k, v in meta.items() if k not in ("code_fingerprint", "dtype", "backend")}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "meta.json").write_text(json.dumps(old))  # a run from before the fingerprint
    with pytest.raises(AprError):
        check_meta(tmp_path / "old", meta)


def _gate(path: Path, cid: str) -> None:
    text = path.read_text()
    at = text.index(f"id: {cid}")
    end = text.index("    check:", at)
    path.write_text(text[:end] + "    gate: true\n" + text[end:])


def test_a_gate_not_passed_holds_back_everything_else(done, capsys):
    path, model, _ = done
    assert _row(path)[1]["ship_pct"] == 50.0  # SHIP-001 discharged, SHIP-002 untested
    _gate(path, "SHIP-002")
    row, entry = _row(path)
    assert (entry["ship_pct"], entry["gates_shut"], row["counted"]) == (0.0, ["SHIP-002"], False)
    assert "gate SHIP-002" in row["note"]
    assert main(["status", str(path)]) == 0
    assert "gate SHIP-002 not passed" in capsys.readouterr().out


def test_a_passed_gate_lets_the_rest_count(done):
    path, model, _ = done
    _gate(path, "SHIP-001")
    row, entry = _row(path)
    assert (entry["ship_pct"], entry["gates_shut"], row["counted"]) == (50.0, [], True)
