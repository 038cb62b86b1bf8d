"""Hostile model files and kernel caches: every corner ends in one BadModelFile line, never a traceback."""

from __future__ import annotations

import struct

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from apr.errors import BadModelFile
from apr.formats.gguf import read_gguf

U32, U64, STR, ARR, F32 = 4, 10, 8, 9, 6


def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_bytes(kv: list[bytes] = (), tensors: list[tuple[str, list[int], int, int]] = (), tail: bytes = b"") -> bytes:
    """A GGUF v3 header from raw key/value records and (name, ne, type, offset) tensor infos."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)) + b"".join(kv)
    for name, ne, qtype, offset in tensors:
        out += _s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", qtype, offset)
    return out + tail


def kv_u32(key: str, v: int) -> bytes:
    return _s(key) + struct.pack("<II", U32, v)


def kv_str(key: str, v: str) -> bytes:
    return _s(key) + struct.pack("<I", STR) + _s(v)


def kv_f32(key: str, v: float) -> bytes:
    return _s(key) + struct.pack("<If", F32, v)


def read_bytes(tmp_path, data: bytes):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    return read_gguf(path)


def test_a_4d_shape_whose_product_wraps_is_refused(tmp_path):
    # 2**21 * 2**21 * 2**22 = 2**64: numpy's int64 product wraps to 0 bytes, which then "fit" any file
    data = gguf_bytes(tensors=[("w", [32, 1 << 21, 1 << 21, 1 << 22], int(Q.F32), 0)], tail=b"\0" * 64)
    with pytest.raises(BadModelFile, match="runs past the end"):
        read_bytes(tmp_path, data)


@pytest.mark.parametrize("record", [kv_str("general.alignment", "abc"), kv_f32("general.alignment", 3.5),
                                    kv_u32("general.alignment", 0)], ids=["string", "float", "zero"])
def test_a_bad_alignment_is_refused(tmp_path, record):
    with pytest.raises(BadModelFile, match="general.alignment .* is not a positive integer"):
        read_bytes(tmp_path, gguf_bytes(kv=[record]))


def test_arrays_nested_without_end_are_refused(tmp_path):
    nested = _s("x") + struct.pack("<I", ARR) + struct.pack("<IQ", ARR, 1) * 20000 + struct.pack("<IQ", U32, 0)
    with pytest.raises(BadModelFile, match="nested more than"):
        read_bytes(tmp_path, gguf_bytes(kv=[nested]))


def test_a_huge_count_of_inner_arrays_is_refused_before_looping(tmp_path):
    record = _s("x") + struct.pack("<I", ARR) + struct.pack("<IQ", ARR, 1 << 27)
    with pytest.raises(BadModelFile, match="implausible count"):
        read_bytes(tmp_path, gguf_bytes(kv=[record]))


def test_an_infinite_float_where_an_int_belongs_is_refused(tmp_path):
    from apr.formats.gguf import GGUFFile, RawTensor, config_from_gguf

    meta = {"general.architecture": "qwen2", "qwen2.attention.head_count": float("inf")}
    with pytest.raises(BadModelFile, match="has a bad value"):
        config_from_gguf(GGUFFile(tmp_path, meta, {"token_embd.weight": RawTensor("t", 0, (1, 1), None)}))


# ---- .apr: the background checksum fails closed ----

def test_apr_background_check_fails_closed_on_any_error(tmp_path, monkeypatch):
    from apr.formats import apr as apr_format
    from apr.formats.apr_write import convert_gguf
    from tiny_gguf import write_tiny_gguf

    src = write_tiny_gguf(tmp_path / "t.gguf", "qwen2", Q.Q8_0, n_layers=1)
    convert_gguf(src, tmp_path / "t.apr", progress=False)

    def broken(jobs, path):
        raise OSError("I/O error reading the mapping")

    monkeypatch.setattr(apr_format, "verify_tensors", broken)
    f = apr_format.open_apr(tmp_path / "t.apr", verify="background")
    tensor = next(iter(f.tensors.values()))
    with pytest.raises(BadModelFile, match="checksum verification failed: OSError: I/O error"):
        tensor.data


# ---- native entry points check shapes before they read ----

def _native():
    from apr.quant import native

    if not native.available():
        pytest.skip(f"native kernels: {native.status()}")
    return native


def test_native_group_checks_k_against_the_row_bytes():
    native = _native()
    rows = torch.zeros(4, 34, dtype=torch.uint8)  # one Q8_0 block (32 values in 34 bytes) per row
    g = native.Group([(rows, int(Q.Q8_0), 4, None)])
    assert g(torch.zeros(1, 32)).shape == (1, 4)
    with pytest.raises(RuntimeError, match="K=64 does not fit a row of 34 bytes"):  # would read a second block
        g(torch.zeros(1, 64))
    with pytest.raises(RuntimeError, match="K=64 does not fit"):
        native.dequantize(rows, int(Q.Q8_0), 64)


def test_native_group_checks_rows_and_bias():
    native = _native()
    rows = torch.zeros(4, 34, dtype=torch.uint8)
    with pytest.raises(ValueError, match="weight rows must be"):
        native.Group([(rows, int(Q.Q8_0), 8, None)])  # 8 outputs from 4 rows
    with pytest.raises(ValueError, match="weight rows must be"):
        native.Group([(rows.float(), int(Q.Q8_0), 4, None)])
    with pytest.raises(ValueError, match="bias has 3 values for 4 outputs"):
        native.Group([(rows, int(Q.Q8_0), 4, torch.zeros(3))])


def test_kernel_cache_rebuilds_a_library_that_is_not_the_one_it_built(tmp_path, monkeypatch):
    native = _native()
    monkeypatch.setenv("APR_HOME", str(tmp_path))
    cc = native._compiler()
    so = native._build(cc)
    assert native._verified(so)
    good = so.read_bytes()
    so.write_bytes(b"\x7fELF not the library apr built")  # replaced behind apr's back
    assert not native._verified(so)
    assert native._build(cc) == so and so.read_bytes() == good and native._verified(so)
    native._sidecar(so).unlink()  # no record of what was built: not trusted either
    assert not native._verified(so)


# ---- tokenizer metadata of the wrong type ----

@pytest.fixture(scope="module")
def tiny_meta(tmp_path_factory):
    from tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path_factory.mktemp("tok") / "t.gguf", dim=32, ffn=32, n_layers=1, n_heads=2, n_kv_heads=1)
    return read_gguf(path).metadata


@pytest.mark.parametrize("key,value,match", [
    ("tokenizer.ggml.tokens", [1, 2, 3], "tokens is not a list of strs"),
    ("tokenizer.ggml.merges", [1, 2], "merges is not a list of strs"),
    ("tokenizer.ggml.token_type", "x", "token_type is not a list of ints"),
    ("tokenizer.chat_template", [1, 2], "chat_template is a list, not a string"),
    ("tokenizer.chat_template", 5, "chat_template is a int, not a string"),
    ("tokenizer.ggml.bos_token_id", "abc", "bos_token_id 'abc' is not an integer"),
    ("tokenizer.ggml.bos_token_id", float("nan"), "bos_token_id nan is not an integer"),
])
def test_tokenizer_metadata_of_the_wrong_type_is_refused(tiny_meta, key, value, match):
    from apr.tokenizer import Tokenizer

    with pytest.raises(BadModelFile, match=match):
        Tokenizer.from_metadata(dict(tiny_meta, **{key: value}))


def test_a_merge_whose_result_is_not_a_token_is_refused_without_a_rust_panic(tiny_meta):
    from apr.tokenizer import Tokenizer

    tokens = [t for t in tiny_meta["tokenizer.ggml.tokens"] if t != "Ġt"]  # "Ġ t" merges into a missing token
    meta = dict(tiny_meta, **{"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": []})
    with pytest.raises(BadModelFile, match="the result of merge 'Ġ t' is not a token"):
        Tokenizer.from_metadata(meta)


def test_a_pre_tokenizer_name_that_is_not_a_string_is_refused(tiny_meta):
    from apr.tokenizer import Tokenizer

    with pytest.raises(BadModelFile, match="unknown tokenizer pre-tokenizer"):
        Tokenizer.from_metadata(dict(tiny_meta, **{"tokenizer.ggml.pre": ["qwen2"]}))


def test_the_header_cache_is_keyed_by_the_file_and_survives_a_bad_entry(tiny_qwen, tmp_path, monkeypatch):
    """A cached header equals a parse; a rewritten file is parsed again; an unreadable entry is parsed over."""
    import os
    import shutil

    from apr.formats import gguf as G

    monkeypatch.setenv("APR_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(G, "_CACHE_MIN_BYTES", 0)
    f = tmp_path / "m.gguf"
    shutil.copy(tiny_qwen, f)
    parsed = read_gguf(f)
    entries = list((tmp_path / "home" / "cache" / "gguf-header").iterdir())
    assert len(entries) == 1
    cached = read_gguf(f)
    assert cached.metadata == parsed.metadata
    assert {k: (t.qtype, t.shape, t.data.tobytes()) for k, t in cached.tensors.items()} == \
        {k: (t.qtype, t.shape, t.data.tobytes()) for k, t in parsed.tensors.items()}
    entries[0].write_bytes(b"\x00garbage")  # a broken entry is a miss, never an error or a wrong header
    assert read_gguf(f).metadata == parsed.metadata
    data = bytearray(f.read_bytes())  # the same size, another name in the header: a new key
    at = data.index(b"general.architecture")
    data[at:at + 7] = b"GENERAL"
    f.write_bytes(bytes(data))
    os.utime(f, ns=(1, 1))
    assert "GENERAL.architecture" in read_gguf(f).metadata
