"""`apr export BASE [--lora ADAPTER] [--quant q4_k_m|q8_0|f16|f32] -o OUT.gguf [--apr]`.

With neither --lora nor --quant, a .apr input is written back to GGUF as it is (same tensors, same bytes).
Otherwise the base (GGUF or .apr) is dequantized, the adapters merged (W + alpha/rank * B @ A), and the
weights re-quantized by apr's own quantizer to the chosen mix (docs/export.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def setup_parser(p):
    p.add_argument("model", metavar="BASE", help="registry name or path to a .gguf or .apr file")
    p.add_argument("--lora", metavar="ADAPTER", default=None,
                   help="an apr-lora/1 adapter (apr finetune's adapter.safetensors, or its folder) to merge")
    p.add_argument("--quant", choices=["q4_k_m", "q8_0", "f16", "f32"], default=None,
                   help="output mix: q4_k_m (llama.cpp's Q4_K_M: Q4_K, Q6_K for the head and some attn_v/"
                        "ffn_down, Q5_0/Q8_0 where a row is not whole 256-blocks), q8_0, f16, f32 "
                        "(default q4_k_m; a .apr without --lora is exported unchanged)")
    p.add_argument("--requantize", action="store_true",
                   help="re-quantize every tensor from float, also those whose type would not change "
                        "(default: such tensors, when no adapter touches them, are copied byte for byte)")
    p.add_argument("--imatrix-text", metavar="FILE", default=None,
                   help="a calibration text: weight the rounding by each column's mean squared activation "
                        "over it (importance-weighted Q4_K/Q6_K/Q5_0)")
    p.add_argument("--imatrix-tokens", type=int, default=2048, metavar="N",
                   help="tokens of the calibration text to run (default 2048)")
    p.add_argument("--apr", action="store_true", help="also write OUT.apr next to OUT.gguf")
    p.add_argument("--format", choices=["gguf"], default="gguf", help="output format (default gguf)")
    p.add_argument("-o", "--output", metavar="OUT", default=None, help="the file to write (default: BASE with .gguf)")
    p.add_argument("--json", action="store_true", help="print one JSON summary")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def main(args):
    from apr.commands.convert import output_path
    from apr.errors import AprError
    from apr.hub import resolve_model

    quiet = args.quiet or args.json
    src = resolve_model(args.model, quiet=True)
    if src.suffix not in (".gguf", ".apr"):
        raise AprError(f"{src}: apr export reads .gguf or .apr files")
    dst = output_path(src, args.output, "." + args.format)
    if args.imatrix_tokens <= 0:
        raise AprError(f"--imatrix-tokens must be positive, got {args.imatrix_tokens}")
    if src.suffix == ".apr" and args.lora is None and args.quant is None and not args.imatrix_text:
        from apr.formats.apr_export import export_gguf

        summary = export_gguf(src, dst, progress=not quiet)
    else:
        summary = _export(src, dst, args, quiet)
    if args.apr:
        summary["apr"] = _write_apr(dst, quiet)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {dst} ({summary['tensors']} tensors, {summary['bytes']:,} bytes"
              + (f", {args.quant or 'q4_k_m'}, {summary['merged']} adapted" if "merged" in summary else "")
              + ")" + (f" and {summary['apr']['output']}" if args.apr else ""), file=sys.stderr)
    return 0


def _export(src: Path, dst: Path, args, quiet: bool) -> dict:
    from apr.errors import AprError
    from apr.formats.gguf_write import export_model, load_adapter, open_source

    base = open_source(src)
    lora, scale, training = {}, 1.0, None
    if args.lora:
        adapter = Path(args.lora).expanduser()
        if adapter.is_dir():
            adapter = adapter / "adapter.safetensors"
        lora, scale, meta = load_adapter(adapter, base)
        training = training_record(adapter, meta)
    imatrix = None
    if args.imatrix_text:
        from apr.formats.gguf_write import collect_imatrix

        text_path = Path(args.imatrix_text).expanduser()
        if not text_path.is_file():
            raise AprError(f"{text_path}: no such calibration text")
        imatrix = collect_imatrix(src, text_path.read_text(errors="replace"), args.imatrix_tokens, quiet=quiet)
    return export_model(base, dst, args.quant or "q4_k_m", lora, scale, requantize=args.requantize,
                        imatrix=imatrix, progress=not quiet, training=training)


def training_record(adapter: Path, meta: dict) -> dict:
    """What the student GGUF records of its training (apr.training): the split, the data shape, the run, and
    the adapter's own sha256, so `apr eval heldout` can rebuild the held-out split and nothing is taken on trust."""
    from apr.hub import sha256_file

    training = meta.get("training") or {}  # read_adapter has parsed it
    return {**training, "base_sha256": meta.get("base_sha256"), "adapter_sha256": sha256_file(adapter),
            "rank": meta.get("rank"), "alpha": meta.get("alpha"), "targets": meta.get("targets")}


def _write_apr(gguf_path: Path, quiet: bool) -> dict:
    from apr.formats.apr_write import convert_gguf

    out = convert_gguf(gguf_path, gguf_path.with_suffix(".apr"), "keep", progress=not quiet)
    return {"output": out["output"], "bytes": out["bytes"]}
