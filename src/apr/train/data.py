"""Training data: the offline code corpus, its manifest and fingerprint, the split by file, token windows.

The corpus is the Python standard library's own `.py` sources (licence PSF-2.0): every machine with a
Python has them. `build_code_corpus` copies them into a folder with `manifest.json` (file list, sha256,
python version, licence) so a run names exactly what it read; the fingerprint is the sha256 of the sorted
"path sha256" lines. Train and validation are split by file from a seed, so no file is on both sides.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

from apr.errors import AprError

LICENCE = "PSF-2.0"
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}
TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".js", ".ts", ".rs", ".go", ".java", ".json", ".toml", ".yaml"}
MANIFEST = "manifest.json"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(files: list[dict]) -> str:
    lines = "".join(f"{f['path']} {f['sha256']}\n" for f in sorted(files, key=lambda f: f["path"]))
    return _sha(lines.encode())


def stdlib_sources(root: Path | None = None) -> list[Path]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))


def build_code_corpus(out: Path, root: Path | None = None, min_files: int = 2) -> dict:
    """Copy the stdlib sources into `out`/files and write `out`/manifest.json; returns the manifest."""
    src_root = Path(root or sysconfig.get_paths()["stdlib"])
    sources = stdlib_sources(src_root)
    if len(sources) < min_files:
        raise AprError(f"code corpus: {len(sources)} source file(s) under {src_root}, need at least {min_files}")
    files = []
    for p in sources:
        rel = p.relative_to(src_root).as_posix()
        data = p.read_bytes()
        dest = out / "files" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        files.append({"path": rel, "sha256": _sha(data), "bytes": len(data)})
    manifest = {"name": "python-stdlib", "licence": LICENCE, "source": str(src_root),
                "python_version": sys.version.split()[0], "implementation": sys.implementation.name,
                "n_files": len(files), "bytes": sum(f["bytes"] for f in files),
                "fingerprint": fingerprint(files), "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def default_corpus_dir() -> Path:
    from apr import hub

    return hub.apr_home() / "corpora" / f"python-stdlib-{sys.version_info.major}.{sys.version_info.minor}"


@dataclass
class Corpus:
    root: Path
    files: list[dict]  # {"path", "sha256"} relative to `base`
    base: Path
    licence: str = "unknown"
    meta: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.files)

    def text(self, f: dict) -> str:
        return (self.base / f["path"]).read_bytes().decode("utf-8", "replace")


def open_corpus(path: str | Path) -> Corpus:
    """A corpus folder made by `apr data code-corpus` (its manifest is checked), or any folder of text files."""
    root = Path(path)
    if not root.exists():
        raise AprError(f"data {root}: no such file or folder")
    if (root / MANIFEST).is_file():
        man = json.loads((root / MANIFEST).read_text())
        base = root / "files"
        for f in man["files"]:
            p = base / f["path"]
            if not p.is_file() or _sha(p.read_bytes()) != f["sha256"]:
                raise AprError(f"corpus {root}: {f['path']} is missing or differs from its manifest sha256")
        return Corpus(root, man["files"], base, man.get("licence", "unknown"),
                      {k: v for k, v in man.items() if k != "files"})
    if root.is_file():
        raise AprError(f"data {root}: a single file cannot be split by file; give a folder of files")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    files = [{"path": p.relative_to(root).as_posix(), "sha256": _sha(p.read_bytes())} for p in paths]
    return Corpus(root, files, root)


def split_files(files: list[dict], seed: int, val_fraction: float = 0.1) -> tuple[list[dict], list[dict]]:
    """(train, validation) by file: sorted by path, shuffled by `seed`, the first ⌈fraction·n⌉ held out."""
    if len(files) < 2:
        raise AprError(f"corpus has {len(files)} file(s): too small to split into train and validation by file")
    order = sorted(files, key=lambda f: f["path"])
    random.Random(seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(val_fraction * len(order))))
    return order[n_val:], order[:n_val]


@dataclass
class Windows:
    """Token windows (N, seq_len + 1) cut from the files in order; `file_ids[i]`: the files window i spans."""
    ids: torch.Tensor
    file_ids: list[frozenset]
    files: list[dict]


def make_windows(corpus: Corpus, files: list[dict], tokenizer, seq_len: int, max_windows: int) -> Windows:
    """Tokenize files (each followed by EOS) into one stream; cut non-overlapping windows of seq_len + 1."""
    eos = getattr(tokenizer, "eos_id", None)
    stream: list[int] = []
    owner: list[int] = []
    need = max_windows * seq_len + 1
    for i, f in enumerate(files):
        ids = tokenizer.encode_plain(corpus.text(f)) + ([eos] if eos is not None else [])
        stream += ids
        owner += [i] * len(ids)
        if len(stream) >= need:
            break
    n = min(max_windows, (len(stream) - 1) // seq_len)
    if n < 1:
        return Windows(torch.empty(0, seq_len + 1, dtype=torch.long), [], files)
    ids = torch.tensor(stream[: n * seq_len + 1], dtype=torch.long)
    rows = torch.stack([ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])  # (N, T+1)
    spans = [frozenset(owner[i * seq_len : i * seq_len + seq_len + 1]) for i in range(n)]
    return Windows(rows, spans, files)


def batch_indices(n_windows: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """The window indices of training step `step` (0-based): a fresh permutation per epoch, from the seed,
    so a resumed run draws exactly the batches the uninterrupted one would have."""
    per_epoch = max(1, n_windows // batch)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[k * batch : (k + 1) * batch] if n_windows >= batch else perm.repeat(-(-batch // n_windows))[:batch]
