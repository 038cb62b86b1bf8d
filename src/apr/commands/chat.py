"""`apr chat MODEL`: an interactive conversation through the model's own chat template.

Each turn re-renders the whole conversation with the template (as HF's apply_chat_template does) and
generates through the one inference path; `/reset` clears the history, `/exit` or Ctrl-D quits.
"""

from __future__ import annotations

import json
import sys

from apr.commands._common import add_content_args, add_model_args, add_sampling_args, load, sampling_kwargs
from apr.commands.run import add_speculative_args, speculative_kwargs


def setup_parser(p):
    add_model_args(p)
    p.add_argument("--system", default=None, help="system message for the conversation")
    add_content_args(p)
    add_sampling_args(p, max_tokens=512)
    add_speculative_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object per turn instead of streaming text")


def main(args):
    from apr.generate import stream_generate

    spec = speculative_kwargs(args)
    lm = load(args, quiet=args.json)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        user = line.rstrip("\n")
        if user.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not user.strip():
            continue
        history.append({"role": "user", "content": user})
        result = None
        for r in stream_generate(lm, list(history), **sampling_kwargs(args), **spec):  # the conversation, templated once
            if not args.json:
                sys.stdout.write(r.text)
                sys.stdout.flush()
            result = r.result or result
        history.append({"role": "assistant", "content": result.text})
        if args.json:
            print(json.dumps({"user": user, "prompt_ids": result.prompt_tokens, "text": result.text,
                              "tokens_generated": result.tokens_generated,
                              "stop_reason": result.stop_reason, "decode_tok_s": round(result.decode_tok_s, 3),
                              "speculative": result.speculative}))
        else:
            sys.stdout.write("\n")
    return 0
