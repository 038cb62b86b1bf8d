"""Constrained decoding through the engine: grammar masks on tiny models, bad grammars, and (real) JSON schemas."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("llguidance")

from apr.engine import Engine, SamplingParams  # noqa: E402
from apr.engine.constrain import BadGrammar  # noqa: E402
from apr.generate import generate  # noqa: E402
from apr.runtime import load_model  # noqa: E402


@pytest.fixture(scope="module")
def lm(tiny_qwen):
    return load_model(str(tiny_qwen), dtype="float32", backend="cpu", quiet=True)


def _run(lm, constraint, max_tokens=24, prompt="the cat"):
    return Engine(lm, 1).submit(lm.tokenizer.encode(prompt), SamplingParams(max_tokens=max_tokens,
                                                                           constraint=constraint))


def test_a_mask_that_admits_one_string_forces_it(lm):
    free = generate(lm, "the cat", chat=False, max_tokens=8).text
    r = _run(lm, ("regex", "dog dog"))
    r.result()
    assert r.text == "dog dog" != free and r.finish_reason == "stop" and r.stop_reason == "grammar"


@pytest.mark.parametrize("kind,spec,check", [
    ("regex", r"[0-9]{2,4}-[a-c]+", lambda t: re.fullmatch(r"[0-9]{2,4}-[a-c]+", t)),
    ("json_schema", {"type": "string", "enum": ["red", "green"]}, lambda t: json.loads(t) in ("red", "green")),
    ("json_schema", {"type": "integer", "minimum": 3, "maximum": 7}, lambda t: 3 <= json.loads(t) <= 7),
    ("lark", 'start: "yes" | "no"', lambda t: t in ("yes", "no")),
    ("gbnf", 'root ::= "a" [0-9] "b"', lambda t: re.fullmatch(r"a[0-9]b", t)),
])
def test_random_model_output_matches_the_grammar(lm, kind, spec, check):
    r = _run(lm, (kind, spec), max_tokens=40)
    r.result()
    assert r.finish_reason == "stop" and check(r.text), (r.text, r.stop_reason)


def test_length_inside_an_object_says_length(lm):
    r = _run(lm, ("json_schema", {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}),
             max_tokens=3)
    r.result()
    assert r.finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(r.text)  # truncated, and reported as such


@pytest.mark.parametrize("kind,spec,msg", [
    ("json_schema", {"type": "objectx"}, "Invalid type"),
    ("json_schema", {"type": "string", "format": "no-such-format"}, "format"),
    ("json_schema", "[1, 2", "json"),
    ("regex", "[a-", "regex"),
    ("lark", "start: undefined_rule", "undefined_rule"),
    ("xml", "<a/>", "unknown constraint kind"),
])
def test_bad_grammars_are_refused_at_submit(lm, kind, spec, msg):
    with pytest.raises((BadGrammar, ValueError), match=msg):
        _run(lm, (kind, spec))


def test_constrained_and_free_sequences_share_a_batch(lm):
    prompts = ["the cat sat", "a dog", "hello world", "in the end"]
    free = {p: generate(lm, p, chat=False, max_tokens=12).tokens for p in prompts}
    eng = Engine(lm, 4)
    reqs = [eng.submit(lm.tokenizer.encode(p), SamplingParams(
        max_tokens=12, constraint=("regex", "[a-z ]{1,30}") if i % 2 else None)) for i, p in enumerate(prompts)]
    results = [r.result() for r in reqs]
    assert [results[0].tokens, results[2].tokens] == [free[prompts[0]], free[prompts[2]]]
    assert all(re.fullmatch("[a-z ]{1,30}", results[i].text) for i in (1, 3))
    assert eng.stats()["batch_sizes"].get(4, 0) >= 1


def test_cli_flags(tiny_qwen, tmp_path, capsys):
    from apr import cli

    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "string", "enum": ["red", "green"]}))
    rc = cli.main(["run", str(tiny_qwen), "--raw", "--prompt", "the cat", "--json-schema", str(schema), "--json",
                   "--dtype", "float32", "-n", "20"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and json.loads(out["text"]) in ("red", "green")
    schema.write_text('{"type": "objectx"}')
    rc = cli.main(["run", str(tiny_qwen), "--raw", "--prompt", "x", "--json-schema", str(schema)])
    err = capsys.readouterr().err
    assert rc != 0 and "Invalid type" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2


NAME = {"type": "string", "maxLength": 40}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"language": {"type": "string", "enum": ["python", "rust", "go"]},
                                      "reasons": {"type": "array", "items": {"type": "string", "maxLength": 60},
                                                  "maxItems": 3}},
     "required": ["language", "reasons"], "additionalProperties": False},
    {"type": "object", "properties": {"function": NAME, "args": {"type": "object", "properties": {
        "n": {"type": "number", "minimum": 0}}, "required": ["n"], "additionalProperties": False}},
     "required": ["function", "args"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 5},
]


@pytest.mark.real
def test_real_model_answers_validate():
    """The 0.5B through the chat template: every constrained answer parses and validates. Every schema bounds
    its strings, so a complete answer fits in max_tokens whatever the model says (an unbounded string ran past
    120 tokens on an AVX2 box, whose prefill rounds differently from AVX512-BF16's: `length`, correctly). The
    bound: at most one token per character of the three 60-character reasons plus the structure around them.
    No schema admits extra keys: an extra key is an unbounded string (on an AMX box the answer to the second
    schema closed its array and went on into a key of its own until `length`)."""
    import jsonschema
    from conftest import REAL_05B, real_model

    lm = load_model(str(real_model(REAL_05B)), quiet=True)
    for schema in SCHEMAS:
        r = generate(lm, f"Answer with JSON matching this schema: {json.dumps(schema)}", max_tokens=320,
                     constraint=("json_schema", schema))
        assert r.stop_reason in ("grammar", "eos"), (schema, r.text)
        jsonschema.validate(json.loads(r.text), schema)
