"""`apr serve` through the official openai client: chat and completions, sync and async, streaming and not,
logprobs; batched greedy output equals sequential `generate`; a disconnect frees its slot; the prefix cache
is hit on a second turn. The server runs on a loopback port over the tiny float32 model."""

from __future__ import annotations

import asyncio

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from test_serve_harness import LiveServer, wait_for  # noqa: E402

from apr.generate import generate  # noqa: E402
from apr.runtime import load_model  # noqa: E402

PROMPTS = ["def add(a, b):", "the theme is", "Write a haiku about tea.", "in the beginning"]


@pytest.fixture(scope="module")
def ref_lm(tiny_qwen):
    """A second copy of the model for the sequential reference runs (the server's engine owns its own)."""
    return load_model(str(tiny_qwen), dtype="float32", backend="cpu", quiet=True)


@pytest.fixture(scope="module")
def live(tiny_qwen):
    lm = load_model(str(tiny_qwen), dtype="float32", backend="cpu", quiet=True)
    server = LiveServer(lm, parallel=4, max_queue=16)
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, prompt: str, max_tokens: int = 12, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=max_tokens, extra_body={"return_token_ids": True}, **kw)


def test_models_lists_the_one_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny"]


def test_chat_plain_matches_generate_and_stream_matches_plain(client, ref_lm):
    ref = generate(ref_lm, PROMPTS[0], chat=True, max_tokens=12)
    resp = chat(client, PROMPTS[0])
    choice = resp.choices[0]
    assert choice.model_extra["token_ids"] == ref.tokens
    assert choice.message.content == ref.text
    assert resp.model_extra["prompt_token_ids"] == ref.prompt_tokens
    assert resp.usage.prompt_tokens == len(ref.prompt_tokens)
    assert resp.usage.completion_tokens == len(ref.tokens)
    assert choice.finish_reason == ("length" if ref.stop_reason == "length" else "stop")

    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.tokens)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason


def test_four_concurrent_requests_equal_four_sequential_runs(live, ref_lm):
    """Continuous batching must not change greedy output: token for token on the float32 model."""
    refs = [generate(ref_lm, p, chat=True, max_tokens=24) for p in PROMPTS]
    before = live.engine.stats()

    async def run_all():
        aclient = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        return await asyncio.gather(*(aclient.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": p}], max_tokens=24, temperature=0,
            extra_body={"return_token_ids": True}) for p in PROMPTS))

    responses = asyncio.run(run_all())
    for ref, resp in zip(refs, responses):
        assert resp.choices[0].model_extra["token_ids"] == ref.tokens
        assert resp.choices[0].message.content == ref.text
    after = live.engine.stats()
    generated = after["generated_tokens_total"] - before["generated_tokens_total"]
    assert generated >= sum(len(r.tokens) for r in refs)  # (an end-of-turn token is sampled, not returned)
    # decoded together: fewer forward steps than tokens (one step per token would mean no batching)
    assert after["steps_total"] - before["steps_total"] < sum(len(r.tokens) for r in refs)


def test_async_streaming_chat(live, ref_lm):
    ref = generate(ref_lm, PROMPTS[1], chat=True, max_tokens=10)

    async def run():
        aclient = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = await aclient.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=10, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert asyncio.run(run()) == ref.text


def test_chat_logprobs_are_the_models(client, ref_lm):
    resp = chat(client, PROMPTS[2], max_tokens=6, logprobs=True, top_logprobs=3)
    ids = resp.choices[0].model_extra["token_ids"]
    content = resp.choices[0].logprobs.content
    assert len(content) == len(ids) == 6
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy picks the top-1
        assert entry.token == entry.top_logprobs[0].token and entry.logprob <= 0
    # the first generated token's logprob, recomputed with one forward pass over the prompt
    prompt = resp.model_extra["prompt_token_ids"]
    ref_lm.model.setup_cache(len(prompt) + 1)
    with torch.no_grad():
        logits = ref_lm.model(torch.tensor(prompt), 0)[-1].float()
    assert content[0].logprob == pytest.approx(float(torch.log_softmax(logits, -1)[ids[0]]), abs=1e-3)


