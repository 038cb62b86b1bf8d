"""apr's quantizer (apr.quant.quantize), the Q4_K_M mix, and `apr export` with LoRA merging."""

from __future__ import annotations

import errno
from pathlib import Path

import gguf.quants
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from apr.cli import main as cli
from apr.errors import AprError
from apr.formats.gguf import read_gguf
from apr.quant import dequantize
from apr.quant.quantize import plan_types, quantize
from apr.quant.testing import random_blocks
from conftest import REAL_05B, real_model
from tiny_gguf import write_tiny_gguf

TYPES = [Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K]
# relative RMSE bounds on Gaussian data (measured: 0.005, 0.043, 0.072, 0.018): a broken search or layout
# lands far above them
REL_RMSE = {Q.Q8_0: 0.008, Q.Q5_0: 0.05, Q.Q4_K: 0.08, Q.Q6_K: 0.022}


def gaussian(rows=32, cols=1024, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 0.02
    x[1, :256] = 0  # an all-zero super-block
    x[2, 256:512] += 0.05  # an all-positive one
    return x


def rel_rmse(y, x) -> float:
    return ((y - x).pow(2).mean() / x.pow(2).mean()).sqrt().item()


# ---- the quantizer ----

@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: Q(q).name)
def test_round_trip_error_bound(qtype):
    x = gaussian()
    y = dequantize(quantize(x, qtype), qtype, x.shape)
    assert rel_rmse(y, x) < REL_RMSE[qtype]
    assert torch.equal(y[1, :256], torch.zeros(256))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: Q(q).name)
def test_requantizing_dequantized_values_is_stable(qtype):
    """quantize -> dequantize -> quantize -> dequantize gives the same values: the levels found are
    representable and the search finds them again."""
    x = gaussian(seed=1)
    y = dequantize(quantize(x, qtype), qtype, x.shape)
    b2 = quantize(y, qtype)
    assert torch.equal(dequantize(b2, qtype, x.shape), y)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: Q(q).name)
def test_blocks_written_by_ggml_layout_come_back(qtype):
    """Valid random ggml blocks -> dequantize -> apr's quantizer -> dequantize: close to the start (a byte
    layout off by one field would scramble the values)."""
    raw = random_blocks(qtype, 64, torch.Generator().manual_seed(2)).numpy()
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    x = dequantize(raw, qtype, (4, 16 * block))
    y = dequantize(quantize(x, qtype), qtype, x.shape)
    assert rel_rmse(y, x) < REL_RMSE[qtype]


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0], ids=lambda q: Q(q).name)
def test_bit_exact_with_the_reference_quantizer(qtype):
    """gguf-py's quantizer is a port of ggml's reference one for these types: the same bytes."""
    x = gaussian(seed=3)
    ref = gguf.quants.quantize(x.numpy(), qtype)
    assert np.array_equal(quantize(x, qtype).reshape(-1), ref.reshape(-1).view(np.uint8))


def test_k_quants_beat_round_to_nearest():
    """The scale searches must do better than the plain min/max grids they start from."""
    x = gaussian(seed=4)
    sub = x.reshape(-1, 32)
    lo = sub.amin(1, keepdim=True).clamp(max=0)
    d = (sub.amax(1, keepdim=True) - lo) / 15
    rtn = ((sub - lo) / d.clamp_min(1e-12)).round().clamp(0, 15) * d + lo
    y = dequantize(quantize(x, Q.Q4_K), Q.Q4_K, x.shape)
    assert rel_rmse(y, x) < rel_rmse(rtn.reshape(x.shape), x)


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q4_K, Q.Q6_K], ids=lambda q: Q(q).name)
def test_importance_weights_lower_the_weighted_error(qtype):
    x = gaussian(seed=5)
    w = torch.rand(x.shape[1], generator=torch.Generator().manual_seed(6)).pow(3) * 10  # a few heavy columns

    def werr(b):
        return ((dequantize(b, qtype, x.shape) - x).pow(2) * w).mean().item()

    assert werr(quantize(x, qtype, w)) < werr(quantize(x, qtype))


