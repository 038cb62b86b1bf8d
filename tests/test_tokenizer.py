"""apr.tokenizer / apr.chat_template / `apr tokenize`.

Real-model tests compare against transformers' own GGUF tokenizer (`AutoTokenizer.from_pretrained(dir,
gguf_file=...)`). That load takes 10-20 s a model, so each is built once a module and pickled into
pytest's cache (keyed by transformers/tokenizers versions and the file's size and mtime).
"""

from __future__ import annotations

import json
import pickle

import pytest

from apr.errors import AprError, BadModelFile
from apr.tokenizer import Tokenizer

MODELS = ["qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct"]

# The acceptance corpus: ids must equal transformers' on every model.
CORPUS = [
    "Hello world", "", " ", "\n",
    "Hello, world! How's it going? I'm fine, you're great, we'll see, they'd know, I've been.",
    "DON'T SHOUT, It'S fine",
    "naïve café résumé Ünïcödé straße ﬁne",
    "Привет, мир! Γειά σου κόσμε. שלום עולם. مرحبا بالعالم",
    "你好，世界！今天天气很好。日本語のテキストです。한국어 텍스트입니다.",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🧑🏿‍💻",
    "spaces    between     words   ", "   leading spaces", "trailing newlines\n\n\n",
    "tabs\tand\t\ttabs\t", "line one\r\nline two\r\n\r\nline four", "mixed \n \n\n  \t\n end",
    "1 12 123 1234 12345 3.14159 -42 1e10 0x1F 1,000,000 x٣٤٥",
    "3141592653589793238462643383279502884197169399375105820974944592307816406286208998628034825342117",
    "def add(a, b):\n    return a + b\n\n\nclass Foo:\n    def __init__(self):\n        self.x = [a, b]\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
    "x = {'key': \"value\", 'n': 10}  # comment\nprint(f\"{x['n']:>5d}\")",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text", "<|im_start|><|im_end|><|im_start|>", "almost special <|im_start and <|im_end|",
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call>", "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    "<repo_name>apr<file_sep>main.py",
    "URL https://example.com/path?q=1&r=2#frag and a.b@c.de !!!??? ... --- === *** ###",
    "zero\u200bwidth\u00a0nbsp\u3000ideographic",
]
# Where the families' own tokenizer.json (and llama.cpp, for SmolLM) depart from transformers' GGUF loader;
# transformers' ids are the contract, so these must match it too.
CORPUS += [
    "   12 spaces then digits\n    34\n\t56", "x = [\n    1,\n    2,\n]", "½ ² Ⅻ ① and  7", "Arabic ٣٤٥",
    "cafe\u0301", "\u212b \u2126", "\uf900", "\u1100\u1161", "e\u0301<|im_start|>e\u0301",
]

