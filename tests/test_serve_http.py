"""`apr serve` over raw HTTP: bad input gets a 4xx with an OpenAI-style error object (never a 500 or a
traceback), the queue limit answers 503 + Retry-After, the API key and CORS gates, health/metrics/tokenize,
the Ollama endpoints through the ollama client, and the process itself: startup errors and a SIGTERM drain."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from test_serve_harness import LiveServer, wait_for  # noqa: E402

from apr.runtime import load_model  # noqa: E402


@pytest.fixture(scope="module")
def lm(tiny_qwen):
    return load_model(str(tiny_qwen), dtype="float32", backend="cpu", quiet=True)


@pytest.fixture(scope="module")
def live(lm):
    server = LiveServer(lm, parallel=1, max_queue=1)
    yield server
    server.close()


def post(live, path: str, body=None, raw: bytes | None = None, **kw) -> httpx.Response:
    if raw is not None:
        return httpx.post(live.url + path, content=raw, headers={"content-type": "application/json"}, timeout=30, **kw)
    return httpx.post(live.url + path, json=body, timeout=30, **kw)


def chat_body(**extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}


def assert_error(r: httpx.Response, status: int, param: str | None = None, words: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text
    if param is not None:
        assert err["param"] == param, err
    assert words.lower() in err["message"].lower(), err
    return err


@pytest.mark.parametrize("body, param, words", [
    (chat_body(temperature="hot"), "temperature", "valid number"),
    (chat_body(temperature=3.0), "temperature", "less than or equal"),
    (chat_body(max_tokens="5"), "max_tokens", "integer"),
    (chat_body(bogus=1), "bogus", "unknown field"),
    (chat_body(messages=[]), "messages", "empty"),
    (chat_body(messages=[{"role": "wizard", "content": "x"}]), "messages.0.role", ""),
    (chat_body(max_tokens=0), "max_tokens", "at least 1"),
    (chat_body(max_completion_tokens=-3), "max_completion_tokens", "at least 1"),
    (chat_body(n=2), "n", "not supported"),
    (chat_body(presence_penalty=0.5), "presence_penalty", "not supported"),
    (chat_body(tools=[{"type": "function", "function": {"name": ""}}]), "tools.0.function.name", "needs a name"),
    (chat_body(functions=[{"name": "f"}]), "functions", "use tools"),
    (chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages.0.content", "image_url"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream", "boolean"),
    ({"model": "tiny"}, "messages", "missing"),
])
def test_chat_bad_input_is_a_400_naming_the_field(live, body, param, words):
    assert_error(post(live, "/v1/chat/completions", body), 400, param, words)


def test_bad_json_and_non_object_bodies(live):
    assert_error(post(live, "/v1/chat/completions", raw=b'{"messages": [,]}'), 400, None, "not valid JSON")
    assert_error(post(live, "/v1/chat/completions", raw=b"[1, 2]"), 400, None, "")
    assert_error(post(live, "/v1/completions", {"prompt": []}), 400, "prompt", "empty")
    assert_error(post(live, "/v1/completions", {"prompt": [10**9]}), 400, "prompt", "outside the vocabulary")
    assert_error(post(live, "/v1/completions", {"prompt": "x", "max_tokens": 0}), 400, "max_tokens", "echo")
    assert_error(post(live, "/detokenize", {"tokens": [-1]}), 400, "tokens", "outside the vocabulary")
    r = httpx.get(live.url + "/v1/nope", timeout=30)
    assert_error(r, 404, None, "no route")


def test_a_prompt_longer_than_the_context_is_a_400(live, lm):
    n = lm.config.context_length
    err = assert_error(post(live, "/v1/completions", {"prompt": [65] * (n + 5)}), 400, "prompt", str(n))
    assert err["code"] == "context_length_exceeded"
    long_chat = chat_body(messages=[{"role": "user", "content": "the " * n}])
    assert_error(post(live, "/v1/chat/completions", long_chat), 400, "messages", "context")


def test_fields_real_clients_send_are_accepted(live):
    body = chat_body(n=1, user="u1", frequency_penalty=0, presence_penalty=0.0, logit_bias={}, seed=7,
                     stream=True, stream_options={"include_usage": True}, top_p=1.0, stop=["\n\n"],
                     response_format={"type": "text"}, tool_choice="none", metadata={}, store=False,
                     messages=[{"role": "developer", "content": "be brief"},
                               {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    r = post(live, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    lines = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["usage"]["total_tokens"] > 0


def test_full_queue_answers_503_with_retry_after(lm):
    """max_queue 1 and the engine's loop not yet running: one request waits, the next is refused; once the
    loop starts, the waiting one is answered."""
    server = LiveServer(lm, parallel=1, max_queue=1, start=False)
    try:
        body = {"model": "tiny", "prompt": "hello there", "max_tokens": 3}
        waiting = threading.Thread(target=lambda: results.append(post(server, "/v1/completions", body)))
        results: list = []
        waiting.start()
        wait_for(lambda: server.engine.stats()["queue_depth"] == 1, what="the first request to queue")
        r = post(server, "/v1/completions", body)
        err = assert_error(r, 503, None, "busy")
        assert err["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
        server.engine.start()
        waiting.join(30)
        assert results[0].status_code == 200 and results[0].json()["usage"]["completion_tokens"] == 3
    finally:
        server.close()


def test_a_bug_is_a_json_500_without_traceback(live, monkeypatch):
    def broken(ids, params):
        raise ValueError("planted fault")

    monkeypatch.setattr(live.state, "engine", type("E", (), {"submit": staticmethod(broken), "step_impl": "x"})())
    r = post(live, "/v1/chat/completions", chat_body())
    err = assert_error(r, 500, None, "ValueError")
    assert err["code"] == "internal_error" and "planted" not in r.text


def test_health_metrics_tokenize(live, lm):
    r = httpx.get(live.url + "/health", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    text = httpx.get(live.url + "/metrics", timeout=30).text
    for name in ("apr_requests_total", "apr_generated_tokens_total", "apr_queue_depth", "apr_active_sequences",
                 "apr_batch_size", "apr_decode_tokens_per_second", "apr_prompt_tokens_total"):
        assert re.search(rf'^{name}{{step_impl="[^"]*"}} [0-9.e+]+$', text, re.M), name
    ids = post(live, "/tokenize", {"content": "hello there"}).json()["tokens"]
    assert ids == lm.tokenizer.encode("hello there")
    assert post(live, "/detokenize", {"tokens": ids}).json()["content"] == "hello there"
    chat_ids = post(live, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()["tokens"]
    assert lm.tokenizer.decode(chat_ids) == lm.tokenizer.render_chat([{"role": "user", "content": "hi"}])


def test_loading_answers_503(lm):
    from fastapi.testclient import TestClient

    from apr.serve.app import ServeState, create_app

    client = TestClient(create_app(ServeState(model_id="tiny")))
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["retry-after"]
    assert_error(client.post("/v1/chat/completions", json=chat_body()), 503, None, "loading")


def test_api_key_and_cors(lm):
    server = LiveServer(lm, parallel=1, api_key="s3cret", cors=["http://ui.example"])
    try:
        assert_error(httpx.get(server.url + "/v1/models", timeout=30), 401, None, "api key")
        bad = {"Authorization": "Bearer nope"}
        assert_error(httpx.get(server.url + "/v1/models", headers=bad, timeout=30), 401)
        ok = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "tiny"
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200  # probes need no key
        pre = httpx.options(server.url + "/v1/chat/completions", timeout=30, headers={
            "Origin": "http://ui.example", "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://ui.example"
    finally:
        server.close()


def test_no_cors_headers_without_cors_origin(live):
    r = httpx.get(live.url + "/v1/models", headers={"Origin": "http://evil.example"}, timeout=30)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = httpx.options(live.url + "/v1/chat/completions", timeout=30, headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers


def test_ollama_endpoints_through_its_client(live, lm):
    ollama = pytest.importorskip("ollama")
    from apr.generate import generate

    client = ollama.Client(host=live.url)
    ref = generate(lm, "hi", chat=True, max_tokens=6)
    one = client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=False,
                      options={"num_predict": 6, "temperature": 0, "num_ctx": 2048})
    assert one.message.content == ref.text and one.done and one.eval_count == len(ref.tokens)
    parts = list(client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True,
                             options={"num_predict": 6, "temperature": 0}))
    assert "".join(p.message.content for p in parts) == ref.text and parts[-1].done
    gen = client.generate(model="tiny", prompt="hi", options={"num_predict": 6, "temperature": 0}, stream=False)
    assert gen.response == ref.text and gen.context[-len(ref.tokens):] == ref.tokens
    assert [m.model for m in client.list().models] == ["tiny"]
    assert client.show("tiny").modelinfo["general.architecture"] == "qwen2"
    # no "stream" field: NDJSON, as Ollama streams by default
    raw = httpx.post(live.url + "/api/generate", json={"prompt": "hi", "options": {"num_predict": 6, "temperature": 0}},
                     timeout=30)
    rows = [json.loads(ln) for ln in raw.text.splitlines()]
    assert raw.headers["content-type"].startswith("application/x-ndjson") and rows[-1]["done"]
    assert "".join(r["response"] for r in rows) == ref.text
    r = httpx.get(live.url + "/api/version", timeout=30)
    assert r.status_code == 200 and r.json()["version"]
    bad = httpx.post(live.url + "/api/chat", json={"model": "tiny", "messages": "hi"}, timeout=30)
    assert bad.status_code == 400 and isinstance(bad.json()["error"], str)


def _apr(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "apr.cli", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_startup_errors_are_one_line(tiny_qwen, tmp_path):
    p = _apr(str(tmp_path / "missing.gguf"))
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and err.strip().startswith("apr: error:") and len(err.strip().splitlines()) == 1
    p = _apr(str(tiny_qwen), "--port", "70000")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "port" in err and "Traceback" not in err


def test_sigterm_drains_in_flight_requests(tiny_qwen):
    """`apr serve --port 0` in its own process: a stream in flight at SIGTERM still ends with [DONE]."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = _apr(str(tiny_qwen), "--port", "0", "--dtype", "float32", "--backend", "cpu", "--parallel", "2", env=env)
    try:
        line = p.stdout.readline()
        url = re.search(r"ready on (http://\S+)", line).group(1)
        lines: list[str] = []
        first = threading.Event()

        def stream():
            body = {"prompt": "hello there", "max_tokens": 120, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for ln in r.iter_lines():
                    if ln:
                        lines.append(ln)
                        first.set()

        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(30)
        p.send_signal(signal.SIGTERM)
        at_signal = len(lines)
        t.join(60)
        assert p.wait(60) == 0
        assert lines[-1] == "data: [DONE]" and len(lines) > at_signal + 1  # it went on after the signal
        chunks = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {")]
        assert chunks[-1]["usage"]["completion_tokens"] == 120
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=5)
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)
