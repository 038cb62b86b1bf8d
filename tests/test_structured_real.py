"""Structured output: the mask's arithmetic on a tiny model, and, on the real 0.5B through the `openai` client against a live `apr serve`: 20 varied JSON
schemas (nested objects, arrays, enums, bounded numbers, required and optional fields); every answer must
finish by itself, parse, and validate with `jsonschema`. One server for all of them; requests go 4 at a time,
so the engine batches constrained sequences that each have their own matcher."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")

from test_serve_harness import LiveServer  # noqa: E402

S = {"type": "string", "maxLength": 24}  # bounded strings keep every answer short
INT = {"type": "integer"}


def obj(props: dict, required: list[str] | None = None, **kw) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **kw}


SCHEMAS = [
    ("a person", obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    ("a colour", {"type": "string", "enum": ["red", "green", "blue"]}),
    ("a list of three small primes", {"type": "array", "items": INT, "minItems": 3, "maxItems": 3}),
    ("a temperature reading", obj({"celsius": {"type": "number", "minimum": -50, "maximum": 60},
                                   "unit": {"const": "C"}})),
    ("a Python package", obj({"name": S, "version": {"type": "string", "pattern": r"^[0-9]\.[0-9]{1,2}$"}})),
    ("a book, optionally its year", obj({"title": S, "year": {"type": "integer", "minimum": 1400, "maximum": 2030}},
                                         required=["title"])),
    ("a point", obj({"x": {"type": "number"}, "y": {"type": "number"}})),
    ("a task", obj({"title": S, "done": {"type": "boolean"},
                    "priority": {"type": "string", "enum": ["low", "medium", "high"]}})),
    ("a user with an address", obj({"name": S, "address": obj({"city": S, "zip": {"type": "string",
                                                                                   "pattern": r"^[0-9]{5}$"}})})),
    ("two programming languages", obj({"languages": {"type": "array", "items": {"enum": ["python", "rust", "go", "c"]},
                                                     "minItems": 2, "maxItems": 2}})),
    ("a rating from 1 to 5", obj({"stars": {"type": "integer", "minimum": 1, "maximum": 5}})),
    ("an HTTP response", obj({"status": {"type": "integer", "minimum": 100, "maximum": 599},
                              "ok": {"type": "boolean"}})),
    ("a product with a price", obj({"sku": S, "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000}})),
    ("a function and its arguments", obj({"function": S, "args": obj({"n": {"type": "integer", "minimum": 0}})})),
    ("a matrix of two rows of two integers", {"type": "array", "minItems": 2, "maxItems": 2,
                                              "items": {"type": "array", "items": INT, "minItems": 2, "maxItems": 2}}),
    ("a nickname or null", obj({"nickname": {"type": ["string", "null"], "maxLength": 16}})),
    ("a shape", {"anyOf": [obj({"kind": {"const": "circle"}, "r": {"type": "number", "minimum": 0}}),
                           obj({"kind": {"const": "square"}, "side": {"type": "number", "minimum": 0}})]}),
    ("a file with tags", obj({"path": S, "tags": {"type": "array", "items": S, "maxItems": 3}}, required=["path"])),
    ("a team of people", obj({"team": S, "members": {"type": "array", "minItems": 1, "maxItems": 2,
                                                     "items": {"$ref": "#/$defs/member"}}},
                             **{"$defs": {"member": obj({"name": S, "role": {"enum": ["dev", "lead"]}})}})),
    ("a yes or no answer with a reason", obj({"answer": {"type": "boolean"}, "reason": S}, required=["answer"])),
]


def test_mask_keeps_exactly_the_tokens_the_matcher_allows(tiny_qwen):
    """apr applies llguidance's bitmask itself (bit j of byte k is token 8k + j): the allowed logits are kept
    as they were, every other one is -inf, and rows past the tokenizer's words (a padded layer) are -inf too."""
    import torch

    from apr.engine.constrain import Constraint
    from apr.runtime import load_model

    lm = load_model(str(tiny_qwen), dtype="float32", backend="cpu", quiet=True)
    c = Constraint(lm, "json_schema", {"type": "object", "properties": {"a": {"type": "integer"}}})
    for token in lm.tokenizer.encode('{"a": 1')[:4] + [None]:
        n = c.n_vocab
        want = np.unpackbits(np.frombuffer(c.matcher.deep_copy().compute_bitmask(), np.uint8),
                             bitorder="little")[:n].astype(bool)
        logits = torch.randn(n + 7)
        out = c.mask(logits)
        assert 0 < want.sum() < n and out.shape == logits.shape and torch.isneginf(out[n:]).all()
        assert torch.equal(torch.isfinite(out[:n]), torch.from_numpy(want))
        assert torch.equal(out[:n][want], logits[:n][want])
        if token is not None:
            c.consume(token)


@pytest.fixture(scope="module")
def client():
    from conftest import REAL_05B, real_model

    from apr.runtime import load_model

    server = LiveServer(load_model(str(real_model(REAL_05B)), quiet=True), parallel=4)
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    server.close()


def _ask(client, what: str, schema: dict):
    r = client.chat.completions.create(
        model="m", max_tokens=120, temperature=0,
        messages=[{"role": "user", "content": f"Give {what} as JSON matching this schema: {json.dumps(schema)}"}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    return r.choices[0]


@pytest.mark.real
def test_twenty_schemas_validate(client):
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda ws: _ask(client, *ws), SCHEMAS))
    for (what, schema), choice in zip(SCHEMAS, answers):
        text = choice.message.content
        assert choice.finish_reason == "stop", (what, choice.finish_reason, text)
        jsonschema.validate(json.loads(text), schema)
