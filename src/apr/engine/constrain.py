"""Constrained decoding: a per-sequence grammar matcher that masks the logits before sampling.

The grammar engine is llguidance (PyPI, no dependencies of its own): it compiles JSON schemas, Lark and
GBNF grammars and regexes against the model's own vocabulary and fills a token bitmask in tens of
microseconds. xgrammar was measured beside it on the 0.5B's 151,936-token vocabulary (docs/structured.md):
the masks cost the same, but xgrammar pulls in triton and transformers and its CPU mask apply took ~0.8 ms.
The tokenizer view is built once per model file (cached here by its sha256); each request gets its own
matcher, so a batch mixes constrained and free sequences.
"""

from __future__ import annotations

import functools
import json

import torch

from apr.errors import AprError

KINDS = ("json_schema", "json_object", "regex", "lark", "gbnf")
# Whitespace between JSON tokens: a newline and indentation are allowed (a model writes JSON pretty-printed, and
# forcing it compact puts it off its own distribution), but bounded: with unbounded whitespace a small model
# can pick newlines forever and never close the object (seen on the 0.5B with a two-key schema).
JSON_DEFAULTS = {"whitespace_pattern": r"(\n {0,16}| )?"}  # one newline + indent, or a space


class BadGrammar(AprError):
    """A schema or grammar that does not compile, or uses something the engine does not support."""


def _llg():
    try:
        import llguidance
        import llguidance.torch  # noqa: F401
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise AprError(f"constrained decoding needs llguidance ({e})") from None
    return llguidance


@functools.lru_cache(maxsize=4)
def _tokenizer(sha256: str, backend_json: str, n_vocab: int, eos: int):
    return _llg().LLTokenizer(backend_json, n_vocab=n_vocab, eos_token=eos)


def tokenizer_for(lm):
    """llguidance's view of `lm`'s vocabulary (the tokenizer JSON apr built from the GGUF), cached per file."""
    tok = lm.tokenizer
    eos = next(iter(sorted(tok.stop_ids)), 0)
    for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):  # the end-of-turn token, where the model has one
        i = tok.token_to_id(name)
        if i is not None and i in tok.stop_ids:
            eos = i
            break
    return _tokenizer(lm.sha256, tok.backend.to_str(), lm.config.vocab_size, eos)


def grammar_text(kind: str, spec) -> str:
    """(kind, spec) -> an llguidance grammar. json_schema: a dict or its JSON text; json_object: any object;
    regex: the pattern; lark / gbnf: the grammar's text."""
    llg = _llg()
    if kind not in KINDS:
        raise BadGrammar(f"unknown constraint kind '{kind}' (choose from {', '.join(KINDS)})")
    try:
        if kind == "json_schema":
            schema = json.loads(spec) if isinstance(spec, str) else spec
            if not isinstance(schema, dict):
                raise BadGrammar("a JSON schema must be an object")
            return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
        if kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_DEFAULTS)
        return llg.grammar_from("gbnf" if kind == "gbnf" else kind, spec)
    except BadGrammar:
        raise
    except (ValueError, TypeError) as e:
        raise BadGrammar(f"invalid {kind.replace('_', ' ')}: {str(e).splitlines()[0]}") from None


class Constraint:
    """One sequence's matcher: `mask` the logits, then `consume` the sampled token."""

    def __init__(self, lm, kind: str, spec):
        llg = _llg()
        self.kind = kind
        grammar = grammar_text(kind, spec)
        tok = tokenizer_for(lm)
        problem = _problem(llg, grammar, tok)
        if problem:
            raise BadGrammar(f"invalid {kind.replace('_', ' ')}: {problem}")
        self.matcher = llg.LLMatcher(tok, grammar)
        if self.matcher.is_error():
            raise BadGrammar(f"invalid {kind.replace('_', ' ')}: {self.matcher.get_error()}")
        self.n_vocab = tok.vocab_size
        self.bitmask = llg.torch.allocate_token_bitmask(1, self.n_vocab)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (vocab,) with every token the grammar forbids at -inf (a copy)."""
        llg = _llg()
        llg.torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        out = logits.float().clone().unsqueeze(0)  # (1, vocab)
        llg.torch.apply_token_bitmask_inplace(out, self.bitmask)
        return out[0]

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise AprError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar admits nothing more (the object is complete and nothing may follow)."""
        return self.matcher.is_stopped()

    @property
    def complete(self) -> bool:
        return self.matcher.is_accepting()


def _problem(llg, grammar: str, tok) -> str | None:
    """Why `grammar` cannot be used, or None. llguidance answers (failed, messages); an unknown keyword, format or
    type comes back as a message too, and each is a refusal here: honouring half a schema would return JSON that
    does not validate."""
    try:
        failed, msgs = llg.LLMatcher.validate_grammar_with_warnings(grammar, tok)
    except (ValueError, TypeError) as e:
        return str(e).splitlines()[0]
    if not failed and not msgs:
        return None
    return " ".join(" ".join(msgs).split())[:300] or "rejected"
