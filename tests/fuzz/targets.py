"""Fuzz targets: each takes arbitrary bytes and must end in success or in one of the project's own errors.

Any other exception is a finding (a traceback a user would see), as is a hang or a crash. The same
functions run under atheris (coverage-guided, `python tests/fuzz/run.py TARGET`) and under the
dependency-free mutator in run.py, which CI uses when atheris is not installed. See docs/fuzzing.md.
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("APR_TEMPLATE_TIMEOUT_S", "1")  # a template that runs longer is a clean error, not a hang

from apr.errors import AprError  # noqa: E402

_DIR = Path(tempfile.mkdtemp(prefix="apr-fuzz-"))


def _file(data: bytes, suffix: str) -> Path:
    path = _DIR / f"input{suffix}"
    path.write_bytes(data)
    return path


def gguf_header(data: bytes) -> None:
    """The GGUF reader, then what a load derives from the header: config, tokenizer, chat template."""
    from apr.formats.gguf import config_from_gguf, read_gguf
    from apr.tokenizer import Tokenizer

    try:
        g = read_gguf(_file(data, ".gguf"))
        config_from_gguf(g)
        tok = Tokenizer.from_metadata(g.metadata)
        tok.stop_ids  # noqa: B018  (renders the template's probe)
    except AprError:
        pass


_ODD_VALUES = [0, -1, 1, 2**31, 2**64 - 1, 1.5, float("nan"), float("inf"), "", "x", "<|im_start|>", True, None,
               [], [0], ["a", "b"], [1.5], [[1]], {"a": 1}]


@lru_cache(maxsize=1)
def _seed_metadata():
    from apr.formats.gguf import read_gguf

    g = read_gguf(Path(__file__).with_name("corpus") / "gguf_header" / "tiny-qwen2-q8_0.gguf")
    return g


def gguf_metadata(data: bytes) -> None:
    """Type confusion behind the reader: a real header's keys given values of other types (the bytes pick
    which keys and values), then config, tokenizer and template as a load derives them."""
    from apr.formats.gguf import GGUFFile, config_from_gguf
    from apr.tokenizer import Tokenizer

    g = _seed_metadata()
    meta, keys = dict(g.metadata), sorted(g.metadata)
    for i in range(0, len(data) - 1, 2):
        key = keys[data[i] % len(keys)]
        odd = _ODD_VALUES[data[i + 1] % len(_ODD_VALUES)]
        value = meta[key]
        meta[key] = value[: data[i + 1]] if isinstance(value, list) and data[i + 1] & 1 else odd
    try:
        config_from_gguf(GGUFFile(g.path, meta, g.tensors))
        tok = Tokenizer.from_metadata(meta)
        tok.stop_ids  # noqa: B018
        tok.encode_chat([{"role": "user", "content": "hi <|im_end|>"}])
    except AprError:
        pass


def apr_header(data: bytes) -> None:
    """The .apr reader with eager checksums: header, offsets, metadata, config."""
    from apr.formats.apr import open_apr

    try:
        f = open_apr(_file(data, ".apr"), verify=True)
        for t in f.tensors.values():
            t.data  # noqa: B018
    except AprError:
        pass


@lru_cache(maxsize=1)
def _tokenizer():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_gguf import write_tiny_gguf

    from apr.formats.gguf import read_gguf
    from apr.tokenizer import Tokenizer

    path = write_tiny_gguf(_DIR / "tok.gguf", "qwen2", dim=256, ffn=256, n_layers=1)
    return Tokenizer.from_metadata(read_gguf(path).metadata)


def chat_template(data: bytes) -> None:
    """A template and a conversation from the same bytes: `template \\0 message \\0 message ...`."""
    from apr.chat_template import ChatTemplate

    text = data.decode("utf-8", "replace")
    source, *contents = text.split("\0")
    messages = [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(contents[:8])]
    try:
        tpl = ChatTemplate(source, {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}, ["<|im_start|>"])
        tpl.render(messages or [{"role": "user", "content": "hi"}])
        tpl.end_of_turn  # noqa: B018
    except AprError:
        pass
    try:
        _tokenizer().encode_chat(messages or [{"role": "user", "content": text}])
    except AprError:
        pass


def serve_request(data: bytes) -> None:
    """The server's request parsing: JSON -> the pydantic request models -> their checks -> template messages
    -> the prompt ids (the tiny tokenizer), as /v1/chat/completions and /v1/completions do before generating."""
    from pydantic import ValidationError

    from apr.serve.schemas import ChatRequest, CompletionRequest

    from apr.serve.errors import APIError

    for model, body in ((ChatRequest, data), (CompletionRequest, data), (ChatRequest, _structured(data))):
        try:
            req = model.model_validate_json(body)
            req.check_supported()
            req.stop_list()
            if isinstance(req, ChatRequest):
                msgs = [m.as_template_message(i) for i, m in enumerate(req.messages)]
                _tokenizer().encode_chat(msgs, True, req.chat_template_kwargs)
            else:
                req.prompts()
        except (AprError, ValidationError):
            pass
        except APIError as e:  # a 400 is the server's answer to a bad request; a 5xx would be our bug
            if e.status >= 500:
                raise


_ROLES = ["system", "developer", "user", "assistant", "tool", "bot"]


def _structured(data: bytes) -> bytes:
    """A well-formed chat request built from the bytes (random bytes are rarely JSON): its fields and
    message texts come from the input, so the checks and the prompt encoding behind the parser run too."""
    text = data[4:].decode("utf-8", "replace")
    parts = text.split("\0")
    head = data[:4].ljust(4, b"\0")
    msgs = [{"role": _ROLES[(head[0] + i) % len(_ROLES)], "content": c} for i, c in enumerate(parts[:6])]
    if head[1] & 1:
        msgs[0]["content"] = [{"type": "text" if head[1] & 2 else "image_url", "text": parts[0]}]
    body = {"messages": msgs, "max_tokens": int.from_bytes(head[2:4], "little", signed=True)}
    if head[1] & 4:
        body["stop"] = parts[-1:]
    if head[1] & 8:
        body["chat_template_kwargs"] = {p[:8]: p for p in parts[1:4]}
    if head[1] & 16:
        body["temperature"] = head[2] / 64
    return json.dumps(body).encode()


TARGETS = {"gguf_header": gguf_header, "gguf_metadata": gguf_metadata, "apr_header": apr_header,
           "chat_template": chat_template, "serve_request": serve_request}


def seeds(name: str) -> list[bytes]:
    corpus = Path(__file__).with_name("corpus") / name
    return [p.read_bytes() for p in sorted(corpus.iterdir()) if p.is_file()]


if __name__ == "__main__":  # a quick self-check: every seed runs clean
    for name, fn in TARGETS.items():
        for s in seeds(name):
            fn(s)
    print(json.dumps({n: len(seeds(n)) for n in TARGETS}))
