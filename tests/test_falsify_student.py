"""Every criterion of MODEL-2's contract (the trained student) can fail: plant the fault it exists to catch and
see its own check come out FALSIFIED, with the unfaulted case DISCHARGED. The checks run in-process on a tiny
student trained and exported here; constants that are facts of the real files (a fingerprint, a sha256, the
window counts) are re-targeted to the tiny run's own (test_falsify.retarget)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from apr.cli import main
from test_falsify import REPO, _answers, _gates, _humaneval, criterion, judge, retarget, run_check  # noqa: F401
from test_falsify import in_repo  # noqa: F401  (a fixture)

CONTRACT = REPO / "contracts" / "qwen2.5-coder-0.5b-instruct-stdlib-lora.yaml"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train(tiny, corpus: Path, out: Path, steps: int, lr: float, seed: int = 0):
    from apr.train import session
    from apr.train.loop import TrainSpec

    ls = session.LoraSpec(rank=4, alpha=8, dropout=0.0, mode="dense")
    ds = session.DataSpec(str(corpus), seq_len=24, val_windows=2)
    ts = TrainSpec(steps=steps, batch=2, val_every=max(1, steps), warmup=1, seed=seed, lr=lr)
    p = session.prepare(str(tiny), ls, ds, ts, True)
    session.run(p, ls, ts, out, session.lm_loss(p, False), "finetune", quiet=True, grad_checkpoint=False,
                extra={"weights": "dense", "grad_checkpoint": False})
    return p


@pytest.fixture(scope="module")
def students(tiny_qwen, tmp_path_factory):
    """A trained student (20 steps, it learns the corpus) and an untrained one (a learning rate of ~0: B stays
    ~0, the base itself), both exported the way the real one is."""
    root = tmp_path_factory.mktemp("stu")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"m{i:02d}.py").write_text(f"def f_{i}(x):\n    return x * {i} + 1\n" * 40)
    out = {}
    for name, lr in (("trained", 5e-3), ("untrained", 1e-12)):
        run = root / name
        _train(tiny_qwen, corpus, run, 20, lr)
        gguf = root / f"{name}.gguf"
        assert main(["export", str(tiny_qwen), "--lora", str(run), "--quant", "f32", "-o", str(gguf), "--quiet"]) == 0
        out[name] = (run, gguf)
    return corpus, out


def _heldout(crit, gguf, base, corpus, capsys):
    return run_check(crit, gguf, capsys, "--base", str(base), "--data", str(corpus), "--windows", "4", "--offset", "2",
                     "--dtype", "float32")


def test_stu001_an_untrained_student_is_not_better(students, tiny_qwen, capsys, in_repo):
    corpus, runs = students
    crit = criterion(CONTRACT, "STU-001")
    good = _heldout(crit, runs["trained"][1], tiny_qwen, corpus, capsys)
    crit = retarget(crit, good)
    assert good["delta_hi"] < 0 and judge(crit, good) == "DISCHARGED"
    flat = _heldout(crit, runs["untrained"][1], tiny_qwen, corpus, capsys)
    assert abs(flat["delta"]) < 1e-3 and flat["delta_hi"] >= 0
    assert judge(crit, flat) == "FALSIFIED"


def test_stu002_pass_rate_below_floor(tiny_qwen, capsys, monkeypatch, in_repo, tmp_path):
    crit = criterion(CONTRACT, "STU-002")
    assert judge(crit, _humaneval(crit, tiny_qwen, capsys, monkeypatch, tmp_path, solve=True)) == "DISCHARGED"
    assert judge(crit, _humaneval(crit, tiny_qwen, capsys, monkeypatch, tmp_path, solve=False)) == "FALSIFIED"


def test_stu003_failing_gate(tiny_qwen, capsys, monkeypatch, in_repo):
    crit = criterion(CONTRACT, "STU-003")
    _gates(monkeypatch, ["pass"] * 11 + ["skip"])
    assert judge(crit, run_check(crit, tiny_qwen, capsys)) == "DISCHARGED"
    _gates(monkeypatch, ["pass"] * 10 + ["fail", "skip"])
    assert judge(crit, run_check(crit, tiny_qwen, capsys)) == "FALSIFIED"
    _gates(monkeypatch, ["pass"] * 10 + ["skip", "skip"])
    assert judge(crit, run_check(crit, tiny_qwen, capsys)) == "FALSIFIED"


def test_stu004_llamacpp_disagrees(students, capsys, monkeypatch, in_repo):
    from apr import peer_llamacpp as pl

    _, runs = students
    crit = criterion(CONTRACT, "STU-004")
    monkeypatch.setattr(pl, "find_peer", lambda explicit=None: "/planted/python")
    planted = {}

    def peer(python, path, text, ids, threads):  # the peer's answer: our own tokens and top-1, then faults
        from apr.runtime import load_model

        top1 = pl.apr_top1(load_model(str(path), quiet=True), ids)
        return {"tokens": planted.get("tokens", ids), "top1": planted.get("top1", lambda t: t)(top1), "version": "planted"}

    monkeypatch.setattr(pl, "_peer_run", peer)
    gguf = runs["trained"][1]
    text = ["--text-file", str(REPO / "benchmarks" / "data" / "textwrap-3.11.7.py.txt")]
    good = run_check(crit, gguf, capsys, *text)
    assert good["top1_agreement"] == 1.0 and judge(crit, good) == "DISCHARGED"
    planted["tokens"] = [0] + list(range(good["tokens"] - 1))  # another tokenization
    assert judge(crit, run_check(crit, gguf, capsys, *text)) == "FALSIFIED"
    planted.pop("tokens")
    planted["top1"] = lambda t: [(x + 1) if i % 10 == 0 else x for i, x in enumerate(t)]  # 90% agreement
    doc = run_check(crit, gguf, capsys, *text)
    assert 0.85 < doc["top1_agreement"] < 0.98 and judge(crit, doc) == "FALSIFIED"


def test_stu005_an_edited_log_does_not_reproduce(students, tiny_qwen, capsys, in_repo):
    corpus, runs = students
    crit = criterion(CONTRACT, "STU-005")
    run = runs["trained"][0]
    extra = ["--data", str(corpus)]
    argv = [a if not a.startswith("students/") else str(run) for a in crit.check.command.split()[1:]]
    crit = crit.model_copy(update={"check": crit.check.model_copy(update={"command": " ".join(["apr", *argv])})})
    good = run_check(crit, tiny_qwen, capsys, *extra)
    crit = retarget(crit, good)  # the thread count of this file's runs (one), not the real run's two
    assert good["identical"] and good["steps_compared"] == 20 and judge(crit, good, "amx") == "DISCHARGED"
    assert judge(crit, good, "avx2") == "FALSIFIED"  # not evidence on another class
    log = run / "log.jsonl"
    saved = log.read_text()
    lines = [json.loads(s) for s in saved.splitlines()]
    next(ln for ln in lines if ln.get("step") == 7 and "loss" in ln)["loss"] *= 1.0000001
    log.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    try:
        bad = run_check(crit, tiny_qwen, capsys, *extra)
    finally:
        log.write_text(saved)
    assert bad["first_mismatch_step"] == 7 and judge(crit, bad, "amx") == "FALSIFIED"


def test_stu006_other_provenance(students, tiny_qwen, capsys, in_repo, tmp_path):
    corpus, runs = students
    crit = criterion(CONTRACT, "STU-006")
    good = run_check(crit, runs["trained"][1], capsys)
    crit = retarget(crit, good)  # the tiny run's fingerprint, licence (a plain folder: unknown), base and adapter
    assert judge(crit, good) == "DISCHARGED"
    _train(tiny_qwen, corpus, tmp_path / "seed7", 2, 5e-3, seed=7)  # the same recipe from another seed
    other = tmp_path / "seed7.gguf"
    assert main(["export", str(tiny_qwen), "--lora", str(tmp_path / "seed7"), "--quant", "f32", "-o", str(other),
                 "--quiet"]) == 0
    assert judge(crit, run_check(crit, other, capsys)) == "FALSIFIED"


def test_stu007_a_changed_corpus(capsys, monkeypatch, in_repo, tmp_path):
    import sysconfig

    crit = criterion(CONTRACT, "STU-007")
    src = tmp_path / "stdlib"
    for name in ("textwrap.py", "bisect.py", "heapq.py"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / name, src / name)
    good = run_check(crit, tmp_path, capsys, "-o", str(tmp_path / "c1"), "--source", str(src))
    crit = retarget(crit, good)
    assert good["licence"] == "PSF-2.0" and judge(crit, good) == "DISCHARGED"
    (tmp_path / "c1" / "files" / "heapq.py").write_text("# edited\n")  # a file that differs from its manifest
    capsys.readouterr()
    assert main(["data", "code-corpus", "-o", str(tmp_path / "c1"), "--json"]) != 0
    assert "differs from its manifest" in capsys.readouterr().err
    (src / "heapq.py").write_text("# another stdlib\n")
    other = run_check(crit, tmp_path, capsys, "-o", str(tmp_path / "c2"), "--source", str(src))
    assert judge(crit, other) == "FALSIFIED"
