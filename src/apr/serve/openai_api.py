"""OpenAI's API: /v1/chat/completions, /v1/completions (echo + logprobs over the prompt, as
lm-evaluation-harness scores loglikelihood), /v1/models. Streams are server-sent events."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from apr.serve import common, tools
from apr.serve.common import Outcome
from apr.serve.errors import APIError, bad_request, error_body
from apr.serve.schemas import ChatRequest, CompletionRequest

router = APIRouter()


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# -- chat ---------------------------------------------------------------------------------------------


@router.post("/v1/chat/completions")
@router.post("/chat/completions", include_in_schema=False)
async def chat_completions(body: ChatRequest, http: Request):
    from apr.generate import prepare_messages

    state = http.app.state.apr.ready()
    body.check_supported()
    lm = state.lm
    messages = [m.as_template_message(i) for i, m in enumerate(body.messages)]
    tool_list = tools.check_tools(body.tools)
    forced = tools.chosen(tool_list, body.tool_choice)
    offer = tool_list if tool_list and body.tool_choice != "none" else None
    extra = {**(body.chat_template_kwargs or {}), **({"tools": offer} if offer else {})}
    try:
        _, ids = prepare_messages(lm, messages, **extra)
    except Exception as e:  # a template that refuses the conversation (e.g. roles out of order)
        raise bad_request(f"the chat template cannot render these messages: {e}", "messages", "template_error") from None
    k = (body.top_logprobs or 0) if body.logprobs else None
    limit = body.max_limit()
    params = common.sampling_params(
        max_tokens=limit if limit is not None else common.default_max_tokens(state, len(ids)),
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        repeat_penalty=body.repeat_penalty, seed=body.seed, stop=body.stop_list(), logprobs=k,
        constraint=tools.forced_grammar(forced, lm.tokenizer) if forced else common.openai_constraint(body.response_format))
    req = common.submit(state, ids, params, "messages")
    head = {"id": common.new_id("chatcmpl"), "created": int(time.time()), "model": state.model_id,
            "system_fingerprint": state.fingerprint}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_chat_stream(state, req, head, ids, k is not None, include_usage, bool(offer)),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    out = await common.collect(req, http)
    if out is None:
        return JSONResponse({}, status_code=499)  # nobody is listening any more
    common.raise_if_failed(req, out)
    choice = {"index": 0, "message": {"role": "assistant", "content": out.text}, "logprobs": None,
              "finish_reason": common.finish_reason(out.finish_reason)}
    if offer:
        content, calls = tools.parse(out.text)
        if calls:
            choice["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
            choice["finish_reason"] = "tool_calls" if choice["finish_reason"] == "stop" else choice["finish_reason"]
    if k is not None:
        tok = lm.tokenizer
        choice["logprobs"] = {"content": [common.chat_logprob_entry(tok, i, lp, top) for i, lp, top in out.logprobs]}
    resp = {**head, "object": "chat.completion", "choices": [choice], "usage": common.usage_block(out, len(ids))}
    if body.return_token_ids:
        choice["token_ids"] = out.tokens
        resp["prompt_token_ids"] = ids
    return resp


async def _chat_stream(state, req, head: dict, ids: list[int], logprobs: bool, include_usage: bool, tooled: bool):
    """The frame of a streamed chat completion: the role delta, the body's deltas, the finish chunk, usage and
    [DONE]. A client that goes away before the end cancels the request, which frees its slot."""
    out, track = Outcome(), {"done": False, "finish": None}
    chunk = {**head, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def delta(d: dict, finish=None, lp=None) -> str:
        return sse({**chunk, "choices": [{"index": 0, "delta": d, "logprobs": lp, "finish_reason": finish}], **extra})

    body = _tool_deltas(req, out, track) if tooled else _text_deltas(state, req, out, track, logprobs)
    try:
        yield delta({"role": "assistant", "content": None if tooled else ""})
        async for d, lp in body:
            yield delta(d, None, lp)
        if out.finish_reason == "error":
            yield sse(error_body(500, f"generation failed: {req.error or 'engine error'}", None, "engine_error"))
        else:
            yield delta({}, track["finish"] or common.finish_reason(out.finish_reason))
            if include_usage:
                yield sse({**chunk, "choices": [], "usage": common.usage_block(out, len(ids))})
        yield "data: [DONE]\n\n"
    finally:
        if not track["done"]:
            req.cancel()


async def _text_deltas(state, req, out: Outcome, track: dict, logprobs: bool):
    """Each event's text as it comes, with its logprob entry when asked."""
    tok, t0 = state.lm.tokenizer, time.perf_counter()
    async for ev in req.aevents():
        common.absorb(out, ev, t0)
        track["done"] = track["done"] or bool(ev.finish_reason)
        lp = None
        if logprobs and ev.token is not None and ev.logprob is not None:
            lp = {"content": [common.chat_logprob_entry(tok, ev.token, ev.logprob, ev.top_logprobs or [])]}
        if ev.text or lp:
            yield {"content": ev.text or ""}, lp


