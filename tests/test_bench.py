"""`apr bench` on a tiny model: the JSON keys, and that it generates through apr.generate. No timing asserts."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("APR_HOME", str(tmp_path / "home"))


def run_bench(capsys, *argv) -> dict:
    from apr.cli import main

    assert main(["bench", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_json_keys(tiny_qwen, home, capsys):
    doc = run_bench(capsys, str(tiny_qwen), "--prompt-tokens", "24", "--gen-tokens", "4", "--iterations", "2")
    for key in ("prefill_tok_s", "decode_tok_s", "prefill_tok_s_min", "prefill_tok_s_max", "decode_tok_s_min",
                "decode_tok_s_max", "load_s", "first_token_s", "peak_rss_mb", "backend", "dtype", "backend_chain"):
        assert key in doc, key
    assert doc["prefill_tok_s"] > 0 and doc["decode_tok_s"] > 0
    assert doc["prefill_tok_s_min"] <= doc["prefill_tok_s"] <= doc["prefill_tok_s_max"]
    assert (doc["prompt_tokens"], doc["gen_tokens"], doc["iterations"]) == (24, 4, 2)
    assert doc["peak_rss_mb"] > 0 and doc["first_token_s"] >= doc["load_s"] > 0


def test_bench_goes_through_the_engine(tiny_llama, home, capsys, monkeypatch):
    from apr.engine import Engine

    seen = []
    real_submit, real_prefill = Engine.submit, Engine._prefill

    def submit(self, prompt_ids, params):
        seen.append((len(prompt_ids), params.max_tokens, params.cache_prompt))
        return real_submit(self, prompt_ids, params)

    def prefill(self, batch):
        seen.extend(("prefilled", len(r.prompt_ids) - r.fed) for r in batch)  # the whole prompt, every iteration
        return real_prefill(self, batch)

    monkeypatch.setattr(Engine, "submit", submit)
    monkeypatch.setattr(Engine, "_prefill", prefill)
    doc = run_bench(capsys, str(tiny_llama), "--prompt-tokens", "20", "--gen-tokens", "3", "--iterations", "2",
                    "--warmup", "0", "--dtype", "float32")
    assert seen == [(20, 3, False), ("prefilled", 20)] * 2 and doc["dtype"] == "float32"
    assert doc["step_impl"] == "torch-block"  # float32: the reference block, never the C one


def test_bench_prompt_is_exact_and_stable(tiny_qwen):
    from apr.commands.bench import bench_prompt
    from apr.runtime import read_model_file
    from apr.tokenizer import Tokenizer

    tok = Tokenizer.from_metadata(read_model_file(tiny_qwen)[1])
    ids = bench_prompt(tok, 300)
    assert len(ids) == 300 and ids == bench_prompt(tok, 300)
    assert not set(ids) & set(tok.stop_ids)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/uptime"), reason="process start is read from Linux /proc")
def test_process_start_is_the_real_start():
    """The first-token latency counts from `process_start()`: a child process must place its own start after
    the moment the parent launched it, and not long before it reads the clock (btime, whole seconds, put it up
    to a second early)."""
    import subprocess
    import sys
    import time

    code = ("import time; from apr.commands.bench import process_start; "
            "t = time.time(); print(process_start(), t)")
    before = time.time()
    start, now = map(float, subprocess.check_output([sys.executable, "-c", code], text=True).split())
    assert before - 0.03 <= start <= now  # 10 ms clock ticks, plus slack
