"""Generation: samplers, the token loop, and text streaming. Every command generates through here.

    prepare_prompt(...)     prompt text -> (rendered, ids): the model's template applied exactly once
    prepare_messages(...)   a conversation -> (rendered, ids)
    submit(...)             queue a prompt on the model's engine (apr.engine: the batched step) -> Request
    stream_generate(...)    prompt text -> GenerationResponse pieces, the last one carrying the result
    generate(...)           stream_generate run to the end -> GenerationResult

The token loop itself is the engine's (apr.engine.Engine.step): there is no second one here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from apr.engine.sampling import Sampler, apply_repeat_penalty, make_sampler  # noqa: F401  (re-exported)
from apr.errors import AprError


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    prompt_tokens: list[int]
    rendered_prompt: str
    stop_reason: str  # "eos" | "stop" | "length"
    prefill_s: float  # start to first token (prefill and its sampling)
    decode_s: float  # first token to last token
    decode_steps: int  # tokens decoded in decode_s (after the first)
    speculative: dict | None = None  # with speculation: drafted, accepted, acceptance_rate, passes, tokens_per_pass

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
    # special tokens count only where the template writes them: one typed in a message stays text; the
    # template variables go as one dict, so a client's chat_template_kwargs cannot set encode_chat's options
    return lm.tokenizer.encode_chat(messages, add_generation_prompt, template_kwargs)


def submit(lm, prompt: str, *, chat: bool | None = None, system: str | None = None, parallel: int = 1,
           max_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
           repeat_penalty: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
           cache_prompt: bool = True, constraint: tuple | None = None, speculative: str | None = None,
           draft_model: str | None = None, draft_max: int | None = None):
    """Queue one prompt on the model's engine (with at least `parallel` slots) -> (rendered prompt, Request).
    `constraint` (kind, spec) makes the output match a JSON schema, any JSON object, a regex or a grammar.
    `speculative` ("ngram" | "draft" | "off"; None: the engine's default) drafts tokens that one target pass
    verifies, the output unchanged (apr.engine.speculative); "draft" drafts with `draft_model`."""
    from apr.engine import SamplingParams, engine_for

    # a list of messages is a whole conversation (apr chat); a string, one prompt
    rendered, prompt_ids = (prepare_messages(lm, prompt) if isinstance(prompt, list)
                            else prepare_prompt(lm, prompt, chat, system))
    params = SamplingParams(max(0, max_tokens), temperature, top_k, top_p, min_p, repeat_penalty, seed,
                            list(stop or []), cache_prompt=cache_prompt, constraint=constraint,
                            speculative=speculative, draft_model=draft_model, draft_max=draft_max)
    eng = engine_for(lm, parallel)
    eng.max_queue = max(eng.max_queue, parallel)
    return rendered, eng.submit(prompt_ids, params)


def stream_generate(lm, prompt: str, **kwargs) -> Iterator[GenerationResponse]:
    """Generate through the engine (a batch of one unless other requests run): text pieces as they are ready,
    the last one carrying the GenerationResult. Keyword arguments: those of `submit`."""
    rendered, req = submit(lm, prompt, **kwargs)
    try:
        for ev in req.events():
            if ev.finish_reason is None:
                if ev.text:
                    yield GenerationResponse(ev.text, ev.token)
                continue
            if req.stop_reason == "error":
                raise AprError(f"generation failed: {req.error}")
            result = req.result()
            result.rendered_prompt = rendered
            yield GenerationResponse(ev.text, None, result)
    finally:
        if not req.done:  # the caller stopped reading (Ctrl-C, a closed pipe): free the slot
            req.cancel()


def generate(lm, prompt: str, **kwargs) -> GenerationResult:
    for response in stream_generate(lm, prompt, **kwargs):
        if response.result is not None:
            return response.result
    raise AssertionError("stream_generate ended without a result")