def test_bad_input():
    with pytest.raises(AprError, match="multiple of 256"):
        quantize(torch.zeros(2, 96), Q.Q4_K)
    with pytest.raises(AprError, match="NaN"):
        quantize(torch.full((1, 32), float("nan")), Q.Q8_0)
    with pytest.raises(AprError, match="cannot quantize"):
        quantize(torch.zeros(1, 256), Q.Q2_K)
    with pytest.raises(AprError, match="importance"):
        quantize(torch.zeros(1, 256), Q.Q4_K, torch.ones(3))


# ---- the Q4_K_M mix ----

def _qwen_like(n_layers=24, dim=896, ffn=4864) -> dict:
    shapes = {"token_embd.weight": (151936, dim)}
    for i in sorted(range(n_layers), key=str):  # lexical file order: blk.0, blk.1, blk.10, ...
        p = f"blk.{i}."
        shapes |= {p + "attn_norm.weight": (dim,), p + "attn_q.bias": (dim,), p + "attn_q.weight": (dim, dim),
                   p + "attn_v.weight": (128, dim), p + "ffn_down.weight": (dim, ffn), p + "ffn_up.weight": (ffn, dim)}
    return shapes | {"output.weight": (151936, dim)}


def test_q4_k_m_mix_rule():
    plan = plan_types(_qwen_like(), "q4_k_m")
    assert plan["output.weight"] == Q.Q8_0  # Q6_K, but 896 is not whole 256-blocks
    assert plan["token_embd.weight"] == Q.Q5_0  # Q4_K's fallback
    assert plan["blk.0.attn_norm.weight"] == Q.F32 and plan["blk.0.attn_q.bias"] == Q.F32
    assert plan["blk.0.attn_q.weight"] == Q.Q5_0
    more = {i for i in range(24) if plan[f"blk.{i}.ffn_down.weight"] == Q.Q6_K}
    assert more == {0, 1, 3, 6, 7, 8, 9, 10, 13, 16, 19, 21}  # counted in file order, as llama.cpp does
    assert {i for i in range(24) if plan[f"blk.{i}.attn_v.weight"] == Q.Q8_0} == more
    assert all(plan[f"blk.{i}.ffn_down.weight"] == Q.Q4_K for i in set(range(24)) - more)
    assert plan_types({"output.weight": (512, 256)}, "q4_k_m")["output.weight"] == Q.Q6_K
    assert set(plan_types(_qwen_like(2), "q8_0").values()) == {Q.Q8_0, Q.F32}
    with pytest.raises(AprError, match="unknown quantization"):
        plan_types({}, "q3_k")


@pytest.mark.real
def test_mix_matches_the_real_q4_k_m_file():
    g = read_gguf(real_model(REAL_05B))
    plan = plan_types({n: t.shape for n, t in g.tensors.items()}, "q4_k_m")
    assert plan == {n: t.qtype for n, t in g.tensors.items()}


# ---- apr export ----

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("q") / "tiny.gguf", "qwen2", Q.Q8_0)


def _export(src, out, *extra) -> Path:
    assert cli(["export", str(src), "-o", str(out), "--quiet", *extra]) == 0
    return out


def _greedy(path, n=12) -> list[int]:
    from apr.generate import generate
    from apr.runtime import load_model

    return generate(load_model(path, dtype="float32", quiet=True), "the cat", chat=False, max_tokens=n).tokens


