"""CI's fuzzing: each target for a bounded time (APR_FUZZ_SECONDS, default 6; five targets take about a
minute). A run fails on any exception that is not the project's own, a hang, or a crash (docs/fuzzing.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import executions  # noqa: E402
from targets import TARGETS, seeds  # noqa: E402

SECONDS = float(os.environ.get("APR_FUZZ_SECONDS", "6"))


@pytest.mark.parametrize("target", TARGETS)
def test_seeds_run_clean(target):
    assert seeds(target), f"no seed corpus for {target}"
    for data in seeds(target):
        TARGETS[target](data)


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_finds_nothing(target, tmp_path):
    proc = subprocess.run([sys.executable, str(HERE / "run.py"), target, "--seconds", str(SECONDS),
                           "--artifacts", str(tmp_path)], capture_output=True, text=True,
                          timeout=SECONDS + 120, cwd=tmp_path)
    runs = executions(proc.stderr)
    print(f"{target}: {runs} executions in {SECONDS:g} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert runs and runs > 0, proc.stderr[-2000:]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))]


def test_a_finding_fails_the_run(tmp_path, monkeypatch):
    # the runner must be able to fail: a target that raises a foreign exception is reported, input kept
    import run

    monkeypatch.setitem(TARGETS, "gguf_header", lambda data: 1 / 0 if len(data) > 0 else None)
    monkeypatch.setattr(sys, "argv", ["run.py"])
    rc = run.main(["gguf_header", "--seconds", "1", "--engine", "mutate", "--artifacts", str(tmp_path)])
    assert rc == 1 and any(p.name.startswith("crash-") for p in tmp_path.iterdir())
