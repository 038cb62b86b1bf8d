"""`apr pull NAME`: fetch a registry model; the local path is the last line of stdout."""

from __future__ import annotations

import json


def setup_parser(p):
    p.add_argument("name", nargs="?", default=None, help="registry name (default: qwen2.5-coder-0.5b-instruct)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print {name, path, size, sha256} as JSON")


def main(args):
    from apr import hub

    name = args.name or hub.DEFAULT_MODEL
    path = hub.pull(name, quiet=args.quiet)
    m = hub.REGISTRY[name]
    if args.json:
        print(json.dumps({"name": name, "path": str(path), "size": m.size, "sha256": m.sha256}))
    else:
        print(path)
    return 0