def test_export_loads_and_generates_like_the_source(tiny, tmp_path):
    q8 = _export(tiny, tmp_path / "q8.gguf", "--quant", "q8_0", "--requantize")
    src, out = read_gguf(tiny), read_gguf(q8)
    assert {k: v for k, v in out.metadata.items() if k != "general.file_type"} == \
           {k: v for k, v in src.metadata.items() if k != "general.file_type"}
    assert out.metadata["general.file_type"] == 7 and list(out.tensors) == list(src.tensors)
    assert _greedy(q8) == _greedy(tiny)  # Q8_0 re-quantized from its own values: the same model
    km = _export(tiny, tmp_path / "km.gguf", "--quant", "q4_k_m", "--apr")
    kinds = {t.qtype for t in read_gguf(km).tensors.values()}
    assert kinds == {Q.Q4_K, Q.Q6_K, Q.F32} and (tmp_path / "km.apr").is_file()
    # a random model is chaotic: greedy tokens diverge at 4 bits, and some positions' logits too; most stay
    # close to the source's (a scrambled layout gives cosines near 0 everywhere)
    cos = torch.nn.functional.cosine_similarity(_logits(km), _logits(tiny), dim=-1)  # (7,)
    assert cos.median() > 0.95, cos
    assert torch.equal(_logits(tmp_path / "km.apr"), _logits(km))


def _logits(path) -> torch.Tensor:
    from apr.model.load import build_modules
    from apr.model.transformer import Transformer
    from apr.runtime import read_model_file

    cfg, _, tensors = read_model_file(Path(path))
    model = Transformer(cfg, build_modules(cfg, tensors)).materialize(torch.float32)
    model.setup_cache(16)
    return model(torch.tensor([1, 5, 9, 200, 262, 33, 7]), 0, all_logits=True)  # (7, vocab)


def _adapter(path: Path, src: Path, rank=4, alpha=8.0, zero_b=True, sha=None, shape_off=0, nan=False) -> Path:
    from safetensors.torch import save_file

    from apr.hub import sha256_file

    g = torch.Generator().manual_seed(7)
    tensors = {}
    for i in range(2):
        for t, (out_f, in_f) in (("attn_q", (256, 256)), ("ffn_down", (256, 512))):
            tensors[f"blk.{i}.{t}.lora_a"] = torch.randn(rank, in_f + shape_off, generator=g) * 0.01
            b = torch.zeros(out_f, rank) if zero_b else torch.randn(out_f, rank, generator=g) * 0.01
            tensors[f"blk.{i}.{t}.lora_b"] = b
    if nan:
        tensors["blk.0.attn_q.lora_b"][0, 0] = float("nan")
    meta = {"format": "apr-lora/1", "rank": str(rank), "alpha": str(alpha), "dropout": "0.0",
            "targets": "attn_q,ffn_down", "base_sha256": sha or sha256_file(src), "base_name": src.name,
            "n_layers": "2", "training": "{}"}
    save_file(tensors, str(path), metadata=meta)
    return path


def test_lora_merge(tiny, tmp_path):
    from safetensors.torch import load_file

    base = read_gguf(_export(tiny, tmp_path / "base.gguf", "--quant", "f32"))
    zero = read_gguf(_export(tiny, tmp_path / "zero.gguf", "--quant", "f32",
                             "--lora", str(_adapter(tmp_path / "zero.safetensors", tiny))))
    assert all(np.array_equal(zero.tensors[n].data, base.tensors[n].data) for n in base.tensors)  # B = 0: W
    ad = _adapter(tmp_path / "ad.safetensors", tiny, zero_b=False)
    merged = read_gguf(_export(tiny, tmp_path / "m.gguf", "--quant", "f32", "--lora", str(ad)))
    lora = load_file(str(ad))
    name = "blk.1.ffn_down"
    w = torch.from_numpy(base.tensors[name + ".weight"].data.view(np.float32).reshape(256, 512).copy())
    want = w + (8.0 / 4) * lora[name + ".lora_b"] @ lora[name + ".lora_a"]
    got = torch.from_numpy(merged.tensors[name + ".weight"].data.view(np.float32).reshape(256, 512).copy())
    assert torch.allclose(got, want, atol=1e-7) and not torch.equal(got, w)
    assert np.array_equal(merged.tensors["blk.0.attn_k.weight"].data, base.tensors["blk.0.attn_k.weight"].data)


