"""The batched engine on tiny random models: batching, prefix cache, cancellation, logprobs, limits."""

from __future__ import annotations

import pytest
import torch

from apr.engine import Engine, QueueFull, SamplingParams, engine_for
from apr.errors import ContextOverflow
from apr.generate import generate
from apr.model.transformer import Segment
from apr.runtime import load_model

PROMPTS = ["the cat sat", "a dog ran far away", "hello world foo", "in the end there was a road"]


def _ids(lm, text):
    return lm.tokenizer.encode(text)


@pytest.mark.parametrize("arch,dtype,impl", [("qwen2", "float32", "torch-block"), ("llama", "float32", "torch-block"),
                                             ("qwen2", "bfloat16", "native-c-block"),
                                             ("llama", "bfloat16", "native-c-block")])
def test_batch_equals_sequential(tiny_dir, arch, dtype, impl):
    """4 sequences decoded together give each one's sequential greedy tokens, token for token."""
    from tiny_gguf import write_tiny_gguf

    from apr.quant import native

    if impl == "native-c-block" and not native.available():
        pytest.skip(f"native kernels unavailable: {native.status()}")
    path = write_tiny_gguf(tiny_dir / f"eng-{arch}-q8.gguf", arch, 8)  # Q8_0: every linear native-capable
    lm = load_model(path, dtype=dtype, backend="cpu", quiet=True)
    seq = [generate(lm, p, chat=False, max_tokens=16).tokens for p in PROMPTS]
    eng = Engine(lm, parallel=4)
    reqs = [eng.submit(_ids(lm, p), SamplingParams(max_tokens=16)) for p in PROMPTS]
    got = [r.result().tokens for r in reqs]
    assert got == seq
    assert eng.stats()["batch_sizes"].get(4, 0) >= 10  # they really ran together
    assert eng.step_impl == impl


def test_batched_native_step_rows_are_independent(tiny_dir):
    """The C block over M rows gives each row exactly its M = 1 logits (weights read once, same arithmetic)."""
    from tiny_gguf import write_tiny_gguf

    from apr.quant import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.status()}")
    lm = load_model(write_tiny_gguf(tiny_dir / "eng-rows.gguf", "qwen2", 8), dtype="bfloat16", backend="cpu",
                    quiet=True)
    m = lm.model
    m.setup_cache(64, slots=3)
    prompts = [[5, 77, 200], [9, 8, 7, 6, 5], [100]]
    for s, p in enumerate(prompts):
        m.step(torch.tensor(p), [Segment(s, 0, len(p))])
    k0, v0 = m.cache.k.clone(), m.cache.v.clone()
    segs = [Segment(s, len(p), 1) for s, p in enumerate(prompts)]
    assert m.step_impl(segs) == "native-c-block"
    together = m.step(torch.tensor([11, 12, 13]), segs)
    alone = []
    for s, seg in enumerate(segs):
        m.cache.k.copy_(k0), m.cache.v.copy_(v0)
        alone.append(m.step(torch.tensor([11 + s]), [seg]))
    assert torch.equal(together, torch.cat(alone))


def test_prefix_cache_is_hit_and_changes_nothing(tiny_qwen):
    lm = load_model(str(tiny_qwen), dtype="float32", backend="cpu", quiet=True)
    eng = Engine(lm, parallel=2)
    first = _ids(lm, "the cat sat on the mat and then")
    second = first + _ids(lm, " it slept")
    a = eng.submit(first, SamplingParams(max_tokens=6)).result()
    r = eng.submit(second, SamplingParams(max_tokens=6))
    b = r.result()
    assert r.cached_tokens >= len(first)  # the first prompt (and what it generated, where it matches) was reused
    fresh = Engine(lm, parallel=1).submit(second, SamplingParams(max_tokens=6, cache_prompt=False)).result()
    assert b.tokens == fresh.tokens and a.tokens
    assert eng.stats()["cached_tokens_total"] == r.cached_tokens


def test_direct_model_calls_invalidate_the_prefix_cache(tiny_qwen):
    lm = load_model(str(tiny_qwen), dtype="float32", backend="cpu", quiet=True)
    eng = Engine(lm, parallel=1)
    ids = _ids(lm, "the cat sat on the mat")
    want = eng.submit(ids, SamplingParams(max_tokens=5)).result().tokens
    lm.model.setup_cache(16)
    lm.model(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]), 0)  # what trace/parity do: overwrites slot 0
    r = eng.submit(ids, SamplingParams(max_tokens=5))
    assert r.result().tokens == want and r.cached_tokens == 0