async def _tool_deltas(req, out: Outcome, track: dict):
    """Where the model may call a tool, its text is read whole, then sent as content or as tool_calls deltas
    the way OpenAI sends them (id, type and name first, then the arguments)."""
    t0 = time.perf_counter()
    async for ev in req.aevents():
        common.absorb(out, ev, t0)
        track["done"] = track["done"] or bool(ev.finish_reason)
    if out.finish_reason == "error":
        return
    content, calls = tools.parse(out.text)
    if content:
        yield {"content": content}, None
    for i, c in enumerate(calls):
        yield {"tool_calls": [{"index": i, "id": c["id"], "type": "function",
                               "function": {"name": c["function"]["name"], "arguments": ""}}]}, None
        yield {"tool_calls": [{"index": i, "function": {"arguments": c["function"]["arguments"]}}]}, None
    if calls and common.finish_reason(out.finish_reason) == "stop":
        track["finish"] = "tool_calls"


# -- completions ----------------------------------------------------------------------------------------


@router.post("/v1/completions")
@router.post("/completions", include_in_schema=False)
async def completions(body: CompletionRequest, http: Request):
    state = http.app.state.apr.ready()
    body.check_supported()
    tok = state.lm.tokenizer
    prompts = body.prompts()
    if body.stream and len(prompts) > 1:
        raise bad_request("streaming takes one prompt", "prompt", "unsupported")
    encoded = []
    for p in prompts:
        if isinstance(p, str):
            encoded.append((p, tok.encode(p)))
        else:
            common.check_ids(state, p, "prompt")
            encoded.append((tok.decode(p), list(p)))
    score = body.echo and body.logprobs is not None
    reqs = []
    try:
        for _, ids in encoded:
            max_tokens = body.max_tokens if body.max_tokens is not None else common.default_max_tokens(state, len(ids))
            params = common.sampling_params(
                max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                min_p=body.min_p, repeat_penalty=body.repeat_penalty, seed=body.seed, stop=body.stop_list(),
                logprobs=body.logprobs, echo_logprobs=score)
            reqs.append(common.submit(state, ids, params, "prompt"))
    except APIError:
        for r in reqs:
            r.cancel()
        raise
    head = {"id": common.new_id("cmpl"), "created": int(time.time()), "model": state.model_id,
            "system_fingerprint": state.fingerprint}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_completion_stream(state, reqs[0], head, encoded[0], body, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    outs = await asyncio.gather(*(common.collect(r, http) for r in reqs))
    if any(o is None for o in outs):
        for r in reqs:
            r.cancel()
        return JSONResponse({}, status_code=499)
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                          "prompt_tokens_details": {"cached_tokens": 0}}
    for index, (req, out, (text, ids)) in enumerate(zip(reqs, outs, encoded)):
        common.raise_if_failed(req, out)
        choices.append(_completion_choice(tok, index, req, out, text, ids, body))
        u = common.usage_block(out, len(ids))
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            usage[key] += u[key]
        usage["prompt_tokens_details"]["cached_tokens"] += u["prompt_tokens_details"]["cached_tokens"]
    return {**head, "object": "text_completion", "choices": choices, "usage": usage}