def _one_line_error(argv, capsys, match: str):
    assert cli([*argv, "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and match in err, err


def test_bad_adapters_and_outputs(tiny, tmp_path, capsys):
    out = str(tmp_path / "o.gguf")
    other = _adapter(tmp_path / "other.safetensors", tiny, sha="ab" * 32)
    _one_line_error(["export", str(tiny), "--lora", str(other), "-o", out], capsys, "another base")
    wrong = _adapter(tmp_path / "wrong.safetensors", tiny, shape_off=32)
    _one_line_error(["export", str(tiny), "--lora", str(wrong), "-o", out], capsys, "want A")
    _one_line_error(["export", str(tiny), "--lora", str(tmp_path / "none"), "-o", out], capsys, "no such adapter")
    nan = _adapter(tmp_path / "nan.safetensors", tiny, nan=True)
    _one_line_error(["export", str(tiny), "--lora", str(nan), "--quant", "f32", "-o", out], capsys, "NaN")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    _one_line_error(["export", str(tiny), "--lora", str(tmp_path / "junk.safetensors"), "-o", out], capsys, "adapter")
    _one_line_error(["export", str(tiny), "-o", str(tmp_path / "o.txt")], capsys, ".gguf")
    assert not Path(out).exists()


def test_full_disk_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    import shutil

    from gguf import GGUFWriter

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    _one_line_error(["export", str(tiny), "-o", str(tmp_path / "a.gguf")], capsys, "MiB free")
    monkeypatch.setattr(shutil, "disk_usage", real)

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(GGUFWriter, "write_tensor_data", full)
    _one_line_error(["export", str(tiny), "-o", str(tmp_path / "b.gguf")], capsys, "no space left")
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_export_math_uses_no_machine_dependent_reduction(monkeypatch):
    """`apr export` must write the same bytes on every CPU. Library reductions (sum, mean, bmm, matmul) order
    their adds by the CPU's vector width and BLAS kernel, so the quantizer and the LoRA merge may use only
    elementwise ops and order-free reductions (max, argmax); torch's sqrt, exp and log go through MKL's vector
    math, whose rounding depends on its code path, so they are banned too. Here every such call raises, and
    the bytes must come out as they did before."""
    from apr.formats.gguf_write import lora_delta

    x = gaussian(seed=7)
    cw = torch.rand(x.shape[1], generator=torch.Generator().manual_seed(8)) + 0.1
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(8, 64, generator=g), torch.randn(48, 8, generator=g)
    want = {(q, wt is None): quantize(x, q, wt) for q in TYPES for wt in (None, cw)}

    def banned(*args, **kwargs):
        raise AssertionError("a reduction or vector-math call whose rounding depends on the machine")

    # torch.sqrt is not correctly rounded on an AMX-class Xeon's AVX-512 MKL path (see quantize._sqrt)
    vml = ("sqrt", "rsqrt", "exp", "log", "pow")
    for name in ("sum", "mean", "bmm", "matmul", "mm", "einsum", "nansum", "dot", "addmm", "baddbmm") + vml:
        monkeypatch.setattr(torch, name, banned)
    for name in ("sum", "mean", "matmul", "__matmul__", "mm", "bmm", "dot", "nansum", "__pow__") + vml:
        monkeypatch.setattr(torch.Tensor, name, banned)
    for (q, no_w), out in want.items():
        assert np.array_equal(quantize(x, q, None if no_w else cw), out), Q(q).name
    delta = lora_delta(a, b).numpy()
    monkeypatch.undo()
    ref = np.zeros((48, 64))  # rank by rank, in float64, as the docstring says
    for r in range(8):
        ref += b[:, r].double().numpy()[:, None] * a[r].double().numpy()[None, :]
    assert np.array_equal(delta, ref)
