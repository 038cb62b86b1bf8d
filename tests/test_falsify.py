"""Every ship criterion can fail: plant the fault it exists to catch and see its own check come out FALSIFIED.

Each test takes the criterion from the real contract (both models), runs its check command in-process on a
tiny GGUF or on the real file, with the fault planted by a monkeypatch, and judges the output with pv's own
verification chain (apr.contracts.discharge). Each also runs the unfaulted case, which must be DISCHARGED:
a check that fails everything proves nothing. Where a clause's value is a fact of one file (a tensor count,
a sha256, a licence), a tiny-model test re-targets that value to the unfaulted tiny run's own
(`retarget`): the check's command, paths and operators are the contract's; only the constant moves.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from apr.contracts.discharge import Run, holds, last_json_object, verification_chain
from apr.contracts.validate import validate_file
from apr.provenance import isa_class

REPO = Path(__file__).resolve().parents[1]
# MODEL-1's contracts (the SHIP-* criteria); a student's contract has its own criteria (test_falsify_student.py)
CONTRACTS = sorted(p for p in (REPO / "contracts").glob("*.yaml") if "id: SHIP-001" in p.read_text())
IDS = [p.stem for p in CONTRACTS]


def criterion(contract: Path, cid: str):
    return next(c for c in validate_file(contract).contract.criteria if c.id == cid)


def judge(crit, doc: dict, isa: str | None = None, allow_weak: bool = False) -> str:
    """The verdict pv discharge would reach on this output (artifact sha taken as matching)."""
    run = Run(["apr"], 0, json.dumps(doc) + "\n", "", 0.1)
    facts = {"provenance": {"isa_class": isa or isa_class()}, "allow_weak_isolation": allow_weak}
    steps, _ = verification_chain(crit, "0" * 64, "0" * 64, run, doc, facts)
    return "DISCHARGED" if holds(steps) else "FALSIFIED"


def run_check(crit, model: Path, capsys, *extra: str) -> dict:
    """The criterion's own command, in-process (as `apr ...`), its last JSON object."""
    from apr.cli import main

    argv = [a.replace("{model}", str(model)) for a in shlex.split(crit.check.command)[1:]] + list(extra)
    capsys.readouterr()
    main(argv)
    out = capsys.readouterr()
    doc = last_json_object(out.out)
    assert doc is not None, f"{crit.check.command} printed no JSON: {out.err[-500:]}"
    return doc


def retarget(crit, doc: dict):
    """The criterion with each `==` clause's file-specific constant set to what `doc` observed."""
    clauses = []
    for c in crit.check.verdict:
        holds_now, seen = c.evaluate(doc)
        fact = c.op == "==" and not isinstance(c.value, bool) and seen is not None
        clauses.append(c.model_copy(update={"value": seen}) if fact else c)
    return crit.model_copy(update={"check": crit.check.model_copy(update={"verdict": clauses})})


def real_path(contract: Path) -> Path:
    from conftest import real_model

    return real_model(validate_file(contract).contract.metadata.model.name)


