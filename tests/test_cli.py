"""The apr command line: help without torch, bad input as one line, `apr run` end to end on tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tiny_gguf import write_tiny_gguf


def apr(*args, env=None, timeout=300):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "apr.cli", *args], capture_output=True, text=True, env=e, timeout=timeout)


def assert_one_line_error(proc, *needles):
    assert proc.returncode not in (0, 1), proc  # 1 is reserved for our own bugs
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    # the error is one line, the last; status lines before it (e.g. the backend chain) are apr's own
    assert lines and lines[-1].startswith("apr: error:"), proc.stderr
    assert all(line.startswith("apr: ") and "error" not in line for line in lines[:-1]), proc.stderr
    for n in needles:
        assert n in lines[-1], lines[-1]


def test_help_does_not_import_torch():
    code = "import sys\nfrom apr.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.strip().endswith("False")
    assert "run" in out.stdout and "pull" in out.stdout


def test_unknown_model_name(tmp_path):
    assert_one_line_error(apr("run", "no-such-model", "--prompt", "x", env={"APR_HOME": str(tmp_path)}), "unknown model")


def test_missing_file():
    assert_one_line_error(apr("run", "/nonexistent/model.gguf", "--prompt", "x"), "not found")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"PK\x03\x04" + os.urandom(2000))
    assert_one_line_error(apr("run", str(p), "--prompt", "x"), "not a GGUF")


@pytest.mark.parametrize("keep", [0.02, 0.3, 0.9, 0.999])
def test_truncated_gguf(tmp_path, tiny_qwen, keep):
    data = tiny_qwen.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: int(len(data) * keep)])
    assert_one_line_error(apr("run", str(p), "--prompt", "x"))


def test_hostile_counts(tmp_path, tiny_qwen):
    """A header claiming 2**60 metadata entries must fail fast, not allocate."""
    data = bytearray(tiny_qwen.read_bytes())
    data[16:24] = (2**60).to_bytes(8, "little")  # kv_count
    p = tmp_path / "hostile.gguf"
    p.write_bytes(bytes(data))
    assert_one_line_error(apr("run", str(p), "--prompt", "x"), "implausible")


def _tokens_count_offset(data: bytes) -> int:
    """Offset of the string count of tokenizer.ggml.tokens: after the key, its type (array) and item type (string)."""
    return data.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 8


@pytest.mark.parametrize("where,value,message", [
    (0, 2**27, "implausible count"),  # more strings than the file has bytes for
    (8, 2**40, "runs past the end"),  # the first string's length
])
def test_hostile_string_array(tmp_path, tiny_qwen, where, value, message):
    from apr.errors import BadModelFile
    from apr.formats.gguf import read_gguf

    data = bytearray(tiny_qwen.read_bytes())
    at = _tokens_count_offset(data) + where
    data[at : at + 8] = value.to_bytes(8, "little")
    p = tmp_path / "hostile.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(BadModelFile, match=message):
        read_gguf(p)


def test_unsupported_architecture(tmp_path):
    p = write_tiny_gguf(tmp_path / "m.gguf", "qwen2")
    data = p.read_bytes().replace(b"qwen2", b"mamba", 1)  # general.architecture's value comes first
    bad = tmp_path / "mamba.gguf"
    bad.write_bytes(data)
    assert_one_line_error(apr("run", str(bad), "--prompt", "x"), "unsupported architecture 'mamba'")


def test_prompt_longer_than_context(tiny_qwen):
    # the tiny model's context is 512 tokens; the byte-level vocabulary makes each 'x ' two tokens
    proc = apr("run", str(tiny_qwen), "--raw", "--prompt", "x " * 400, "--max-tokens", "2")
    assert_one_line_error(proc, "context")


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_run_json(tmp_path, arch):
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch)
    proc = apr("run", str(path), "--prompt", "the cat", "--max-tokens", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    keys = {"model", "model_sha256", "prompt_tokens", "tokens", "text", "tokens_generated", "stop_reason",
            "prefill_tok_s", "decode_tok_s", "load_s", "wall_s", "backend", "dtype"}
    assert keys <= out.keys()
    assert out["tokens_generated"] == len(out["tokens"]) <= 5
    assert out["stop_reason"] in ("eos", "length")
    assert len(out["model_sha256"]) == 64
    # instruct model (it has a template): the prompt was wrapped exactly once
    assert out["rendered_prompt"].count("<|im_start|>user") == 1


def test_no_double_wrap(tiny_qwen):
    templated = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    out = json.loads(apr("run", str(tiny_qwen), "--prompt", templated, "--max-tokens", "1", "--json").stdout)
    assert out["rendered_prompt"] == templated
    raw = json.loads(apr("run", str(tiny_qwen), "--raw", "--prompt", "hi", "--max-tokens", "1", "--json").stdout)
    assert raw["rendered_prompt"] == "hi"


def test_seeded_sampling_is_reproducible(tiny_llama):
    args = ["run", str(tiny_llama), "--raw", "--prompt", "the", "--max-tokens", "8", "--temperature", "1.5",
            "--top-k", "50", "--top-p", "0.95", "--seed", "7", "--json"]
    a, b = (json.loads(apr(*args).stdout)["tokens"] for _ in range(2))
    assert a == b and len(a) == 8


def test_list_and_pull_errors(tmp_path):
    env = {"APR_HOME": str(tmp_path)}
    out = apr("list", "--json", env=env)
    assert out.returncode == 0 and json.loads(out.stdout) == []
    assert_one_line_error(apr("pull", "no-such-model", env=env), "unknown model")
