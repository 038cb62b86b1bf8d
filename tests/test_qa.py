"""apr qa: the gibberish detector, the report, and planted faults that must fail the right gate.

Tiny random GGUFs carry most faults (rope theta, NaN, degenerate tensors, a template without the generation
prompt, a leaking KV cache). The real 0.5B model (`-m real`) carries the rest: a copy with a patched rope
theta, and shuffled attention rows (patched in-process on the loaded model) that must fail golden_output.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct

import numpy as np
import pytest
import torch

from apr.cli import main as cli
from apr.qa import GATE_NAMES, QAContext, QAOptions, gibberish_reason, run_qa
from apr.qa.gates import selection
from apr.qa.report import baseline
from apr.runtime import load_model
from conftest import REAL_05B, real_model
from tiny_gguf import CHATML, write_tiny_gguf

STATIC = ["capability_match", "tensor_contract", "metadata_plausibility", "tokenizer_roundtrip", "chat_template"]
CHATML_NO_GEN = CHATML.split("{% if add_generation_prompt %}")[0]  # ChatML without the generation prompt


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Every test gets its own $APR_HOME, so the report history (the performance baseline) starts empty."""
    monkeypatch.setenv("APR_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def gates(report) -> dict:
    return {g.name: g for g in report.gates}


# ---- the gibberish detector ----

@pytest.mark.parametrize("text", [
    "2 + 2 equals 4.", "The capital of France is Paris.",
    "```python\ndef fib(n):\n    if n < 2:\n        return n\n            return fib(n - 1) + fib(n - 2)\n```",
    "| a | b |\n| --- | --- | --- |", "naïve café", "x = [0, 1, 1, 2, 3, 5, 8]", "Paris: 2,148,000 people",
])
def test_gibberish_passes_real_text(text):
    assert gibberish_reason(text) is None


@pytest.mark.parametrize("text, why", [
    ("", "empty"), ("   \n\t", "empty"), ("ok \ufffd then", "U+FFFD"),
    ("日本語のテキストです。中文测试", "non-ASCII"), ("the the the the the the", "repeated"),
    ("answer: 4 foo!foo!foo! done", "repeated"), ("Paris Paris Paris Paris", "repeated"),
    ("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!a", "of the text"),
])
def test_gibberish_catches_broken_output(text, why):
    reason = gibberish_reason(text)
    assert reason is not None and why in reason, reason


def test_gibberish_fragment_is_counted_in_bytes():
    # "éé" is 4 bytes: the shortest fragment the rule looks at
    assert "repeated" in gibberish_reason("abc éééééé xyz")
    assert gibberish_reason("abc éé xyz") is None


# ---- selection, report, CLI ----

def test_selection_rejects_unknown_gates():
    from apr.errors import AprError

    with pytest.raises(AprError, match="unknown gate 'nope'"):
        selection(["nope"], None)
    chosen = selection(["throughput", "golden_output"], ["golden_output"])
    assert [n for n, why in chosen.items() if why is None] == ["throughput"]
    assert len(GATE_NAMES) == 12


def test_tiny_static_gates_pass_and_json_shape(tiny_qwen, capsys):
    rc = cli(["qa", str(tiny_qwen), "--json", *sum((["--only", g] for g in STATIC), [])])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0, doc["summary"]
    assert set(doc) == {"model", "model_sha256", "passed", "gates", "gates_executed", "gates_skipped",
                        "gates_passed", "gates_failed", "skipped_gates", "total_duration_ms", "timestamp", "summary", "system_info"}
    assert [g["name"] for g in doc["gates"]] == list(GATE_NAMES)
    assert set(doc["gates"][0]) == {"name", "passed", "skipped", "message", "value", "threshold", "duration_ms"}
    assert doc["passed"] and doc["gates_executed"] == 5 and doc["gates_skipped"] == 7
    assert doc["gates_passed"] == 5 and doc["gates_failed"] == 0 and len(doc["skipped_gates"]) == 7
    assert all(g["passed"] for g in doc["gates"] if not g["skipped"])
    assert not any(g["passed"] for g in doc["gates"] if g["skipped"])  # a skip never counts as a pass


def test_min_executed_and_table(tiny_qwen, capsys):
    rc = cli(["qa", str(tiny_qwen), "--only", "metadata_plausibility", "--min-executed", "2"])
    out = capsys.readouterr().out
    assert rc == 5 and "fewer than --min-executed 2" in out
    assert "metadata_plausibility   PASS" in out and "not selected (--only)" in out


# ---- planted faults on tiny models ----

def test_rope_theta_10000_on_qwen2_fails_metadata(tmp_path):
    path = write_tiny_gguf(tmp_path / "rope.gguf", "qwen2", rope_theta=10000.0)
    g = gates(run_qa(path, only=STATIC))
    assert not g["metadata_plausibility"].passed and "rope theta 10000" in g["metadata_plausibility"].message
    assert all(g[n].passed for n in STATIC if n != "metadata_plausibility")


def test_llama_rope_theta_band(tmp_path):
    ok = write_tiny_gguf(tmp_path / "ok.gguf", "llama", rope_theta=10000.0)
    bad = write_tiny_gguf(tmp_path / "bad.gguf", "llama", rope_theta=1e9)
    assert gates(run_qa(ok, only=["metadata_plausibility"]))["metadata_plausibility"].passed
    assert not gates(run_qa(bad, only=["metadata_plausibility"]))["metadata_plausibility"].passed


def _weight(path, name: str) -> np.ndarray:
    from apr.formats.gguf import read_gguf
    from apr.quant import dequantize

    t = read_gguf(path).tensors[name]
    return dequantize(torch.from_numpy(t.data), t.qtype, t.shape).numpy().copy()


@pytest.mark.parametrize("fault, expect", [
    ("nan", "NaN/Inf"), ("zeros", "all-zero"), ("constant_rows", "rows are constant"), ("huge", "rms"),
])
def test_broken_weight_fails_tensor_contract(tmp_path, tiny_qwen, fault, expect):
    w = _weight(tiny_qwen, "blk.1.ffn_up.weight")  # (ffn, dim)
    if fault == "nan":
        w[3, 7] = np.nan
    elif fault == "zeros":
        w[:] = 0
    elif fault == "constant_rows":
        w[: w.shape[0] // 2] = 0.5
    else:
        w *= 1e3
    path = write_tiny_gguf(tmp_path / "bad.gguf", "qwen2", overrides={"blk.1.ffn_up.weight": w})
    g = gates(run_qa(path, only=STATIC))
    assert not g["tensor_contract"].passed
    assert "blk.1.ffn_up.weight" in g["tensor_contract"].message and expect in g["tensor_contract"].message
    assert all(g[n].passed for n in STATIC if n != "tensor_contract")


def test_template_without_generation_prompt_fails_chat_template(tmp_path):
    path = write_tiny_gguf(tmp_path / "nogen.gguf", "qwen2", chat_template=CHATML_NO_GEN)
    g = gates(run_qa(path, only=STATIC))
    assert not g["chat_template"].passed and "assistant header" in g["chat_template"].message
    assert all(g[n].passed for n in STATIC if n != "chat_template")


@pytest.fixture
def leaky_cache(monkeypatch):
    """A KV cache that leaks between requests: each request's positions start where the previous one's
    ended, so its attention also sees the earlier request's keys and values (the engine's step is where
    every generation runs, so the leak is planted there)."""
    from apr.model.transformer import Segment, Transformer

    step, setup = Transformer.step, Transformer.setup_cache
    state = {"base": 0, "end": 0}

    def setup_cache(self, capacity, slots=1, keep=False):
        setup(self, capacity + 4096, slots, keep)  # one allocation kept across requests, with room for the carry-over

    def leaky_step(self, ids, segs, all_logits=False):
        if segs[0].n > 1:  # a new request's prompt: it starts where the previous request ended
            state["base"] = state["end"]
        state["end"] = state["base"] + segs[0].pos + segs[0].n
        moved = [Segment(s.slot, state["base"] + s.pos, s.n) for s in segs]
        need = max(s.pos + s.n for s in moved)
        if need > self.cache.capacity:  # room for the carried-over positions, contents kept
            setup(self, need + 4096, self.cache.slots, True)
        return step(self, ids, moved, all_logits)

    monkeypatch.setattr(Transformer, "setup_cache", setup_cache)
    monkeypatch.setattr(Transformer, "step", leaky_step)


def test_state_isolation_passes_then_catches_a_leak(tiny_qwen, request):
    lm = load_model(tiny_qwen, quiet=True)
    assert gates(run_qa(ctx=QAContext.with_model(lm), only=["state_isolation"]))["state_isolation"].passed
    request.getfixturevalue("leaky_cache")
    g = gates(run_qa(ctx=QAContext.with_model(lm), only=["state_isolation"]))["state_isolation"]
    assert not g.passed and "leaked" in g.message


# ---- live gates on a tiny model ----

def _with_speed(lm, tok_s: float) -> QAContext:
    ctx = QAContext.with_model(lm)
    ctx.shared["speed"] = {"decode_tok_s": tok_s, "steps": 47, "prefill_tok_s": 500.0, "prompt_tokens": 20}
    return ctx


def _save_passing(lm, tok_s: float) -> None:
    """A saved run whose performance_regression passed at tok_s: the history's baseline."""
    from apr.qa.report import GateResult, QAReport, save

    gate = GateResult("performance_regression", True, False, "ok", tok_s, tok_s * 0.9)
    save(QAReport(str(lm.path), lm.sha256, [gate], 1.0, {"dtype": lm.dtype, "backend": lm.backend}))


def test_performance_regression_baseline_then_drop(tiny_qwen):
    lm = load_model(tiny_qwen, quiet=True)
    only = ["throughput", "performance_regression"]
    first = gates(run_qa(ctx=_with_speed(lm, 100.0), only=only))["performance_regression"]
    assert first.skipped and not first.passed and "no baseline" in first.message  # nothing to compare with
    assert baseline(lm.sha256, lm.dtype, lm.backend) is None  # a skipped gate is not a baseline
    _save_passing(lm, 100.0)
    slow = gates(run_qa(ctx=_with_speed(lm, 85.0), only=only))["performance_regression"]
    assert not slow.passed and slow.threshold == 90.0 and "-15.0%" in slow.message
    # a failed run is not a baseline: the next run is still measured against 100
    ok = gates(run_qa(ctx=_with_speed(lm, 95.0), only=only))["performance_regression"]
    assert ok.passed and "vs 100.00" in ok.message


def test_throughput_floor(tiny_qwen):
    lm = load_model(tiny_qwen, quiet=True)
    ctx = _with_speed(lm, 12.0)
    ctx.options.min_tps = 20.0
    g = gates(run_qa(ctx=ctx, only=["throughput"], keep=False))["throughput"]
    assert not g.passed and (g.value, g.threshold) == (12.0, 20.0)


def test_live_gates_on_tiny(tiny_qwen):
    """Everything but golden_output passes on a random model (its answers are gibberish, by design)."""
    # the floor is not what this test is about: the shared test box is often loaded far below 10 tok/s
    g = gates(run_qa(tiny_qwen, QAOptions(min_tps=0.5), skip=["reference_parity"], keep=False))
    assert not g["golden_output"].passed and "gibberish" in g["golden_output"].message
    assert g["backend_parity"].skipped == (not torch.cuda.is_available())
    failed = [n for n, r in g.items() if not r.passed and not r.skipped and n != "golden_output"]
    assert not failed, [g[n].message for n in failed]
    assert "identical greedy tokens" in g["format_parity"].message


def test_missing_code_fails_never_skips(tiny_qwen, monkeypatch):
    import apr.formats.apr_write as aw

    def gone(*a, **k):
        raise ImportError("No module named 'apr.formats.apr'")

    monkeypatch.setattr(aw, "convert_gguf", gone)
    g = gates(run_qa(tiny_qwen, only=["format_parity"], keep=False))["format_parity"]
    assert not g.passed and not g.skipped and "ImportError" in g.message


def test_reference_parity_skips_without_transformers(tiny_qwen, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    g = gates(run_qa(tiny_qwen, only=["reference_parity"], keep=False))["reference_parity"]
    assert g.skipped and not g.passed and "transformers is not installed" in g.message


@pytest.mark.reference
def test_reference_parity_on_tiny(tiny_qwen):
    g = gates(run_qa(tiny_qwen, QAOptions(dtype="float32"), only=["reference_parity"], keep=False))
    assert g["reference_parity"].passed and g["reference_parity"].value >= 0.99, g["reference_parity"].message


# ---- the real 0.5B model ----

def patch_rope_theta(src, dst, theta: float) -> None:
    """Copy a qwen2 GGUF and overwrite the value bytes of qwen2.rope.freq_base (exact: same file size)."""
    shutil.copyfile(src, dst)
    key = b"qwen2.rope.freq_base"
    with open(dst, "r+b") as f:
        head = f.read(1 << 20)  # the key/value section comes before the tokenizer's big arrays
        at = head.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
        vtype = struct.unpack("<I", head[at : at + 4])[0]
        f.seek(at + 4)
        f.write(struct.pack({6: "<f", 12: "<d"}[vtype], theta))


@pytest.fixture(scope="module")
def real_path():
    """Resolved before the per-test $APR_HOME exists (module scope sets up first): no second pull."""
    return real_model(REAL_05B)


@pytest.fixture(scope="module")
def real_lm(real_path):
    return load_model(real_path, quiet=True)


@pytest.mark.real
def test_real_rope_theta_patch_fails_metadata(real_path, tmp_path, capsys):
    bad = tmp_path / "qwen-rope1e4.gguf"
    patch_rope_theta(real_path, bad, 10000.0)
    rc = cli(["qa", str(bad), "--json", "--only", "metadata_plausibility", "--only", "capability_match"])
    doc = json.loads(capsys.readouterr().out)
    g = {x["name"]: x for x in doc["gates"]}
    assert rc == 5 and not g["metadata_plausibility"]["passed"] and g["capability_match"]["passed"]
    assert "rope theta 10000 is implausible for qwen2" in g["metadata_plausibility"]["message"]


def shuffle_attention_rows(lm, seed: int = 0) -> list:
    """Permute the rows of every layer's attn_q and attn_k (raw ggml rows, then re-prepared): the model
    still runs, on broken attention. Returns what restore_rows needs."""
    gen, saved = torch.Generator().manual_seed(seed), []
    for block in lm.model.blk:
        for mod in (block.attn_q, block.attn_k):
            saved.append((mod, mod.raw))
            mod.raw = mod.raw[torch.randperm(mod.raw.shape[0], generator=gen)].clone()
            mod.prepared = None
            mod.materialize(lm.model.dtype)
    return saved


def restore_rows(lm, saved: list) -> None:
    for mod, raw in saved:
        mod.raw, mod.prepared = raw, None
        mod.materialize(lm.model.dtype)


@pytest.mark.real
def test_real_shuffled_attention_fails_golden_output(real_lm):
    saved = shuffle_attention_rows(real_lm)
    try:
        g = gates(run_qa(ctx=QAContext.with_model(real_lm), only=["golden_output"], keep=False))["golden_output"]
    finally:
        restore_rows(real_lm, saved)
    print(g.message)  # shown with -rA: what the broken model answered
    assert not g.passed, g.message


@pytest.mark.real
@pytest.mark.reference
def test_real_model_passes_every_gate(real_lm):
    # Left out here, each for a reason: speed gates are timings (they belong to benchmarks and to `apr qa`
    # itself, their logic is tested above on tiny models); reference_parity and format_parity on this model
    # are the subject of tests/test_reference.py and tests/test_apr_format.py, which CI also runs.
    elsewhere = ["throughput", "performance_regression", "reference_parity", "format_parity"]
    report = run_qa(ctx=QAContext.with_model(real_lm, QAOptions(real_lm.dtype, real_lm.backend)), skip=elsewhere,
                    keep=False)
    failed = [f"{g.name}: {g.message}" for g in report.gates if not g.passed and not g.skipped]
    assert report.passed, failed
    skipped = {g.name for g in report.gates if g.skipped}
    assert skipped - set(elsewhere) <= {"backend_parity"}
    assert ("backend_parity" in skipped) == (not torch.cuda.is_available())


def test_committed_baseline_per_machine_class(tiny_qwen, tmp_path, monkeypatch):
    from apr.provenance import isa_class
    from apr.qa import baseline as qb

    with monkeypatch.context() as m:  # the recorded speed, planted
        m.setattr("apr.qa.gates_live.decode_speed", lambda ctx: {"decode_tok_s": 100.0, "steps": 47,
                                                                "prefill_tok_s": 1.0, "prompt_tokens": 8})
        entry = qb.record(str(tiny_qwen), tmp_path / "qa-baselines")
    doc = json.loads((tmp_path / "qa-baselines" / f"{isa_class()}.json").read_text())
    assert doc["isa_class"] == isa_class() and doc["entries"] == [entry] and len(entry["code_fingerprint"]) == 64
    lm = load_model(tiny_qwen, quiet=True)
    only = ["throughput", "performance_regression"]

    def gate(tok_s: float, where) -> object:
        ctx = _with_speed(lm, tok_s)
        ctx.options.baseline = str(where)
        return gates(run_qa(ctx=ctx, only=only, keep=False))["performance_regression"]

    assert gate(95.0, tmp_path / "qa-baselines").passed  # within 10% of the committed 100
    slow = gate(85.0, tmp_path / "qa-baselines")
    assert not slow.passed and not slow.skipped and slow.threshold == 90.0
    assert gate(95.0, tmp_path / "empty").skipped  # no file for this class: SKIP, never a pass
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**doc, "isa_class": "amx" if isa_class() != "amx" else "avx2"}))
    wrong = gate(95.0, other)
    assert not wrong.passed and not wrong.skipped and "machine class" in wrong.message


def test_saved_reports_never_replace_each_other(tiny_qwen):
    """Two runs saved within one millisecond (same timestamp, same process) keep two files."""
    from apr.qa.report import GateResult, QAReport, history, save

    lm = load_model(tiny_qwen, quiet=True)
    before = len(history(lm.sha256))
    stamp = "2026-01-01T00:00:00.000001+00:00"
    paths = [save(QAReport(str(lm.path), lm.sha256, [GateResult("x", ok, False, "m", None, None)], 1.0,
                           {"dtype": lm.dtype, "backend": lm.backend}, timestamp=stamp)) for ok in (True, False)]
    assert None not in paths and paths[0] != paths[1]
    assert len(history(lm.sha256)) == before + 2
