"""The backend chain: availability, preflight, the parity gate (with a perturbed candidate), gate caching,
forced backends that cannot run, and the CPU prepared-weight cache."""

from __future__ import annotations

import json

import pytest
import torch

from apr import backends
from apr.errors import BackendUnavailable
from apr.runtime import DTYPES, default_dtype, fast_bf16_cpu, load_model, read_model_file

SHA = "0" * 64


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("APR_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def no_cuda(monkeypatch):
    """Make the real cuda entry unavailable, so these tests mean the same on a GPU machine."""
    monkeypatch.setattr(backends.BACKENDS["cuda"], "available", lambda: "simulated: no CUDA device")


def fake_cuda(monkeypatch, perturb: float = 0.0, label: str = "fake:0", free: int = 1 << 40) -> dict:
    """Replace the cuda entry by a candidate that runs on the CPU, its logits optionally perturbed."""
    calls = {"build": 0}

    def build(config, tensors, dtype, sha256=None):
        calls["build"] += 1
        model = backends.BACKENDS["cpu"].build(config, tensors, dtype)
        if perturb:
            forward, gen = model.forward, torch.Generator().manual_seed(0)

            def noisy(ids, pos, all_logits=False):
                out = forward(ids, pos, all_logits)
                return out + perturb * out.std() * torch.randn(out.shape, generator=gen)

            model.forward = noisy
        return model

    fake = backends.Backend("cuda", lambda: None, lambda: label, lambda: free, build, True, backends._all_types)
    monkeypatch.setitem(backends.BACKENDS, "cuda", fake)
    return calls


def select(path, requested="auto", dtype="bfloat16"):
    config, _, tensors = read_model_file(path)
    return backends.select(requested, config, tensors, DTYPES[dtype], SHA, [5, 77, 200, 3, 99])


def test_default_dtype_is_bf16_where_the_cpu_is_fast():
    assert default_dtype() == ("bfloat16" if fast_bf16_cpu() else "float32")


def test_auto_records_cuda_rejected_then_cpu(tiny_qwen, home, no_cuda):
    lm = load_model(tiny_qwen, backend="auto", quiet=True)
    assert lm.backend == "cpu"
    assert lm.backend_chain[0] == {"backend": "cuda", "accepted": False, "reason": "simulated: no CUDA device"}
    assert lm.backend_chain[-1]["backend"] == "cpu" and lm.backend_chain[-1]["accepted"]


def test_forced_unavailable_cuda_is_an_error_with_its_exit_code(tiny_qwen, home, no_cuda, capsys):
    from apr.cli import main

    with pytest.raises(BackendUnavailable):
        load_model(tiny_qwen, backend="cuda", quiet=True)
    assert main(["run", str(tiny_qwen), "--backend", "cuda", "--prompt", "hi", "-n", "2", "-q"]) == BackendUnavailable.exit_code == 6
    assert "cuda" in capsys.readouterr().err


def test_json_output_carries_the_chain(tiny_qwen, home, no_cuda, capsys):
    from apr.cli import main

    assert main(["run", str(tiny_qwen), "--prompt", "hi", "-n", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["backend"] for c in doc["backend_chain"]] == ["cuda", "cpu"]
    assert doc["backend_chain"][0]["reason"]


def test_passing_gate_is_cached(tiny_qwen, home, monkeypatch):
    calls = fake_cuda(monkeypatch)
    first = select(tiny_qwen)
    assert first.backend == "cuda" and "parity gate passed" in first.chain[0]["reason"]
    cached = backends.cached_gate(SHA, "fake:0", torch.bfloat16)
    assert cached and cached["passed"]
    assert list((home / "gates").glob("*.json"))
    second = select(tiny_qwen)
    assert second.backend == "cuda" and "cached" in second.chain[0]["reason"]
    assert calls["build"] == 2  # built each time, but the second time without a cpu reference run


def test_failing_gate_falls_back_to_cpu_and_is_cached(tiny_qwen, home, monkeypatch):
    fake_cuda(monkeypatch, perturb=5.0)
    sel = select(tiny_qwen)
    assert sel.backend == "cpu"
    assert not sel.chain[0]["accepted"] and "parity gate failed" in sel.chain[0]["reason"]
    assert sel.chain[1]["accepted"]
    again = select(tiny_qwen)
    assert "(cached)" in again.chain[0]["reason"] and again.backend == "cpu"
    with pytest.raises(BackendUnavailable, match="parity gate failed"):
        select(tiny_qwen, requested="cuda")  # forced: never a silent downgrade


def test_gate_cache_is_per_device_and_dtype(tiny_qwen, home, monkeypatch):
    backends.store_gate(SHA, "fake:0", torch.bfloat16, False, "planted failure")
    fake_cuda(monkeypatch, label="fake:1")  # another device: the planted result does not apply
    assert select(tiny_qwen).backend == "cuda"
    assert backends.cached_gate(SHA, "fake:0", torch.float32) is None


def test_preflight_rejects_what_does_not_fit(tiny_qwen, home, monkeypatch):
    fake_cuda(monkeypatch, free=1000)
    sel = select(tiny_qwen)
    assert sel.backend == "cpu" and sel.chain[0]["reason"].startswith("preflight: needs")


def test_compare_logits_verdicts():
    a = torch.randn(50)
    assert backends.compare_logits([a, a], [a, a.clone()])[0]
    b = a.clone()
    b[int(a.argmin())] = float(a.max()) + 1  # a new argmax
    ok, why = backends.compare_logits([a, b], [a, a])
    assert not ok and "argmax" in why
    assert not backends.compare_logits([a.clone().fill_(float("nan"))], [a])[0]


def test_cpu_prepared_cache_round_trip(tiny_qwen, home):
    first = load_model(tiny_qwen, dtype="bfloat16", backend="cpu", quiet=True)
    files = list((home / "prepared").rglob("*.bin"))
    assert len(files) == 1
    second = load_model(tiny_qwen, dtype="bfloat16", backend="cpu", quiet=True)
    ids = torch.tensor([5, 77, 200, 3])
    out = []
    for lm in (first, second):
        lm.model.setup_cache(8)
        out.append(lm.model(ids, 0, all_logits=True))
    assert torch.equal(out[0], out[1])
    index = files[0].with_suffix(".json")
    index.write_text("{broken")  # a damaged cache is a miss, never an error
    third = load_model(tiny_qwen, dtype="bfloat16", backend="cpu", quiet=True)
    third.model.setup_cache(8)
    assert torch.equal(third.model(ids, 0, all_logits=True), out[0])


@pytest.mark.parametrize("native", ["1", "0"])  # the native kernel's state (the blocks) or torch's int4 packing
def test_apr_prepared_states_load_without_packing(tmp_path, home, monkeypatch, native):
    from gguf import GGMLQuantizationType as Q
    from tiny_gguf import write_tiny_gguf

    from apr.formats.apr_write import convert_gguf
    from apr.quant import kernels

    monkeypatch.setenv("APR_NATIVE", native)
    src = write_tiny_gguf(tmp_path / "p.gguf", "qwen2", Q.Q5_0)
    convert_gguf(src, tmp_path / "p.apr", "keep", progress=False, prepare_dtype="bfloat16")

    def no_packing(*a, **k):
        raise AssertionError("packed although the .apr file stores the prepared state")

    monkeypatch.setattr(kernels, "prepare", no_packing)
    lm = load_model(tmp_path / "p.apr", dtype="bfloat16", backend="cpu", quiet=True)
    lm.model.setup_cache(8)
    assert torch.isfinite(lm.model(torch.tensor([5, 77, 200]), 0)).all()