CHATS = [
    [{"role": "user", "content": "Write a function."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 👋\n  there"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "  b\n"}, {"role": "user", "content": "你好 <|im_end|>"}],
]


# -- fixtures ------------------------------------------------------------------------------------

def _model_path(name):
    from apr import hub

    if not hub.is_pulled(name):
        pytest.skip(f"{name} is not pulled (apr pull {name})")
    return hub.local_path(name)


@pytest.fixture(scope="module")
def loaded():
    return {}


def _load(request, loaded, name):
    """(name, apr Tokenizer, transformers tokenizer) of a real model, built once a module."""
    if name not in loaded:
        from apr.formats.gguf import read_gguf

        path = _model_path(name)
        loaded[name] = (name, Tokenizer.from_metadata(read_gguf(path).metadata), _hf_tokenizer(request, path))
    return loaded[name]


@pytest.fixture(scope="module", params=MODELS)
def model(request, loaded):
    return _load(request, loaded, request.param)


@pytest.fixture(scope="module")
def smollm(request, loaded):
    return _load(request, loaded, "smollm2-135m-instruct")


def _hf_tokenizer(request, path):
    transformers = pytest.importorskip("transformers")
    import tokenizers

    st = path.stat()
    key = f"{path.name}-{transformers.__version__}-{tokenizers.__version__}-{st.st_size}-{st.st_mtime_ns}.pkl"
    cached = request.config.cache.mkdir("apr-hf-tokenizers") / key
    if cached.exists():
        try:
            return pickle.loads(cached.read_bytes())
        except Exception:
            pass
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    cached.write_bytes(pickle.dumps(hf))
    return hf


# -- real models vs transformers -----------------------------------------------------------------

@pytest.mark.real
@pytest.mark.reference
def test_encode_matches_transformers(model):
    name, tok, hf = model
    bad = [(t, tok.encode(t), hf.encode(t)) for t in CORPUS if tok.encode(t) != hf.encode(t)]
    assert not bad, f"{name}: {bad[:3]}"


@pytest.mark.real
def test_decode_roundtrip_and_stream(model):
    name, tok, hf = model
    for text in CORPUS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        stream = tok.stream_decoder()
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)


@pytest.mark.real
@pytest.mark.reference
def test_special_ids_match_transformers(model):
    name, tok, hf = model
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (hf.bos_token_id, hf.eos_token_id, len(hf))
    im_start, im_end = hf.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert tok.encode("<|im_start|>") == [im_start]
    assert {tok.eos_id, im_end, hf.convert_tokens_to_ids("<|endoftext|>")} == tok.stop_ids
    assert tok.encode("hi", add_bos=True) == [tok.bos_id, *tok.encode("hi")]
    assert tok.encode("hi") == tok.encode("hi", add_bos=False)  # the GGUFs say add_bos_token = false
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"


@pytest.mark.real
@pytest.mark.reference
@pytest.mark.parametrize("gen", [True, False])
def test_chat_matches_transformers(model, gen):
    name, tok, hf = model
    assert tok.has_chat_template and tok.chat_start_marker == "<|im_start|>"
    for chat in CHATS:
        rendered = tok.render_chat(chat, add_generation_prompt=gen)
        assert rendered == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
        # ordinary conversations: the text-safe chat encoding gives transformers' ids, and today's
        ids = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        typed = sum(m["content"].count("<|im_end|>") for m in chat)
        text, mine = tok.encode_chat(chat, add_generation_prompt=gen)
        assert text == rendered and list(ids) == tok.encode(rendered, add_bos=False)
        if not typed:
            assert mine == list(ids)
        else:  # transformers makes the typed <|im_end|> a control token; apr keeps it text
            im_end = tok.token_to_id("<|im_end|>")
            assert mine.count(im_end) == list(ids).count(im_end) - typed
        assert tok.is_templated(rendered) and tok.is_templated("\n" + rendered)
    assert not tok.is_templated("Write a function.") and not tok.is_templated("user: <|im_start|>")


@pytest.mark.real
def test_cli_json(smollm, capsys):
    from apr.cli import main

    name, tok, hf = smollm  # the command is model-independent: the smallest model is enough
    assert main(["tokenize", name, "Hello world 123", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ids"] == hf.encode("Hello world 123") and out["count"] == len(out["ids"])
    assert out["tokens"] == hf.convert_ids_to_tokens(out["ids"])
    assert main(["tokenize", name, "hi", "--chat", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rendered"] == hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                     add_generation_prompt=True)
    assert out["ids"] == hf.encode(out["rendered"], add_special_tokens=False)
    assert main(["tokenize", name, out["rendered"], "--chat", "--json"]) == 0  # no double wrap
    assert json.loads(capsys.readouterr().out)["rendered"] == out["rendered"]


# -- synthetic vocabularies (no model files needed) ----------------------------------------------

def _byte_symbols():
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def tiny_meta(pre="qwen2", template=None, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), **extra):
    merges = ["Ġ t", "h e", "Ġt he", "Ġ Ġ", "1 2", "12 3"]
    tokens = _byte_symbols() + [m.replace(" ", "") for m in merges] + list(specials)
    meta = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": [1] * (len(tokens) - len(specials)) + [3] * len(specials),
        "tokenizer.ggml.bos_token_id": len(tokens) - len(specials), "tokenizer.ggml.eos_token_id": len(tokens) - 1,
    }
    if template:
        meta["tokenizer.chat_template"] = template
    meta.update(extra)
    return meta


def _pieces(tok, text):
    return [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str(text)]


def test_pre_tokenizer_families():
    text = "ab  1234567 x"
    assert _pieces(Tokenizer.from_metadata(tiny_meta("qwen2")), text) == ["ab", "Ġ", "Ġ", *"1234567", "Ġx"]
    assert _pieces(Tokenizer.from_metadata(tiny_meta("llama-bpe")), text) == ["ab", "Ġ", "Ġ", "123", "456", "7", "Ġx"]
    assert _pieces(Tokenizer.from_metadata(tiny_meta("gpt2")), text) == ["ab", "Ġ", "Ġ1234567", "Ġx"]
    assert _pieces(Tokenizer.from_metadata(tiny_meta("smollm")), text) == ["ab", "Ġ", "Ġ1234567", "Ġx"]
    # llama-bpe sets ignore_merges (Llama 3): "123" is in the vocab, so it is used whole.
    tok = Tokenizer.from_metadata(tiny_meta("llama-bpe"))
    assert [tok.id_to_token(i) for i in tok.encode(" the 123")] == ["Ġthe", "Ġ", "123"]


@pytest.mark.parametrize("key,value,match", [
    ("tokenizer.ggml.pre", "tekken", "unknown tokenizer pre-tokenizer 'tekken'"),
    ("tokenizer.ggml.pre", None, "unknown tokenizer pre-tokenizer 'None'"),
    ("tokenizer.ggml.model", "llama", "tokenizer model 'llama' is not supported"),
    ("tokenizer.ggml.merges", ["Ġ zz"], "merges do not fit"),
    ("tokenizer.ggml.merges", ["a b c"], "not 'left right'"),
    ("tokenizer.ggml.eos_token_id", 10**6, "outside the vocabulary"),
])
def test_bad_metadata(key, value, match):
    with pytest.raises(BadModelFile, match=match):
        Tokenizer.from_metadata(tiny_meta(**{key: value}) if key != "tokenizer.ggml.pre" else tiny_meta(pre=value))


def test_stream_decoder_waits_for_whole_characters():
    tok = Tokenizer.from_metadata(tiny_meta())
    ids = tok.encode("é😀!")  # the tiny vocab has no merges for these: one token per byte
    assert len(ids) == 7
    stream = tok.stream_decoder()
    assert [stream.push(i) for i in ids] == ["", "é", "", "", "", "😀", "!"]
    stream.push(ids[2])  # a dangling lead byte...
    assert stream.flush() == "\ufffd"  # ...becomes U+FFFD only at the end
    quiet = tok.stream_decoder(skip_special_tokens=True)
    assert "".join(quiet.push(i) for i in tok.encode("<|im_start|>hi<|im_end|>")) == "hi"


def test_chatml_fallback_and_markers():
    tok = Tokenizer.from_metadata(tiny_meta())
    assert not tok.has_chat_template
    rendered = tok.render_chat([{"role": "user", "content": "hi"}])
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.chat_start_marker == "<|im_start|>" and tok.is_templated(" <|im_start|>user\nhi")
    assert tok.stop_ids == {tok.eos_id, tok.token_to_id("<|endoftext|>")}


LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
          " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def test_llama3_style_template_markers():
    specials = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    tok = Tokenizer.from_metadata(tiny_meta("llama-bpe", LLAMA3, specials, **{"tokenizer.ggml.add_bos_token": True}))
    assert tok.render_chat([{"role": "user", "content": " hi "}], add_generation_prompt=False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>")
    assert tok.chat.start_markers == ("<|begin_of_text|>", "<|start_header_id|>")
    assert tok.is_templated("<|start_header_id|>user<|end_header_id|>\n\nhi") and not tok.is_templated("hi")
    assert tok.token_to_id("<|eot_id|>") in tok.stop_ids and tok.token_to_id("<|end_of_text|>") in tok.stop_ids
    assert tok.encode("hi")[0] == tok.bos_id and tok.encode("hi", add_bos=False)[0] != tok.bos_id


def test_template_semantics_and_errors():
    render = lambda t, msgs=(), **kw: Tokenizer.from_metadata(tiny_meta(template=t)).chat.render(list(msgs), **kw)
    # tojson like transformers: no HTML escaping, non-ASCII kept, options passed through
    assert render("{{ messages[0] | tojson }}", [{"role": "user", "content": "<a>&é"}]) == \
        '{"role": "user", "content": "<a>&é"}'
    assert render("{{ {'b': 1, 'a': [1]} | tojson(indent=2, sort_keys=True) }}").startswith('{\n  "a": [')
    assert render("{% for x in [1, 2, 3] %}{% if x == 2 %}{% break %}{% endif %}{{ x }}{% endfor %}") == "1"
    assert render("  {% if true %}\n  x\n{% endif %}\n") == "  x\n"  # trim_blocks + lstrip_blocks
    assert render("{{ bos_token }}|{{ eos_token }}") == "<|endoftext|>|<|im_end|>"
    assert render("{{ messages[0].name is defined }}", [{"role": "user", "content": "x", "name": None}]) == "False"
    with pytest.raises(AprError, match=r"^chat template error: Conversation roles must alternate$"):
        render("{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(AprError, match="chat template does not compile"):
        render("{% for %}")
    with pytest.raises(AprError, match="chat template error"):  # str + int inside the template
        render("{{ 'a' + messages[0].content }}", [{"role": "user", "content": 3}])
    with pytest.raises(AprError, match="chat template error"):  # the sandbox holds
        render("{{ ''.__class__.__mro__ }}{{ cycler.__init__.__globals__ }}")
    with pytest.raises(AprError) as e:
        render("{% set ns = namespace(_x=1) %}")
    assert "\n" not in str(e.value)


def test_cli_errors(capsys):
    from apr.cli import main

    assert main(["tokenize", "/nonexistent/model.gguf", "hi"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("apr: error: model file not found") and err.count("\n") == 1
