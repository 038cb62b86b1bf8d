"""Structured output over HTTP: OpenAI response_format and Ollama format reach the engine's grammar mask."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
httpx = pytest.importorskip("httpx")

from test_serve_harness import LiveServer  # noqa: E402

from apr.runtime import load_model  # noqa: E402

ENUM = {"type": "string", "enum": ["red", "green", "blue"]}


@pytest.fixture(scope="module")
def live(tiny_qwen):
    server = LiveServer(load_model(str(tiny_qwen), dtype="float32", backend="cpu", quiet=True), parallel=2)
    yield server
    server.close()


def test_openai_json_schema_and_json_object(live):
    from openai import OpenAI

    client = OpenAI(base_url=live.url + "/v1", api_key="none")
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a colour"}], max_tokens=30,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "c", "schema": ENUM}})
    assert json.loads(r.choices[0].message.content) in ENUM["enum"] and r.choices[0].finish_reason == "stop"
    for seed in (1, 2, 3):  # sampled, not greedy: the random model's draws are masked just the same
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a colour"}],
                                           max_tokens=30, temperature=1.5, seed=seed,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "c", "schema": ENUM}})
        assert json.loads(r.choices[0].message.content) in ENUM["enum"], r.choices[0].message.content
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.lstrip().startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens inside the object: said so, never passed off as complete
        assert r.choices[0].finish_reason == "length"


def test_ollama_format(live):
    r = httpx.post(live.url + "/api/generate", json={"model": "tiny", "prompt": "a colour", "stream": False,
                                                    "format": ENUM, "options": {"num_predict": 30}}, timeout=60)
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["response"]) in ENUM["enum"]


@pytest.mark.parametrize("body,words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "Invalid type"),
    ({"response_format": {"type": "json_schema", "json_schema": "nope"}}, "json_schema"),
    ({"response_format": {"type": "xml"}}, "not supported"),
])
def test_bad_schemas_are_400s(live, body, words):
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                           "messages": [{"role": "user", "content": "x"}], **body},
                   timeout=30)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]
    r = httpx.post(live.url + "/api/chat", json={"model": "tiny", "stream": False, "format": {"type": "objectx"},
                                                "messages": [{"role": "user", "content": "x"}]}, timeout=30)
    assert r.status_code == 400 and "Invalid type" in r.json()["error"]  # Ollama: the error is a string
