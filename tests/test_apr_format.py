"""The native .apr format: GGUF -> .apr -> GGUF round trips, requantization, corruption, and the commands."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from apr.cli import main as cli
from apr.errors import BadModelFile
from apr.formats.apr import open_apr, read_apr
from apr.formats.apr_export import export_gguf
from apr.formats.apr_quant import target_type
from apr.formats.apr_write import convert_gguf
from apr.formats.gguf import config_from_gguf, read_gguf
from apr.model.load import build_modules
from apr.model.transformer import Transformer
from apr.quant import dequantize
from apr.quant.quantize import quantize
from conftest import REAL_05B, real_model
from tiny_gguf import write_tiny_gguf

ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
IDS = torch.tensor([1, 5, 9, 200, 262, 33, 7])


def logits(config, tensors) -> torch.Tensor:
    model = Transformer(config, build_modules(config, tensors)).materialize(torch.float32)
    model.setup_cache(16)
    return model(IDS, 0, all_logits=True)


def same_tensors(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        a[n].qtype == b[n].qtype and a[n].shape == b[n].shape and a[n].data.tobytes() == b[n].data.tobytes() for n in a)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny qwen2 GGUF and its .apr."""
    d = tmp_path_factory.mktemp("apr")
    src = write_tiny_gguf(d / "tiny.gguf", "qwen2", Q.Q4_K)
    convert_gguf(src, d / "tiny.apr", progress=False)
    return src, d / "tiny.apr"


# ---- round trips ----

@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: Q(q).name)
def test_round_trip_every_type(tmp_path, qtype):
    src = write_tiny_gguf(tmp_path / "m.gguf", "qwen2", qtype, embd_qtype=qtype, seed=int(qtype))
    convert_gguf(src, tmp_path / "m.apr", progress=False)
    export_gguf(tmp_path / "m.apr", tmp_path / "back.gguf", progress=False)
    g, back = read_gguf(src), read_gguf(tmp_path / "back.gguf")
    assert same_tensors(g.tensors, back.tensors)
    assert back.metadata == g.metadata
    config, metadata, tensors = read_apr(tmp_path / "m.apr")
    assert config == config_from_gguf(g)
    assert {k: v for k, v in metadata.items() if not k.startswith("apr.")} == {
        k: v for k, v in g.metadata.items() if k != "GGUF.version"}
    assert torch.equal(logits(config, tensors), logits(config_from_gguf(g), g.tensors))


def test_round_trip_llama_tied_is_byte_identical(tmp_path):
    src = write_tiny_gguf(tmp_path / "l.gguf", "llama", Q.Q6_K)
    convert_gguf(src, tmp_path / "l.apr", progress=False)
    export_gguf(tmp_path / "l.apr", tmp_path / "l2.gguf", progress=False)
    assert (tmp_path / "l2.gguf").read_bytes() == src.read_bytes()  # both written by gguf-py: same bytes


def test_exported_gguf_reads_with_gguf_package(tiny, tmp_path):
    from gguf import GGUFReader

    src, apr = tiny
    export_gguf(apr, tmp_path / "e.gguf", progress=False)
    r = GGUFReader(tmp_path / "e.gguf")
    names = [t.name for t in r.tensors]
    assert names == list(read_gguf(src).tensors)
    field = r.fields["tokenizer.ggml.bos_token_id"]
    assert field.types[0].name == "UINT32"  # the exact value type survives (llama.cpp checks it)


