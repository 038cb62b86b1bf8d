"""`apr trace MODEL --prompt TEXT`: activation statistics at every tap point of every layer, and the top-k."""

from __future__ import annotations

import json
import sys

from apr.commands._common import add_model_args, load


def add_prompt_args(p, prompt_help: str = "the prompt (default: read standard input)") -> None:
    p.add_argument("--prompt", "-p", default=None, help=prompt_help)
    p.add_argument("--system", default=None, help="system message (chat mode)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap the prompt in the model's chat template (default for instruct models)")
    mode.add_argument("--raw", dest="chat", action="store_false", help="send the prompt as is")


def setup_parser(p):
    add_model_args(p)
    add_prompt_args(p)
    p.add_argument("--top-k", type=int, default=10, help="most likely next tokens to list (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def main(args):
    from apr.generate import prepare_prompt
    from apr.trace import format_report, trace

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    lm = load(args, quiet=args.json)
    _, ids = prepare_prompt(lm, prompt, args.chat, args.system)
    report = trace(lm, ids, top_k=args.top_k)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(format_report(report))
    return 0
