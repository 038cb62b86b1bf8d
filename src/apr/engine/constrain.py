"""Constrained decoding: a per-sequence grammar matcher that masks the logits before sampling.

The grammar engine is llguidance (PyPI, no dependencies of its own): it compiles JSON schemas, Lark and
GBNF grammars and regexes against the model's own vocabulary and fills a token bitmask in tens of
microseconds. xgrammar was measured beside it on the 0.5B's 151,936-token vocabulary (docs/structured.md):
the masks cost the same, but xgrammar pulls in triton and transformers and its CPU mask apply took ~0.8 ms.
The tokenizer view is built once per model file (cached here by its sha256); each request gets its own
matcher, so a batch mixes constrained and free sequences.

The mask is applied here rather than by `llguidance.torch`: that module wraps its apply in `torch.compile`, so
importing it loads the compiler stack and the first mask of a process waits for a C++ build (10-25 s seen on
the 2-core box, in the first constrained request's time to first token). A byte -> 8 additive values table
(0 or -inf) does the same in one gather and one add, ~50 us on 151,936 tokens, with nothing to compile.
"""

from __future__ import annotations

import json

import numpy as np
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
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise AprError(f"constrained decoding needs llguidance ({e})") from None
    return llguidance


_TOKENIZERS: dict = {}  # (model sha256, vocab size) -> llguidance.LLTokenizer; a few models at most


def tokenizer_for(lm):
    """llguidance's view of `lm`'s vocabulary (the tokenizer JSON apr built from the GGUF), cached per file.
    The cache is looked up before the tokenizer is serialised: that JSON (151,936 words and their merges) takes
    hundreds of milliseconds to write, which would otherwise be paid by every request's grammar compile."""
    key = (lm.sha256, lm.config.vocab_size)
    hit = _TOKENIZERS.get(key)
    if hit is not None:
        return hit
    tok = lm.tokenizer
    eos = next(iter(sorted(tok.stop_ids)), 0)
    for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):  # the end-of-turn token, where the model has one
        i = tok.token_to_id(name)
        if i is not None and i in tok.stop_ids:
            eos = i
            break
    view = _llg().LLTokenizer(tok.backend.to_str(), n_vocab=lm.config.vocab_size, eos_token=eos)
    if len(_TOKENIZERS) >= 4:
        _TOKENIZERS.pop(next(iter(_TOKENIZERS)))  # the oldest
    _TOKENIZERS[key] = view
    return view


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


# _ADD[b] (8,): what the bitmask byte b adds to its 8 tokens' logits: 0 where bit j is set (allowed), else -inf.
# llguidance's mask is 32-bit words, bit i of word w = token 32w + i; read as bytes on a little-endian CPU (every
# CPU apr builds for), byte k bit j is token 8k + j.
_ADD = np.array([[0.0 if (b >> j) & 1 else -np.inf for j in range(8)] for b in range(256)], dtype=np.float32)


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
        self.bits = np.empty(4 * ((self.n_vocab + 31) // 32), dtype=np.uint8)  # the mask, one bit a token
        self.add = np.empty((self.bits.size, 8), dtype=np.float32)  # (bytes, 8): 0 / -inf per token

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (vocab,) with every token the grammar forbids at -inf (a new tensor; `logits` is untouched).
        numpy, single-threaded, on purpose: a 2-thread torch op waits for its second thread, and on a busy
        2-core CPU that wait was measured at tens of milliseconds; these two passes take ~50 us."""
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)  # fills bits; drops the GIL
        np.take(_ADD, self.bits, axis=0, out=self.add)
        add = self.add.reshape(-1)  # (bytes, 8) -> (8 * bytes,), >= the tokenizer's words
        n = logits.shape[-1]
        if n > add.size:  # logits rows past the tokenizer's words (a padded output layer): never allowed
            add = np.concatenate([add, np.full(n - add.size, -np.inf, dtype=np.float32)])
        if logits.device.type != "cpu":  # a GPU's logits: the mask travels to them (~600 KB)
            return logits.float() + torch.from_numpy(add[:n]).to(logits.device)
        return torch.from_numpy(logits.detach().float().contiguous().numpy() + add[:n])

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