def _completion_choice(tok, index: int, req, out: Outcome, prompt_text: str, ids: list[int], body) -> dict:
    echo = prompt_text if body.echo else ""
    choice = {"index": index, "text": echo + out.text, "logprobs": None,
              "finish_reason": common.finish_reason(out.finish_reason)}
    if body.logprobs is not None:
        choice["logprobs"] = legacy_logprobs(tok, req, out, prompt_text, ids, body.echo)
    if body.return_token_ids:
        choice["token_ids"] = out.tokens
        choice["prompt_token_ids"] = ids
    return choice


def legacy_logprobs(tok, req, out: Outcome, prompt_text: str, ids: list[int], echo: bool) -> dict:
    """The completions endpoint's logprobs: parallel lists over (echoed prompt +) generated tokens;
    the first prompt token has no logprob (nothing comes before it)."""
    tokens, lps, tops, offsets = [], [], [], []
    if echo:
        scored = req.prompt_logprobs or [None] * len(ids)
        for i, entry in zip(ids, scored):
            tokens.append(common.token_text(tok, i))
            lps.append(None if entry is None else entry[0])
            tops.append(None if entry is None else {common.token_text(tok, t): lp for t, lp in entry[1]})
        offsets += common.text_offsets(tok, ids)
    gen = [t for t, _, _ in out.logprobs]
    for t, lp, top in out.logprobs:
        tokens.append(common.token_text(tok, t))
        lps.append(lp)
        tops.append({common.token_text(tok, i): v for i, v in top})
    offsets += common.text_offsets(tok, gen, len(prompt_text) if echo else 0)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def _completion_stream(state, req, head: dict, prompt: tuple[str, list[int]], body, include_usage: bool):
    tok, out, t0 = state.lm.tokenizer, Outcome(), time.perf_counter()
    text, ids = prompt
    chunk = {**head, "object": "text_completion"}
    extra = {"usage": None} if include_usage else {}
    offset = len(text) if body.echo else 0

    def piece(t: str, finish=None, lp=None) -> str:
        return sse({**chunk, "choices": [{"index": 0, "text": t, "logprobs": lp, "finish_reason": finish}], **extra})

    finished = False
    try:
        if body.echo:
            yield piece(text)
        async for ev in req.aevents():
            common.absorb(out, ev, t0)
            lp = None
            if body.logprobs is not None and ev.token is not None and ev.logprob is not None:
                lp = {"tokens": [common.token_text(tok, ev.token)], "token_logprobs": [ev.logprob],
                      "top_logprobs": [{common.token_text(tok, i): v for i, v in ev.top_logprobs or []}],
                      "text_offset": [offset]}
            offset += len(ev.text or "")
            if ev.text or lp:
                yield piece(ev.text or "", None, lp)
            if ev.finish_reason:
                finished = True
        if out.finish_reason == "error":
            yield sse(error_body(500, f"generation failed: {req.error or 'engine error'}", None, "engine_error"))
        else:
            yield piece("", common.finish_reason(out.finish_reason))
            if include_usage:
                yield sse({**chunk, "choices": [], "usage": common.usage_block(out, len(ids))})
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            req.cancel()


# -- models -------------------------------------------------------------------------------------------------


@router.get("/v1/models")
@router.get("/models", include_in_schema=False)
async def models(http: Request):
    state = http.app.state.apr.ready()
    return {"object": "list", "data": [state.model_card()]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, http: Request):
    state = http.app.state.apr.ready()
    if model_id != state.model_id:
        raise APIError(404, f"no model '{model_id}' (this server runs '{state.model_id}')", "model", "model_not_found")
    return state.model_card()
