"""`apr eval ... --ray`: a local Ray cluster on loopback (one node, two CPUs: two worker processes, one actor
each) runs the evals on the tiny random model. Per-item results equal the single-process run's, every item
names the process it ran on, a killed worker's items are retried on the other, and an unreachable address
is one error line. One cluster is shared by the module (starting Ray costs seconds)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray")

from apr.evals import distributed, python_syntax  # noqa: E402
from apr.generate import generate  # noqa: E402
from apr.runtime import load_model  # noqa: E402

PROMPTS = ["def fib(n):", "class Stack:", "def add(a, b):", "the theme is", "def is_prime(n):", "import os"]
MAX_TOKENS = 8
VOLATILE = ("decode_tok_s", "worker", "duration_s")  # timings, and where it ran


def _same(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


@pytest.fixture(scope="module")
def cluster():
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def single(tiny_qwen):
    """The single-process run, the reference every Ray run must equal."""
    lm = load_model(str(tiny_qwen), dtype="float32", backend="cpu", quiet=True)
    return python_syntax.run(lm, generate, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def pool(cluster, tiny_qwen):
    """Two actors, shared by the two tests below in file order (the second kills one and closes the pool)."""
    p = distributed.Pool(str(tiny_qwen), actors=2, cpus=1, dtype="float32", backend="cpu")
    yield p
    p.close()


TEXT = "the theme is in the details; def add(a, b): return a + b. In the beginning was the word. " * 3


def test_perplexity_over_two_workers_equals_the_single_process_run(pool, tiny_qwen, tmp_path):
    """The same windows in the same batches: per-window nll, the figure, and a saved base file, as one process."""
    import numpy as np

    from apr.evals import logits_file, perplexity_run

    lm = load_model(str(tiny_qwen), dtype="float32", backend="cpu", quiet=True)
    one = perplexity_run.run(lm, TEXT, 16, 2, str(tmp_path / "one.npz"), progress=False)
    many = distributed.perplexity(pool, TEXT, 16, 2, str(tmp_path / "ray.npz"))
    assert one["n_windows"] == many["n_windows"] >= 8
    assert many["ppl"] == pytest.approx(one["ppl"], rel=1e-6) and many["ppl_error"] == pytest.approx(one["ppl_error"], rel=1e-5)
    a, b = logits_file.read(tmp_path / "one.npz"), logits_file.read(tmp_path / "ray.npz")
    assert a["header"] == b["header"]
    np.testing.assert_allclose(b["nll"], a["nll"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(b["top_ids"][:, 0], a["top_ids"][:, 0])
    assert [w for sh in many["shards"] for w in sh["windows"]] == list(range(many["n_windows"]))
    assert len({sh["pid"] for sh in many["shards"]}) == 2  # both actors scored windows


def test_a_killed_worker_has_its_items_retried_on_the_other(pool, single):
    jobs = [pool.submit("python-syntax", p, MAX_TOKENS) for p in PROMPTS]
    # each actor holds one item now and the rest wait in the queue: kill the one given the second item
    holder = next(actor for jid, actor in pool.running.values() if jid == jobs[1])
    victim = pool.info[holder]["pid"]
    os.kill(victim, signal.SIGKILL)
    results = [pool.result(j)[0] for j in jobs]
    report = pool.report("test")
    pool.close()  # its CPUs go back to the cluster for the tests below
    assert _same(results) == _same(single["results"])
    assert [w["pid"] for w in report["lost_workers"]] == [victim] and report["retried_items"] >= 1


# Problems short enough for the tiny model's 512-token context, in HumanEval's shape.
SHORT = {f"HumanEval/{i}": {"task_id": f"HumanEval/{i}", "prompt": f"def f{i}(a, b):\n", "entry_point": f"f{i}",
                            "test": f"def check(f):\n    assert f(1, 2) == {i}\n"} for i in range(3)}


def test_humaneval_over_ray_cli_equals_the_single_process_run(cluster, tiny_qwen, tmp_path, monkeypatch, capsys):
    """`apr eval humaneval --ray` end to end (in this process, which already holds the cluster): the same
    completions and verdicts as without --ray, each record naming the worker it ran on."""
    from apr import cli
    from apr.evals import humaneval

    monkeypatch.setattr(humaneval, "load_problems", lambda limit=None: dict(SHORT))
    base = ["eval", "humaneval", str(tiny_qwen), "--max-tokens", "8", "--dtype", "float32", "--backend", "cpu",
            "--workers", "2", "--json"]
    reports = []
    for extra in (["--out", str(tmp_path / "one")], ["--out", str(tmp_path / "ray"), "--ray", cluster, "--ray-actors", "2"]):
        assert cli.main(base + extra) == 0
        reports.append(json.loads(capsys.readouterr().out))
    a, b = reports
    assert a["pass@1"] == b["pass@1"] and a["statuses"] == b["statuses"] and a["model_sha256"] == b["model_sha256"]
    assert len(b["ray"]["workers"]) == 2 and b["ray"]["lost_workers"] == [] and "ray" not in a

    def records(out):
        return [json.loads(line) for line in (tmp_path / out / "samples.jsonl").read_text().splitlines()]

    ray_records = records("ray")
    assert _same(ray_records) == _same(records("one")) and len(ray_records) == 3
    assert {r["worker"]["pid"] for r in ray_records} <= {w["pid"] for w in b["ray"]["workers"]}


def test_two_workers_equal_the_single_process_run(cluster, tiny_qwen, single):
    """A separate `apr` process joins the cluster by its address, as on a real multi-node cluster: the same
    per-prompt results and figure as the single-process run, both actors used, each result naming its worker."""
    r = subprocess.run([sys.executable, "-m", "apr.cli", "eval", "python-syntax", str(tiny_qwen), "--max-tokens",
                        str(MAX_TOKENS), "--dtype", "float32", "--backend", "cpu", "--ray", cluster, "--ray-actors",
                        "2", "--json", "--prompts", _prompts_file()], capture_output=True, text=True, timeout=300)
    assert r.returncode == (0 if single["n_ok"] == len(PROMPTS) else 1), r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert _same(report["results"]) == _same(single["results"])
    assert report["n_ok"] == single["n_ok"] and report["pass_rate"] == single["pass_rate"]
    assert report["ray"]["address"] == cluster and len(report["ray"]["workers"]) == 2
    pids = {x["worker"]["pid"] for x in report["results"]}
    assert pids == {w["pid"] for w in report["ray"]["workers"]}  # both actors took items
    assert all(x["worker"]["hostname"] == socket.gethostname() and x["worker"]["node_id"] for x in report["results"])


def _prompts_file() -> str:
    import tempfile

    f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(PROMPTS, f)
    f.close()
    return f.name


def test_unreachable_address_is_one_line(tmp_path, tiny_qwen):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    r = subprocess.run([sys.executable, "-m", "apr.cli", "eval", "python-syntax", str(tiny_qwen), "--ray",
                        f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in r.stderr
    bad = subprocess.run([sys.executable, "-m", "apr.cli", "eval", "python-syntax", str(tiny_qwen), "--ray", "nohost"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "--ray wants" in bad.stderr


def test_pv_discharge_passes_ray_to_eval_checks_only():
    from pathlib import Path

    from apr.contracts.discharge import build_argv

    argv = build_argv("apr eval humaneval {model} --json", Path("/m.gguf"), "10.0.0.1:6379")
    assert argv[-5:] == ["humaneval", "/m.gguf", "--json", "--ray", "10.0.0.1:6379"]
    assert "--ray" not in build_argv("apr qa {model} --json", Path("/m.gguf"), "10.0.0.1:6379")
    assert "--ray" not in build_argv("apr eval humaneval {model} --json", Path("/m.gguf"))
    assert build_argv("apr eval python-syntax {model} --ray auto", Path("/m.gguf"), "h:1").count("--ray") == 1


def test_more_actors_than_the_cluster_has_cpus_is_refused(cluster, tiny_qwen):
    """Actors that could never be placed would wait forever: refused up front, in one line."""
    from apr.errors import AprError

    with pytest.raises(AprError, match="need 5 CPUs; the cluster has 2"):
        distributed.Pool(str(tiny_qwen), actors=5, cpus=1, dtype="float32", backend="cpu")
