"""Every criterion of the students' contracts (MODEL-2, LoRA-adapted; MODEL-3, distilled) can fail: plant the
fault it exists to catch and see its own check come out FALSIFIED, with the unfaulted case DISCHARGED. The checks
run in-process on tiny students trained (plain LoRA, or distilled from a tiny teacher) and exported here, one set
per contract; constants that are facts of the real files (a fingerprint, a sha256, the window counts) are
re-targeted to the tiny run's own (test_falsify.retarget)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from apr.cli import main
from test_falsify import REPO, _answers, _gates, _humaneval, criterion, judge, retarget, run_check  # noqa: F401
from test_falsify import in_repo  # noqa: F401  (a fixture)

CONTRACTS = {"lora": REPO / "contracts" / "qwen2.5-coder-0.5b-instruct-stdlib-lora.yaml",
             "distill": REPO / "contracts" / "qwen2.5-coder-0.5b-instruct-stdlib-distill.yaml"}


@pytest.fixture(scope="module", params=sorted(CONTRACTS))
def kind(request) -> str:
    """Which student's contract a test judges: each test runs once per contract."""
    return request.param


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train(tiny, corpus: Path, out: Path, steps: int, lr: float, seed: int = 0, teacher: Path | None = None):
    """A LoRA run of the tiny model, or (with a teacher) a distill run, the way `apr finetune`/`apr distill` train."""
    from apr.train import distill, forward, session
    from apr.train.loop import TrainSpec

    ls = session.LoraSpec(rank=4, alpha=8, dropout=0.0, mode="dense")
    ds = session.DataSpec(str(corpus), seq_len=24, val_windows=2)
    ts = TrainSpec(steps=steps, batch=2, val_every=max(1, steps), warmup=1, seed=seed, lr=lr)
    p = session.prepare(str(tiny), ls, ds, ts, True)
    extra = {"weights": "dense", "grad_checkpoint": False}
    if teacher is None:
        loss, name = session.lm_loss(p, False), "finetune"
    else:
        out.mkdir(parents=True, exist_ok=True)
        t = forward.load_base(str(teacher))
        ids, logp = distill.load_or_compute(out, t, str(teacher), p.train.ids, 4, 2.0, p.corpus.fingerprint, True)
        loss, name = distill.distill_loss(p, ids, logp, 2.0, 0.5, False), "distill"
        extra |= {"teacher": str(teacher), "teacher_sha256": t.sha256, "temperature": 2.0, "kd_alpha": 0.5, "top_k": 4}
    session.run(p, ls, ts, out, loss, name, quiet=True, grad_checkpoint=False, extra=extra)
    return p


@pytest.fixture(scope="module")
def teachers(tiny_dir):
    """The distill runs' teacher, and another one with the same vocabulary (other random weights)."""
    from tiny_gguf import write_tiny_gguf

    return write_tiny_gguf(tiny_dir / "teacher-a.gguf", "qwen2", seed=11), write_tiny_gguf(
        tiny_dir / "teacher-b.gguf", "qwen2", seed=12)


@pytest.fixture(scope="module")
def students(kind, tiny_qwen, teachers, tmp_path_factory):
    """A trained student (20 steps, it learns the corpus) and an untrained one (a learning rate of ~0: B stays
    ~0, the base itself), both exported the way the real one is; distilled from teacher A for MODEL-3's contract."""
    teacher = teachers[0] if kind == "distill" else None
    root = tmp_path_factory.mktemp(f"stu-{kind}")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"m{i:02d}.py").write_text(f"def f_{i}(x):\n    return x * {i} + 1\n" * 40)
    out = {}
    for name, lr in (("trained", 5e-3), ("untrained", 1e-12)):
        out[name] = (root / name, _export(tiny_qwen, corpus, root / name, teacher, 0, steps=20, lr=lr))
    return corpus, out


def _heldout(crit, gguf, base, corpus, capsys):
    return run_check(crit, gguf, capsys, "--base", str(base), "--data", str(corpus), "--windows", "4", "--offset", "2",
                     "--dtype", "float32")


