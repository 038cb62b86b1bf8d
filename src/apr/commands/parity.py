"""`apr parity A [B]`: compare two models, two dtypes or backends of one model, or a model against HF
transformers, layer by layer on the same token ids; exit 5 when out of tolerance."""

from __future__ import annotations

import json
from pathlib import Path

from apr.commands._common import add_model_args
from apr.commands.trace import add_prompt_args
from apr.errors import AprError

OUT_OF_TOLERANCE = 5
DTYPES = ["float32", "bfloat16"]
BACKENDS = ["auto", "cuda", "cpu"]


def setup_parser(p):
    add_model_args(p, dtype=False, backend=False)
    p.add_argument("b", nargs="?", default=None, metavar="B",
                   help="the model to compare against (the reference); 'hf' for HF transformers; 'llama.cpp' for "
                        "llama-cpp-python on A's GGUF: identical tokenization and top-1 agreement (default: A)")
    add_prompt_args(p, "compare on this prompt (default: ~2k tokens of Python stdlib source)")
    p.add_argument("--text-file", default=None, help="compare on this file's text, as is (no chat template)")
    p.add_argument("--max-tokens", type=int, default=2048, help="use at most this many tokens (default 2048)")
    p.add_argument("--reference", choices=["hf", "float32"], default=None,
                   help="hf: B is HF transformers on A's GGUF; float32: B is A at float32, A at the default dtype")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of both runs unless --a/--b-dtype say")
    p.add_argument("--a-dtype", choices=DTYPES, default=None)
    p.add_argument("--b-dtype", choices=DTYPES, default=None)
    p.add_argument("--a-backend", choices=BACKENDS, default="auto")
    p.add_argument("--b-backend", choices=BACKENDS, default="auto")
    p.add_argument("--chunk", type=int, default=None, metavar="N",
                   help="positions per forward call (default: as many as memory allows, the prefill path); "
                        "1 runs every position through the decode step (the C block and the native matvec)")
    p.add_argument("--points", default="all",
                   help="comma-separated tap points to compare, 'all' (default), or 'logits' (no taps: each "
                        "model runs exactly as it generates); e.g. residual")
    p.add_argument("--min-cosine", type=float, default=0.99, help="per-point cosine threshold (default 0.99)")
    p.add_argument("--std-band", type=float, nargs=2, default=[0.5, 2.0], metavar=("LO", "HI"),
                   help="allowed std(A)/std(B) (default 0.5 2.0)")
    p.add_argument("--max-kl", type=float, default=None, help="also fail when the mean KL(B||A) exceeds this")
    p.add_argument("--min-top1", type=float, default=None, help="also fail when top-1 agreement is below this")
    p.add_argument("--verbose", "-v", action="store_true", help="print every point of every layer")
    p.add_argument("--peer-python", default=None, metavar="PATH",
                   help="with B = llama.cpp: the python of llama-cpp-python's venv (default $APR_LLAMACPP_PYTHON, "
                        "else shared/peer/build-llamacpp.sh's /tmp/venv-llamacpp-*)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(args):
    from apr.parity import Tolerance, compare

    points = parse_points(args.points)  # user errors before the (slow) loads
    tol = Tolerance(args.min_cosine, tuple(args.std_band), args.max_kl, args.min_top1)
    if args.b == "llama.cpp":
        return _llamacpp(args)
    lm_a, b = load_pair(args)
    ids, source = token_ids(lm_a, args)
    if args.chunk is not None and args.chunk < 1:
        raise AprError("--chunk must be at least 1")
    report = compare(lm_a, b, ids, tol, points=points, chunk=args.chunk)
    if args.json:
        print(json.dumps({**report.to_dict(), "text": source}))
    else:
        print(format_report(report, source, args.verbose))
    return 0 if report.passed else OUT_OF_TOLERANCE


def _llamacpp(args) -> int:
    from apr.parity import code_text
    from apr.peer_llamacpp import cross_engine
    from apr.provenance import threads
    from apr.runtime import load_model

    text = Path(args.text_file).read_text(encoding="utf-8") if args.text_file else code_text()
    lm = load_model(args.model, dtype=args.dtype, backend=args.a_backend, quiet=args.json)
    r = cross_engine(lm, text, min(args.max_tokens, lm.config.context_length), args.peer_python, threads())
    r["passed"] = r["tokenization_identical"] and r["top1_agreement"] >= (args.min_top1 or 0.98)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['tokens']} tokens: tokenization {'identical' if r['tokenization_identical'] else 'DIFFERS at ' + str(r['first_token_mismatch'])}"
              f", top-1 agreement with llama.cpp {r['top1_agreement']:.2%} ({r['peer']['version']}): "
              + ("PASS" if r["passed"] else "FAIL"))
    return 0 if r["passed"] else OUT_OF_TOLERANCE


