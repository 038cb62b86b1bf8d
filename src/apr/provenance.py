"""What code, on what machine, produced a result: recorded in every piece of evidence.

    code_fingerprint()   sha256 over the installed apr package's sources (.py and the C kernels)
    git_state()          {commit, dirty} of the checkout the package runs from (None outside a repo)
    isa_class()          "amx" | "avx512" | "avx2" | "baseline", from /proc/cpuinfo's flags
    provenance(doc)      all of it, plus versions, CPU, threads, APR_* variables, and the dtype/backend/
                         kernel path a command's JSON output reports

Everything here is cheap (no torch import: its version comes from the installed metadata), so `pv`
can recompute the fingerprint on every `pv status` to tell fresh evidence from stale.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import apr

PACKAGE_DIR = Path(apr.__file__).resolve().parent
SOURCE_SUFFIXES = (".py", ".c", ".h")  # the C kernels under quant/csrc are compiled on first use
SKIP_DIRS = {"__pycache__"}


def source_files(root: Path = PACKAGE_DIR) -> list[Path]:
    """Every .py file of the package and every C source under quant/csrc, sorted by relative path."""
    files = []
    for path in root.rglob("*"):
        if not path.is_file() or SKIP_DIRS & set(path.relative_to(root).parts):
            continue
        rel = path.relative_to(root).as_posix()
        if path.suffix == ".py" or (rel.startswith("quant/csrc/") and path.suffix in SOURCE_SUFFIXES):
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def code_fingerprint(root: Path | None = None) -> str:
    """sha256 over (relative path, NUL, sha256 of the bytes, newline) of each source file.

    Paths are part of the hash, so moving code between files changes it; the content, not mtimes,
    decides, so a fresh clone of the same commit has the same fingerprint as the tree it came from."""
    root = Path(root) if root else PACKAGE_DIR
    h = hashlib.sha256()
    for path in source_files(root):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).hexdigest().encode() + b"\n")
    return h.hexdigest()


def _git(*args: str, cwd: Path) -> str | None:
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_state(root: Path = PACKAGE_DIR) -> dict:
    """The commit of the checkout apr runs from, and whether the package's sources differ from it.

    `dirty` looks at the package folder only: contracts and evidence change during a discharge, and
    they are not the code that ran."""
    commit = _git("rev-parse", "HEAD", cwd=root)
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=all", "--", ".", cwd=root)
    changed = [line for line in (status or "").splitlines() if line.strip()]
    return {"commit": commit, "dirty": bool(changed), "dirty_files": len(changed)}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's flags, read once: the kernels' dispatch asks on every call, and /proc/cpuinfo costs ~0.2 ms."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def isa_class(flags: set[str] | None = None) -> str:
    """The machine class speed claims are made for: amx > avx512 (foundation) > avx2 > baseline."""
    flags = cpu_flags() if flags is None else flags
    if {"amx_tile", "amx_bf16"} <= flags:
        return "amx"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "baseline"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def threads() -> int:
    """CPUs this process may run on (torch and OpenMP default to these unless *_NUM_THREADS say)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _static() -> dict:
    return {"apr_version": apr.__version__, "torch_version": _version("torch"),
            "python": platform.python_version(), "cpu_model": cpu_model(), "isa_class": isa_class()}


def apr_env() -> dict:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("APR_")}


def kernel_facts(doc: dict | None) -> dict:
    """dtype, backend and kernel path as the command's own JSON output reports them (None where silent)."""
    doc = doc if isinstance(doc, dict) else {}
    backend = doc.get("backend")
    return {"dtype": doc.get("dtype"), "backend": backend if isinstance(backend, str) else None,
            "kernel": doc.get("step_impl", doc.get("kernel")), "kernel_isa": doc.get("kernel_isa"),
            "activations": doc.get("activations")}


def provenance(doc: dict | None = None, root: Path | None = None) -> dict:
    """Everything evidence records about the code and the machine (doc: the command's JSON output)."""
    root = Path(root) if root else PACKAGE_DIR
    return {"code_fingerprint": code_fingerprint(root), **{f"git_{k}": v for k, v in git_state(root).items()},
            **_static(), "threads": threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "apr_env": apr_env(), **kernel_facts(doc)}


def hash_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of the file's bytes, read now: never a marker, a registry constant or a cache entry."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
