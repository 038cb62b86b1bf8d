"""A trained student, end to end on a tiny random GGUF: export records its training (apr.training), `apr eval
heldout` rebuilds the held-out split from that record and compares the student with its base window by window,
`apr finetune --reproduce` reruns a run's first steps bit for bit, and a locally built model resolves by name."""

from __future__ import annotations

import json

import pytest
import torch

from apr import hub
from apr.cli import main
from apr.errors import AprError
from apr.evals import heldout
from apr.formats.gguf import read_gguf
from apr.train import session
from apr.train.loop import TrainSpec


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-for-bit claims are per thread count
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run(tiny_qwen, tmp_path_factory):
    """A finished 8-step finetune of the tiny model on a small corpus, and its exported student."""
    root = tmp_path_factory.mktemp("student")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"m{i:02d}.py").write_text(f"def f_{i}(x):\n    return x * {i} + 1\n" * 40)
    ls = session.LoraSpec(rank=4, alpha=8, dropout=0.1, mode="dense")
    ds = session.DataSpec(str(corpus), seq_len=24, val_windows=2)
    ts = TrainSpec(steps=8, batch=2, val_every=4, warmup=2, seed=3, lr=5e-3)
    p = session.prepare(str(tiny_qwen), ls, ds, ts, True)
    out = root / "run"
    session.run(p, ls, ts, out, session.lm_loss(p, False), "finetune", quiet=True, grad_checkpoint=False,
                extra={"weights": "dense", "grad_checkpoint": False})
    student = root / "student.gguf"
    assert main(["export", str(tiny_qwen), "--lora", str(out), "--quant", "f32", "-o", str(student), "--quiet"]) == 0
    return corpus, out, student, p


def test_export_records_the_training(run):
    corpus, out, student, p = run
    rec = heldout.training_record(read_gguf(student).metadata, student)
    assert rec["kind"] == "finetune" and rec["split"]["seed"] == 3 and rec["data"] == {"seq_len": 24, "val_windows": 2}
    assert rec["split"]["val_files"] == [f["path"] for f in p.corpus.files if f["path"] in rec["split"]["val_files"]] \
        or rec["split"]["val_files"] == p.split["val_files"]
    assert rec["base_sha256"] == p.base.sha256 and rec["adapter_sha256"] == hub.sha256_file(out / "adapter.safetensors")



def test_re_exporting_a_student_writes_one_training_record(run, tmp_path):
    """A student exported again (here as its own base) gets the new record in place of its old one, not both."""
    from apr.formats.gguf_write import export_model, open_source

    _, _, student, _ = run
    again = tmp_path / "again.gguf"
    export_model(open_source(student), again, "f32", progress=False, training={"kind": "re-export", "marker": 1})
    meta = read_gguf(again).metadata
    assert json.loads(meta[heldout.TRAINING_KEY]) == {"kind": "re-export", "marker": 1}
    from apr.commands.inspect import describe

    assert describe(again)["training"] is None  # inspect shows a record without a split as unreadable, never raises
    assert describe(student)["training"]["split"]["seed"] == 3

