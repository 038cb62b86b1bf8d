"""Tool calls over the OpenAI API: rendered by the model's template, parsed into tool_calls, and with
tool_choice "required" or a named function, arguments constrained by the function's schema."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
httpx = pytest.importorskip("httpx")

from test_serve_harness import LiveServer  # noqa: E402

from apr.runtime import load_model  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}  # bounded: a random model must still finish


def _valid(call, tool) -> dict:
    import jsonschema

    assert call.function.name == tool["function"]["name"]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def _client(live):
    from openai import OpenAI

    return OpenAI(base_url=live.url + "/v1", api_key="none")


@pytest.fixture(scope="module")
def tiny(tiny_qwen):
    server = LiveServer(load_model(str(tiny_qwen), dtype="float32", backend="cpu", quiet=True), parallel=2)
    yield server
    server.close()


def test_required_and_named_calls_validate_on_a_random_model(tiny):
    client = _client(tiny)
    msgs = [{"role": "user", "content": "weather in Oslo"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER, ADD], tool_choice="required",
                                       max_tokens=120)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    _valid(call, WEATHER if call.function.name == "get_weather" else ADD)
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER, ADD], max_tokens=120,
                                       tool_choice={"type": "function", "function": {"name": "add"}})
    _valid(r.choices[0].message.tool_calls[0], ADD)


def test_streamed_call_sends_name_then_arguments(tiny):
    stream = _client(tiny).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], tools=[ADD], tool_choice="required",
        max_tokens=120, stream=True)
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = [d.delta.tool_calls[0] for d in deltas if d.delta.tool_calls]
    assert calls[0].id and calls[0].function.name == "add" and calls[0].function.arguments == ""
    args = json.loads("".join(c.function.arguments or "" for c in calls))
    assert set(args) >= {"a", "b"} and deltas[-1].finish_reason == "tool_calls"


@pytest.mark.parametrize("body,words", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "not a schema"}}]}, "JSON schema"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}],
      "tool_choice": "required"}, "Invalid type"),
])
def test_bad_tools_are_400s(tiny, body, words):
    r = httpx.post(tiny.url + "/v1/chat/completions", json={"model": "tiny", "max_tokens": 4, **body,
                                                           "messages": [{"role": "user", "content": "x"}]}, timeout=30)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


@pytest.mark.real
def test_real_model_calls_a_tool_and_reads_its_result():
    from conftest import REAL_05B, real_model

    server = LiveServer(load_model(str(real_model(REAL_05B)), quiet=True), parallel=2)
    try:
        client = _client(server)
        msgs = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
        r = client.chat.completions.create(model="m", messages=msgs, tools=[WEATHER], tool_choice="required",
                                           max_tokens=80)
        call = r.choices[0].message.tool_calls[0]
        args = _valid(call, WEATHER)
        assert "paris" in args["city"].lower()
        stream = client.chat.completions.create(model="m", messages=msgs, tools=[WEATHER], tool_choice="required",
                                                max_tokens=80, stream=True)
        parts = [c.choices[0].delta.tool_calls[0] for c in stream if c.choices and c.choices[0].delta.tool_calls]
        assert json.loads("".join(p.function.arguments or "" for p in parts)) == args  # greedy: the same call
        msgs += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'}]
        r = client.chat.completions.create(model="m", messages=msgs, tools=[WEATHER], max_tokens=60)
        answer = r.choices[0].message.content or ""
        assert r.choices[0].finish_reason == "stop" and "21" in answer, answer
    finally:
        server.close()


def test_ollama_chat_with_tools_answers_tool_calls(tiny, monkeypatch):
    """Ollama's /api/chat with tools: a <tool_call> in the model's text comes back as message.tool_calls."""
    from apr.serve.tools import forced_grammar

    real = tiny.engine.submit

    def forced(ids, params):  # Ollama has no tool_choice: force the call so the random model makes one
        params.constraint = forced_grammar([ADD], tiny.engine.lm.tokenizer)
        return real(ids, params)

    monkeypatch.setattr(tiny.engine, "submit", forced)
    for stream in (False, True):
        r = httpx.post(tiny.url + "/api/chat", json={"model": "tiny", "stream": stream, "tools": [ADD],
                                                    "messages": [{"role": "user", "content": "1+2"}],
                                                    "options": {"num_predict": 120}}, timeout=60)
        assert r.status_code == 200, r.text
        lines = [json.loads(x) for x in r.text.splitlines()] if stream else [r.json()]
        msg = next(x["message"] for x in lines if x["message"].get("tool_calls"))
        call = msg["tool_calls"][0]["function"]
        assert call["name"] == "add" and set(call["arguments"]) == {"a", "b"} and lines[-1]["done"]
