"""`pv`: validate, lint, discharge and report ship contracts (docs/contracts.md).

Every failure reaches the user as one line `pv: error: ...` and a non-zero exit, never a traceback
(set PV_DEBUG=1 to see one for a bug of ours).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from apr import __version__
from apr.contracts.loader import ContractError

EPILOG = "Exit codes: 0 ok; 1 errors found (validate, lint), criterion FALSIFIED (discharge) or invalid contracts " \
         "(status); 2 usage errors, refusals and failures. Codes PV-E*/PV-W* are listed in docs/contracts.md."


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pv", description="Ship contracts: falsifiable acceptance criteria about one model artifact, "
                "checked on the real artifact, with evidence.", epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"pv (apr) {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    v = sub.add_parser("validate", help="check contract files against the schema",
                       description="Check contracts: schema (unknown keys, wrong types, bad semver), duplicate YAML "
                       "keys and ids, empty predictions, DISCHARGED criteria without existing evidence. Prints "
                       "`file:line: CODE severity: message`; exits 1 on any error.")
    v.add_argument("files", nargs="+", type=Path, metavar="FILE", help="contract YAML files (or folders of them)")
    v.add_argument("--json", action="store_true", help="print a JSON report instead of lines")

    lt = sub.add_parser("lint", help="validate, and check every test binding resolves to a collected test",
                        description="Validate every contract in DIR, then run `pytest --collect-only -q` once over "
                        "the bound test files and check each `test` binding names a collected test. Unresolved "
                        "bindings are warnings (PV-W006), or errors (PV-E016) with --strict-test-binding.")
    lt.add_argument("dir", nargs="?", type=Path, default=Path("contracts"), metavar="DIR",
                    help="folder of contracts, or one contract (default: contracts)")
    lt.add_argument("--strict-test-binding", action="store_true", help="unresolved test bindings are errors")
    lt.add_argument("--rootdir", type=Path, metavar="DIR", help="project root that node ids are relative to "
                    "(default: nearest folder above DIR with pyproject.toml, pytest.ini, setup.cfg or .git)")
    lt.add_argument("--json", action="store_true", help="print a JSON report instead of lines")

    d = sub.add_parser("discharge", help="run a criterion's live check and record the evidence",
                       description="Check the artifact's sha256 against metadata.model.artifact_sha256 (refuse on a "
                       "mismatch), run the criterion's check command with {model} replaced by the artifact path, "
                       "evaluate the verdict on the command's last JSON object, write evidence/<ID>-<DATE>[-N]/ and "
                       "update the contract (status, evidence, live_discharge, patch version, changelog). "
                       "Exit 0 DISCHARGED, 1 FALSIFIED, 2 refused or failed (contract untouched).")
    d.add_argument("contract", type=Path, metavar="CONTRACT", help="contract YAML file")
    which = d.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="cid", metavar="ID", help="criterion id, e.g. SHIP-002")
    which.add_argument("--stale", action="store_true", help="every criterion not DISCHARGED on the current code "
                       "and artifact (STALE, FALSIFIED, UNTESTED), one after the other")
    d.add_argument("--allow-weak-isolation", action="store_true", help="accept a code evaluation whose sandbox "
                   "is weaker than namespaces (recorded in the evidence)")
    d.add_argument("--model", metavar="PATH_OR_NAME", help="artifact: a registry name or a file "
                   "(default: metadata.model.name)")
    d.add_argument("--evidence-dir", type=Path, metavar="DIR",
                   help="evidence root (default: evidence/ next to the contract's folder)")
    d.add_argument("--timeout", type=float, metavar="S", help="check timeout in seconds "
                   "(default: check.timeout_s, else 3600)")
    d.add_argument("--ray", nargs="?", const="auto", metavar="auto|ADDRESS",
                   help="pass --ray ADDRESS to `apr eval` checks: the eval runs on that Ray cluster, and the evidence "
                        "records where each item ran")
    d.add_argument("--json", action="store_true", help="print the outcome as JSON")

    vf = sub.add_parser("verify", help="re-run a criterion's recorded check and see if the verdict reproduces",
                        description="Re-run the newest evidence's recorded command on its recorded artifact (its "
                        "bytes must still hash to the recorded sha256), evaluate the recorded verdict, and append "
                        "verify-<DATE>[-N].json to the evidence folder. Exit 0 reproduced, 1 not, 2 failed.")
    vf.add_argument("contract", type=Path, metavar="CONTRACT", help="contract YAML file")
    vf.add_argument("--id", required=True, dest="cid", metavar="ID", help="criterion id, e.g. SHIP-002")
    vf.add_argument("--timeout", type=float, metavar="S", help="check timeout in seconds")
    vf.add_argument("--json", action="store_true", help="print the record as JSON")

    s = sub.add_parser("status", help="ship %% per model, and what is left",
                       description="For each model: ship % = discharged ship-blocking criteria / ship-blocking "
                       "criteria, and the ship-blocking criteria left with their status and if_fails. Invalid "
                       "contracts are listed and not counted (exit 1).")
    s.add_argument("dir", nargs="?", type=Path, default=Path("contracts"), metavar="DIR",
                   help="folder of contracts, or one contract (default: contracts)")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.add_argument("--report", type=Path, metavar="FILE", help="also write a report for people: FILE.md or FILE.html")
    return p


def _expand(paths: list[Path]) -> list[Path]:
    from apr.contracts.lint import contract_files

    return [f for p in paths for f in (contract_files(p) if p.is_dir() else [p])]


def _print_results(results, as_json: bool) -> int:
    errors = sum(len(r.errors) for r in results)
    warnings = sum(len(r.warnings) for r in results)
    if as_json:
        files = [{"file": str(r.path), "ok": not r.errors, "diagnostics": [d.to_dict() for d in r.diagnostics]} for r in results]
        print(json.dumps({"ok": errors == 0, "errors": errors, "warnings": warnings, "files": files}, indent=2))
    else:
        for r in results:
            for d in r.diagnostics:
                print(d.format())
        print(f"{len(results)} file(s): {errors} error(s), {warnings} warning(s)")
    return 1 if errors else 0


def cmd_validate(args) -> int:
    from apr.contracts.validate import shared_folders, validate_file

    results = [validate_file(p) for p in _expand(args.files)]
    shared_folders(results)
    return _print_results(results, args.json)


def cmd_lint(args) -> int:
    from apr.contracts.lint import contract_files, lint

    return _print_results(lint(contract_files(args.dir), args.strict_test_binding, args.rootdir), args.json)


def _print_outcome(out, args) -> None:
    if args.json:
        print(json.dumps(out.to_dict(), indent=2, default=str))
        return
    clauses = "; ".join(s["detail"] + ("" if s["verdict"] != "FAIL" else " FAILED") for s in out.steps if s["step"].startswith("verdict"))
    failed = [s["detail"] for s in out.steps if s["verdict"] == "FAIL" and not s["step"].startswith("verdict")]
    print(f"{out.criterion} {out.previous_status} -> {out.status}: {'; '.join(failed + [clauses])}")
    print(f"evidence: {out.evidence_dir}")
    print(f"contract: {args.contract} now v{out.contract_version}")


def cmd_discharge(args) -> int:
    from apr.contracts.discharge import discharge, unfresh_ids

    ids = unfresh_ids(args.contract) if args.stale else [args.cid]
    if not ids:
        print(f"{args.contract}: every criterion is DISCHARGED on the current code and artifact; nothing to do")
        return 0
    worst = 0
    for cid in ids:
        try:
            out = discharge(args.contract, cid, args.model, args.evidence_dir, args.timeout, args.allow_weak_isolation,
                            args.ray)
        except ContractError as e:
            if not args.stale:
                raise
            print(f"pv: error: {cid}: {e}", file=sys.stderr)  # --stale goes on with the next criterion
            worst = 2
            continue
        _print_outcome(out, args)
        worst = max(worst, 0 if out.holds else 1)
    return worst


def cmd_verify(args) -> int:
    from apr.contracts.verify import verify

    rec = verify(args.contract, args.cid, args.timeout)
    if args.json:
        print(json.dumps(rec, indent=2, default=str))
    else:
        word = "reproduces" if rec["reproduced"] else "does NOT reproduce"
        print(f"{rec['criterion']}: recorded {rec['recorded_verdict']}, now {rec['verdict']}: {word} "
              f"(observed {json.dumps(rec['observed'])}, recorded {json.dumps(rec['recorded_observed'])})")
        print(f"record: {rec['file']}")
    return 0 if rec["reproduced"] else 1


def cmd_status(args) -> int:
    from apr.contracts.lint import contract_files
    from apr.contracts.status import render_text, summarize, write_report

    if args.report and args.report.suffix.lower() not in (".md", ".html", ".htm"):
        raise ContractError(f"--report must end in .md or .html, not {args.report.name}")
    summary = summarize(contract_files(args.dir))
    if args.report:
        write_report(summary, args.report)
    print(json.dumps(summary, indent=2) if args.json else render_text(summary))
    if args.report and not args.json:
        print(f"report: {args.report}")
    return 1 if summary["invalid"] else 0


COMMANDS = {"validate": cmd_validate, "lint": cmd_lint, "discharge": cmd_discharge, "verify": cmd_verify,
            "status": cmd_status}


def main(argv: list[str] | None = None) -> int:
    from apr.errors import AprError

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0 if not argv else 2
    try:
        return COMMANDS[args.command](args)
    except (ContractError, AprError) as e:
        print(f"pv: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `pv status | head`: not an error
        return 0
    except OSError as e:
        print(f"pv: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pv: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours: one line unless asked for the traceback
        if os.environ.get("PV_DEBUG") or os.environ.get("APR_DEBUG"):
            raise
        print(f"pv: internal error: {type(e).__name__}: {e} (set PV_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