def test_cancel_frees_the_slot_within_a_step(tiny_qwen):
    lm = load_model(str(tiny_qwen), dtype="float32", backend="cpu", quiet=True)
    eng = Engine(lm, parallel=1)
    r1 = eng.submit(_ids(lm, "the cat"), SamplingParams(max_tokens=200, stop_ids=set()))
    r2 = eng.submit(_ids(lm, "a dog"), SamplingParams(max_tokens=3, stop_ids=set()))
    eng.step()
    assert eng.stats()["active"] == 1 and eng.stats()["queue_depth"] == 1
    r1.cancel()
    eng.step()  # r1 leaves, r2 takes its slot
    assert r1.finish_reason == "cancelled" and eng.running == [r2]
    assert len(r2.result().tokens) == 3 and len(r1.tokens) < 200


def test_queue_limit_and_bad_prompts(tiny_qwen):
    lm = load_model(str(tiny_qwen), dtype="float32", backend="cpu", quiet=True)
    eng = Engine(lm, parallel=1, max_queue=2)
    for _ in range(2):
        eng.submit([1, 2], SamplingParams(max_tokens=1))
    with pytest.raises(QueueFull):
        eng.submit([1, 2], SamplingParams(max_tokens=1))
    with pytest.raises(ContextOverflow, match="empty"):
        eng.submit([], SamplingParams())
    with pytest.raises(ContextOverflow, match="context holds"):
        eng.submit([1] * lm.config.context_length, SamplingParams())


def test_echo_logprobs_match_a_full_forward(tiny_qwen):
    lm = load_model(str(tiny_qwen), dtype="float32", backend="cpu", quiet=True)
    ids = _ids(lm, "the cat sat on the mat")
    r = Engine(lm, parallel=1).submit(ids, SamplingParams(max_tokens=0, echo_logprobs=True, logprobs=2))
    r.result()
    assert r.finish_reason == "length" and r.tokens == []
    lm.model.setup_cache(len(ids))
    ref = torch.log_softmax(lm.model(torch.tensor(ids), 0, all_logits=True), -1)
    assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(ids)
    for i in range(1, len(ids)):
        lp, top = r.prompt_logprobs[i]
        assert lp == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4)
        assert top[0][0] == int(ref[i - 1].argmax()) and len(top) == 2


def test_sampled_neighbour_leaves_greedy_alone(tiny_qwen):
    """Sampling parameters are per sequence: a hot, seeded neighbour does not change a greedy sequence."""
    lm = load_model(str(tiny_qwen), dtype="float32", backend="cpu", quiet=True)
    want = generate(lm, "the cat sat", chat=False, max_tokens=12).tokens
    eng = engine_for(lm, 2)
    hot = eng.submit(_ids(lm, "a dog"), SamplingParams(max_tokens=12, temperature=1.5, seed=3))
    cold = eng.submit(_ids(lm, "the cat sat"), SamplingParams(max_tokens=12))
    assert cold.result().tokens == want
    again = Engine(lm, 2).submit(_ids(lm, "a dog"), SamplingParams(max_tokens=12, temperature=1.5, seed=3))
    assert hot.result().tokens == again.result().tokens  # seeded: reproducible whatever it ran beside


def test_background_loop_and_drain(tiny_qwen):
    lm = load_model(str(tiny_qwen), dtype="float32", backend="cpu", quiet=True)
    eng = Engine(lm, parallel=2)
    eng.start()
    reqs = [eng.submit(_ids(lm, p), SamplingParams(max_tokens=8, stop_ids=set())) for p in PROMPTS]
    eng.stop(drain=True, timeout=60)
    assert all(r.done and len(r.tokens) == 8 for r in reqs)
    with pytest.raises(QueueFull, match="shutting down"):
        eng.submit([1, 2], SamplingParams())


def test_chunked_prefill_interleaves_with_decode(tiny_qwen, monkeypatch):
    """A long prompt is prefilled a chunk per step while running sequences keep decoding; its echo logprobs and
    greedy tokens are those of a one-piece prefill."""
    import apr.engine.engine as engine_mod

    lm = load_model(str(tiny_qwen), dtype="float32", backend="cpu", quiet=True)
    long_ids = _ids(lm, "the cat sat on the mat and then it slept for a long long time in the sun")
    whole = Engine(lm, parallel=1).submit(long_ids, SamplingParams(max_tokens=4, echo_logprobs=True, logprobs=1))
    whole.result()
    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", 4)
    eng = Engine(lm, parallel=2)
    runner = eng.submit(_ids(lm, "a dog"), SamplingParams(max_tokens=40, stop_ids=set()))
    eng.step()
    chunked = eng.submit(long_ids, SamplingParams(max_tokens=4, echo_logprobs=True, logprobs=1))
    before = len(runner.tokens)
    eng.step(), eng.step()
    assert chunked.fed == 8 and not chunked.tokens and len(runner.tokens) == before + 2  # it kept decoding
    chunked.result()
    assert chunked.tokens == whole.tokens
    # float32 sums over 4-row chunks and over the whole prompt run in another order; the tiny random model's
    # logits are in the hundreds, so that is ~1e-4 relative at worst (8e-5 seen on an AMX box: -105.6437 vs
    # -105.6350); a chunk attending to the wrong positions moves them by whole units. Same top-1 everywhere.
    assert [p is None for p in chunked.prompt_logprobs] == [p is None for p in whole.prompt_logprobs]
    for c, w in zip(chunked.prompt_logprobs, whole.prompt_logprobs):
        if c is not None:
            assert c[0] == pytest.approx(w[0], rel=2e-4, abs=1e-3) and c[1][0][0] == w[1][0][0]