def test_heldout_rebuilds_the_split_and_pairs_the_windows(run, tiny_qwen, capsys):
    corpus, out, student, p = run
    assert main(["eval", "heldout", str(student), "--base", str(tiny_qwen), "--data", str(corpus),
                 "--windows", "4", "--dtype", "float32", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    s = r["split"]
    assert (s["seed"], s["seq_len"], s["offset"], s["n_windows"]) == (3, 24, 2, 4)  # the 2 validation windows skipped
    assert s["corpus_fingerprint"] == p.corpus.fingerprint
    val = set(p.split["val_files"])
    assert s["val_files_sha256"] == heldout.files_sha(p.split["val_files"]) and not val & {f["path"] for f in p.train.files}
    # the figures are the two models' own: recompute them directly through the same step
    from apr.runtime import load_model

    wins, _ = heldout.heldout_windows(heldout.training_record(read_gguf(student).metadata, student), str(corpus),
                                      p.base.tokenizer, 4, None)
    ls = heldout.window_losses(load_model(str(student), dtype="float32"), wins)
    lb = heldout.window_losses(load_model(str(tiny_qwen), dtype="float32"), wins)
    assert r["delta"] == pytest.approx(float((ls - lb).mean()), abs=1e-4)
    assert r["delta_hi"] == pytest.approx(r["delta"] + 2 * r["delta_se"], abs=2e-5)
    assert r["student"]["loss"] != r["base"]["loss"]  # the adapter changed the model


def test_heldout_refuses_what_it_cannot_trust(run, tiny_qwen, tmp_path, capsys):
    corpus, out, student, p = run
    other = tmp_path / "other"
    other.mkdir()
    for i in range(12):
        (other / f"m{i:02d}.py").write_text(f"x = {i}\n" * 50)
    cases = [(["eval", "heldout", str(student), "--base", str(tiny_qwen), "--data", str(other)], "fingerprint"),
             (["eval", "heldout", str(tiny_qwen), "--base", str(tiny_qwen), "--data", str(corpus)], "apr.training"),
             (["eval", "heldout", str(student), "--base", str(tiny_qwen), "--data", str(corpus), "--windows", "999"],
              "windows")]
    for argv, word in cases:
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0], err


def test_reproduce_is_bit_for_bit_and_catches_an_edit(run, tiny_qwen, capsys):
    corpus, out, student, p = run
    argv = ["finetune", str(tiny_qwen), "--reproduce", str(out), "--reproduce-steps", "5", "--data", str(corpus), "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["steps_compared"], r["identical"], r["max_abs_diff"], r["seed"]) == (5, True, 0.0, 3)
    log = out / "log.jsonl"
    lines = [json.loads(s) for s in log.read_text().splitlines()]
    saved = log.read_text()
    try:
        next(ln for ln in lines if ln.get("step") == 4 and "loss" in ln)["loss"] += 1e-7
        log.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
        assert main(argv) == 1
        r = json.loads(capsys.readouterr().out)
        assert (r["identical"], r["first_mismatch_step"]) == (False, 4)
    finally:
        log.write_text(saved)


def test_a_run_without_a_numerics_record_reproduces_with_version_1(run, tiny_qwen, tmp_path, capsys):
    """Runs made before training numerics 2 (the shipped students) record none: they rerun nn.Dropout and the full
    logits, bit for bit, and the two versions really differ, so the default is what keeps them reproducible."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    corpus, _, _, _ = run
    losses = {}
    for v in (1, 2):
        ls = session.LoraSpec(rank=4, alpha=8, dropout=0.1, mode="dense", numerics=v)
        ts = TrainSpec(steps=5, batch=2, val_every=5, warmup=2, seed=3, lr=5e-3)
        p = session.prepare(str(tiny_qwen), ls, session.DataSpec(str(corpus), seq_len=24, val_windows=2), ts, True)
        out = tmp_path / f"v{v}"
        losses[v] = session.run(p, ls, ts, out, session.lm_loss(p, False, v), "finetune", quiet=True,
                                grad_checkpoint=False, extra={"weights": "dense", "grad_checkpoint": False})["first_losses"]
    assert losses[1][0] == pytest.approx(losses[2][0], rel=1e-5) and losses[1][1:] != losses[2][1:]
    adapter = tmp_path / "v1" / session.ADAPTER
    with safe_open(str(adapter), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    training = json.loads(meta["training"])
    assert training.pop("numerics") == 1
    save_file(tensors, str(adapter), metadata={**meta, "training": json.dumps(training, sort_keys=True)})
    argv = ["finetune", str(tiny_qwen), "--reproduce", str(tmp_path / "v1"), "--reproduce-steps", "5",
            "--data", str(corpus), "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["identical"] is True


def test_a_version_2_run_reproduces_with_version_2(run, tiny_qwen, tmp_path, capsys):
    """A run recorded as numerics 2 (made before version 3) reruns as version 2 bit for bit, not as the default."""
    corpus, _, _, _ = run
    ls = session.LoraSpec(rank=4, alpha=8, dropout=0.1, mode="dense", numerics=2)
    ts = TrainSpec(steps=5, batch=2, val_every=5, warmup=2, seed=3, lr=5e-3)
    p = session.prepare(str(tiny_qwen), ls, session.DataSpec(str(corpus), seq_len=24, val_windows=2), ts, True)
    session.run(p, ls, ts, tmp_path / "v2", session.lm_loss(p, False, 2), "finetune", quiet=True,
                grad_checkpoint=False, extra={"weights": "dense", "grad_checkpoint": False})
    argv = ["finetune", str(tiny_qwen), "--reproduce", str(tmp_path / "v2"), "--reproduce-steps", "5",
            "--data", str(corpus), "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["identical"] is True


def test_reproduce_reruns_a_distill_run_with_its_teacher(run, tiny_qwen, tmp_path, capsys):
    """A distill run's first steps come back bit for bit with the teacher's top-k computed again; an edited
    loss in its log is caught."""
    from apr.train import distill, forward

    corpus, _, _, _ = run
    ls = session.LoraSpec(rank=4, alpha=8, dropout=0.1, mode="dense")
    ds = session.DataSpec(str(corpus), seq_len=24, val_windows=2)
    ts = TrainSpec(steps=6, batch=2, val_every=3, warmup=2, seed=5, lr=5e-3)
    p = session.prepare(str(tiny_qwen), ls, ds, ts, True)
    out = tmp_path / "distill"
    out.mkdir()
    teacher = forward.load_base(str(tiny_qwen))
    ids, logp = distill.load_or_compute(out, teacher, str(tiny_qwen), p.train.ids, 4, 2.0, p.corpus.fingerprint, True)
    session.run(p, ls, ts, out, distill.distill_loss(p, ids, logp, 2.0, 0.5, False), "distill", quiet=True,
                grad_checkpoint=False, extra={"teacher": str(tiny_qwen), "teacher_sha256": teacher.sha256,
                                              "temperature": 2.0, "kd_alpha": 0.5, "top_k": 4, "weights": "dense",
                                              "grad_checkpoint": False})
    (out / distill.TOPK_FILE).unlink()  # the rerun must compute the teacher again, not read the run's file
    argv = ["finetune", str(tiny_qwen), "--reproduce", str(out), "--reproduce-steps", "4", "--data", str(corpus), "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["kind"], r["steps_compared"], r["identical"], r["max_abs_diff"]) == ("distill", 4, True, 0.0)
    lines = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
    next(ln for ln in lines if ln.get("step") == 3 and "loss" in ln)["loss"] += 1e-7
    (out / "log.jsonl").write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    assert main(argv) == 1
    r = json.loads(capsys.readouterr().out)
    assert (r["identical"], r["first_mismatch_step"]) == (False, 3)


def test_reproduce_needs_a_finished_run(tmp_path, capsys):
    assert main(["finetune", "--reproduce", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adapter.safetensors" in err[0]


def test_a_local_build_resolves_by_name(run, monkeypatch, tmp_path):
    corpus, out, student, p = run
    monkeypatch.setenv("APR_HOME", str(tmp_path))
    with pytest.raises(AprError):
        hub.resolve_model("my-student")
    (tmp_path / "models" / "my-student").mkdir(parents=True)
    (tmp_path / "models" / "my-student" / "my-student.gguf").write_bytes(student.read_bytes())
    assert hub.resolve_model("my-student") == tmp_path / "models" / "my-student" / "my-student.gguf"


def test_llamacpp_peer_missing_is_one_line(monkeypatch, tmp_path):
    from apr import peer_llamacpp

    monkeypatch.setenv("APR_LLAMACPP_PYTHON", str(tmp_path / "none"))
    monkeypatch.setattr(peer_llamacpp.glob, "glob", lambda _p: [])
    with pytest.raises(AprError, match="build-llamacpp.sh"):
        peer_llamacpp.find_peer(None)
