"""Byte-level BPE tokenizers built from GGUF metadata with HF `tokenizers`.

A GGUF carries no tokenizer.json: only tokens, merges, token types and `tokenizer.ggml.pre`,
llama.cpp's name for the pre-tokenizer family. We rebuild each family's pre-tokenizer as the
family's own HF tokenizer.json (and llama.cpp) define it. Where transformers' GGUF loader is
known to differ, the difference is noted at the family below.
"""

from __future__ import annotations

import codecs
from functools import cached_property, lru_cache
from itertools import repeat

from apr.chat_template import ChatTemplate
from apr.errors import BadModelFile

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

# The split regexes of llama.cpp's llama-vocab.cpp, identical to the families' tokenizer.json.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Names of tokens that end a turn or a document in the families we serve.
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|end|>")


def _split_then_bytes(pattern: str):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


def _qwen2():
    # Qwen2's own tokenizer.json also NFC-normalizes; llama.cpp and transformers' GGUF loader do not,
    # and we match them (ids equal transformers' on any text): only non-NFC input ("e\u0301") differs.
    return None, _split_then_bytes(_QWEN2_SPLIT), False


def _smollm():
    # We match transformers' GGUF loader: GPT-2 byte-level splitting. SmolLM's own tokenizer.json (and
    # llama.cpp) first isolate every digit, so they differ where 2+ whitespace chars precede a digit
    # ("\n    1") and where a space precedes a non-ASCII number (" ½"); transformers' ids are our contract.
    from tokenizers import pre_tokenizers

    return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False


def _llama_bpe():
    # Llama 3's tokenizer.json sets ignore_merges: a pre-token found whole in the vocab is used as is.
    return None, _split_then_bytes(_LLAMA3_SPLIT), True


def _gpt2():
    from tokenizers import pre_tokenizers

    return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False


# tokenizer.ggml.pre -> () -> (normalizer, pre_tokenizer, ignore_merges)
PRE_TOKENIZERS = {"qwen2": _qwen2, "smollm": _smollm, "llama-bpe": _llama_bpe, "gpt2": _gpt2}