def test_reprepared_weights_invalidate_the_prefix_cache(tiny_qwen):
    """Swapping a model's weights (as the qa tests' faults do) must not reuse KV that the old weights computed."""
    lm = load_model(str(tiny_qwen), dtype="float32", backend="cpu", quiet=True)
    eng = Engine(lm, parallel=1)
    ids = _ids(lm, "the cat sat on the mat")
    eng.submit(ids, SamplingParams(max_tokens=4)).result()
    mod = lm.model.blk[0].attn_q
    raw = mod.raw
    mod.raw, mod.prepared = raw.flip(0).clone(), None  # another model
    mod.materialize(torch.float32)
    swapped = eng.submit(ids, SamplingParams(max_tokens=4))
    swapped.result()
    fresh = Engine(lm, 1).submit(ids, SamplingParams(max_tokens=4, cache_prompt=False)).result()
    mod.raw, mod.prepared = raw, None
    mod.materialize(torch.float32)
    assert swapped.cached_tokens == 0 and swapped.tokens == fresh.tokens


@pytest.mark.parametrize("qtype,dtype", [(8, "bfloat16"), (12, "bfloat16"), (8, "float32")])  # Q8_0, Q4_K
def test_batched_prefill_gives_each_prompt_its_own_logits(tiny_dir, qtype, dtype):
    """Prompts prefilled side by side in one forward get bit for bit the logits and KV rows they get alone,
    whatever kernel their length picks alone (the native row kernel for a few rows, tiles + GEMM for many):
    a GEMM over everyone's rows would round each prompt otherwise."""
    from tiny_gguf import write_tiny_gguf

    from apr.quant import linear, native

    if dtype != "float32" and not native.available():
        pytest.skip(f"native kernels unavailable: {native.status()}")
    lm = load_model(write_tiny_gguf(tiny_dir / f"eng-prefill-{qtype}.gguf", "qwen2", qtype), dtype=dtype,
                    backend="cpu", quiet=True)
    m, few = lm.model, linear.few_rows_max()
    lens = [3, few, few + 1, 2 * native.MAX_ROWS + 5, 7]  # both sides of the crossover on every CPU class
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 200, (n,), generator=g) for n in lens]
    m.setup_cache(256, slots=len(lens))
    alone = torch.cat([m.step(p, [Segment(s, 0, len(p))]) for s, p in enumerate(prompts)])
    k_alone, v_alone = m.cache.k.clone(), m.cache.v.clone()
    m.cache.k.zero_(), m.cache.v.zero_()
    together = m.step(torch.cat(prompts), [Segment(s, 0, len(p)) for s, p in enumerate(prompts)])
    assert torch.equal(together, alone)
    assert torch.equal(m.cache.k, k_alone) and torch.equal(m.cache.v, v_alone)


def test_engine_prefills_waiting_prompts_in_one_forward(tiny_dir):
    """Requests that arrive together are prefilled by one forward, and still give their sequential tokens."""
    from tiny_gguf import write_tiny_gguf

    from apr.quant import native

    dtype = "bfloat16" if native.available() else "float32"
    lm = load_model(write_tiny_gguf(tiny_dir / "eng-prefill-one.gguf", "qwen2", 8), dtype=dtype, backend="cpu",
                    quiet=True)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (4, 30, 70, 11)]
    one = Engine(lm, parallel=1)  # one prompt at a time, each prefilled alone
    seq = [one.submit(p, SamplingParams(max_tokens=8, cache_prompt=False)).result().tokens for p in prompts]
    eng = Engine(lm, parallel=4)
    reqs = [eng.submit(p, SamplingParams(max_tokens=8)) for p in prompts]
    assert [r.result().tokens for r in reqs] == seq
    assert eng.stats()["prefill_forwards_total"] == 1
