"""Generation: samplers, the token loop, and text streaming. Every command generates through here.

    make_sampler(...)       logits -> next token id
    generate_step(...)      prefill the prompt, then yield one token id at a time
    stream_generate(...)    prompt text -> GenerationResponse pieces, the last one carrying the result
    generate(...)           stream_generate run to the end -> GenerationResult
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from apr.errors import ContextOverflow

Sampler = Callable[[torch.Tensor], int]


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    prompt_tokens: list[int]
    rendered_prompt: str
    stop_reason: str  # "eos" | "stop" | "length"
    prefill_s: float  # start to first token (prefill and its sampling)
    decode_s: float  # first token to last token
    decode_steps: int  # forward passes in decode_s

    @property
    def tokens_generated(self) -> int:
        return len(self.tokens)

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_tokens) / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = self.decode_steps
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


@dataclass
class GenerationResponse:
    text: str  # new text since the previous response
    token: int | None
    result: GenerationResult | None = None  # set on the last response only


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: int | None = None) -> Sampler:
    """Greedy at temperature 0; otherwise temperature, then top-k, top-p and min-p filtering, seeded."""
    if temperature <= 0:
        return lambda logits: int(torch.argmax(logits))
    gen = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % (2**31)))

    def sample(logits: torch.Tensor) -> int:
        logits = logits.float() / temperature
        if top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if min_p > 0:
            probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
        if top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            # drop tokens once the mass before them already reaches top_p (always keep the first)
            drop = (torch.cumsum(sorted_p, 0) - sorted_p) >= top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))

    return sample


def apply_repeat_penalty(logits: torch.Tensor, history: list[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as llama.cpp and transformers): shrink positive logits, grow negative ones."""
    if penalty == 1.0 or not history:
        return logits
    ids = torch.tensor(sorted(set(history)), dtype=torch.long)
    vals = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def generate_step(model, prompt_ids: list[int], sampler: Sampler, max_tokens: int,
                  repeat_penalty: float = 1.0, repeat_last_n: int = 64) -> Iterator[int]:
    """Prefill `prompt_ids` in one batch, then decode one token per step; yields token ids."""
    model.setup_cache(len(prompt_ids) + max_tokens)
    history = list(prompt_ids)
    logits = model(torch.tensor(prompt_ids, dtype=torch.long), 0)[-1]  # (vocab,)
    pos = len(prompt_ids)
    for i in range(max_tokens):
        logits = apply_repeat_penalty(logits, history[-repeat_last_n:], repeat_penalty)
        token = sampler(logits)
        yield token
        if i + 1 == max_tokens:
            return  # no forward pass for a token nobody will read
        history.append(token)
        logits = model(torch.tensor([token], dtype=torch.long), pos)[-1]
        pos += 1


def prepare_prompt(lm, prompt: str, chat: bool | None = None, system: str | None = None) -> tuple[str, list[int]]:
    """The text fed to the model. An instruct model's prompt is wrapped in its template exactly once:
    `chat=None` wraps when the model has a template, `chat=False` never wraps, and a prompt that is
    already templated (starts with the template's start marker) is never wrapped again.
    Returns the text and its ids; templated text gets no extra BOS (the template writes its own)."""
    tok = lm.tokenizer
    wrap = tok.has_chat_template if chat is None else chat
    if chat is not True and tok.is_templated(prompt):  # an explicit chat=True wraps even a templated-looking prompt
        return prompt, tok.encode(prompt, add_bos=False)
    if not wrap:
        return prompt, tok.encode(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return prepare_messages(lm, messages)


def prepare_messages(lm, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> tuple[str, list[int]]:
    """A conversation rendered through the model's own template once -> (text, ids); no extra BOS."""
    # special tokens count only where the template writes them: one typed in a message stays text
    return lm.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)


def _stop_at(text: str, stops: list[str]) -> int:
    cut = [text.find(s) for s in stops if s and s in text]
    return min(cut) if cut else -1


def stream_generate(lm, prompt: str, *, chat: bool | None = None, system: str | None = None, max_tokens: int = 256,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                    repeat_penalty: float = 1.0, seed: int | None = None,
                    stop: list[str] | None = None) -> Iterator[GenerationResponse]:
    tok, ctx = lm.tokenizer, lm.config.context_length
    # a list of messages is a whole conversation (apr chat); a string, one prompt
    rendered, prompt_ids = (prepare_messages(lm, prompt) if isinstance(prompt, list)
                            else prepare_prompt(lm, prompt, chat, system))
    if not prompt_ids:
        raise ContextOverflow("the prompt is empty")
    if len(prompt_ids) >= ctx:
        raise ContextOverflow(f"the prompt has {len(prompt_ids)} tokens; the context holds {ctx}")
    max_tokens = max(0, min(max_tokens, ctx - len(prompt_ids)))
    sampler = make_sampler(temperature, top_k, top_p, min_p, seed)
    stops, hold = list(stop or []), max((len(s) for s in stop or []), default=1) - 1
    tokens: list[int] = []
    decoder = tok.stream_decoder()
    text, sent, reason = "", 0, "length"
    t0 = time.perf_counter()
    t_first = t_last = None
    steps = -1  # the first token costs the prefill, not a decode step
    for token in generate_step(lm.model, prompt_ids, sampler, max_tokens, repeat_penalty):
        t_last = time.perf_counter()
        t_first = t_first or t_last
        steps += 1
        if token in tok.stop_ids:
            reason = "eos"
            break
        tokens.append(token)
        text += decoder.push(token)  # only whole characters; a partial UTF-8 sequence waits
        cut = _stop_at(text, stops)
        if cut >= 0:
            text, reason = text[:cut], "stop"
            break
        ready = len(text) - hold  # hold back what may be the start of a stop string
        if ready > sent:
            yield GenerationResponse(text[sent:ready], token)
            sent = ready
    if reason != "stop":
        text += decoder.flush()
    t_first = t_first or time.perf_counter()
    t_last = t_last or t_first
    result = GenerationResult(text, tokens, prompt_ids, rendered, reason, t_first - t0, t_last - t_first, max(steps, 0))
    yield GenerationResponse(text[sent:], None, result)


def generate(lm, prompt: str, **kwargs) -> GenerationResult:
    for response in stream_generate(lm, prompt, **kwargs):
        if response.result is not None:
            return response.result
    raise AssertionError("stream_generate ended without a result")
