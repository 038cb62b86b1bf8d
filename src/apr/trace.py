"""Per-layer activation statistics of one prefill pass, through the Transformer's `tap` hook.

    activation_stats(x)        count, mean, std, l2, min, max, nan, inf of one tensor
    trace(lm, ids, top_k)      TraceReport: stats at every tap point of every layer, plus the logits' top-k
    format_report(report)      the compact text tables `apr trace` prints
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from apr.errors import AprError, ContextOverflow

# The per-layer tap points, in the order the Transformer calls them (and `apr trace` prints them).
POINTS = ("attn_norm", "q", "k", "v", "attn_out", "ffn_norm", "gate", "up", "swiglu", "ffn_out", "residual")
STAT_KEYS = ("count", "mean", "std", "l2", "min", "max", "nan", "inf")


def activation_stats(x: torch.Tensor) -> dict:
    """Statistics of every element of `x`. mean/std (population, ddof 0)/l2/min/max are over the finite
    elements only, so one NaN does not hide the rest; nan and inf count the others. Computed in float64
    so a bfloat16 activation's statistics are exact for its values. None where no element is finite."""
    xd = x.detach().reshape(-1).double()  # (N,)
    finite = torch.isfinite(xd)
    nan, inf = int(torch.isnan(xd).sum()), int(torch.isinf(xd).sum())
    v = xd[finite]
    out = {"count": xd.numel(), "mean": None, "std": None, "l2": None, "min": None, "max": None, "nan": nan, "inf": inf}
    if v.numel():
        out.update(mean=float(v.mean()), std=float(v.std(correction=0)), l2=float(v.norm()),
                   min=float(v.min()), max=float(v.max()))
    return out


@dataclass
class TraceReport:
    model: str
    model_sha256: str
    dtype: str
    prompt_tokens: int
    embedding: dict
    layers: list[dict]  # [{"layer": i, "points": {point: stats}}]
    logits: dict  # {"stats": stats of the last position's logits, "top_k": [{id, token, logit, prob}]}
    prompt_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"model": self.model, "model_sha256": self.model_sha256, "dtype": self.dtype,
                "prompt_tokens": self.prompt_tokens, "prompt_ids": self.prompt_ids, "embedding": self.embedding,
                "layers": self.layers, "logits": self.logits}


def trace(lm, ids: list[int], top_k: int = 10) -> TraceReport:
    """Prefill `ids` once with a tap that keeps only statistics (never the activations themselves)."""
    if not ids:
        raise AprError("nothing to trace: the prompt has no tokens")
    ctx = lm.config.context_length
    if len(ids) > ctx:
        raise ContextOverflow(f"the prompt has {len(ids)} tokens; the context holds {ctx}")
    model = lm.model
    seen: dict[tuple[int, str], dict] = {}

    def tap(layer: int, point: str, x: torch.Tensor) -> None:
        seen[(layer, point)] = activation_stats(x)

    old = model.tap
    model.tap = tap
    try:
        model.setup_cache(len(ids))
        logits = model(torch.tensor(ids, dtype=torch.long), 0)[-1]  # (vocab,) of the last position
    finally:
        model.tap = old
    n = lm.config.n_layers
    layers = [{"layer": i, "points": {p: seen[(i, p)] for p in POINTS if (i, p) in seen}} for i in range(n)]
    return TraceReport(str(lm.path), lm.sha256, lm.dtype, len(ids), seen.get((-1, "embedding"), {}), layers,
                       {"stats": activation_stats(logits), "top_k": top_tokens(lm.tokenizer, logits, top_k)},
                       list(ids))


def top_tokens(tokenizer, logits: torch.Tensor, k: int) -> list[dict]:
    """The k most likely next tokens of one position's logits (vocab,)."""
    k = max(0, min(k, logits.numel()))
    probs = torch.softmax(logits.float(), dim=-1)
    vals, idx = torch.topk(logits.float(), k)
    return [{"id": int(i), "token": tokenizer.decode([int(i)]), "logit": float(v), "prob": float(probs[i])}
            for v, i in zip(vals, idx)]


def _num(v) -> str:
    if v is None:
        return f"{'-':>11}"
    if isinstance(v, float) and not math.isfinite(v):
        return f"{v:>11}"
    return f"{v:>11.4g}"


def _rows(stats_by_name: dict) -> list[str]:
    head = f"  {'point':<10}{'count':>10}" + "".join(f"{k:>11}" for k in STAT_KEYS[1:6]) + f"{'nan':>7}{'inf':>7}"
    rows = [head]
    for name, s in stats_by_name.items():
        rows.append(f"  {name:<10}{s['count']:>10}" + "".join(_num(s[k]) for k in STAT_KEYS[1:6])
                    + f"{s['nan']:>7}{s['inf']:>7}")
    return rows


def format_report(r: TraceReport) -> str:
    lines = [f"model {r.model} ({r.dtype}), {r.prompt_tokens} prompt tokens"]
    if r.embedding:
        lines += ["embedding", *_rows({"embedding": r.embedding})]
    for layer in r.layers:
        lines += [f"layer {layer['layer']}", *_rows(layer["points"])]
    lines += ["logits (last position)", *_rows({"logits": r.logits["stats"]}), "top tokens"]
    for t in r.logits["top_k"]:
        lines.append(f"  {t['id']:>8}  {t['logit']:>9.4f}  {t['prob']:>8.4f}  {t['token']!r}")
    return "\n".join(lines)