def test_stu001_an_untrained_student_is_not_better(kind, students, tiny_qwen, capsys, in_repo):
    corpus, runs = students
    crit = criterion(CONTRACTS[kind], "STU-001")
    good = _heldout(crit, runs["trained"][1], tiny_qwen, corpus, capsys)
    crit = retarget(crit, good)
    assert good["delta_hi"] < 0 and judge(crit, good) == "DISCHARGED"
    flat = _heldout(crit, runs["untrained"][1], tiny_qwen, corpus, capsys)
    assert abs(flat["delta"]) < 1e-3 and flat["delta_hi"] >= 0
    assert judge(crit, flat) == "FALSIFIED"


def test_stu002_pass_rate_below_floor(kind, tiny_qwen, capsys, monkeypatch, in_repo, tmp_path):
    crit = criterion(CONTRACTS[kind], "STU-002")
    assert judge(crit, _humaneval(crit, tiny_qwen, capsys, monkeypatch, tmp_path, solve=True)) == "DISCHARGED"
    assert judge(crit, _humaneval(crit, tiny_qwen, capsys, monkeypatch, tmp_path, solve=False)) == "FALSIFIED"


def test_stu003_failing_gate(kind, tiny_qwen, capsys, monkeypatch, in_repo):
    crit = criterion(CONTRACTS[kind], "STU-003")
    _gates(monkeypatch, ["pass"] * 11 + ["skip"])
    assert judge(crit, run_check(crit, tiny_qwen, capsys)) == "DISCHARGED"
    _gates(monkeypatch, ["pass"] * 10 + ["fail", "skip"])
    assert judge(crit, run_check(crit, tiny_qwen, capsys)) == "FALSIFIED"
    _gates(monkeypatch, ["pass"] * 10 + ["skip", "skip"])
    assert judge(crit, run_check(crit, tiny_qwen, capsys)) == "FALSIFIED"


def test_stu004_llamacpp_disagrees(kind, students, capsys, monkeypatch, in_repo):
    from apr import peer_llamacpp as pl

    _, runs = students
    crit = criterion(CONTRACTS[kind], "STU-004")
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


def test_stu005_an_edited_log_does_not_reproduce(kind, students, tiny_qwen, capsys, in_repo):
    corpus, runs = students
    crit = criterion(CONTRACTS[kind], "STU-005")
    run = runs["trained"][0]
    if kind == "distill":
        from apr.train import distill

        (run / distill.TOPK_FILE).unlink(missing_ok=True)  # the rerun computes the teacher again, as on a fresh clone
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


def test_stu006_other_provenance(kind, students, teachers, tiny_qwen, capsys, in_repo, tmp_path):
    corpus, runs = students
    crit = criterion(CONTRACTS[kind], "STU-006")
    good = run_check(crit, runs["trained"][1], capsys)
    crit = retarget(crit, good)  # the tiny run's fingerprint, licence (a plain folder: unknown), base and adapter
    assert judge(crit, good) == "DISCHARGED"
    teacher = teachers[0] if kind == "distill" else None
    assert judge(crit, run_check(crit, _export(tiny_qwen, corpus, tmp_path / "seed7", teacher, 7), capsys)) == "FALSIFIED"
    if kind == "distill":  # the teacher clauses alone: another teacher, and no teacher at all, are both caught
        only = crit.model_copy(update={"check": crit.check.model_copy(update={"verdict": [
            c for c in crit.check.verdict if c.path in ("$.training.kind", "$.training.teacher_sha256")]})})
        assert len(only.check.verdict) == 2 and judge(only, good) == "DISCHARGED"
        for other, name in ((teachers[1], "teacher-b"), (None, "plain")):
            assert judge(only, run_check(only, _export(tiny_qwen, corpus, tmp_path / name, other, 0), capsys)) == "FALSIFIED"


def _export(tiny, corpus: Path, run: Path, teacher: Path | None, seed: int, steps: int = 2, lr: float = 5e-3) -> Path:
    """`steps` of the recipe (from `seed`, with `teacher` or none), exported the way the real student is."""
    _train(tiny, corpus, run, steps, lr, seed=seed, teacher=teacher)
    gguf = run.with_suffix(".gguf")
    assert main(["export", str(tiny), "--lora", str(run), "--quant", "f32", "-o", str(gguf), "--quiet"]) == 0
    return gguf


def test_stu007_a_changed_corpus(kind, capsys, monkeypatch, in_repo, tmp_path):
    import sysconfig

    crit = criterion(CONTRACTS[kind], "STU-007")
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
