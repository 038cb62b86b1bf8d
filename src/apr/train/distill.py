"""Logit distillation: the teacher's top-k log-probs, computed once with the inference path and stored,
then a KL loss against them for the student (top-k entries plus one "rest" bucket) mixed with the
hard-label cross entropy: loss = α · τ² · KL(p_τ ‖ q_τ) + (1 − α) · CE.

The stored file (`teacher_topk.safetensors`, safetensors): `windows` int64 (N, T+1) the token windows,
`topk_ids` int32 (N, T, k) and `topk_logp` float32 (N, T, k) the teacher's log-probs at temperature τ;
metadata: teacher sha256, tokenizer fingerprint, temperature, k, corpus fingerprint. A file whose
metadata or windows do not match the run is recomputed, never reused.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from apr.errors import AprError
from apr.train import forward

TOPK_FILE = "teacher_topk.safetensors"


def teacher_topk(teacher_spec: str | None, windows: torch.Tensor, k: int, temperature: float, quiet: bool,
                 dtype: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N, T, k) int32, log-probs (N, T, k) float32) of the teacher on each window's first T tokens,
    through the inference Transformer (its fastest faithful dtype, as `apr run` loads it)."""
    from tqdm import tqdm

    from apr.runtime import load_model

    lm = load_model(teacher_spec, dtype=dtype, quiet=True)
    model, (n, t1) = lm.model, windows.shape
    model.setup_cache(t1)
    ids = torch.empty(n, t1 - 1, k, dtype=torch.int32)
    logp = torch.empty(n, t1 - 1, k, dtype=torch.float32)
    for i in tqdm(range(n), desc="teacher top-k", disable=quiet or None, unit="window"):
        z = model.forward(windows[i, :-1].to(model.device), 0, all_logits=True).float().cpu()  # (T, V)
        lp = F.log_softmax(z / temperature, dim=-1)
        v, j = lp.topk(k, dim=-1)  # (T, k)
        ids[i], logp[i] = j.to(torch.int32), v
    return ids, logp


def load_or_compute(out: Path, teacher: forward.Base, teacher_spec: str, windows: torch.Tensor, k: int,
                    temperature: float, corpus_fp: str, quiet: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = out / TOPK_FILE
    meta = {"teacher_sha256": teacher.sha256, "tokenizer": forward.tokenizer_fingerprint(teacher.metadata),
            "temperature": repr(float(temperature)), "k": str(k), "corpus_fingerprint": corpus_fp}
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                same = f.metadata() == meta
            stored = load_file(str(path)) if same else {}
            if same and torch.equal(stored["windows"], windows):
                return stored["topk_ids"], stored["topk_logp"]
        except Exception:  # unreadable or partial: recompute below
            pass
    ids, logp = teacher_topk(teacher_spec, windows, k, temperature, quiet)
    try:
        save_file({"windows": windows.contiguous(), "topk_ids": ids, "topk_logp": logp}, str(path), metadata=meta)
    except OSError as e:
        raise AprError(f"cannot write {path}: {e.strerror or e}") from None
    return ids, logp


def kd_loss(student_logits: torch.Tensor, targets: torch.Tensor, topk_ids: torch.Tensor, topk_logp: torch.Tensor,
            temperature: float, alpha: float) -> torch.Tensor:
    """student_logits (R, V), targets (R,), topk_ids/topk_logp (R, k) -> scalar loss (mean over rows)."""
    tau = temperature
    q = F.log_softmax(student_logits / tau, dim=-1)  # (R, V)
    q_k = q.gather(1, topk_ids.long())  # (R, k)
    p_k = topk_logp.exp()
    # the rest bucket: the mass outside the teacher's top k, on both sides
    p_rest = (1.0 - p_k.sum(1)).clamp_min(0.0)  # (R,)
    log_q_rest = torch.log((1.0 - q_k.exp().sum(1)).clamp_min(1e-12))
    kl = (p_k * (topk_logp - q_k)).sum(1) + torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest  # (R,)
    ce = F.cross_entropy(student_logits, targets)
    return alpha * tau * tau * kl.mean() + (1.0 - alpha) * ce


def distill_loss(p, topk_ids: torch.Tensor, topk_logp: torch.Tensor, temperature: float, alpha: float,
                 grad_checkpoint: bool):
    """The Trainer's loss over training windows `idx` of the prepared student run `p`."""
    if not 0.0 <= alpha <= 1.0 or not temperature > 0:
        raise AprError("--alpha must be in [0, 1] and --temperature positive")

    def loss(idx: torch.Tensor):
        w = p.train.ids[idx]  # (B, T+1)
        z = forward.logits(p.base.model, w[:, :-1], grad_checkpoint)  # (B*T, V)
        kk = topk_ids.shape[-1]
        value = kd_loss(z, w[:, 1:].reshape(-1), topk_ids[idx].reshape(-1, kk), topk_logp[idx].reshape(-1, kk),
                        temperature, alpha)
        return value, int(w[:, 1:].numel())
    return loss
