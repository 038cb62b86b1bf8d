"""Ollama's API: /api/chat and /api/generate (NDJSON streams, streaming unless "stream": false, as Ollama),
/api/tags, /api/show, /api/version. Ollama's schema is open (its server ignores unknown fields), so these
models ignore extras but still refuse ill-typed values; `options` keys apr has no use for are ignored."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from apr import __version__
from apr.serve import common, tools
from apr.serve.common import Outcome
from apr.serve.errors import bad_request
from apr.serve.schemas import Knobs

router = APIRouter()
Open = ConfigDict(extra="ignore", strict=True)


class Options(Knobs):
    model_config = ConfigDict(extra="allow", strict=True)
    num_predict: int | None = None
    temperature: float | None = Field(None, ge=0.0)


class OllamaMessage(BaseModel):
    model_config = Open
    role: str
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[dict] | None = None


class Base(BaseModel):
    model_config = Open
    model: str | None = None
    stream: bool | None = True
    options: Options | None = None
    format: Union[str, dict, None] = None
    keep_alive: Union[float, str, None] = None
    think: Union[bool, str, None] = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def check(self) -> None:
        if self.think:
            raise bad_request("think is not supported", "think")


class ChatBody(Base):
    messages: list[OllamaMessage] | None = None
    tools: list[dict] | None = None


class GenerateBody(Base):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None
    images: list[str] | None = None


class ShowBody(BaseModel):
    model_config = Open
    model: str | None = None
    name: str | None = None  # the older spelling
    verbose: bool | None = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _params(state, body: Base, n_prompt: int):
    o = body.options or Options()
    stop = [o.stop] if isinstance(o.stop, str) else list(o.stop or [])
    # num_predict: -1 (and -2, "fill the context") mean no limit in Ollama
    limit = o.num_predict if o.num_predict is not None and o.num_predict > 0 else common.default_max_tokens(state, n_prompt)
    k = (body.top_logprobs or 0) if body.logprobs else None
    return common.sampling_params(max_tokens=limit, temperature=o.temperature, top_p=o.top_p, top_k=o.top_k,
                                  min_p=o.min_p, repeat_penalty=o.repeat_penalty, seed=o.seed, stop=stop, logprobs=k,
                                  constraint=common.ollama_constraint(body.format))


@router.post("/api/chat")
async def chat(body: ChatBody, http: Request):
    from apr.generate import prepare_messages

    state = http.app.state.apr.ready()
    body.check()
    offer = tools.check_tools(body.tools) or None
    if not body.messages:
        # Ollama answers an empty chat with a load acknowledgement
        return {"model": state.model_id, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done_reason": "load", "done": True}
    msgs = []
    for m in body.messages:
        if m.images:
            raise bad_request("images are not supported", "messages")
        msg = {"role": m.role, "content": m.content or ""}
        if m.tool_calls:  # Ollama sends arguments as an object already
            msg["tool_calls"] = tools.template_calls(m.tool_calls)
        msgs.append(msg)
    try:
        _, ids = prepare_messages(state.lm, msgs, **({"tools": offer} if offer else {}))
    except Exception as e:
        raise bad_request(f"the chat template cannot render these messages: {e}", "messages") from None
    req = common.submit(state, ids, _params(state, body, len(ids)), "messages")
    if offer:
        return await _tool_answer(state, http, body, req, ids)
    return await _answer(state, http, body, req, ids, chat=True)


async def _tool_answer(state, http: Request, body: Base, req, ids: list[int]):
    """A chat that may call a tool: read whole, then answered as Ollama does, with `message.tool_calls`
    (arguments as objects); a stream gets it as one piece followed by the final one."""
    t0 = time.perf_counter()
    out = await common.collect(req, http)
    if out is None:
        return JSONResponse({}, status_code=499)
    common.raise_if_failed(req, out)
    content, calls = tools.parse(out.text)
    message = {"role": "assistant", "content": content or ""}
    if calls:
        message["tool_calls"] = [{"function": {"name": c["function"]["name"],
                                               "arguments": json.loads(c["function"]["arguments"] or "{}")}}
                                 for c in calls]
    final = _final(state, out, ids, True, t0, "")
    if body.stream is False:
        return {**final, "message": message}
    lines = [{**_piece(state, True, "", False), "message": message}, final]
    return StreamingResponse(iter([json.dumps(x, ensure_ascii=False) + "\n" for x in lines]),
                             media_type="application/x-ndjson")


@router.post("/api/generate")
async def generate(body: GenerateBody, http: Request):
    from apr.generate import prepare_prompt

    state = http.app.state.apr.ready()
    body.check()
    if body.images:
        raise bad_request("images are not supported", "images")
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if body.template:
        raise bad_request("a template override is not supported", "template")
    if not body.prompt:
        return {"model": state.model_id, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
    tok = state.lm.tokenizer
    if body.raw:
        ids = tok.encode(body.prompt)
    else:
        _, ids = prepare_prompt(state.lm, body.prompt, None, body.system)
    if body.context:  # the previous exchange's ids (Ollama's older multi-turn mechanism)
        common.check_ids(state, body.context, "context")
        ids = list(body.context) + ids
    req = common.submit(state, ids, _params(state, body, len(ids)), "prompt")
    return await _answer(state, http, body, req, ids, chat=False)


def _piece(state, chat: bool, text: str, done: bool, **extra) -> dict:
    base = {"model": state.model_id, "created_at": _now()}
    if chat:
        base["message"] = {"role": "assistant", "content": text}
    else:
        base["response"] = text
    return {**base, "done": done, **extra}


def _final(state, out: Outcome, ids: list[int], chat: bool, t0: float, text: str) -> dict:
    total = time.perf_counter() - t0
    first = out.first_token_s or total
    stats = {"done_reason": "length" if out.finish_reason == "length" else "stop",
             "total_duration": int(total * 1e9), "load_duration": 0,
             "prompt_eval_count": int(out.usage.get("prompt_tokens", len(ids))),
             "prompt_eval_duration": int(first * 1e9),
             "eval_count": int(out.usage.get("completion_tokens", len(out.tokens))),
             "eval_duration": int(max(total - first, 0) * 1e9)}
    if not chat:
        stats["context"] = ids + out.tokens
    return _piece(state, chat, text, True, **stats)


def _logprobs(tok, entries) -> list:
    return [common.chat_logprob_entry(tok, i, lp, top) for i, lp, top in entries]


async def _answer(state, http: Request, body: Base, req, ids: list[int], chat: bool):
    t0 = time.perf_counter()
    if body.stream is False:
        out = await common.collect(req, http)
        if out is None:
            return JSONResponse({}, status_code=499)
        common.raise_if_failed(req, out)
        final = _final(state, out, ids, chat, t0, out.text)
        if body.logprobs:
            final["logprobs"] = _logprobs(state.lm.tokenizer, out.logprobs)
        return final
    return StreamingResponse(_stream(state, req, ids, chat, t0, bool(body.logprobs)),
                             media_type="application/x-ndjson")


async def _stream(state, req, ids: list[int], chat: bool, t0: float, logprobs: bool):
    out, finished, tok = Outcome(), False, state.lm.tokenizer
    try:
        async for ev in req.aevents():
            common.absorb(out, ev, t0)
            lp = logprobs and ev.token is not None and ev.logprob is not None
            if ev.text or lp:  # the final event may carry text too (a held-back stop-string prefix)
                extra = {"logprobs": _logprobs(tok, out.logprobs[-1:])} if lp else {}
                yield json.dumps(_piece(state, chat, ev.text or "", False, **extra), ensure_ascii=False) + "\n"
            if ev.finish_reason:
                finished = True
                break
        if out.finish_reason == "error":
            yield json.dumps({"error": f"generation failed: {req.error or 'engine error'}"}) + "\n"
        else:
            yield json.dumps(_final(state, out, ids, chat, t0, ""), ensure_ascii=False) + "\n"
    finally:
        if not finished:
            req.cancel()


# -- model info -------------------------------------------------------------------------------------------


@router.get("/api/tags")
async def tags(http: Request):
    state = http.app.state.apr.ready()
    return {"models": [state.ollama_model()]}


@router.get("/api/ps")
async def ps(http: Request):
    state = http.app.state.apr.ready()
    m = state.ollama_model()
    return {"models": [{**m, "size_vram": 0, "context_length": state.lm.config.context_length}]}


@router.post("/api/show")
async def show(body: ShowBody, http: Request):
    state = http.app.state.apr.ready()
    name = body.model or body.name
    if name and name not in (state.model_id, state.model_id + ":latest"):
        return JSONResponse({"error": f"model '{name}' not found (this server runs '{state.model_id}')"}, status_code=404)
    cfg, m = state.lm.config, state.ollama_model()
    info: dict[str, Any] = {"general.architecture": cfg.architecture,
                            f"{cfg.architecture}.context_length": cfg.context_length,
                            f"{cfg.architecture}.embedding_length": cfg.dim,
                            f"{cfg.architecture}.block_count": cfg.n_layers}
    template = state.lm.metadata.get("tokenizer.chat_template") or ""
    return {"modelfile": f"FROM {state.lm.path}\n", "parameters": "", "template": template,
            "details": m["details"], "model_info": info, "capabilities": ["completion"],
            "modified_at": m["modified_at"]}


@router.get("/api/version")
async def version():
    return {"version": __version__}
