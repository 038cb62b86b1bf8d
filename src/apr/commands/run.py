"""`apr run MODEL --prompt TEXT`: generate and stream the answer (or print one JSON object)."""

from __future__ import annotations

import json
import sys
import time

from apr.commands._common import add_content_args, add_model_args, add_sampling_args, load, sampling_kwargs


def setup_parser(p):
    add_model_args(p)
    p.add_argument("--prompt", "-p", default=None, help="the prompt (default: read standard input)")
    p.add_argument("--system", default=None, help="system message (chat mode)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap the prompt in the model's chat template (default for instruct models); with "
                           "--chat even a prompt that looks templated is wrapped, its special tokens kept as text")
    mode.add_argument("--raw", dest="chat", action="store_false", help="send the prompt as is")
    add_content_args(p)
    add_sampling_args(p)
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE", help="the answer is JSON that validates against this schema")
    shape.add_argument("--json-object", action="store_true", help="the answer is one JSON object")
    shape.add_argument("--grammar", metavar="FILE", help="the answer matches this grammar (.gbnf or .lark)")
    shape.add_argument("--regex", metavar="RE", help="the answer matches this regular expression")
    add_speculative_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--quiet", "-q", action="store_true", help="no statistics on stderr")


def main(args):
    from apr.generate import stream_generate

    t0 = time.perf_counter()
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    constraint = constraint_arg(args)  # read before the load: a bad file fails at once
    lm = load(args, quiet=args.json or args.quiet)
    result = None
    kw = {**sampling_kwargs(args), **speculative_kwargs(args)}
    if constraint is not None:
        kw["constraint"] = constraint
    for r in stream_generate(lm, prompt, chat=args.chat, system=args.system, **kw):
        if not args.json and r.text:
            sys.stdout.write(r.text)
            sys.stdout.flush()
        result = r.result or result
    wall = time.perf_counter() - t0
    if args.json:
        print(json.dumps(report(lm, result, wall)))
        return 0
    sys.stdout.write("\n")
    if not args.quiet:
        print(f"[{lm.backend} {lm.dtype} {lm.engine.step_impl}] prompt {len(result.prompt_tokens)} tok at {result.prefill_tok_s:.1f} tok/s, "
              f"generated {result.tokens_generated} tok at {result.decode_tok_s:.1f} tok/s, "
              f"stop: {result.stop_reason}{spec_summary(result)}, load {lm.load_s:.2f}s, wall {wall:.2f}s", file=sys.stderr)
    return 0


def report(lm, result, wall: float) -> dict:
    return {
        "model": str(lm.path), "model_sha256": lm.sha256,
        "prompt_tokens": len(result.prompt_tokens), "prompt_ids": result.prompt_tokens,
        "rendered_prompt": result.rendered_prompt,
        "tokens": result.tokens, "text": result.text, "tokens_generated": result.tokens_generated,
        "stop_reason": result.stop_reason,
        "prefill_tok_s": round(result.prefill_tok_s, 3), "decode_tok_s": round(result.decode_tok_s, 3),
        "load_s": round(lm.load_s, 3), "wall_s": round(wall, 3),
        "backend": lm.backend, "dtype": lm.dtype, "step_impl": lm.engine.step_impl, "kernel_isa": _kernel_isa(), "activations": lm.activations,
        "backend_chain": lm.backend_chain, "speculative": result.speculative,
    }


def add_speculative_args(p) -> None:
    p.add_argument("--speculative", choices=["ngram", "draft", "off"], default=None,
                   help="draft tokens and verify them in one pass, the output unchanged: ngram looks them up in the "
                        "prompt and the text so far (suits editing code), draft asks --draft-model (default: off)")
    p.add_argument("--draft-model", metavar="NAME", default=None,
                   help="with --speculative draft: a smaller model with the same vocabulary (e.g. the 0.5B for the 1.5B)")
    p.add_argument("--draft-max", metavar="K", type=int, default=None,
                   help="tokens drafted per pass (default 4)")


def speculative_kwargs(args) -> dict:
    from apr.errors import AprError

    if args.draft_model and args.speculative is None:
        args.speculative = "draft"  # a draft model given is a draft model asked for
    if args.speculative == "draft" and not args.draft_model:
        raise AprError("--speculative draft needs --draft-model NAME")
    if args.draft_max is not None and args.draft_max < 1:
        raise AprError(f"--draft-max must be at least 1, got {args.draft_max}")
    return dict(speculative=args.speculative, draft_model=args.draft_model, draft_max=args.draft_max)


def spec_summary(result) -> str:
    s = result.speculative
    if not s or not s["passes"]:
        return ""
    rate = f"{100 * s['acceptance_rate']:.0f}%" if s["acceptance_rate"] is not None else "-"
    return f", {s['mode']} drafts accepted {rate}, {s['tokens_per_pass']:.2f} tok/pass"


def constraint_arg(args) -> tuple | None:
    """(kind, spec) from --json-schema / --json-object / --grammar / --regex, or None."""
    from pathlib import Path

    from apr.errors import AprError

    def read(path: str) -> str:
        try:
            return Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise AprError(f"cannot read {path}: {e.strerror if isinstance(e, OSError) else e}") from None

    if args.json_schema:
        try:
            return "json_schema", json.loads(read(args.json_schema))
        except ValueError as e:
            raise AprError(f"{args.json_schema} is not JSON: {e}") from None
    if args.json_object:
        return "json_object", None
    if args.grammar:
        return ("lark" if args.grammar.endswith(".lark") else "gbnf"), read(args.grammar)
    if args.regex:
        return "regex", args.regex
    return None


def _kernel_isa() -> str | None:
    from apr.quant import native

    return native.isa()
