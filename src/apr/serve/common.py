"""What the OpenAI and Ollama routes share: engine parameters, submitting, reading a request's events
(cancelling it when the client goes away) and logprob formatting."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from fastapi import Request as HTTPRequest

from apr.errors import ContextOverflow
from apr.serve.errors import APIError


@dataclass
class Outcome:
    """A request read to its end: the events' text, tokens and logprobs gathered."""
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list]] = field(default_factory=list)  # (id, logprob, top)
    finish_reason: str = "length"
    usage: dict = field(default_factory=dict)
    first_token_s: float | None = None


def sampling_params(*, max_tokens: int, temperature=None, top_p=None, top_k=None, min_p=None, repeat_penalty=None,
                    seed=None, stop=None, logprobs: int | None = None, echo_logprobs: bool = False,
                    constraint: tuple | None = None):
    from apr.engine import SamplingParams

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0 if temperature is None else float(temperature),
        top_k=top_k or 0, top_p=1.0 if top_p is None else float(top_p), min_p=min_p or 0.0,
        repeat_penalty=1.0 if repeat_penalty is None else float(repeat_penalty),
        seed=seed, stop=list(stop or []), logprobs=logprobs, echo_logprobs=echo_logprobs, constraint=constraint)


def openai_constraint(response_format: dict | None) -> tuple | None:
    """OpenAI's response_format -> the engine's (kind, spec): json_object, or json_schema's `schema`."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object", None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise APIError(400, "response_format.json_schema must be an object with a `schema` object",
                           "response_format.json_schema")
        return "json_schema", spec.get("schema", {})
    raise APIError(400, f"response_format type '{kind}' is not supported (text, json_object, json_schema)",
                   "response_format.type", "unsupported")


def ollama_constraint(fmt) -> tuple | None:
    """Ollama's `format`: "json" (any JSON object) or a JSON schema."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return "json_object", None
    if isinstance(fmt, dict):
        return "json_schema", fmt
    raise APIError(400, 'format must be "json" or a JSON schema object', "format")


def submit(state, ids: list[int], params, param: str = "messages"):
    """engine.submit with its refusals as HTTP answers: a full queue is 503 + Retry-After, a prompt
    that does not fit the context is a 400 naming the counts."""
    from apr.engine import QueueFull

    from apr.engine.constrain import BadGrammar

    try:
        return state.engine.submit(ids, params)
    except BadGrammar as e:
        raise APIError(400, str(e), None, "invalid_schema") from None
    except QueueFull as e:
        raise APIError(503, f"the server is busy: {e}", None, "queue_full", {"Retry-After": str(state.retry_after)}) from None
    except ContextOverflow as e:
        raise APIError(400, str(e), param, "context_length_exceeded") from None


def default_max_tokens(state, n_prompt: int) -> int:
    """No limit asked: the server's default (--max-tokens), never past the context. A bound, because the engine
    sizes each slot's KV cache for prompt + limit, and a 32k-context model would otherwise reserve all of it."""
    return max(1, min(state.default_max_tokens, state.lm.config.context_length - n_prompt))


def check_ids(state, ids: list[int], param: str) -> None:
    n = state.lm.tokenizer.vocab_size
    bad = next((i for i in ids if not 0 <= i < n), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary ({n} tokens)", param, "invalid_value")


async def _until_disconnect(http: HTTPRequest) -> None:
    # After the body is read, the server's next message is http.disconnect (or nothing until the reply is sent).
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def collect(req, http: HTTPRequest | None) -> Outcome | None:
    """Read all events of an engine request; None if the client disconnected first (the request is cancelled,
    so its slot frees within one step)."""
    task = asyncio.ensure_future(_gather(req))
    watch = asyncio.ensure_future(_until_disconnect(http)) if http is not None else None
    try:
        done, _ = await asyncio.wait([t for t in (task, watch) if t], return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        req.cancel()
        task.cancel()
        return None
    finally:
        if watch:
            watch.cancel()
        if not task.done():
            req.cancel()
            task.cancel()


async def _gather(req) -> Outcome:
    out, t0 = Outcome(), time.perf_counter()
    async for ev in req.aevents():
        absorb(out, ev, t0)
    return out


def absorb(out: Outcome, ev, t0: float) -> None:
    """Fold one event into an Outcome (also used while streaming, for the final usage and stats)."""
    if ev.token is not None:
        out.tokens.append(ev.token)
        out.first_token_s = out.first_token_s or time.perf_counter() - t0
        if ev.logprob is not None:
            out.logprobs.append((ev.token, ev.logprob, list(ev.top_logprobs or [])))
    out.text += ev.text or ""
    if ev.finish_reason:
        out.finish_reason = ev.finish_reason
        out.usage = dict(ev.usage or {})


def raise_if_failed(req, out: Outcome) -> None:
    if out.finish_reason == "error":
        raise APIError(500, f"generation failed: {getattr(req, 'error', None) or 'engine error'}", None, "engine_error")


def finish_reason(reason: str) -> str:
    """The engine's reasons in OpenAI's words (a cancelled request has nobody left to read it)."""
    return "length" if reason == "length" else "stop"


def usage_block(out: Outcome, n_prompt: int) -> dict:
    cached = int(out.usage.get("cached_tokens", 0))
    prompt = int(out.usage.get("prompt_tokens", n_prompt))
    completion = int(out.usage.get("completion_tokens", len(out.tokens)))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def token_text(tok, token_id: int) -> str:
    return tok.token_bytes(token_id).decode("utf-8", errors="replace")


def chat_logprob_entry(tok, token_id: int, logprob: float, top: list) -> dict:
    def one(i, lp):
        b = tok.token_bytes(i)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}

    entry = one(token_id, logprob)
    entry["top_logprobs"] = [one(i, lp) for i, lp in top]
    return entry


def text_offsets(tok, ids: list[int], start: int = 0) -> list[int]:
    """Character offset of each token in the text the ids decode to (a token inside a UTF-8 character
    gets the offset where that character starts)."""
    dec, pos, offsets = tok.stream_decoder(), start, []
    for i in ids:
        offsets.append(pos)
        pos += len(dec.push(i))
    return offsets


def new_id(prefix: str) -> str:
    import uuid

    return f"{prefix}-{uuid.uuid4().hex[:24]}"
