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
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {dst} ({summary['tensors']} tensors, {summary['bytes']:,} bytes, quantize {args.quantize}, "
              f"prepared {prepare or 'none'}, licence {summary['license']})", file=sys.stderr)
    return 0
