"""`apr convert IN.gguf -o OUT.apr [--quantize MODE]`: write apr's native .apr file (docs/format.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def setup_parser(p):
    p.add_argument("model", metavar="IN", help="registry name or path to a .gguf file")
    p.add_argument("-o", "--output", metavar="OUT", default=None, help="the .apr file to write (default: IN with .apr)")
    p.add_argument("--quantize", choices=["keep", "q8_0", "q4_k", "bf16", "f32"], default="keep",
                   help="keep: tensors as they are (default); q8_0/q4_k/bf16/f32: requantize the 2-D weights "
                        "(rows that are not whole blocks fall back as in llama.cpp: q4_k -> q5_0, q8_0 -> f16)")
    p.add_argument("--prepared", choices=["default", "none", "float32", "bfloat16"], default="default",
                   help="also store the weights as the kernels consume them in this compute dtype, so loading "
                        "skips dequantizing/packing (default: apr's default dtype; float32 means dense weights, "
                        "about 4 bytes per parameter; none: the smallest file, raw ggml blocks only)")
    p.add_argument("--verify", action="store_true",
                   help="after writing, export the .apr back to GGUF (a temp file) and check that the source, the "
                        ".apr and the re-export give identical greedy tokens; report the stored licence and provenance")
    p.add_argument("--verify-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of the --verify runs (default float32, the reference mode)")
    p.add_argument("--json", action="store_true", help="print one JSON summary")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def output_path(src: Path, out: str | None, suffix: str) -> Path:
    from apr.errors import AprError

    dst = Path(out).expanduser() if out else src.with_suffix(suffix)
    if dst.suffix != suffix:
        raise AprError(f"{dst}: the output must end in {suffix} (apr tells formats apart by suffix)")
    if dst.resolve() == src.resolve():
        raise AprError(f"{dst}: the output would overwrite the input")
    if not dst.parent.is_dir():
        raise AprError(f"{dst.parent}: no such directory")
    return dst


def main(args):
    from apr.errors import AprError
    from apr.formats.apr_write import convert_gguf
    from apr.hub import resolve_model
    from apr.runtime import default_dtype

    src = resolve_model(args.model, quiet=args.quiet or args.json)
    if src.suffix == ".apr":
        raise AprError(f"{src} is already a .apr file (apr export turns it back into GGUF)")
    dst = output_path(src, args.output, ".apr")
    prepare = {"default": default_dtype(), "none": None}.get(args.prepared, args.prepared)
    summary = convert_gguf(src, dst, args.quantize, progress=not (args.quiet or args.json), prepare_dtype=prepare)
    if args.verify:
        summary["verify"] = verify_roundtrip(src, dst, args.verify_dtype, quiet=args.quiet or args.json)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {dst} ({summary['tensors']} tensors, {summary['bytes']:,} bytes, quantize {args.quantize}, "
              f"prepared {prepare or 'none'}, licence {summary['license']})", file=sys.stderr)
        if args.verify:
            v = summary["verify"]
            print(f"verify ({v['dtype']}): .apr tokens identical: {v['apr_identical']}, "
                  f"re-exported GGUF tokens identical: {v['export_identical']}", file=sys.stderr)
    return 0 if not args.verify or summary["verify"]["passed"] else 5


VERIFY_PROMPT = "def quicksort(items):"
VERIFY_TOKENS = 16


def verify_roundtrip(src: Path, dst: Path, dtype: str, quiet: bool) -> dict:
    """GGUF -> .apr -> GGUF: greedy tokens of all three through the one inference path, and the .apr's
    licence and provenance as stored in its header."""
    import tempfile

    from apr.formats.apr import open_apr
    from apr.formats.apr_export import export_gguf
    from apr.generate import generate
    from apr.runtime import load_model

    def tokens(path: Path) -> list[int]:
        lm = load_model(path, dtype=dtype, quiet=True)
        return generate(lm, VERIFY_PROMPT, chat=False, max_tokens=VERIFY_TOKENS).tokens

    header = open_apr(dst, verify=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        back = Path(tmp) / (src.stem + ".roundtrip.gguf")
        export_gguf(dst, back, progress=not quiet)
        ref, via_apr, via_export = tokens(src), tokens(dst), tokens(back)
    out = {"prompt": VERIFY_PROMPT, "dtype": dtype, "tokens_gguf": ref, "tokens_apr": via_apr,
           "tokens_export": via_export, "apr_identical": via_apr == ref, "export_identical": via_export == ref,
           "license": header.metadata["apr.license"], "provenance": header.metadata["apr.provenance"]}
    out["passed"] = bool(ref) and out["apr_identical"] and out["export_identical"]
    return out