@lru_cache(maxsize=1)
def _byte_maps() -> tuple[dict[int, str], dict[str, int]]:
    """GPT-2's reversible byte <-> printable-char map that byte-level vocabularies are spelled in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars, {c: b for b, c in chars.items()}


def _meta(meta: dict, key: str, default=None):
    return meta.get(f"tokenizer.ggml.{key}", default)


def _check(meta: dict) -> tuple[list[str], list[str], dict[int, int]]:
    """(tokens, merges, {id: type} of the control and user-defined tokens), or BadModelFile."""
    model = _meta(meta, "model")
    if model != "gpt2":
        raise BadModelFile(f"tokenizer model '{model}' is not supported (apr reads byte-level BPE: 'gpt2')")
    pre = _meta(meta, "pre")
    if not isinstance(pre, str) or pre not in PRE_TOKENIZERS:
        raise BadModelFile(f"unknown tokenizer pre-tokenizer '{pre}' (apr knows: {', '.join(PRE_TOKENIZERS)})")
    tokens, merges = _meta(meta, "tokens"), _meta(meta, "merges")
    if not tokens or merges is None:
        raise BadModelFile("GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    types = _meta(meta, "token_type") or []
    for key, value, kind in (("tokens", tokens, str), ("merges", merges, str), ("token_type", types, int)):
        if not (isinstance(value, list) and set(map(type, value)) <= {kind}):
            raise BadModelFile(f"GGUF tokenizer.ggml.{key} is not a list of {kind.__name__}s")
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise BadModelFile(f"GGUF tokenizer.chat_template is a {type(template).__name__}, not a string")
    if types and len(types) != len(tokens):
        raise BadModelFile(f"GGUF has {len(tokens)} tokens but {len(types)} token types")
    marked = {i: k for i, k in enumerate(types) if k == CONTROL or k == USER_DEFINED}
    return tokens, merges, marked


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _special_id(meta: dict, key: str, n: int) -> int | None:
    i = _meta(meta, f"{key}_token_id")
    if i is None:
        return None
    if type(i) is not int:
        raise BadModelFile(f"tokenizer.ggml.{key}_token_id {i!r} is not an integer")
    if not 0 <= int(i) < n:
        raise BadModelFile(f"tokenizer.ggml.{key}_token_id {i} is outside the vocabulary ({n} tokens)")
    return int(i)


class StreamDecoder:
    """Turns ids arriving one by one into text, never emitting half a UTF-8 character."""

    def __init__(self, tok: "Tokenizer", skip_special_tokens: bool = False):
        self._tok, self._skip = tok, skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this id ("" while a character is still incomplete)."""
        if self._skip and token_id in self._tok.special_ids:
            return ""
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is left at the end (an unfinished character decodes as U+FFFD)."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """Encode/decode and chat templates of a GGUF model. Build with `Tokenizer.from_metadata`."""

    def __init__(self, backend, meta: dict, tokens: list[str], marked: dict[int, int]):
        self.backend = backend  # tokenizers.Tokenizer
        self.pre = _meta(meta, "pre")
        self.vocab_size = len(tokens)
        self.bos_id = _special_id(meta, "bos", len(tokens))
        self.eos_id = _special_id(meta, "eos", len(tokens))
        self.pad_id = _special_id(meta, "padding", len(tokens))
        self.unk_id = _special_id(meta, "unknown", len(tokens))
        self.add_bos = bool(_meta(meta, "add_bos_token", False))
        self.special_ids = frozenset(i for i, k in marked.items() if k == CONTROL)
        # True: special tokens typed in chat messages count as specials (`--allow-special-in-content`)
        self.allow_special_in_content = False
        self._tokens = tokens
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id, "pad_token": self.pad_id}
        self.chat = ChatTemplate(
            meta.get("tokenizer.chat_template"),
            {k: tokens[i] if i is not None else None for k, i in names.items()},
            [tokens[i] for i in marked],
        )

    @classmethod
    def from_metadata(cls, meta: dict) -> "Tokenizer":
        from tokenizers import AddedToken, decoders, models
        from tokenizers import Tokenizer as Backend

        tokens, merges, marked = _check(meta)
        normalizer, pre_tokenizer, ignore_merges = PRE_TOKENIZERS[_meta(meta, "pre")]()
        alphabet = set(_byte_maps()[1])
        if set("".join(tokens)) <= alphabet:  # the usual case: skip the per-token check
            vocab = dict(zip(tokens, range(len(tokens))))
        else:
            vocab = {_respell(t, alphabet): i for i, t in enumerate(tokens)}
        pairs = _merge_pairs(merges)
        # A merge whose result is not in the vocabulary makes the Rust BPE panic (a PanicException and a
        # Rust backtrace on stderr) instead of failing: checked first, at C speed ("a b" -> "ab").
        if not all(map(vocab.__contains__, map(str.replace, merges, repeat(" "), repeat("")))):
            bad = next(m for m in merges if m.replace(" ", "") not in vocab)
            raise BadModelFile(f"GGUF tokenizer merges do not fit its vocabulary: the result of merge {bad!r} "
                               "is not a token")
        try:
            bpe = models.BPE(vocab, pairs, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                             fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # a merge naming a token the vocabulary lacks; pyo3's PanicException is
            # a BaseException (a vocabulary the Rust side cannot index)
            raise BadModelFile(f"GGUF tokenizer merges do not fit its vocabulary: {_one_line(e)}") from None
        backend = Backend(bpe)
        backend.normalizer = normalizer
        backend.pre_tokenizer = pre_tokenizer
        backend.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>) are special; user-defined ones (<tool_call>) are plain added
        # tokens; both are matched whole in text. A control token spelled outside the byte alphabet
        # is a mislabel that would not map onto its own id, so (like transformers) it is skipped.
        control = [tokens[i] for i, k in marked.items() if k == CONTROL and set(tokens[i]) <= alphabet]
        user = [tokens[i] for i, k in marked.items() if k == USER_DEFINED and tokens[i] in vocab]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
        return cls(backend, meta, tokens, marked)

    # -- text <-> ids ---------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their single ids."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self._tokens[token_id]

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (special tokens: their text)."""
        piece = self.backend.id_to_token(int(token_id))
        if piece is None:
            raise IndexError(f"token id {token_id} is outside the vocabulary ({self.vocab_size} tokens)")
        to_byte = _byte_maps()[1]
        if all(c in to_byte for c in piece):
            return bytes(to_byte[c] for c in piece)
        return piece.encode("utf-8")

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    # -- chat -------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return self.chat.has_template

    @property
    def chat_start_marker(self) -> str | None:
        return self.chat.start_marker

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        return self.chat.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def is_templated(self, prompt: str) -> bool:
        return self.chat.is_templated(prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, template_kwargs: dict | None = None,
                    *, allow_special_in_content: bool | None = None) -> tuple[str, list[int]]:
        """A conversation through the template -> (text, ids), where special and added tokens come only from
        the template's own text: one typed in a message (`<|im_start|>system`) is tokenized as plain text.

        Each such string in the messages is swapped for a private-use character before rendering, and the
        rendered text is tokenized piece by piece between those characters, each one as its string's plain
        text. A conversation without such strings is rendered and encoded exactly as before (one `encode`
        of the rendered text), so ordinary ids are unchanged by construction. `allow_special_in_content`
        (default: `self.allow_special_in_content`) restores the old behaviour: specials anywhere count.
        `template_kwargs` (extra template variables, which API clients may send) come as one dict, so that
        none of them can set this method's own parameters; their strings are text like the messages'."""
        allow = self.allow_special_in_content if allow_special_in_content is None else allow_special_in_content
        kwargs = dict(template_kwargs or {})
        if not allow:
            found = set(_strings_matching(messages, self._added_re)) | set(_strings_matching(kwargs, self._added_re))
            if found:
                return self._encode_escaped(messages, add_generation_prompt, found, kwargs)
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return text, self.encode(text, add_bos=False)

    def _encode_escaped(self, messages, add_generation_prompt, found: set[str], kwargs) -> tuple[str, list[int]]:
        import re

        taken = set(self.chat.source) | set("".join(_all_strings([messages, kwargs])))
        free = (chr(c) for c in range(_ESCAPE_BASE, 0x10FFFE) if chr(c) not in taken)
        to_char = dict(zip(sorted(found), free))
        back = {c: t for t, c in to_char.items()}

        def sub(text: str) -> str:
            return self._added_re.sub(lambda m: to_char.get(m.group(0), m.group(0)), text)

        rendered = self.render_chat(_map_strings(messages, sub), add_generation_prompt=add_generation_prompt,
                                    **_map_strings(kwargs, sub))
        ids: list[int] = []
        parts: list[str] = []
        for piece in re.split("([" + "".join(back) + "])", rendered):
            if piece in back:
                ids += self.encode_plain(back[piece])
                parts.append(back[piece])
            elif piece:
                ids += self.backend.encode(piece, add_special_tokens=False).ids
                parts.append(piece)
        return "".join(parts), ids

    def encode_plain(self, text: str) -> list[int]:
        """Ids of `text` as plain text: no special or added token is matched, only the BPE itself."""
        b = self.backend
        if b.normalizer is not None:
            text = b.normalizer.normalize_str(text)
        pieces = b.pre_tokenizer.pre_tokenize_str(text) if b.pre_tokenizer is not None else [(text, None)]
        return [t.id for piece, _ in pieces for t in b.model.tokenize(piece)]

    @cached_property
    def _added_re(self):
        import re

        names = sorted({t.content for t in self.backend.get_added_tokens_decoder().values() if t.content},
                       key=len, reverse=True)
        return re.compile("|".join(map(re.escape, names))) if names else re.compile(r"(?!x)x")

    @cached_property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: EOS, the template's end-of-turn token, and known end tokens."""
        ids = {self.eos_id} if self.eos_id is not None else set()
        for name in (self.chat.end_of_turn, *_END_TOKENS):
            i = self.backend.token_to_id(name) if name else None
            if i is not None and (i in self.special_ids or name == self.chat.end_of_turn):
                ids.add(i)
        return frozenset(ids)


