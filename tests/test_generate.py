"""Samplers and the generation loop on tiny models."""

from __future__ import annotations

import torch

from apr.generate import apply_repeat_penalty, generate, make_sampler
from apr.runtime import load_model


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -2.0, 2.9])
    assert make_sampler(0.0)(logits) == 1


def test_seeds_reproduce_and_differ():
    logits = torch.zeros(1000)  # uniform: every draw is random

    def draw(seed):
        sample = make_sampler(1.0, seed=seed)
        return [sample(logits) for _ in range(10)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_top_k_top_p_min_p_restrict_support():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    seen = lambda s: {s(logits) for _ in range(200)}
    assert seen(make_sampler(1.0, top_k=2, seed=0)) == {0, 1}
    assert seen(make_sampler(1.0, top_p=0.7, seed=0)) == {0, 1}  # 0.5 < 0.7, 0.5+0.3 >= 0.7
    assert seen(make_sampler(1.0, min_p=0.25, seed=0)) == {0, 1, 2}  # 0.15 >= 0.25*0.5
    assert seen(make_sampler(1.0, top_k=1, seed=0)) == {0}


def test_repeat_penalty():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repeat_penalty(logits, [0, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert apply_repeat_penalty(logits, [0], 1.0) is logits


def test_generate_result_and_stop_strings(tiny_qwen):
    lm = load_model(str(tiny_qwen), dtype="float32")
    r = generate(lm, "the cat", chat=False, max_tokens=12)
    assert r.tokens_generated == len(r.tokens) <= 12
    assert r.rendered_prompt == "the cat"
    assert r.text == lm.tokenizer.decode(r.tokens)
    if r.text:  # a stop string taken from the greedy text cuts it there
        stop = r.text[len(r.text) // 2 :][:2]
        cut = generate(lm, "the cat", chat=False, max_tokens=12, stop=[stop])
        assert cut.stop_reason == "stop" and stop not in cut.text
        assert r.text.startswith(cut.text)


def test_state_isolation(tiny_llama):
    """A, then B, then A again: the cache from B must not leak into A."""
    lm = load_model(str(tiny_llama), dtype="float32")
    a = generate(lm, "the cat sat", chat=False, max_tokens=8).tokens
    b = generate(lm, "in the end there was a long winding road", chat=False, max_tokens=8).tokens
    assert generate(lm, "the cat sat", chat=False, max_tokens=8).tokens == a
    assert a != b
