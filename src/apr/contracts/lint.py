"""`pv lint`: validate, then prove every `test` binding names a test pytest really collects.

Bindings are resolved by asking pytest (`--collect-only -q`, once, over the bound files), not by grepping:
a parametrized test, a test inside a class, a skipped module or a syntax error in the test file are all
judged the way pytest itself sees them.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml.comments import CommentedSeq

from apr.contracts.loader import ContractError
from apr.contracts.validate import Result, criteria_nodes, diag, validate_file

ROOT_MARKERS = ("pyproject.toml", "pytest.ini", "tox.ini", "setup.cfg", ".git")


@dataclass
class Binding:
    contract: Path
    line: int
    criterion: str
    node_id: str


def contract_files(target: Path) -> list[Path]:
    target = Path(target)
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise ContractError(f"no such file or directory: {target}")
    files = sorted([*target.glob("*.yaml"), *target.glob("*.yml")])
    if not files:
        raise ContractError(f"no contract files (*.yaml) in {target}")
    return files


def project_root(start: Path) -> Path:
    """The nearest folder above `start` that looks like a project root: node ids are relative to it."""
    for folder in [start.resolve(), *start.resolve().parents]:
        if any((folder / m).exists() for m in ROOT_MARKERS):
            return folder
    return Path.cwd()


def bindings(result: Result) -> list[Binding]:
    """Every test binding in the raw tree (so they are checked even when the schema failed elsewhere)."""
    if result.loaded is None:
        return []
    out = []
    for line, crit in criteria_nodes(result.loaded.data):
        cid = str(crit.get("id", "?"))
        for key in ("test", "falsified_by"):
            test = crit.get(key)
            if isinstance(test, str):
                out.append(Binding(result.path, crit.lc.key(key)[0] + 1, cid, test))
            elif isinstance(test, CommentedSeq):
                out += [Binding(result.path, test.lc.item(i)[0] + 1, cid, t) for i, t in enumerate(test) if isinstance(t, str)]
    return out


def unfalsifiable(result: Result) -> None:
    """PV-E023: with --strict-test-binding every criterion must name a test that plants its fault."""
    if result.loaded is None:
        return
    for line, crit in criteria_nodes(result.loaded.data):
        if not crit.get("falsified_by"):
            result.diagnostics.append(diag(result.path, line, "PV-E023", f"{crit.get('id', '?')}: no falsified_by: name "
                                           "the test that plants this criterion's fault and sees its check FALSIFIED"))


def _file_of(node_id: str) -> str:
    return node_id.split("::", 1)[0].removeprefix("./")


def collect(root: Path, files: list[str]) -> tuple[set[str], str]:
    """Node ids pytest collects from `files` (relative to `root`), and a note when collection had errors."""
    if not files:
        return set(), ""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", f"--rootdir={root}", *files]
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as e:
        return set(), f"pytest could not run: {e}"
    lines = proc.stdout.splitlines()
    ids = {ln.strip() for ln in lines if "::" in ln and not ln.startswith(("ERROR", "FAILED", "=", "_"))}
    note = ""
    if proc.returncode not in (0, 5):  # 5: nothing collected, which the bindings will show
        last = next((ln for ln in reversed(lines + proc.stderr.splitlines()) if ln.strip()), "")
        note = f"pytest --collect-only exited {proc.returncode}: {last.strip()}"
    return ids, note


def resolves(node_id: str, ids: set[str]) -> bool:
    """Exact id, or a prefix that pytest expands: a file, a class, or a test without its [params]."""
    node_id = node_id.removeprefix("./")
    return node_id in ids or any(i.startswith(node_id + "::") or i.startswith(node_id + "[") for i in ids)


def lint(paths: list[Path], strict: bool = False, rootdir: Path | None = None) -> list[Result]:
    results = [validate_file(p) for p in paths]
    if strict:
        for r in results:
            unfalsifiable(r)
    found = [b for r in results for b in bindings(r)]
    if not found:
        return results
    root = Path(rootdir).resolve() if rootdir else project_root(paths[0].parent)
    files = sorted({_file_of(b.node_id) for b in found if (root / _file_of(b.node_id)).is_file()})
    ids, note = collect(root, files)
    code = "PV-E016" if strict else "PV-W006"
    by_path = {r.path: r for r in results}
    for b in found:
        if resolves(b.node_id, ids):
            continue
        if not (root / _file_of(b.node_id)).is_file():
            why = f"no file {_file_of(b.node_id)} under {root}"
        else:
            why = f"pytest does not collect it{f' ({note})' if note else ''}"
        by_path[b.contract].diagnostics.append(diag(b.contract, b.line, code, f"{b.criterion}: test {b.node_id} does not resolve: {why}"))
    for r in results:
        r.diagnostics.sort(key=lambda d: (d.line, d.code))
    return results

