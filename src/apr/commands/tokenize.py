"""`apr tokenize MODEL TEXT`: the token ids of a text (optionally after the chat template)."""

from __future__ import annotations

import json
import sys


def setup_parser(p):
    p.add_argument("model", metavar="MODEL", help="registry name or path to a .gguf file")
    p.add_argument("text", metavar="TEXT", help="text to tokenize ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="render TEXT as a user message through the chat template first")
    p.add_argument("--json", action="store_true", help="print JSON: ids, tokens, count (and rendered with --chat)")


def load_tokenizer(spec: str):
    """The Tokenizer of a MODEL argument (registry name or file path)."""
    from apr.hub import resolve_model
    from apr.runtime import read_model_file
    from apr.tokenizer import Tokenizer

    path = resolve_model(spec)
    _, metadata, _ = read_model_file(path)  # .gguf or .apr
    return path, Tokenizer.from_metadata(metadata)


def main(args):
    text = sys.stdin.read() if args.text == "-" else args.text
    path, tok = load_tokenizer(args.model)
    rendered = None
    if args.chat and tok.is_templated(text):  # a prompt that already carries the template is not wrapped twice
        rendered, ids = text, tok.encode(text, add_bos=False)
    elif args.chat:  # the ids `apr run --chat` feeds the model: typed special tokens stay text
        rendered, ids = tok.encode_chat([{"role": "user", "content": text}])
    else:
        ids = tok.encode(text)
    if args.json:
        out = {"model": str(path), "ids": ids, "tokens": [tok.id_to_token(i) for i in ids], "count": len(ids)}
        if args.chat:
            out["rendered"] = rendered
        print(json.dumps(out, ensure_ascii=False))
    else:
        print(" ".join(map(str, ids)))
    return 0
