"""Speculative decoding (apr.engine.speculative): drafts verified in the engine's one step, the output unchanged.

Greedy: token for token the plain decode's output, on tiny float32 models of both architectures (the torch
block) and a bfloat16 one (the C block's multi-row step over one slot), with drafts that are right, wrong and
mixed, alone and batched with other sequences. Sampling: the accept/reject rule reproduces the target's
distribution. A draft model with another vocabulary is refused."""

from __future__ import annotations

import pytest
import torch

from apr.engine import Engine, SamplingParams
from apr.engine import speculative as spec
from apr.engine.sampling import make_sampler
from apr.errors import AprError
from apr.generate import generate
from apr.runtime import load_model

PROMPTS = ["the cat sat on the mat", "hello world hello", "in the end there was a road"]
N = 16


@pytest.fixture(scope="module")
def models(tiny_dir):
    from tiny_gguf import write_tiny_gguf

    out = {}
    for arch in ("qwen2", "llama"):
        out[arch] = write_tiny_gguf(tiny_dir / f"spec-{arch}.gguf", arch, 8)
        out[arch + "-other"] = write_tiny_gguf(tiny_dir / f"spec-{arch}-s1.gguf", arch, 8, seed=1)
    return out


def _plain(lm, prompt, n=N, **kw):
    return generate(lm, prompt, chat=False, max_tokens=n, cache_prompt=False, **kw)


def test_ngram_draft_looks_up_the_latest_earlier_occurrence():
    hist = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert spec.ngram_draft(hist, 3) == [7, 8, 5]  # the nearest earlier "1 2 3" is followed by 7 8 5
    assert spec.ngram_draft(hist, 1) == [7]
    assert spec.ngram_draft([1, 2, 3, 4], 4) == []  # nothing repeats
    assert spec.ngram_draft([5, 6, 5, 6], 4) == [5, 6]  # what follows runs up to the end of the history


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_is_token_identical_float32(models, arch):
    """A draft model that is the target itself (every draft right), another model (mostly wrong), and
    n-gram lookup all give the plain greedy tokens."""
    lm = load_model(models[arch], dtype="float32", backend="cpu", quiet=True)
    for prompt in PROMPTS[:2]:
        want = _plain(lm, prompt).tokens
        same = _plain(lm, prompt, speculative="draft", draft_model=str(models[arch]), draft_max=3)
        other = _plain(lm, prompt, speculative="draft", draft_model=str(models[arch + "-other"]), draft_max=3)
        ngram = _plain(lm, prompt, speculative="ngram", draft_max=4)
        assert same.tokens == want and other.tokens == want and ngram.tokens == want
        if len(want) > 4:  # really speculated: whole drafts kept, several tokens per pass
            assert same.speculative["acceptance_rate"] == 1.0 and same.speculative["tokens_per_pass"] > 2
            assert other.speculative["drafted"] > 0


def _oracle(monkeypatch, truth: dict, wrong_every: int):
    """n-gram drafting replaced by the known continuation, every `wrong_every`-th drafted token corrupted:
    acceptance and rollback both happen, at known places."""
    calls = {"n": 0}

    def draft(hist, k):
        for prompt_ids, toks in truth.values():
            if hist[: len(prompt_ids)] == prompt_ids:
                done = len(hist) - len(prompt_ids)
                out = list(toks[done : done + k])
                for i in range(len(out)):
                    calls["n"] += 1
                    if calls["n"] % wrong_every == 0:
                        out[i] = (out[i] + 1) % 200
                return out
        return []

    monkeypatch.setattr(spec, "ngram_draft", draft)


@pytest.mark.parametrize("arch,dtype,impl", [("qwen2", "float32", "torch-block"), ("llama", "float32", "torch-block"),
                                             ("qwen2", "bfloat16", "native-c-block")])
def test_rollback_past_the_first_rejection(models, monkeypatch, arch, dtype, impl):
    """Drafts right and wrong, three sequences batched with one that does not speculate: every sequence gets
    its plain tokens, the rejected rows' KV is never trusted (fed, and the prefix cache, stop before them)."""
    from apr.quant import native

    if impl == "native-c-block" and not native.available():
        pytest.skip(f"native kernels unavailable: {native.status()}")
    lm = load_model(models[arch], dtype=dtype, backend="cpu", quiet=True)
    truth = {}
    for p in PROMPTS:
        ids = lm.tokenizer.encode(p)
        truth[p] = (ids, _plain(lm, p).tokens)
    _oracle(monkeypatch, truth, wrong_every=3)
    eng = Engine(lm, parallel=4)
    modes = ["ngram", "ngram", "off"]
    reqs = [eng.submit(truth[p][0], SamplingParams(max_tokens=N, speculative=m, draft_max=4, cache_prompt=False))
            for p, m in zip(PROMPTS, modes)]
    got = [r.result().tokens for r in reqs]
    assert got == [truth[p][1] for p in PROMPTS]
    assert eng.step_impl == impl
    st = eng.stats()
    assert 0 < st["spec_accepted_total"] < st["spec_drafted_total"]  # both kept and rejected drafts
    assert st["tokens_per_pass"] > 1.0
    assert reqs[2].spec_drafted == 0  # "off" really did not speculate
    for r in reqs:  # the slot remembers exactly the real tokens whose KV it holds
        held = eng.slot_tokens[r.slot]
        assert held == (r.prompt_ids + r.tokens)[: len(held)] and len(held) == r.fed
    # a follow-up that reuses a speculated slot's prefix decodes as a fresh engine would
    r0 = reqs[0]
    follow = r0.prompt_ids + r0.tokens[:5]
    again = eng.submit(follow, SamplingParams(max_tokens=8))
    again_tokens = again.result().tokens  # before another load re-prepares the weights (that empties the cache)
    assert again.cached_tokens > len(r0.prompt_ids)
    fresh = Engine(load_model(models[arch], dtype=dtype, backend="cpu", quiet=True)).submit(
        follow, SamplingParams(max_tokens=8, cache_prompt=False))
    assert again_tokens == fresh.result().tokens