def load_pair(args):
    """(A, B): B is a LoadedModel, an HFReference, or A itself when nothing differs but the spec."""
    from apr.runtime import load_model

    reference = args.reference or ("hf" if args.b == "hf" else None)
    quiet = args.json
    if reference == "float32":
        if args.b:
            raise AprError("--reference float32 compares A with itself; give no B")
        lm_a = load_model(args.model, dtype=args.a_dtype, backend=args.a_backend, quiet=quiet)
        return lm_a, load_model(lm_a.path, dtype="float32", backend=args.b_backend, quiet=quiet)
    a_dtype, b_dtype = args.a_dtype or args.dtype, args.b_dtype or args.dtype
    lm_a = load_model(args.model, dtype=a_dtype, backend=args.a_backend, quiet=quiet)
    if reference == "hf":
        from apr.parity import HFReference

        return lm_a, HFReference(Path(lm_a.path), lm_a.config, quiet=quiet)
    same = args.b is None and a_dtype == b_dtype and args.a_backend == args.b_backend
    if same:
        raise AprError("nothing to compare: give B, --reference, or different --a-/--b-dtype or -backend")
    return lm_a, load_model(args.b or lm_a.path, dtype=b_dtype, backend=args.b_backend, quiet=quiet)


def token_ids(lm, args) -> tuple[list[int], str]:
    """The ids both runs see (A's tokenizer), at most --max-tokens and the context, and where they came from."""
    from apr.generate import prepare_prompt
    from apr.parity import code_text

    if args.prompt is not None and args.text_file:
        raise AprError("give --prompt or --text-file, not both")
    if args.prompt is not None:
        ids, source = prepare_prompt(lm, args.prompt, args.chat, args.system)[1], "prompt"
    elif args.text_file:
        try:
            text = Path(args.text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise AprError(f"cannot read --text-file: {e}") from None
        ids, source = lm.tokenizer.encode(text), f"file {args.text_file}"
    else:
        ids, source = lm.tokenizer.encode(code_text()), "built-in code text (Python stdlib source)"
    limit = min(args.max_tokens, lm.config.context_length)
    if len(ids) > limit:
        ids = ids[:limit]
    return ids, source


def parse_points(spec: str) -> tuple[str, ...] | None:
    from apr.parity import ALL_POINTS

    if spec == "all":
        return None
    if spec == "logits":
        return ()
    points = tuple(p.strip() for p in spec.split(",") if p.strip())
    bad = [p for p in points if p not in ALL_POINTS]
    if bad or not points:
        raise AprError(f"unknown tap point(s) {', '.join(bad) or spec!r}; choose from {', '.join(ALL_POINTS)}")
    return points


def _fmt(m: dict) -> str:
    return f"cos {m['cosine']:.6f}  std x{m['std_ratio']:.3f}  max|d| {m['max_abs_diff']:.4g}"


def format_report(r, source: str, verbose: bool = False) -> str:
    t = r.tolerance
    lines = [f"A: {r.a['model']} ({r.a['dtype']}, {r.a['backend']})",
             f"B: {r.b['model']} ({r.b['dtype']}, {r.b['backend']})  [reference]",
             f"{r.tokens} tokens of {source}; tolerance: cosine >= {t.min_cosine}, "
             f"std ratio in [{t.std_band[0]}, {t.std_band[1]}]"]
    for layer in r.layers:
        pts = layer["points"]
        main_point = "residual" if "residual" in pts else next(iter(pts))
        worst = min(pts, key=lambda p: (pts[p]["ok"], pts[p]["cosine"]))
        mark = "ok" if layer["ok"] else "OUT"
        line = f"  layer {layer['layer']:>3}  {main_point:<9} {_fmt(pts[main_point])}"
        if worst != main_point and (pts[worst]["cosine"] < pts[main_point]["cosine"] or not pts[worst]["ok"]):
            line += f"   worst {worst}: cos {pts[worst]['cosine']:.6f} std x{pts[worst]['std_ratio']:.3f}"
        lines.append(f"{line}  {mark}")
        if verbose:
            lines += [f"      {p:<10} {_fmt(m)}  {'ok' if m['ok'] else 'OUT'}" for p, m in pts.items()]
    lg = r.logits
    lines.append(f"  logits     {_fmt(lg)}  KL(B||A) {lg['kl']:.4g}  top-1 {lg['top1']:.2%}  "
                 f"ppl A {lg['ppl_a']:.4g} B {lg['ppl_b']:.4g}  {'ok' if lg['ok'] else 'OUT'}")
    lines += [f"  note: {n}" for n in r.notes]
    if r.passed:
        lines.append("PASS")
    else:
        where = "the logits" if r.first_divergent_point == "logits" else \
            f"layer {r.first_divergent_layer} ({r.first_divergent_point})"
        lines.append(f"FAIL: first out of tolerance at {where}")
    return "\n".join(lines)