def test_apr_is_a_safetensors_file(tiny):
    from safetensors import safe_open

    src, apr = tiny
    g = read_gguf(src)
    with safe_open(apr, "pt") as f:
        assert f.metadata()["format"] == "apr"
        norm = f.get_tensor("blk.0.attn_norm.weight")
        q = f.get_tensor("blk.0.attn_q.weight")
    assert torch.equal(norm, dequantize(g.tensors["blk.0.attn_norm.weight"].data, Q.F32, (256,)))
    assert q.dtype == torch.uint8 and tuple(q.shape) == (256, 256 // 256 * 144)  # raw Q4_K blocks, one row each


def test_metadata_carries_licence_provenance_and_tokenizer(tiny):
    src, apr = tiny
    f = open_apr(apr)
    assert f.metadata["apr.license"] == "unknown"
    assert "no general.license" in f.header["apr.license_note"]
    prov = f.metadata["apr.provenance"]
    assert prov["source"]["file"] == "tiny.gguf" and len(prov["source"]["sha256"]) == 64
    assert prov["apr_version"] and prov["created"] and prov["quantize"] == "keep"
    assert f.metadata["tokenizer.ggml.tokens"] == read_gguf(src).metadata["tokenizer.ggml.tokens"]
    assert "im_start" in f.metadata["tokenizer.chat_template"]
    described = json.loads(f.header["apr.tensors"])
    assert described["blk.0.attn_q.weight"]["ggml_type"] == "Q4_K"
    assert described["blk.0.attn_q.weight"]["layout"] == "ggml"


def test_licence_is_copied_when_present(tmp_path):
    src = _with_license(write_tiny_gguf(tmp_path / "m.gguf"), tmp_path / "lic.gguf")
    convert_gguf(src, tmp_path / "lic.apr", progress=False)
    assert open_apr(tmp_path / "lic.apr").metadata["apr.license"] == "apache-2.0"


def _with_license(src: Path, dst: Path) -> Path:
    """A copy of the GGUF `src` with general.license = apache-2.0."""
    from gguf import GGUFValueType, GGUFWriter

    from apr.formats.apr import byte_shape
    from apr.formats.apr_write import gguf_kv_types

    g = read_gguf(src)
    w = GGUFWriter(dst, "qwen2")
    w.add_key_value("general.license", "apache-2.0", GGUFValueType.STRING)
    for k, (vt, sub) in gguf_kv_types(src).items():
        if k != "general.architecture":
            w.add_key_value(k, g.metadata[k], GGUFValueType(vt), GGUFValueType(sub) if sub is not None else None)
    for name, t in g.tensors.items():
        w.add_tensor(name, np.asarray(t.data).reshape(byte_shape(t.qtype, t.shape)), raw_dtype=Q(t.qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


# ---- running an .apr ----

def test_load_model_and_generate_match_gguf(tiny):
    from apr.generate import generate
    from apr.runtime import load_model

    src, apr = tiny
    a, b = load_model(src, dtype="float32", quiet=True), load_model(apr, dtype="float32", quiet=True)
    assert a.config == b.config and a.is_instruct and b.is_instruct
    ra, rb = (generate(lm, "the cat", chat=False, max_tokens=8) for lm in (a, b))
    assert ra.tokens == rb.tokens


def test_background_verification_guards_the_bytes(tiny, tmp_path):
    bad = _flipped(tiny[1], tmp_path, "blk.1.ffn_up.weight")
    config, metadata, tensors = read_apr(bad)  # returns at once; the checksums run behind
    assert tensors["blk.0.attn_q.weight"].shape == (256, 256)  # shapes need no bytes
    with pytest.raises(BadModelFile, match="blk.1.ffn_up.weight.*checksum"):
        tensors["blk.0.attn_q.weight"].data  # any tensor's bytes wait for the whole file's verdict


# ---- requantization ----

@pytest.mark.parametrize("mode,qtype,tol", [("f32", Q.F32, 0.0), ("bf16", Q.BF16, 0.01), ("q8_0", Q.Q8_0, 0.01),
                                            ("q4_k", Q.Q4_K, 0.1)])
def test_convert_quantize(tmp_path, mode, qtype, tol):
    src = write_tiny_gguf(tmp_path / "f.gguf", "qwen2", Q.F32)
    convert_gguf(src, tmp_path / "q.apr", mode, progress=False)
    f = open_apr(tmp_path / "q.apr")
    assert f.tensors["blk.0.ffn_up.weight"].qtype == qtype
    assert f.tensors["blk.0.attn_norm.weight"].qtype == Q.F32  # 1-D tensors stay float32
    assert f.metadata["apr.provenance"]["quantize"] == mode
    g = read_gguf(src)
    w0 = dequantize(g.tensors["blk.0.ffn_up.weight"].data, Q.F32, (512, 256))
    t = f.tensors["blk.0.ffn_up.weight"]
    w1 = dequantize(t.data, t.qtype, t.shape)
    assert ((w1 - w0).norm() / w0.norm()).item() <= tol
    assert logits(f.config, f.tensors).argmax(-1).shape == (len(IDS),)


@pytest.mark.parametrize("mode", ["q4_k", "q8_0"])
def test_convert_writes_the_export_quantizers_bytes(tmp_path, mode):
    """convert and export share apr.quant.quantize: from the same float weights, the same bytes (ffn 640 is
    not whole 256-value blocks, so q4_k's ffn_down takes the Q5_0 fallback)."""
    src = write_tiny_gguf(tmp_path / "f.gguf", "qwen2", Q.F32, ffn=640)
    convert_gguf(src, tmp_path / "q.apr", mode, progress=False)
    g, f = read_gguf(src), open_apr(tmp_path / "q.apr")
    seen = set()
    for name, t in f.tensors.items():
        s = g.tensors[name]
        if s.qtype == t.qtype:  # copied, not requantized: the norms, and token_embd (Q8_0 in the tiny file) at q8_0
            assert t.data.tobytes() == s.data.tobytes(), name
            continue
        w = dequantize(s.data, s.qtype, s.shape).reshape(-1, s.shape[-1])  # (rows, cols)
        assert t.data.tobytes() == quantize(w, t.qtype).tobytes(), name
        seen.add(t.qtype)
    assert seen == ({Q.Q4_K, Q.Q5_0} if mode == "q4_k" else {Q.Q8_0})


def test_q4_k_falls_back_like_llama_cpp():
    assert target_type(Q.Q6_K, (896, 896), "q4_k") == Q.Q5_0  # 896 is not whole 256-value blocks
    assert target_type(Q.Q6_K, (896, 4864), "q4_k") == Q.Q4_K
    assert target_type(Q.Q6_K, (896, 40), "q8_0") == Q.F16
    assert target_type(Q.Q6_K, (896, 896), "keep") == Q.Q6_K


# ---- corruption ----

def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _rewrite(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _flipped(apr: Path, tmp_path: Path, tensor: str) -> Path:
    header, data = _header(apr)
    begin, end = header[tensor]["data_offsets"]
    raw = bytearray(apr.read_bytes())
    raw[len(raw) - len(data) + (begin + end) // 2] ^= 0x10
    (tmp_path / "flip.apr").write_bytes(bytes(raw))
    return tmp_path / "flip.apr"


def test_flipped_byte_in_a_tensor(tiny, tmp_path):
    bad = _flipped(tiny[1], tmp_path, "blk.0.ffn_down.weight")
    with pytest.raises(BadModelFile, match="blk.0.ffn_down.weight.*fails its checksum"):
        open_apr(bad)


def test_flipped_byte_in_the_header(tiny, tmp_path):
    raw = bytearray(tiny[1].read_bytes())
    at = raw.index(b"im_start")  # inside the chat template, so the JSON stays valid
    raw[at] ^= 0x01
    (tmp_path / "h.apr").write_bytes(bytes(raw))
    with pytest.raises(BadModelFile, match="header checksum mismatch"):
        open_apr(tmp_path / "h.apr")


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1, -1000])
def test_truncated(tiny, tmp_path, keep):
    raw = tiny[1].read_bytes()
    (tmp_path / "t.apr").write_bytes(raw[:keep] if keep >= 0 else raw[:keep])
    with pytest.raises(BadModelFile, match="truncated|empty|too short"):
        open_apr(tmp_path / "t.apr")


def _lie(header: dict, how: str) -> dict:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    first, second, last = header[names[0]], header[names[1]], header[names[-1]]
    if how == "past_eof":
        last["data_offsets"] = [last["data_offsets"][0] + 64, last["data_offsets"][1] + 64]
    elif how == "overlap":
        size = second["data_offsets"][1] - second["data_offsets"][0]
        second["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + size]
    elif how == "negative":
        first["data_offsets"] = [-4, first["data_offsets"][1]]
    elif how == "shape":
        first["shape"] = [x * 2 for x in first["shape"]]
    elif how == "dtype":
        first["dtype"] = "Q4_K"
    return header


@pytest.mark.parametrize("how,message", [
    ("past_eof", "ends at byte"), ("overlap", "overlaps"), ("negative", "impossible data_offsets"),
    ("shape", "needs"), ("dtype", "bad header entry")])
def test_header_lies_about_sizes(tiny, tmp_path, how, message):
    header, data = _header(tiny[1])
    bad = _rewrite(tmp_path / "lie.apr", _lie(header, how), data)
    with pytest.raises(BadModelFile, match=message):
        open_apr(bad)


@pytest.mark.parametrize("length,message", [(1 << 62, "implausible"), (10**6, "runs past the end")])
def test_header_length_lies(tiny, tmp_path, length, message):
    raw = tiny[1].read_bytes()
    (tmp_path / "n.apr").write_bytes(struct.pack("<Q", length) + raw[8:])
    with pytest.raises(BadModelFile, match=message):
        open_apr(tmp_path / "n.apr")


def test_plain_safetensors_and_garbage_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(4)}, tmp_path / "plain.apr")
    with pytest.raises(BadModelFile, match="not a .apr file"):
        open_apr(tmp_path / "plain.apr")
    (tmp_path / "junk.apr").write_bytes(struct.pack("<Q", 9) + b"not json!" + b"x" * 20)
    with pytest.raises(BadModelFile, match="not valid JSON"):
        open_apr(tmp_path / "junk.apr")


def test_cli_reports_corruption_in_one_line(tiny, tmp_path, capsys):
    bad = _flipped(tiny[1], tmp_path, "output.weight")
    for argv in (["inspect", str(bad)], ["export", str(bad), "-o", str(tmp_path / "x.gguf")],
                 ["run", str(bad), "-p", "hi", "-n", "2", "--json"]):
        assert cli(argv) == 4
        err = capsys.readouterr().err.strip()
        assert err.startswith("apr: error: ") and "checksum" in err and "\n" not in err
    assert not (tmp_path / "x.gguf").exists()


# ---- commands ----

def test_cli_convert_export_inspect(tiny, tmp_path, capsys):
    src, _ = tiny
    out = tmp_path / "c.apr"
    assert cli(["convert", str(src), "-o", str(out), "--json", "--quiet", "--prepared", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"] == 27
    assert sorted(os.listdir(tmp_path)) == ["c.apr"]  # written atomically: no temp file left
    assert cli(["export", str(out), "--format", "gguf", "-o", str(tmp_path / "c.gguf"), "--quiet"]) == 0
    assert (tmp_path / "c.gguf").read_bytes() == src.read_bytes()
    for path, fmt in ((out, "apr"), (src, "gguf")):
        capsys.readouterr()
        assert cli(["inspect", str(path), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["format"] == fmt and info["tensor_count"] == 27 and len(info["sha256"]) == 64
        assert info["parameter_count"] == sum(np.prod(r["shape"]) for r in info["tensors"])
        assert info["config"]["architecture"] == "qwen2"
    assert cli(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "checksums verified" in text and "blk.0.attn_q.weight" in text and "Q4_K" in text


def test_cli_refuses_bad_outputs(tiny, tmp_path, capsys):
    src, apr = tiny
    assert cli(["convert", str(src), "-o", str(tmp_path / "x.bin")]) == 2
    assert cli(["convert", str(apr)]) == 2
    assert cli(["export", str(src)]) == 2
    assert cli(["convert", str(src), "-o", str(tmp_path / "nodir" / "x.apr")]) == 2
    assert "error" in capsys.readouterr().err


# ---- kernel-packed ("prepared") state ----

@pytest.mark.parametrize("dtype,mode", [("float32", "keep"), ("bfloat16", "keep"), ("bfloat16", "q8_0")])
def test_prepared_state_is_stored_and_loads_without_packing(tmp_path, dtype, mode):
    from apr.quant import QuantLinear

    src = write_tiny_gguf(tmp_path / "p.gguf", "llama", Q.Q4_K)  # tied: token_embd is also the output
    convert_gguf(src, tmp_path / "p.apr", mode, progress=False, prepare_dtype=dtype)
    f = open_apr(tmp_path / "p.apr")
    assert not f.tensors["blk.0.attn_norm.weight"].prepared
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "token_embd.weight"):
        t = f.tensors[name]
        rows, cols = t.shape
        raw = torch.from_numpy(t.data).view(rows, -1)
        stored, fresh = QuantLinear(raw, t.qtype, cols, rows), QuantLinear(raw, t.qtype, cols, rows)
        x = torch.randn(3, cols, generator=torch.Generator().manual_seed(1)).to(getattr(torch, dtype))
        assert stored.load_prepared(f.tensors[name].prepared[dtype], getattr(torch, dtype))  # used, not repacked
        fresh.materialize(getattr(torch, dtype))
        assert torch.equal(stored(x), fresh(x))
    if mode == "keep":  # the raw blocks are kept: export is unchanged
        export_gguf(tmp_path / "p.apr", tmp_path / "p2.gguf", progress=False)
        assert (tmp_path / "p2.gguf").read_bytes() == src.read_bytes()


# ---- the real 0.5B model ----

@pytest.mark.real
def test_real_05b_round_trip(tmp_path):
    from apr.generate import generate
    from apr.runtime import load_model

    gguf_path = real_model(REAL_05B)
    apr_path, back = tmp_path / "m.apr", tmp_path / "back.gguf"
    convert_gguf(gguf_path, apr_path, progress=False)
    export_gguf(apr_path, back, progress=False)
    runs = {}
    for path in (gguf_path, apr_path, back):
        t0 = time.perf_counter()
        lm = load_model(path, dtype="float32", quiet=True)
        load_s = time.perf_counter() - t0
        runs[path] = generate(lm, "def fibonacci(n):", chat=False, max_tokens=16).tokens
        print(f"{path.name}: load_model float32 {load_s:.2f}s")
        del lm
    assert runs[apr_path] == runs[gguf_path] and runs[back] == runs[gguf_path]
    assert same_tensors(read_gguf(gguf_path).tensors, read_gguf(back).tensors)
    t0 = time.perf_counter()
    read_gguf(gguf_path)
    t_gguf = time.perf_counter() - t0
    t0 = time.perf_counter()
    read_apr(apr_path)
    t_apr = time.perf_counter() - t0
    print(f"read: gguf {t_gguf:.2f}s, apr {t_apr:.2f}s (checksums in the background)")  # speed: benchmarks, not here


def test_convert_verify_roundtrip(tmp_path, tiny_llama, capsys):
    """`apr convert --verify`: source, .apr and re-exported GGUF give the same greedy tokens, and the
    stored licence and provenance come back (what contracts SHIP-004 and SHIP-009 check)."""
    from apr.cli import main

    out = tmp_path / "v.apr"
    assert main(["convert", str(tiny_llama), "-o", str(out), "--verify", "--json"]) == 0
    v = json.loads(capsys.readouterr().out)["verify"]
    assert v["passed"] and v["apr_identical"] and v["export_identical"]
    assert len(v["tokens_gguf"]) > 0
    assert v["license"] == "unknown"
    assert v["provenance"]["source"]["file"] == tiny_llama.name
    assert v["provenance"]["source"]["sha256"] == hashlib.sha256(tiny_llama.read_bytes()).hexdigest()