@pytest.fixture
def in_repo(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # checks name files relative to the project root (contracts/prompts/...)
    monkeypatch.setenv("APR_HOME", str(tmp_path / "home"))


def other_tiny(path: Path) -> Path:
    from tiny_gguf import write_tiny_gguf

    return write_tiny_gguf(path, "qwen2", seed=1)  # same shapes, other weights


# ---- SHIP-001: loads and runs ----

@pytest.mark.real
@pytest.mark.parametrize("contract", CONTRACTS, ids=IDS)
def test_ship001_tensor_count_off_by_one(contract, capsys, monkeypatch):
    import apr.formats.gguf as gguf

    crit, model = criterion(contract, "SHIP-001"), real_path(contract)  # unfaulted: test_ship001_garbage_kernel
    real = gguf.read_gguf

    def one_more(path, *a, **k):  # a reader that reports a tensor the file does not have
        g = real(path, *a, **k)
        first = next(iter(g.tensors.values()))
        g.tensors = {**g.tensors, "blk.0.phantom.weight": first}
        return g

    monkeypatch.setattr(gguf, "read_gguf", one_more)
    doc = run_check(crit, model, capsys)
    assert doc["tensor_count"] == crit.check.verdict[0].value + 1
    assert judge(crit, doc) == "FALSIFIED"


@pytest.mark.real
@pytest.mark.parametrize("contract", CONTRACTS, ids=IDS)
def test_ship001_garbage_kernel(contract, capsys, monkeypatch):
    import torch

    from apr.quant.linear import QuantLinear

    crit, model = criterion(contract, "SHIP-001"), real_path(contract)
    assert judge(crit, run_check(crit, model, capsys)) == "DISCHARGED"
    real = QuantLinear.forward

    def garbage(self, x):  # right shape, finite, meaningless
        out = real(self, x)
        return torch.randn_like(out.float()).to(out.dtype) * 4

    monkeypatch.setattr(QuantLinear, "forward", garbage)
    doc = run_check(crit, model, capsys)
    assert doc["forward"]["finite"] and doc["forward"]["nll"] > 3.0
    assert judge(crit, doc) == "FALSIFIED"


# ---- SHIP-002: the fib answer parses ----

def _answers(monkeypatch, text_for):
    import apr.generate as gen

    def fake(lm, prompt, **kw):
        return SimpleNamespace(text=text_for(prompt), tokens=[1, 2, 3], stop_reason="eos", decode_tok_s=50.0)

    monkeypatch.setattr(gen, "generate", fake)


@pytest.mark.parametrize("contract", CONTRACTS, ids=IDS)
def test_ship002_broken_code(contract, tiny_qwen, capsys, monkeypatch, in_repo):
    crit = criterion(contract, "SHIP-002")
    _answers(monkeypatch, lambda p: "```python\ndef fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n```")
    assert judge(crit, run_check(crit, tiny_qwen, capsys)) == "DISCHARGED"
    _answers(monkeypatch, lambda p: "```python\ndef fib(n):\n    return (n +\n```")
    assert judge(crit, run_check(crit, tiny_qwen, capsys)) == "FALSIFIED"


# ---- SHIP-003 / SHIP-004 / SHIP-009: the .apr conversion ----

@pytest.mark.parametrize("contract", CONTRACTS, ids=IDS)
def test_ship003_corrupt_apr_writer(contract, tiny_qwen, capsys, monkeypatch, in_repo, tmp_path):
    import apr.formats.apr_write as aw

    crit = criterion(contract, "SHIP-003")
    assert judge(crit, run_check(crit, tiny_qwen, capsys)) == "DISCHARGED"
    wrong, real = other_tiny(tmp_path / "other.gguf"), aw.convert_gguf
    monkeypatch.setattr(aw, "convert_gguf", lambda src, dst, *a, **k: real(wrong, dst, *a, **k))  # wrong weights
    assert judge(crit, run_check(crit, tiny_qwen, capsys)) == "FALSIFIED"


@pytest.fixture
def tiny_copy(tiny_qwen, tmp_path) -> Path:
    return Path(shutil.copy(tiny_qwen, tmp_path / "tiny.gguf"))  # convert writes its .apr beside it


@pytest.mark.parametrize("contract", CONTRACTS, ids=IDS)
def test_ship004_lossy_export(contract, tiny_copy, capsys, monkeypatch, in_repo, tmp_path):
    import apr.formats.apr_export as ae

    crit = criterion(contract, "SHIP-004")
    assert judge(crit, run_check(crit, tiny_copy, capsys)) == "DISCHARGED"
    wrong = other_tiny(tmp_path / "other.gguf")
    monkeypatch.setattr(ae, "export_gguf", lambda src, dst, *a, **k: shutil.copy(wrong, dst) and {})
    assert judge(crit, run_check(crit, tiny_copy, capsys)) == "FALSIFIED"


@pytest.mark.parametrize("contract", CONTRACTS, ids=IDS)
def test_ship009_missing_licence(contract, tiny_copy, capsys, monkeypatch, in_repo):
    import apr.formats.apr_write as aw

    crit = criterion(contract, "SHIP-009")
    good = run_check(crit, tiny_copy, capsys)
    crit = retarget(crit, good)  # the tiny file's own licence and sha256
    assert judge(crit, good) == "DISCHARGED"
    monkeypatch.setattr(aw, "_license", lambda metadata, sha: ("", "dropped by a broken writer"))
    assert judge(crit, run_check(crit, tiny_copy, capsys)) == "FALSIFIED"


# ---- SHIP-005: HumanEval pass@1 and its sandbox ----

def _humaneval(crit, tiny_qwen, capsys, monkeypatch, tmp_path, solve: bool) -> dict:
    from apr.evals.humaneval import load_problems

    problems = {p["prompt"][-200:]: p for p in load_problems(2).values()}

    def text_for(prompt):
        p = next((v for k, v in problems.items() if k.strip() in prompt), None)
        return f"```python\n{p['prompt']}{p['canonical_solution']}```" if solve and p else "I cannot help with that."

    _answers(monkeypatch, text_for)
    return run_check(crit, tiny_qwen, capsys, "--limit", "2", "--max-tokens", "8", "--out", str(tmp_path / f"he{solve}"))


@pytest.mark.parametrize("contract", CONTRACTS, ids=IDS)
def test_ship005_pass_rate_below_floor(contract, tiny_qwen, capsys, monkeypatch, in_repo, tmp_path):
    crit = criterion(contract, "SHIP-005")
    good = _humaneval(crit, tiny_qwen, capsys, monkeypatch, tmp_path, solve=True)
    assert good["pass@1"] == 1.0 and judge(crit, good) == "DISCHARGED"
    bad = _humaneval(crit, tiny_qwen, capsys, monkeypatch, tmp_path, solve=False)
    assert bad["pass@1"] == 0.0 and judge(crit, bad) == "FALSIFIED"


@pytest.mark.parametrize("contract", CONTRACTS, ids=IDS)
def test_ship005_weak_sandbox(contract, tiny_qwen, capsys, monkeypatch, in_repo, tmp_path):
    import apr.evals.sandbox as sb

    crit = criterion(contract, "SHIP-005")
    monkeypatch.setattr(sb, "isolation_report", lambda: {"works": True, "level": "audit-hook", "guard": True})
    doc = _humaneval(crit, tiny_qwen, capsys, monkeypatch, tmp_path, solve=True)
    assert doc["sandbox"]["isolation"] == "audit-hook" and doc["pass@1"] == 1.0
    assert judge(crit, doc) == "FALSIFIED"  # weaker than namespaces
    assert judge(crit, doc, allow_weak=True) == "DISCHARGED"  # only with the explicit flag


# ---- SHIP-006: every qa gate that can run executes and passes ----

def _gates(monkeypatch, outcomes: list[str]):
    from apr.qa import gates as g
    from apr.qa.context import Outcome, Skip

    def make(kind):
        def run(ctx):
            if kind == "skip":
                raise Skip("planted: prerequisite absent")
            return Outcome(kind == "pass", f"planted {kind}")
        return run

    fake = tuple(g.Gate(f"gate_{i}", make(k), False, "planted") for i, k in enumerate(outcomes))
    monkeypatch.setattr(g, "GATES", fake)
    monkeypatch.setattr(g, "GATE_NAMES", tuple(x.name for x in fake))


@pytest.mark.parametrize("contract", CONTRACTS, ids=IDS)
def test_ship006_failing_gate(contract, tiny_qwen, capsys, monkeypatch, in_repo):
    crit = criterion(contract, "SHIP-006")
    _gates(monkeypatch, ["pass"] * 11 + ["skip"])
    assert judge(crit, run_check(crit, tiny_qwen, capsys)) == "DISCHARGED"
    _gates(monkeypatch, ["pass"] * 10 + ["fail", "skip"])
    assert judge(crit, run_check(crit, tiny_qwen, capsys)) == "FALSIFIED"


@pytest.mark.parametrize("contract", CONTRACTS, ids=IDS)
def test_ship006_skip_is_not_a_pass(contract, tiny_qwen, capsys, monkeypatch, in_repo):
    crit = criterion(contract, "SHIP-006")
    _gates(monkeypatch, ["pass"] * 10 + ["skip", "skip"])  # e.g. no baseline: performance_regression skips
    doc = run_check(crit, tiny_qwen, capsys)
    assert doc["gates_passed"] == 10 and doc["gates_failed"] == 0
    assert judge(crit, doc) == "FALSIFIED"


# ---- SHIP-007: decode speed, per machine class ----

def _bench(crit, tiny_qwen, capsys, monkeypatch, tok_s: float) -> dict:
    import torch

    import apr.commands.bench as bench

    stats = {"median": tok_s, "min": tok_s, "max": tok_s}

    def measure(lm, *a, **k):  # the planted speed; nothing is generated, so no engine was started
        if getattr(lm, "engine", 0) is None:
            lm.engine = SimpleNamespace(step_impl="planted")
        return {"prompt_tokens": 8, "gen_tokens": 8, "iterations": 1, "prefill": stats, "decode": stats,
                "first_token_s": 0.1}

    monkeypatch.setattr(bench, "measure", measure)
    threads = torch.get_num_threads()
    try:
        return run_check(crit, tiny_qwen, capsys)
    finally:
        torch.set_num_threads(threads)


def _floor(crit) -> float:
    return next(c.value for c in crit.check.verdict if c.isa_class)


@pytest.mark.parametrize("contract", CONTRACTS, ids=IDS)
def test_ship007_below_floor(contract, tiny_qwen, capsys, monkeypatch):
    crit = criterion(contract, "SHIP-007")
    for isa in ("avx2", "avx512", "amx"):
        assert judge(crit, _bench(crit, tiny_qwen, capsys, monkeypatch, _floor(crit) + 1), isa) == "DISCHARGED"
        assert judge(crit, _bench(crit, tiny_qwen, capsys, monkeypatch, _floor(crit) * 0.9), isa) == "FALSIFIED"


@pytest.mark.parametrize("contract", CONTRACTS, ids=IDS)
def test_ship007_other_machine_class(contract, tiny_qwen, capsys, monkeypatch):
    crit = criterion(contract, "SHIP-007")
    fast = _bench(crit, tiny_qwen, capsys, monkeypatch, _floor(crit) * 10)
    assert judge(crit, fast, "avx512") == "DISCHARGED"
    assert judge(crit, fast, "amx") == "DISCHARGED" and judge(crit, fast, "baseline") == "FALSIFIED"


# ---- SHIP-008: the chat template ----

@pytest.mark.real
@pytest.mark.parametrize("contract", CONTRACTS, ids=IDS)
def test_ship008_template_without_generation_prompt(contract, capsys, monkeypatch):
    from apr.tokenizer import Tokenizer

    crit, model = criterion(contract, "SHIP-008"), real_path(contract)
    assert judge(crit, run_check(crit, model, capsys)) == "DISCHARGED"
    real = Tokenizer.from_metadata.__func__

    def no_generation_prompt(cls, meta):
        meta = dict(meta)
        meta["tokenizer.chat_template"] = meta["tokenizer.chat_template"].replace("add_generation_prompt", "false")
        return real(cls, meta)

    monkeypatch.setattr(Tokenizer, "from_metadata", classmethod(no_generation_prompt))
    doc = run_check(crit, model, capsys)
    assert not doc["rendered"].endswith("<|im_start|>assistant\n")
    assert judge(crit, doc) == "FALSIFIED"


# ---- SHIP-010: the bytes are the registry's ----

@pytest.mark.parametrize("contract", CONTRACTS, ids=IDS)
def test_ship010_bytes_differ_marker_matches(contract, tiny_qwen, capsys, monkeypatch, tmp_path):
    from apr import hub

    monkeypatch.setenv("APR_HOME", str(tmp_path / "home"))
    crit = criterion(contract, "SHIP-010")
    name = validate_file(contract).contract.metadata.model.name
    path = hub.local_path(name)
    path.parent.mkdir(parents=True)
    shutil.copy(tiny_qwen, path)  # other bytes than the registry's...
    st = path.stat()
    hub._marker(path).write_text(json.dumps({"sha256": hub.REGISTRY[name].sha256, "size": st.st_size,
                                             "mtime": st.st_mtime}))  # ...under a marker that matches size and mtime
    assert hub.known_sha256(path) == hub.REGISTRY[name].sha256  # what inspect used to report: a tautology
    old = criterion(contract, "SHIP-010").model_copy(deep=True)
    old.check.command = "apr inspect {model} --json"
    old.check.verdict = old.check.verdict[:1]
    assert judge(old, run_check(old, path, capsys)) == "DISCHARGED"  # the old check passed these wrong bytes
    doc = run_check(crit, path, capsys)
    assert doc["sha256_source"] == "bytes" and doc["sha256"] != hub.REGISTRY[name].sha256
    assert judge(crit, doc) == "FALSIFIED"
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
