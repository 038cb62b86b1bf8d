"""The base model's per-token log-probabilities for KL divergence (`--save-logits` / `--kl-base`).

One `.npz` (numpy's zip of arrays, no pickle) with a JSON header and, per scored token: the true token's nll,
the top-k ids and log-probs (float32: float16's 2^-7 steps at lp ~ -10 would swamp the KL of a faithful
dtype change, ~1e-3) and the log of the mass outside them. The header names what the numbers depend on
(tokenizer fingerprint, text sha256, ctx, BOS rule, k, model sha256 and dtype); a comparison refuses a file
whose tokenizer, text, ctx or windows differ, in one line.

While a run is in progress, each finished window is written to `FILE.parts/` so an interrupted run resumes
where it stopped (only with the same model, dtype, text and settings); the final file replaces the folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from apr.errors import AprError
from apr.evals.perplexity import WindowScore

FORMAT = "apr-logits/1"
# what a comparison needs equal; the model and its dtype may (and usually do) differ
MUST_MATCH = ("tokenizer_sha256", "text_sha256", "ctx", "add_bos", "n_windows", "top_k")


def tokenizer_fingerprint(metadata: dict) -> str:
    """sha256 over what decides the ids: the token list, merges, pre-tokenizer and BOS rule."""
    keys = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token")
    blob = json.dumps([_plain(metadata.get(k)) for k in keys], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def make_header(lm, text_sha256: str, ctx: int, n_windows: int, top_k: int) -> dict:
    return {"format": FORMAT, "tokenizer_sha256": tokenizer_fingerprint(lm.metadata), "text_sha256": text_sha256,
            "ctx": ctx, "add_bos": bool(lm.tokenizer.add_bos and lm.tokenizer.bos_id is not None),
            "n_windows": n_windows, "top_k": top_k, "model_sha256": lm.sha256, "dtype": lm.dtype,
            "model": str(lm.path.name)}


def write(path: str | Path, header: dict, scores: list[WindowScore]) -> None:
    """The whole file at once (written beside it, then renamed: never a half-written base)."""
    path = Path(path)
    arrays = {"header": np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8),
              "nll": np.concatenate([s.nll for s in scores]),
              "top_ids": np.concatenate([s.top_ids for s in scores]),
              "top_lp": np.concatenate([s.top_lp for s in scores]),
              "rest_lp": np.concatenate([s.rest_lp for s in scores])}
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as e:
        raise AprError(f"cannot write {path}: {e.strerror}") from None


def read(path: str | Path) -> dict:
    """{"header": dict, "nll", "top_ids", "top_lp", "rest_lp"}; anything else is a one-line error."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in ("header", "nll", "top_ids", "top_lp", "rest_lp")}
        data["header"] = json.loads(data["header"].tobytes().decode("utf-8"))
    except FileNotFoundError:
        raise AprError(f"logits file {path} does not exist") from None
    except OSError as e:
        raise AprError(f"cannot read logits file {path}: {e.strerror or e}") from None
    except (KeyError, ValueError, zipfile.BadZipFile, UnicodeDecodeError, EOFError):
        raise AprError(f"{path} is not a logits file written by `apr eval perplexity --save-logits`") from None
    h = data["header"]
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        raise AprError(f"{path} is not a {FORMAT} logits file (format {h.get('format') if isinstance(h, dict) else '?'})")
    n, k = data["top_ids"].shape if data["top_ids"].ndim == 2 else (0, 0)
    if k != h.get("top_k") or any(len(data[a]) != n for a in ("nll", "top_lp", "rest_lp")):
        raise AprError(f"{path} is damaged: its arrays do not match its header")
    return data


def check_compatible(base_header: dict, header: dict, path) -> None:
    """One line naming the first thing that differs between the base file and this run."""
    for key in MUST_MATCH:
        if base_header.get(key) != header.get(key):
            what = {"tokenizer_sha256": "another tokenizer", "text_sha256": "another text"}.get(key, f"another {key}")
            raise AprError(f"{path} was computed with {what} ({key} {_short(base_header.get(key))} there, "
                           f"{_short(header.get(key))} here): rerun the base on the same text with the same settings")


def _short(v):
    return v[:12] if isinstance(v, str) and len(v) == 64 else v


class Parts:
    """FILE.parts/: header.json plus one w<index>.npz per finished window, for resuming."""

    def __init__(self, path: str | Path, header: dict):
        self.dir = Path(str(path) + ".parts")
        self.header = header

    def load(self) -> dict[int, WindowScore]:
        """Windows already done by an earlier run of the same settings (an unrelated folder is refused)."""
        hfile = self.dir / "header.json"
        if not hfile.exists():
            return {}
        try:
            old = json.loads(hfile.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise AprError(f"{self.dir} holds an unreadable header.json: remove the folder to start over") from None
        if old != self.header:
            diff = sorted(k for k in set(old) | set(self.header) if old.get(k) != self.header.get(k))
            raise AprError(f"{self.dir} holds partial results of another run (differs in {', '.join(diff)}): "
                           "remove it or rerun with the same settings")
        done = {}
        for f in sorted(self.dir.glob("w*.npz")):
            try:
                with np.load(f, allow_pickle=False) as z:
                    s = WindowScore(int(z["index"]), z["nll"], z["top_ids"], z["top_lp"], z["rest_lp"])
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
                continue  # a window cut off mid-write is simply scored again
            done[s.index] = s
        return done

    def start(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "header.json").write_text(json.dumps(self.header), encoding="utf-8")
        except OSError as e:
            raise AprError(f"cannot write partial results to {self.dir}: {e.strerror}") from None

    def add(self, s: WindowScore) -> None:
        buf = io.BytesIO()
        np.savez(buf, index=np.int64(s.index), nll=s.nll, top_ids=s.top_ids, top_lp=s.top_lp, rest_lp=s.rest_lp)
        tmp = self.dir / f"w{s.index:06d}.tmp"
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, self.dir / f"w{s.index:06d}.npz")

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