_ESCAPE_BASE = 0x100000  # plane-16 private use: stand-ins for token strings found in chat messages


def _all_strings(x):
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _all_strings(k)
            yield from _all_strings(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _all_strings(v)


def _strings_matching(x, pattern):
    for text in _all_strings(x):
        yield from (m.group(0) for m in pattern.finditer(text))


def _map_strings(x, fn):
    """A copy of nested dicts/lists with `fn` applied to every string (keys included)."""
    if isinstance(x, str):
        return fn(x)
    if isinstance(x, dict):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_map_strings(v, fn) for v in x)
    return x


def _respell(token: str, alphabet: set[str]) -> str:
    # Byte-level vocabularies are spelled in GPT-2's byte alphabet; a token that is not (some
    # converters store raw text) is respelled from its UTF-8 bytes, as transformers does.
    if set(token) <= alphabet:
        return token
    chars = _byte_maps()[0]
    return "".join(chars[b] for b in token.encode("utf-8"))


def _merge_pairs(merges: list[str]) -> list[tuple[str, str]]:
    # "Ġ t" -> ("Ġ", "t"). One C-level join/split instead of 150k Python splits (~0.1 s saved);
    # byte-level tokens never hold a space, so each merge yields exactly two halves.
    flat = " ".join(merges).split(" ")
    if len(flat) != 2 * len(merges):
        raise BadModelFile("GGUF tokenizer.ggml.merges has an entry that is not 'left right'")
    halves = iter(flat)
    return list(zip(halves, halves))
