"""Evidence folders for `pv discharge`: facts about the run, extracted artifacts, atomic placement.

A folder `evidence/<contract>/<id>-<YYYY-MM-DD>[-N]/` (one subfolder per contract file, named by its
stem, so two contracts never share a folder) is built in a hidden temp folder next to its final place and
renamed into place in one step, so a reader never sees half an evidence folder and an existing folder is
never overwritten (the next free N is taken instead).
"""

from __future__ import annotations

import ast
import datetime as dt
import errno
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import apr

EVIDENCE_FILE = "discharge-evidence-v1.json"
MAX_INLINE = 1 << 20  # bytes of stdout kept inside the JSON; the full text is in stdout.txt


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def today() -> str:
    """The date in evidence folder names (UTC, so two hosts agree); tests patch this."""
    return now().date().isoformat()


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} threads)"


def gpu_name() -> str | None:
    # nvidia-smi answers in milliseconds; importing torch here would cost seconds for one string
    if not shutil.which("nvidia-smi"):
        return None
    names = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    return ", ".join(n.strip() for n in names.splitlines()) if names else None


def git_commit() -> str | None:
    """The commit of the apr source that ran the check (None for an installed wheel)."""
    return _run(["git", "rev-parse", "HEAD"], cwd=Path(apr.__file__).resolve().parent)


def run_facts(doc: dict | None = None) -> dict:
    """Host facts plus apr.provenance (code fingerprint, git state, versions, ISA class, APR_* variables,
    and the dtype/backend/kernel the command's JSON output `doc` reports)."""
    from apr.provenance import provenance

    prov = provenance(doc)
    return {
        "host": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "gpu": gpu_name(),
        "apr_version": apr.__version__,
        "git_commit": prov["git_commit"],
        "git_dirty": prov["git_dirty"],
        "provenance": prov,
    }


def contract_root(evidence_root: Path, contract: Path) -> Path:
    """evidence/<contract stem>/: every contract writes into its own folder."""
    return Path(evidence_root) / Path(contract).stem


def read_evidence(path: Path) -> dict:
    """An evidence JSON file (or the folder holding one); OSError/ValueError when it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / EVIDENCE_FILE
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise ValueError("evidence is not a JSON object")
    return doc


def backend_chain(doc: dict) -> list[str]:
    chain = doc.get("backend_chain", doc.get("backend"))
    if isinstance(chain, str):
        return [chain]
    if isinstance(chain, list):
        return [str(x) for x in chain]
    return []


def _own_ast_summary(code: str) -> dict:
    """Same shape as apr.evals.code.ast_summary, for when that module is not there."""
    try:
        nodes = list(ast.walk(ast.parse(code)))
    except (SyntaxError, ValueError) as e:  # ValueError: a NUL byte in the source
        return {"ok": False, "error": {"msg": getattr(e, "msg", str(e)), "line": getattr(e, "lineno", None)},
                "node_count": 0, "functions": [], "classes": []}
    return {"ok": True, "error": None, "node_count": len(nodes),
            "functions": [n.name for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))],
            "classes": [n.name for n in nodes if isinstance(n, ast.ClassDef)]}


def ast_summary(code: str) -> dict:
    """apr.evals.code.ast_summary when that module exists, else a small ast.parse-based summary."""
    try:
        from apr.evals.code import ast_summary as apr_summary

        summary = apr_summary(code)
        json.dumps(summary)
        return summary if isinstance(summary, dict) else {"summary": summary}
    except Exception:  # missing module, or a summary we cannot store: fall back, never fail a discharge
        return _own_ast_summary(code)


def extracted_files(doc: dict) -> dict[str, str]:
    """Artifacts a person wants to read: the completion (`text`, else `code`) and an AST summary of
    the code (`code`, else `text`)."""
    text = doc.get("text") if isinstance(doc.get("text"), str) else None
    code = doc.get("code") if isinstance(doc.get("code"), str) else None
    if text is None and code is None:
        return {}
    return {
        "completion.txt": text if text is not None else code,
        "ast-summary.json": json.dumps(ast_summary(code if code is not None else text), indent=2) + "\n",
    }


MAX_ATTACHED = 64 << 20  # bytes per attached file, before compression


def attached_files(doc: dict, cwd: Path) -> dict[str, bytes]:
    """Files a check names in its output's `evidence_files` (e.g. HumanEval's samples and per-task
    verdicts), copied into the evidence; .jsonl files gzip-compressed (name.jsonl.gz)."""
    import gzip

    out: dict[str, bytes] = {}
    names = doc.get("evidence_files")
    for item in names if isinstance(names, list) else []:
        path = Path(cwd) / str(item)
        if not path.is_file() or path.stat().st_size > MAX_ATTACHED:
            continue
        data = path.read_bytes()
        if path.suffix == ".jsonl":
            out[path.name + ".gz"] = gzip.compress(data, mtime=0)
        else:
            out[path.name] = data
    return out


def folder_name(cid: str, date: str, n: int) -> str:
    return f"{cid}-{date}" if n == 1 else f"{cid}-{date}-{n}"


def next_free(root: Path, cid: str, date: str) -> str:
    n = 1
    while (root / folder_name(cid, date, n)).exists():
        n += 1
    return folder_name(cid, date, n)


def write_folder(root: Path, cid: str, date: str, build: Callable[[str], dict[str, str]]) -> Path:
    """Write `build(evidence_id)`'s files into a temp folder and rename it to the next free name.

    The id is part of the evidence JSON, so when another discharge takes the name between our check
    and our rename, the files are rebuilt for the next name.
    """
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        name = next_free(root, cid, date)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".tmp"))
        try:
            for fname, content in build(name).items():
                if isinstance(content, bytes):
                    (tmp / fname).write_bytes(content)
                else:
                    (tmp / fname).write_text(content, encoding="utf-8")
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700; evidence is meant to be read
            if _rename_new(tmp, root / name):
                return root / name
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    raise OSError(f"could not find a free evidence folder name for {cid} in {root}")


def _rename_new(src: Path, dst: Path) -> bool:
    """Rename unless `dst` exists (then False, and the caller takes the next name)."""
    if dst.exists():
        return False
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    return True