def test_accept_rule_keeps_the_target_distribution():
    """min(1, p/q) acceptance with residual resampling draws from p, whatever q proposes; a point-mass q
    (n-gram) too. 20000 draws per case: total variation from p well under 0.02 (a rule that always accepted
    the draft would sit at about 0.5)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    sampler = make_sampler(1.0, seed=1)
    p = torch.softmax(logits, -1)
    q = torch.softmax(torch.tensor([0.0, 2.0, 0.0, 1.0, 0.0, -2.0]), -1)
    for proposal in ("model", "point"):
        counts = torch.zeros(6)
        for _ in range(20000):
            if proposal == "model":
                d, qd = int(torch.multinomial(q, 1, generator=gen)), q
            else:
                d, qd = 1, None  # always proposes token 1
            token, _ = spec.choose(sampler, logits, d, qd)
            counts[token] += 1
        tv = 0.5 * float((counts / counts.sum() - p).abs().sum())
        assert tv < 0.02, (proposal, tv, counts)


def test_sampling_with_speculation_runs_and_accepts(models, monkeypatch):
    """Sampled (temperature 0.8) generation with drafts: seeded, reproducible, and drafts are accepted at
    about the rate the target gives them (here the drafts are the greedy continuation)."""
    lm = load_model(models["qwen2"], dtype="float32", backend="cpu", quiet=True)
    ids = lm.tokenizer.encode(PROMPTS[0])
    truth = {PROMPTS[0]: (ids, _plain(lm, PROMPTS[0], n=64).tokens)}
    _oracle(monkeypatch, truth, wrong_every=10**9)
    a = _plain(lm, PROMPTS[0], n=12, temperature=0.8, seed=3, speculative="ngram", draft_max=3)
    b = _plain(lm, PROMPTS[0], n=12, temperature=0.8, seed=3, speculative="ngram", draft_max=3)
    assert a.tokens == b.tokens
    assert a.speculative["drafted"] > 0


def test_refuses_a_draft_with_another_vocabulary(models, tiny_dir, monkeypatch):
    import tiny_gguf

    monkeypatch.setattr(tiny_gguf, "MERGES", tiny_gguf.MERGES[:-1])  # one token fewer: ids mean other text
    other = tiny_gguf.write_tiny_gguf(tiny_dir / "spec-othervocab.gguf", "qwen2", 8)
    lm = load_model(models["qwen2"], dtype="float32", backend="cpu", quiet=True)
    with pytest.raises(AprError, match="different vocabulary"):
        _plain(lm, "hi", speculative="draft", draft_model=str(other))
    with pytest.raises(AprError, match="unknown speculative mode"):
        _plain(lm, "hi", speculative="guess")


def test_cli_reports_acceptance(models, capsys):
    import json

    from apr.cli import main

    rc = main(["run", str(models["qwen2"]), "--raw", "-p", "hello world hello", "-n", "8", "--dtype", "float32",
               "--backend", "cpu", "--speculative", "draft", "--draft-model", str(models["qwen2"]), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    s = out["speculative"]
    assert s["mode"] == "draft" and s["drafted"] >= s["accepted"] >= 0 and s["passes"] >= 1


@pytest.mark.real
def test_real_05b_greedy_identical_with_ngram():
    """The 0.5B (the C block, bfloat16) editing code: n-gram speculation keeps the greedy tokens."""
    from conftest import REAL_05B, real_model

    lm = load_model(real_model(REAL_05B), backend="cpu", quiet=True)
    code = "def area(w, h):\n    return w * h\n"
    prompts = [f"Rename the function to rect_area:\n{code}", f"Add a docstring:\n{code}",
               "Rewrite with a for loop:\ndef total(xs):\n    return sum(xs)\n"]
    for prompt in prompts:
        want = generate(lm, prompt, max_tokens=40, cache_prompt=False).tokens
        got = generate(lm, prompt, max_tokens=40, cache_prompt=False, speculative="ngram")
        assert got.tokens == want
        assert got.speculative["drafted"] > 0
