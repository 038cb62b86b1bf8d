"""`apr qa MODEL`: run the ship gates; a table, or one JSON report with --json.

Exit 0 when every executed gate passes (and at least --min-executed ran), 5 when any fails.
"""

from __future__ import annotations

import json
import sys

from apr.commands._common import add_model_args

QA_FAILED = 5


def setup_parser(p):
    from apr.qa.gates import GATES

    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON report instead of the table")
    p.add_argument("--skip", action="extend", nargs="+", default=[], metavar="GATE",
                   help="leave these gates out (repeatable)")
    p.add_argument("--only", action="extend", nargs="+", default=[], metavar="GATE",
                   help="run only these gates (repeatable)")
    p.add_argument("--min-tps", type=float, default=10.0, help="throughput floor in decode tok/s (default 10)")
    p.add_argument("--min-executed", type=int, default=0, metavar="N",
                   help="fail unless at least N gates executed (skips do not count)")
    p.add_argument("--baseline", metavar="PATH", help="performance baseline: a folder of <isa_class>.json files "
                   "(this machine's class is used) or one such file (default: the last saved run; none: SKIP)")
    p.add_argument("--no-save", action="store_true",
                   help="do not add this run to $APR_HOME/qa-reports (the performance baseline history)")
    p.epilog = ("gates, in order: " + "; ".join(f"{g.name} ({g.what})" for g in GATES)
                + ". A gate whose prerequisite is absent here (no GPU, no transformers) is skipped with the reason. "
                "Exit 0 when every executed gate passes, 5 when any fails. Reports are kept in $APR_HOME/qa-reports.")


def main(args):
    from apr.qa import QAOptions, run_qa
    from apr.qa.report import format_table

    options = QAOptions(dtype=args.dtype, backend=args.backend, min_tps=args.min_tps, quiet=args.json,
                        baseline=args.baseline)
    progress = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    report = run_qa(args.model, options, only=args.only or None, skip=args.skip or None,
                    min_executed=args.min_executed, progress=progress, keep=not args.no_save)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(format_table(report))
    return 0 if report.passed else QA_FAILED
