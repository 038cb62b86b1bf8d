"""`apr export IN.apr --format gguf -o OUT.gguf`: a GGUF with the source's metadata keys, types and tensor order."""

from __future__ import annotations

import json
import sys


def setup_parser(p):
    p.add_argument("model", metavar="IN", help="path to a .apr file")
    p.add_argument("--format", choices=["gguf"], default="gguf", help="output format (default gguf)")
    p.add_argument("-o", "--output", metavar="OUT", default=None, help="the file to write (default: IN with .gguf)")
    p.add_argument("--json", action="store_true", help="print one JSON summary")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def main(args):
    from apr.commands.convert import output_path
    from apr.errors import AprError
    from apr.formats.apr_export import export_gguf
    from apr.hub import resolve_model

    src = resolve_model(args.model, quiet=True)
    if src.suffix != ".apr":
        raise AprError(f"{src}: apr export reads .apr files (apr convert makes them)")
    dst = output_path(src, args.output, "." + args.format)
    summary = export_gguf(src, dst, progress=not (args.quiet or args.json))
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {dst} ({summary['tensors']} tensors, {summary['bytes']:,} bytes)", file=sys.stderr)
    return 0