def _prompt_logprobs(lm, ids: list[int]) -> list[float]:
    lm.model.setup_cache(len(ids) + 1)
    with torch.no_grad():
        lp = torch.log_softmax(lm.model(torch.tensor(ids), 0, all_logits=True).float(), -1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_completions_echo_logprobs_score_the_prompt(client, ref_lm, max_tokens):
    """lm-evaluation-harness's loglikelihood request: token ids, echo, logprobs=1, max_tokens 0 or 1."""
    ids = ref_lm.tokenizer.encode("the theme is in the details")
    resp = client.completions.create(model="tiny", prompt=[ids], max_tokens=max_tokens, echo=True, logprobs=1,
                                     temperature=0)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + max_tokens == len(lp.token_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(_prompt_logprobs(ref_lm, ids), abs=1e-3)
    for tok_lp, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert len(top) == 1 and max(top.values()) >= tok_lp - 1e-6
    assert resp.choices[0].text.startswith(ref_lm.tokenizer.decode(ids))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert resp.usage.prompt_tokens == len(ids)


def test_lm_eval_harness_loglikelihood_request(live, ref_lm):
    """The payload lm-evaluation-harness's local-completions model sends for loglikelihood (a batch of token-id
    prompts, max_tokens 1, logprobs 1, echo), read back the way its parse_logprobs reads it."""
    tok = ref_lm.tokenizer
    pairs = [("the theme is", " in the details"), ("def add(a, b):", " return a + b")]
    batch = [tok.encode(c) + tok.encode(x) for c, x in pairs]
    body = {"model": "tiny", "prompt": batch, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    out = httpx.post(live.url + "/v1/completions", json=body, timeout=60).json()
    for choice, (ctx, _), ids in zip(sorted(out["choices"], key=lambda c: c["index"]), pairs, batch):
        n = len(tok.encode(ctx))
        lps, tops = choice["logprobs"]["token_logprobs"][n:-1], choice["logprobs"]["top_logprobs"][n:-1]
        ref = _prompt_logprobs(ref_lm, ids)[n - 1:]
        assert sum(lps) == pytest.approx(sum(ref), abs=1e-3)
        ref_lm.model.setup_cache(len(ids) + 1)
        with torch.no_grad():
            argmax = ref_lm.model(torch.tensor(ids), 0, all_logits=True).argmax(-1).tolist()
        greedy = all(lp == max(top.values()) for lp, top in zip(lps, tops))  # lm-eval's exact comparison
        assert greedy == all(argmax[i - 1] == ids[i] for i in range(n, len(ids)))


def test_completions_string_prompt_and_stream(client, ref_lm):
    ref = generate(ref_lm, PROMPTS[3], chat=False, max_tokens=10)
    resp = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=10, temperature=0,
                                     extra_body={"return_token_ids": True})
    assert resp.choices[0].model_extra["token_ids"] == ref.tokens and resp.choices[0].text == ref.text
    stream = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == ref.text
    two = client.completions.create(model="tiny", prompt=[PROMPTS[3], PROMPTS[0]], max_tokens=4, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == resp.choices[0].text[:len(two.choices[0].text)]


def test_seed_and_stop(client, ref_lm):
    """A seeded sampled request repeats itself; a stop string ends the text before it, as `generate` does."""
    a, b = (chat(client, PROMPTS[2], max_tokens=12, temperature=0.9, seed=11).choices[0] for _ in range(2))
    assert a.model_extra["token_ids"] == b.model_extra["token_ids"]
    full = generate(ref_lm, PROMPTS[0], chat=True, max_tokens=12).text
    stop = full[3:5]
    ref = generate(ref_lm, PROMPTS[0], chat=True, max_tokens=12, stop=[stop])
    got = chat(client, PROMPTS[0], max_tokens=12, stop=[stop]).choices[0]
    assert got.message.content == ref.text == full[:full.index(stop)] and got.finish_reason == "stop"


def test_prefix_cache_is_hit_on_the_second_turn(client):
    first = [{"role": "system", "content": "You are terse. " * 8}, {"role": "user", "content": "Name a colour."}]
    one = client.chat.completions.create(model="tiny", messages=first, max_tokens=8, temperature=0)
    second = first + [{"role": "assistant", "content": one.choices[0].message.content},
                      {"role": "user", "content": "Another one."}]
    two = client.chat.completions.create(model="tiny", messages=second, max_tokens=8, temperature=0)
    cached = two.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < two.usage.prompt_tokens
    assert cached >= one.usage.prompt_tokens - 1  # at least the first turn's prompt is reused


def test_a_disconnect_frees_the_slot(live):
    """Close a stream after its first token: the engine request is cancelled and its slot freed."""
    body = {"model": "tiny", "prompt": "hello there", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", live.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            next(r.iter_lines())
            req = live.submitted[-1]
            assert live.engine.stats()["active"] >= 1
    wait_for(lambda: req.finish_reason is not None, what="the cancelled request to finish")
    assert req.finish_reason == "cancelled" and len(req.tokens) < 400
    wait_for(lambda: live.engine.stats()["active"] == 0, what="the slot to be freed")


def test_a_disconnect_before_the_answer_frees_the_slot(live):
    """The same for a non-streaming request: the server notices the closed connection."""
    body = {"model": "tiny", "prompt": "hello there", "max_tokens": 400, "temperature": 0}
    n = len(live.submitted)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(live.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.05))
    req = wait_for(lambda: live.submitted[n] if len(live.submitted) > n else None, what="the request")
    wait_for(lambda: req.finish_reason is not None, what="the request to end")
    assert req.finish_reason == "cancelled" and len(req.tokens) < 400
    wait_for(lambda: live.engine.stats()["active"] == 0, what="the slot to be freed")


@pytest.mark.real
def test_real_model_concurrent_greedy_equals_sequential():
    """On the 0.5B (its default dtype): 4 concurrent greedy requests give the sequential tokens, token for
    token: prompts prefilled together and sequences decoded together are each computed as they are alone."""
    from conftest import REAL_05B, real_model

    path = real_model(REAL_05B)
    ref_lm = load_model(str(path), quiet=True)
    refs = [generate(ref_lm, p, chat=True, max_tokens=24) for p in PROMPTS]
    server = LiveServer(load_model(str(path), quiet=True), parallel=4)
    try:
        async def run_all():
            aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
            return await asyncio.gather(*(aclient.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": p}], max_tokens=24, temperature=0, logprobs=True,
                top_logprobs=2, extra_body={"return_token_ids": True}) for p in PROMPTS))

        responses = asyncio.run(run_all())
    finally:
        server.close()
    for ref, resp in zip(refs, responses):  # batched prefill and decode give every row its alone arithmetic
        assert resp.choices[0].model_extra["token_ids"] == ref.tokens, (ref.text, resp.choices[0].message.content)
