"""apr.train on tiny random GGUFs: LoRA init, gradient flow, overfitting, determinism, resume, the split,
the distillation loss and bad input. Small shapes throughout (the whole file runs in well under a minute)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from apr.errors import AprError
from apr.train import data as D
from apr.train import distill, forward, lora, session
from apr.train.loop import TrainSpec


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one thread is as fast and does not wait on a busy second core. (Bit-for-bit claims are
    per thread count, so every run in this file uses the same one.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(10):
        (d / f"m{i}.py").write_text(f"def f_{i}(x):\n    return x * {i} + 1\n" * 30)
    return d


def _run(model, corpus, out, steps=6, stop_after=None, resume=False, seed=0, lr=5e-3, val_every=3, gc=False):
    ls = session.LoraSpec(rank=4, alpha=8, dropout=0.1)
    ds = session.DataSpec(str(corpus), seq_len=24, val_windows=2)
    ts = TrainSpec(steps=steps, batch=2, val_every=val_every, warmup=2, seed=seed, lr=lr)
    p = session.prepare(str(model), ls, ds, ts, True)
    return session.run(p, ls, ts, out, session.lm_loss(p, gc), "finetune", resume=resume, quiet=True,
                       stop_after=stop_after, grad_checkpoint=gc)


def test_lora_init_output_equals_base(tiny_qwen):
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = forward.load_base(str(tiny_qwen)).model
    with torch.no_grad():
        want = forward.logits(ref, ids)
    b = forward.load_base(str(tiny_qwen))
    lora.attach(b.model, session.DEFAULT_TARGETS.split(","), 4, 8.0, 0.0, 0)
    with torch.no_grad():
        got = forward.logits(b.model, ids)
    assert torch.equal(got, want)  # B = 0: exactly the base
    # and the training forward is the inference forward: same logits as Transformer.forward in float32
    inf = forward.load_base(str(tiny_qwen)).model.materialize(torch.float32)
    inf.setup_cache(16)
    assert torch.allclose(inf.forward(ids[0], 0, all_logits=True), want[:12], atol=1e-4, rtol=1e-4)


def test_gradients_reach_only_adapters_and_match_dense(tiny_llama):
    ids = torch.randint(0, 200, (1, 10, ), generator=torch.Generator().manual_seed(2))
    grads = {}
    for mode in ("dequant", "dense"):
        b = forward.load_base(str(tiny_llama))
        ad = lora.attach(b.model, ["attn_q", "ffn_down"], 4, 8.0, 0.0, 0, mode=mode)
        with torch.no_grad():  # a non-zero B so A's gradient is not zero either
            for m in ad.values():
                m.lora_b.normal_(0, 0.02, generator=torch.Generator().manual_seed(3))
        forward.logits(b.model, ids).logsumexp(-1).sum().backward()
        trainable = {n for n, p in b.model.named_parameters() if p.requires_grad}
        assert trainable == {f"{k}.{w}" for k in ad for w in ("lora_a", "lora_b")}
        assert all(t.grad is None for n, t in b.model.named_buffers())
        assert all(m.lora_a.grad.abs().sum() > 0 and m.lora_b.grad.abs().sum() > 0 for m in ad.values())
        grads[mode] = {k: m.lora_a.grad.clone() for k, m in ad.items()}
    for k in grads["dense"]:  # the on-the-fly dequantized weight is the dense one: same gradients
        assert torch.allclose(grads["dequant"][k], grads["dense"][k], atol=1e-6, rtol=1e-5)


def test_loss_decreases_on_tiny_overfit_set(tiny_qwen, corpus, tmp_path):
    s = _run(tiny_qwen, corpus, tmp_path / "o", steps=12, lr=2e-2, val_every=6)
    lines = [json.loads(x) for x in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    train = [ln["loss"] for ln in lines if "loss" in ln]
    assert len(train) == 12 and sum(train[-3:]) < sum(train[:3])
    assert s["best_val_loss"] < s["base_val_loss"]
    tensors, meta = lora.read_adapter(tmp_path / "o" / session.ADAPTER)
    assert meta["rank"] == 4 and meta["alpha"] == 8 and meta["format"] == lora.FORMAT
    assert meta["base_sha256"] == s["base_sha256"] and meta["training"]["split"]["seed"] == 0
    assert tensors["blk.0.attn_q.lora_a"].shape == (4, 256) and tensors["blk.1.ffn_down.lora_b"].shape == (256, 4)
    assert (tmp_path / "o" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_same_seed_same_first_losses_and_resume_identical(tiny_qwen, corpus, tmp_path):
    # dropout on and blocks recomputed in backward (grad checkpointing): its RNG must replay too
    a = _run(tiny_qwen, corpus, tmp_path / "a", steps=20, val_every=10, gc=True)
    c = _run(tiny_qwen, corpus, tmp_path / "c", steps=20, val_every=10, stop_after=3, seed=1, gc=True)
    assert len(a["first_losses"]) == 20 and c["first_losses"] != a["first_losses"][:3]
    # the same seed again, interrupted after step 7 (between validations: the checkpoint is the one written at
    # the stop), then resumed: its 7 fresh losses and 13 resumed ones are a's 20, bit for bit
    first = _run(tiny_qwen, corpus, tmp_path / "r", steps=20, val_every=10, gc=True, stop_after=7)
    assert first["first_losses"] == a["first_losses"][:7]
    r = _run(tiny_qwen, corpus, tmp_path / "r", steps=20, val_every=10, gc=True, resume=True)
    log = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [ln["loss"] for ln in log if "loss" in ln] == a["first_losses"]
    assert r["best_val_loss"] == a["best_val_loss"]


def test_resume_refuses_a_checkpoint_of_another_base(tiny_qwen, tiny_dir, corpus, tmp_path):
    from tiny_gguf import write_tiny_gguf

    other = write_tiny_gguf(tiny_dir / "tiny-qwen2-seed5.gguf", "qwen2", seed=5)
    _run(tiny_qwen, corpus, tmp_path / "x", steps=3)
    with pytest.raises(AprError, match="another run .*base_sha256"):
        _run(other, corpus, tmp_path / "x", steps=3, resume=True)


def test_split_by_file_is_disjoint_and_validation_never_trained(tiny_qwen, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    for i in range(8):  # the held-out files are told apart by a byte the training files never contain
        (d / f"f{i}.py").write_text("x = 1\n" * 60)
    files = D.open_corpus(d).files
    train_f, val_f = D.split_files(files, seed=3)
    assert train_f and val_f and not {f["path"] for f in train_f} & {f["path"] for f in val_f}
    assert D.split_files(files, seed=3) == (train_f, val_f) and D.split_files(files, 4) != (train_f, val_f)
    for f in val_f:
        (d / f["path"]).write_text("Z" * 400)
    tok = forward.load_base(str(tiny_qwen)).tokenizer
    (z,) = tok.encode_plain("Z")
    seen = []
    ls = session.LoraSpec(rank=2, alpha=4, dropout=0.0)
    ts = TrainSpec(steps=8, batch=2, val_every=4, seed=3)
    p = session.prepare(str(tiny_qwen), ls, session.DataSpec(str(d), seq_len=16, val_windows=2), ts, True)
    base_loss = session.lm_loss(p, False)

    def spy(idx):
        seen.append(p.train.ids[idx].clone())
        return base_loss(idx)

    session.run(p, ls, ts, tmp_path / "o", spy, "finetune", quiet=True)
    trained = torch.cat(seen)
    assert len(seen) == 8 and not (trained == z).any()  # no held-out token ever reached a training step
    assert (p.val.ids == z).any()


def test_code_corpus_manifest_and_fingerprint(tmp_path):
    src = tmp_path / "lib"
    (src / "pkg").mkdir(parents=True)
    (src / "test").mkdir()
    (src / "a.py").write_text("a = 1\n")
    (src / "pkg" / "b.py").write_text("b = 2\n")
    (src / "test" / "t.py").write_text("skip\n")
    m = D.build_code_corpus(tmp_path / "out", src)
    assert [f["path"] for f in m["files"]] == ["a.py", "pkg/b.py"] and m["licence"] == "PSF-2.0"
    c = D.open_corpus(tmp_path / "out")
    assert c.fingerprint == m["fingerprint"]
    (tmp_path / "out" / "files" / "a.py").write_text("a = 3\n")
    with pytest.raises(AprError, match="differs from its manifest"):
        D.open_corpus(tmp_path / "out")
    (tmp_path / "few").mkdir()
    (tmp_path / "few" / "only.py").write_text("x\n")
    with pytest.raises(AprError, match="at least 2"):
        D.build_code_corpus(tmp_path / "out2", tmp_path / "few")


def test_kd_loss_is_zero_when_student_is_teacher_and_positive_otherwise():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 50, generator=gen)
    tgt = torch.randint(0, 50, (5,), generator=gen)
    v, j = torch.log_softmax(z / 2.0, -1).topk(8, -1)
    assert distill.kd_loss(z, tgt, j, v, 2.0, 1.0).abs().item() < 1e-5
    assert distill.kd_loss(torch.randn(5, 50, generator=gen), tgt, j, v, 2.0, 1.0).item() > 0.01
    ce = torch.nn.functional.cross_entropy(z, tgt).item()
    assert math.isclose(distill.kd_loss(z, tgt, j, v, 2.0, 0.0).item(), ce, rel_tol=1e-6)


def test_distill_end_to_end_and_vocab_mismatch(tiny_qwen, tiny_dir, corpus, tmp_path):
    from apr.cli import main
    from tiny_gguf import MERGES, write_tiny_gguf

    teacher = write_tiny_gguf(tiny_dir / "tiny-teacher.gguf", "qwen2", seed=7)
    args = ["--data", str(corpus), "--steps", "3", "--seq-len", "16", "--batch", "2", "--val-every", "3",
            "--top-k", "4", "--val-windows", "2"]
    assert main(["distill", "--teacher", str(teacher), "--student", str(tiny_qwen), "-o", str(tmp_path / "d"),
                 "--json", *args]) == 0
    stored = (tmp_path / "d" / distill.TOPK_FILE)
    assert stored.is_file() and (tmp_path / "d" / session.ADAPTER).is_file()
    mtime = stored.stat().st_mtime_ns
    assert main(["distill", "--teacher", str(teacher), "--student", str(tiny_qwen), "-o", str(tmp_path / "d"),
                 "--json", *args]) == 0
    assert stored.stat().st_mtime_ns == mtime  # computed once, reused
    import tiny_gguf

    old = list(MERGES)
    tiny_gguf.MERGES[:] = old[:-1]  # a different vocabulary (one merge fewer)
    try:
        other = write_tiny_gguf(tmp_path / "other-vocab.gguf", "qwen2")
    finally:
        tiny_gguf.MERGES[:] = old
    with pytest.raises(AprError, match="different vocabularies"):
        forward.check_same_vocab(forward.load_base(str(other)), forward.load_base(str(tiny_qwen)))


def test_bad_input_is_one_line(tiny_qwen, corpus, tmp_path, capsys):
    from apr.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.py").write_text("x = 1\n")
    (small / "b.py").write_text("y = 2\n")
    base = ["finetune", str(tiny_qwen), "-o", str(tmp_path / "o"), "--steps", "2", "--seq-len", "16"]
    cases = [([*base, "--data", str(corpus), "--targets", "attn_q,nope"], "names no module"),
             ([*base, "--data", str(empty)], "too small to split"),
             ([*base, "--data", str(small)], "too small"),
             ([*base, "--data", str(tmp_path / "missing")], "no such file"),
             ([*base, "--data", str(corpus), "--resume"], "no checkpoint"),
             ([*base, "--data", str(corpus), "--rank", "0"], "--rank")]
    for argv, msg in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err and "Traceback" not in err, err


def test_fused_head_cross_entropy_matches_the_full_logits(tiny_qwen):
    """Numerics 2's and 3's chunked head + cross entropy (and 3's addmm LoRA sum) give version 1's losses and
    adapter gradients."""
    ids = torch.randint(0, 200, (3, 41), generator=torch.Generator().manual_seed(4))
    b = forward.load_base(str(tiny_qwen))
    ad = lora.attach(b.model, ["attn_v", "ffn_up"], 4, 8.0, 0.0, 0, mode="dense")
    with torch.no_grad():
        for m in ad.values():
            m.lora_b.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))
    got = {}
    for v in (1, 2, 3):
        for m in ad.values():
            m.numerics = v  # the dropout is 0 here, so only the sum's form changes with the version
        per = forward.token_losses(b.model, ids, numerics=v)  # (3, 40)
        (per * torch.linspace(0.5, 2.0, 40)).sum().backward()  # unequal row weights reach dh * g
        got[v] = per.detach(), [m.lora_a.grad.clone() for m in ad.values()] + [m.lora_b.grad.clone() for m in ad.values()]
        for m in ad.values():
            m.lora_a.grad = m.lora_b.grad = None
    for v in (2, 3):
        assert got[1][0].shape == got[v][0].shape == (3, 40)
        assert torch.allclose(got[1][0], got[v][0], atol=1e-5, rtol=1e-5)
        for g1, g2 in zip(got[1][1], got[v][1]):
            assert g1.abs().sum() > 0 and (g1 - g2).abs().max() <= 1e-4 * g1.abs().max()  # float32 sums, reordered
    with torch.no_grad():  # validation: no gradient is formed, same losses
        assert torch.allclose(forward.token_losses(b.model, ids, numerics=2), got[2][0], atol=1e-6, rtol=1e-6)


def test_dropout16_rate_scale_and_seed():
    d = lora.Dropout16(0.05)
    x = torch.ones(400_000)
    torch.manual_seed(7)
    y = d(x)
    cut = round(0.05 * 65536)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - cut / 65536) < 4 * math.sqrt(0.05 * 0.95 / x.numel())  # 4 sigma
    assert y.unique().tolist() == [0.0, torch.tensor(65536 / (65536 - cut)).item()]  # float32 scale
    assert abs(y.mean().item() - 1.0) < 0.003  # inverted dropout keeps the expectation
    torch.manual_seed(7)
    assert torch.equal(d(x), y)  # the torch generator's seed decides the mask
    assert not torch.equal(d(x), y)
    d.eval()
    assert d(x) is x
    with pytest.raises(AprError, match="numerics"):
        lora.attach(None, ["attn_q"], 4, 8.0, 0.1, 0, numerics=4)  # refused before the model is read


def test_head_chunks_of_either_size_give_the_same_losses_and_gradient(tiny_qwen):
    """The head's chunk (64 rows in version 2, 512 in 3) changes only GEMM shapes: 150 rows in 64-row chunks
    (three, the last short) and in one chunk agree to float32 rounding, losses and dL/dh alike."""
    b = forward.load_base(str(tiny_qwen))
    lora.attach(b.model, ["attn_v"], 4, 8.0, 0.0, 0, mode="dense")
    head = b.model.output.base  # the FrozenLinear's QuantLinear, as token_losses passes it
    h = torch.randn(150, b.model.cfg.dim, generator=torch.Generator().manual_seed(2))
    t = torch.randint(0, 200, (150,), generator=torch.Generator().manual_seed(3))
    out = {}
    for chunk in (64, 512):
        x = h.clone().requires_grad_()
        per = forward._HeadCrossEntropy.apply(x, t, head, chunk)
        (per * torch.linspace(0.5, 2.0, 150)).sum().backward()
        out[chunk] = per.detach(), x.grad
    assert torch.allclose(out[64][0], out[512][0], atol=1e-5, rtol=1e-5)
    assert out[64][1].abs().sum() > 0 and torch.allclose(out[64][1], out[512][1], atol=1e-6, rtol=1e-4)
    assert forward.HEAD_CHUNK == {2: 64, 3: 512} and forward.NUMERICS == 3
