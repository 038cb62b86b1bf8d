"""`apr eval heldout STUDENT --base BASE`: a trained student's next-token loss on the held-out split of its own
training corpus, paired window by window against the base it was trained from.

The split is never chosen here: it is rebuilt from what the student's GGUF records (`apr.training`, written
by `apr export --lora`): the corpus fingerprint, the seed and the validation fraction. The rebuilt held-out
file list must equal the recorded one, so the figure cannot be taken on training text. The windows that
picked the best step during training (the first `val_windows`) are skipped: the test windows are the ones
after them, so model selection does not flatter the figure.

Both models run through the inference path (`apr.runtime.load_model`, the engine's batched step), each
window in its own KV slot from position 0, every position scored. The margin is the paired standard error:
per-window differences (student - base) remove the windows' own difficulty from the spread.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys

import numpy as np

from apr.errors import AprError
from apr.formats.gguf import TRAINING_KEY, training_record  # noqa: F401 (callers import them from here)

def files_sha(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


def heldout_windows(rec: dict, corpus_dir: str, tokenizer, n: int, offset: int | None):
    """The test windows (n, T+1) of the recorded split, and what identifies them."""
    from apr.train import data as D

    corpus = D.open_corpus(corpus_dir)
    split = rec["split"]
    if corpus.fingerprint != split.get("corpus_fingerprint"):
        raise AprError(f"corpus {corpus_dir} has fingerprint {corpus.fingerprint[:12]}…, the student was trained on "
                       f"{str(split.get('corpus_fingerprint'))[:12]}…")
    _, val_files = D.split_files(corpus.files, int(split["seed"]), float(split.get("val_fraction", 0.1)))
    if [f["path"] for f in val_files] != list(split["val_files"]):
        raise AprError("the held-out files rebuilt from the seed differ from the ones the student records")
    seq_len = int(rec["data"]["seq_len"])
    skip = int(rec["data"].get("val_windows", 0)) if offset is None else offset
    wins = D.make_windows(corpus, val_files, tokenizer, seq_len, skip + n)
    if len(wins.ids) < skip + n:
        raise AprError(f"the held-out split has only {len(wins.ids)} windows of {seq_len + 1} tokens; "
                       f"{skip} skipped + {n} asked")
    ident = {"seed": split["seed"], "val_fraction": split.get("val_fraction", 0.1), "val_files": len(val_files),
             "val_files_sha256": files_sha([f["path"] for f in val_files]), "corpus_fingerprint": corpus.fingerprint,
             "licence": corpus.licence, "seq_len": seq_len, "offset": skip, "n_windows": n}
    return wins.ids[skip : skip + n], ident


def window_losses(lm, windows, batch: int = 4, label: str = "") -> np.ndarray:
    """(N,) mean next-token loss of each window (N, T+1), every position scored, through the engine's step."""
    import torch
    from tqdm import tqdm

    from apr.evals.perplexity import forward_sequences

    t = windows.shape[1] - 1
    out = []
    for at in tqdm(range(0, len(windows), batch), desc=f"heldout {label}", unit="batch", file=sys.stderr,
                   disable=not sys.stderr.isatty()):
        w = windows[at : at + batch]  # (B, T+1)
        logits = forward_sequences(lm.model, w[:, :-1].reshape(-1), len(w), t)  # (B*T, V)
        nll = torch.nn.functional.cross_entropy(logits, w[:, 1:].reshape(-1), reduction="none")
        out.append(nll.view(len(w), t).mean(1).numpy())  # (B,)
    return np.concatenate(out).astype(np.float64)


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def compare(student_losses: np.ndarray, base_losses: np.ndarray) -> dict:
    """Paired comparison: delta = mean(student - base); the band is two paired standard errors."""
    d = student_losses - base_losses
    delta, se = _mean_se(d)
    return {"delta": round(delta, 5), "delta_se": round(se, 5), "delta_hi": round(delta + 2 * se, 5),
            "z": round(delta / se, 2) if se > 0 else None, "windows_better": int((d < 0).sum())}


def run(student: str, base: str | None, corpus_dir: str | None, n: int, offset: int | None, batch: int,
        dtype: str | None, backend: str) -> dict:
    from apr import hub
    from apr.runtime import load_model
    from apr.train import data as D

    if n < 2:
        raise AprError(f"--windows must be at least 2 (a standard error needs two), got {n}")
    s = load_model(student, dtype=dtype, backend=backend, quiet=True)
    rec = training_record(s.metadata, s.path)
    want = rec.get("base_sha256")
    if base is None:
        entry = hub.registry_entry_for_sha256(want or "")
        if entry is None:
            raise AprError(f"{s.path}: its base (sha256 {str(want)[:12]}…) is not a registry model; give --base")
        base = entry.name
    corpus_dir = corpus_dir or str(D.default_corpus_dir())
    wins, ident = heldout_windows(rec, corpus_dir, s.tokenizer, n, offset)
    ls = window_losses(s, wins, batch, "student")
    chain = s.backend_chain
    del s
    b = load_model(base, dtype=dtype, backend=backend, quiet=True)
    if want and b.sha256 != want:
        raise AprError(f"{b.path} (sha256 {b.sha256[:12]}…) is not the base the student was trained from ({want[:12]}…)")
    lb = window_losses(b, wins, batch, "base")
    sm, sse = _mean_se(ls)
    bm, bse = _mean_se(lb)
    return {"student": {"path": student, "loss": round(sm, 5), "se": round(sse, 5)},
            "base": {"path": str(b.path), "sha256": b.sha256, "loss": round(bm, 5), "se": round(bse, 5)},
            **compare(ls, lb), "split": ident, "backend_chain": chain, "dtype": b.dtype,
            "training": {k: rec.get(k) for k in ("kind", "best_step", "val_loss", "adapter_sha256")}}


def format_text(r: dict) -> str:
    return (f"held-out loss over {r['split']['n_windows']} windows of {r['split']['seq_len']} tokens: "
            f"student {r['student']['loss']:.4f} ± {r['student']['se']:.4f}, base {r['base']['loss']:.4f} ± "
            f"{r['base']['se']:.4f}; paired difference {r['delta']:+.4f} ± {r['delta_se']:.4f} "
            f"(upper 2-SE bound {r['delta_hi']:+.4f}), better on {r['windows_better']}/{r['split']['n_windows']} windows")
