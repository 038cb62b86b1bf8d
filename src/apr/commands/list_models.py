"""`apr list`: the models pulled into $APR_HOME."""

from __future__ import annotations

import json


def setup_parser(p):
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--all", action="store_true", help="also list registry models not pulled yet")


def main(args):
    from apr import hub

    rows = hub.pulled_models()
    if args.all:
        have = {r["name"] for r in rows}
        rows += [{"name": n, "path": None, "size": m.size, "sha256": m.sha256, "architecture": m.architecture}
                 for n, m in hub.REGISTRY.items() if n not in have]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models pulled under {hub.apr_home()}; try `apr pull {hub.DEFAULT_MODEL}`")
        return 0
    for r in rows:
        size = f"{r['size'] / 1e6:8.1f} MB"
        print(f"{r['name']:32s} {r['architecture']:6s} {size}  {r['path'] or '(not pulled)'}")
    return 0
