"""`apr inspect MODEL [--json]`: metadata, tensor table, parameter count and sha256 of a .gguf or .apr file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

_HEAD = 8  # items of a long array shown


def setup_parser(p):
    p.add_argument("model", metavar="MODEL", help="registry name or path to a .gguf/.apr file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-verify", action="store_true", help=".apr: skip the checksums (to look inside a damaged file)")
    p.add_argument("--verify-sha", action="store_true", help="hash the file's bytes now (no registry marker, no "
                   "cache); sha256_source says which was reported")
    p.add_argument("--forward", action="store_true", help="also build the model and run a prefill and one decode "
                   "step over a short code text (reports finiteness and the next-token loss)")


def describe(path: Path, verify: bool = True, verify_sha: bool = False) -> dict[str, Any]:
    """Everything inspect shows, as plain JSON-able values."""
    from apr import hub
    from apr.errors import AprError
    from apr.formats.gguf import TRAINING_KEY, GGUFFile, config_from_gguf, training_record

    info: dict[str, Any] = {"path": str(path), "size": path.stat().st_size}
    if path.suffix == ".apr":
        from apr.formats.apr import open_apr

        f = open_apr(path, verify=verify)
        meta, tensors = dict(f.metadata), f.tensors
        info.update(format="apr", format_version=meta.pop("apr.format_version"), checksums_verified=verify,
                    license=meta.pop("apr.license"), license_note=f.header.get("apr.license_note"),
                    provenance=meta.pop("apr.provenance"))
    else:
        from apr.formats.gguf import read_gguf

        g = read_gguf(path)
        meta, tensors = dict(g.metadata), g.tensors
        info.update(format="gguf", format_version=meta.pop("GGUF.version", None),
                    license=meta.get("general.license", "unknown"))
    try:
        info["config"] = config_from_gguf(GGUFFile(path, meta, tensors)).to_dict()
    except AprError as e:  # inspect still shows a file apr cannot run
        info["config"], info["config_error"] = None, str(e)
    info["sha256"], info["sha256_source"] = _sha256(path, verify_sha)
    info["parameter_count"] = sum(math.prod(t.shape) for t in tensors.values())
    info["tensor_count"] = len(tensors)
    info["metadata"] = {k: _short(v) for k, v in meta.items()}
    if TRAINING_KEY in meta:  # a student exported by `apr export --lora`: what it was trained on
        info["training"] = training_record(meta, path, strict=False)
    info["tensors"] = [_row(t) for t in tensors.values()]
    return info


def _sha256(path: Path, from_bytes: bool) -> tuple[str, str]:
    """The sha256 and where it came from: "bytes" (hashed now), "registry" (a pulled file's marker
    matched its size and mtime) or "cache" (apr's per-(path, size, mtime) cache)."""
    from apr import hub
    from apr.provenance import hash_file

    if from_bytes:
        return hash_file(path), "bytes"
    known = hub.known_sha256(path)
    return (known, "registry") if known else (hub.sha256_file(path), "cache")


def _row(t) -> dict[str, Any]:
    from apr.quant import type_name

    row = {"name": t.name, "type": type_name(t.qtype), "shape": list(t.shape), "bytes": t.nbytes}
    if getattr(t, "layout", None):
        row["layout"] = t.layout
        if t.prepared:
            row["prepared"] = sorted(t.prepared)
    return row


def _short(v: Any) -> Any:
    """Long arrays (a 150k-token vocabulary) as their length and first items."""
    if isinstance(v, list) and len(v) > _HEAD:
        return {"length": len(v), "head": v[:_HEAD]}
    return v


def _text(v: Any, width: int = 100) -> str:
    if isinstance(v, dict) and set(v) == {"length", "head"}:
        s = f"[{v['length']} items: {', '.join(map(repr, v['head']))}, ...]"
    else:
        s = repr(v) if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    return s if len(s) <= width else s[: width - 3] + "..."


def print_text(info: dict[str, Any]) -> None:
    fmt = f"{info['format']} v{info['format_version']}"
    if info["format"] == "apr":
        fmt += " (checksums verified)" if info["checksums_verified"] else " (checksums NOT verified)"
    cfg = info["config"]
    print(f"file        {info['path']}\nformat      {fmt}")
    print(f"size        {info['size']:,} bytes\nsha256      {info['sha256']} ({info['sha256_source']})")
    if "forward" in info:
        f = info["forward"]
        print(f"forward     {f['dtype']}/{f['backend']} ({f['step_impl']}): {f['tokens']} tokens, finite "
              f"{f['finite']}, next-token loss {f['nll']:.3f}")
    print(f"parameters  {info['parameter_count']:,} in {info['tensor_count']} tensors")
    if cfg:
        print(f"model       {cfg['architecture']}: {cfg['n_layers']} layers, dim {cfg['dim']}, "
              f"{cfg['n_heads']} heads ({cfg['n_kv_heads']} kv), ffn {cfg['ffn_dim']}, "
              f"vocab {cfg['vocab_size']}, context {cfg['context_length']}")
    else:
        print(f"model       not runnable by apr: {info['config_error']}")
    note = f" ({info['license_note']})" if info.get("license_note") else ""
    print(f"licence     {info['license']}{note}")
    if "provenance" in info:
        p, src = info["provenance"], info["provenance"].get("source", {})
        print(f"provenance  from {src.get('file')} (sha256 {src.get('sha256')}), apr {p.get('apr_version')}, "
              f"{p.get('created')}, quantize {p.get('quantize')}, prepared {p.get('prepared') or 'none'}")
    print(f"\nmetadata ({len(info['metadata'])} keys)")
    for k, v in info["metadata"].items():
        print(f"  {k} = {_text(v)}")
    print(f"\ntensors ({info['tensor_count']})")
    w = max((len(r["name"]) for r in info["tensors"]), default=4)
    print(f"  {'name':<{w}}  {'type':<7} {'shape':<16} {'bytes':>12}")
    for r in info["tensors"]:
        extra = f"  +prepared {','.join(r['prepared'])}" if r.get("prepared") else ""
        print(f"  {r['name']:<{w}}  {r['type']:<7} {str(r['shape']):<16} {r['bytes']:>12,}{extra}")


def main(args):
    from apr.hub import resolve_model

    path = resolve_model(args.model, quiet=args.json)
    info = describe(path, verify=not args.no_verify, verify_sha=args.verify_sha)
    if args.forward:
        from apr.commands.inspect_forward import forward_check

        info["forward"] = forward_check(path)
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
    else:
        print_text(info)
    return 0
