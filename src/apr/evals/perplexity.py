"""Perplexity by llama.cpp's `llama-perplexity` method, and the per-token data KL divergence needs.

The text is tokenized once (BOS in front only where the GGUF says `add_bos_token`), cut into
non-overlapping windows of `ctx` tokens (the tail that does not fill a window is dropped), and each
window is run from an empty cache; only its second half is scored: the logits at positions
ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1, so each window scores ctx - 1 - ctx/2 tokens. Where the
vocabulary adds BOS, the first token of every window is replaced by BOS, as llama-perplexity does.

The functions are small and independent so a caller can shard the work (e.g. one worker per machine):
`windows()` cuts the ids, `score_windows()` runs any subset of them through one forward, `merge()` puts
the results back in window order, and `perplexity_stats()` / `kl_stats()` reduce them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apr.errors import AprError

TOP_K = 32  # base log-probs kept per scored token (the rest of the mass is kept as one number)


@dataclass(frozen=True)
class Window:
    index: int  # window number in the text (0-based)
    ids: tuple[int, ...]  # the ctx tokens fed to the model (first one BOS where the vocabulary adds it)
    targets: tuple[int, ...]  # the scored tokens: the text's tokens at window positions ctx/2+1 .. ctx-1


@dataclass
class WindowScore:
    """Per scored token (n = ctx - 1 - ctx/2 rows): nll of the true token, the top-k log-probs, the log of the
    mass outside them, and (against a base) this model's log-probs at the base's top-k ids."""
    index: int
    nll: np.ndarray  # (n,) float32
    top_ids: np.ndarray  # (n, k) int32, most likely first
    top_lp: np.ndarray  # (n, k) float32
    rest_lp: np.ndarray  # (n,) float32: log(1 - sum(exp(top_lp)))
    at_base: np.ndarray | None = None  # (n, k) float32, log-probs at the base's top_ids


def tokenize(tokenizer, text: str) -> list[int]:
    """The text's ids as llama-perplexity gets them: special-token strings stay plain text (parse_special is
    off there), and BOS goes in front only when the vocabulary says add_bos_token."""
    ids = tokenizer.encode_plain(text)
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        ids.insert(0, tokenizer.bos_id)
    return ids


def first_scored(ctx: int) -> int:
    return ctx // 2


def n_scored(ctx: int) -> int:
    return ctx - 1 - first_scored(ctx)


def windows(ids: list[int], ctx: int, bos_id: int | None = None) -> list[Window]:
    """Non-overlapping windows of `ctx` tokens; `bos_id` (only where the vocabulary adds BOS) replaces each
    window's first token. Fewer than 2 * ctx tokens is refused, as llama-perplexity refuses it."""
    if ctx < 8:
        raise AprError(f"--ctx must be at least 8 (got {ctx})")
    if len(ids) < 2 * ctx:
        raise AprError(f"the text tokenizes to only {len(ids)} tokens; perplexity with --ctx {ctx} needs at least "
                       f"{2 * ctx} (two windows): give a longer text or a smaller --ctx")
    first, out = first_scored(ctx), []
    for i in range(len(ids) // ctx):
        chunk = list(ids[i * ctx:(i + 1) * ctx])
        targets = tuple(chunk[first + 1:])
        if bos_id is not None:
            chunk[0] = bos_id
        out.append(Window(i, tuple(chunk), targets))
    return out


def forward_sequences(model, ids, n_seqs: int, length: int, pick=None):
    """Teacher-forced logits of `n_seqs` sequences of `length` tokens (ids flat, (n_seqs*length,)), each in its
    own KV slot from position 0, in ONE step of the engine's model. `pick` (row indices into the flat
    sequence): only those rows go through the output layer. Returns (rows, vocab) float32, rows = len(pick) or
    n_seqs*length. The one place perplexity, held-out loss and the llama.cpp parity check score text."""
    import torch

    from apr.model.transformer import Segment

    model.setup_cache(length, slots=n_seqs)
    # the slots are overwritten here: the engine's prefix cache must not reuse them (as after a direct forward)
    model.direct_steps = getattr(model, "direct_steps", 0) + 1
    segs = [Segment(slot, 0, length) for slot in range(n_seqs)]
    hook = None
    if pick is not None:  # a pre-hook on the final norm picks the rows: it skips that share of the vocab GEMM
        hook = model.output_norm.register_forward_pre_hook(lambda _m, a: (a[0].index_select(0, pick.to(a[0].device)),))
    try:
        with torch.inference_mode():
            logits = model.step(torch.as_tensor(ids, dtype=torch.long), segs, all_logits=True).float()
    finally:
        if hook is not None:
            hook.remove()
    if pick is not None and logits.shape[0] != len(pick):  # a step that bypassed the norm module: all rows came back
        logits = logits.index_select(0, pick.to(logits.device))
    return logits


def score_windows(lm, wins: list[Window], top_k: int = TOP_K, base_ids: list[np.ndarray] | None = None) -> list[WindowScore]:
    """Run `wins` (all of the same length) through ONE forward of the loaded model, each window in its own KV
    slot from position 0, and score the second half of each. `base_ids[i]` (n, k): also return this model's
    log-probs at those ids (for KL against a base)."""
    import torch

    ctx = len(wins[0].ids)
    first, n = first_scored(ctx), n_scored(ctx)
    ids = torch.tensor([t for w in wins for t in w.ids], dtype=torch.long)  # (B*ctx,)
    # only the scored rows go through the output layer (llama-perplexity asks for logits at pos >= ctx/2 the same way)
    pick = torch.cat([torch.arange(b * ctx + first, b * ctx + first + n) for b in range(len(wins))])
    logits = forward_sequences(lm.model, ids, len(wins), ctx, pick).reshape(len(wins), n, -1)  # (B, n, vocab)
    out = []
    for b, w in enumerate(wins):
        rows = logits[b]  # (n, vocab): row j predicts targets[j]
        out.append(_score_rows(w.index, rows, torch.tensor(w.targets, dtype=torch.long), top_k,
                               None if base_ids is None else base_ids[b]))
    del logits
    return out


def score_window(lm, window: Window, top_k: int = TOP_K, base_ids: np.ndarray | None = None) -> WindowScore:
    return score_windows(lm, [window], top_k, None if base_ids is None else [base_ids])[0]


def _score_rows(index: int, rows, targets, top_k: int, base_ids) -> WindowScore:
    import torch

    lse = torch.logsumexp(rows, dim=-1, keepdim=True)  # (n, 1)
    nll = (lse[:, 0] - rows.gather(1, targets[:, None])[:, 0]).numpy()
    vals, idx = torch.topk(rows, min(top_k, rows.shape[-1]), dim=-1)  # (n, k), sorted
    top_lp = (vals - lse).numpy()
    at_base = None
    if base_ids is not None:
        at_base = (rows.gather(1, torch.as_tensor(base_ids, dtype=torch.long)) - lse).numpy().astype(np.float32)
    return WindowScore(index, nll.astype(np.float32), idx.numpy().astype(np.int32), top_lp.astype(np.float32),
                       rest_logprob(top_lp), at_base)


def rest_logprob(lp: np.ndarray) -> np.ndarray:
    """log(1 - sum(exp(lp))) per row, in float64; a mass that rounds to nothing becomes log(1e-30)."""
    rest = 1.0 - np.exp(lp.astype(np.float64)).sum(-1)
    return np.log(np.maximum(rest, 1e-30)).astype(np.float32)


def merge(parts) -> list[WindowScore]:
    """Scores from any number of shards, in window order; a missing or repeated window is an error."""
    scores = sorted((s for part in parts for s in part), key=lambda s: s.index)
    want = list(range(len(scores)))
    if [s.index for s in scores] != want:
        raise AprError(f"window results are not the windows 0..{len(scores) - 1}: got {[s.index for s in scores]}")
    return scores


def _mean_err(x: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error, as llama-perplexity computes them (sqrt(var / (n - 1)))."""
    x = x.astype(np.float64)
    m = float(x.mean())
    var = float((x * x).mean() - m * m)
    return m, (var / (len(x) - 1)) ** 0.5 if var > 0 and len(x) > 1 else 0.0


def perplexity_stats(nll: np.ndarray) -> dict:
    """exp(mean nll) and its error exp(mean) * stderr(nll), as llama-perplexity's final estimate."""
    m, e = _mean_err(nll)
    ppl = float(np.exp(m))
    return {"ppl": ppl, "ppl_error": ppl * e, "mean_nll": m, "n_tokens_scored": int(len(nll))}


class Running:
    """The running estimate shown while windows arrive in order."""

    def __init__(self):
        self.s = self.s2 = 0.0
        self.n = 0

    def add(self, nll: np.ndarray) -> None:
        x = nll.astype(np.float64)
        self.s, self.s2, self.n = self.s + float(x.sum()), self.s2 + float((x * x).sum()), self.n + len(x)

    def text(self) -> str:
        m = self.s / self.n
        var = self.s2 / self.n - m * m
        ppl = float(np.exp(m))
        err = ppl * (var / (self.n - 1)) ** 0.5 if var > 0 and self.n > 1 else 0.0
        return f"{ppl:.4f}±{err:.4f}" if ppl < 1e6 else f"{ppl:.4g}±{err:.3g}"


def kl_stats(base: dict, scores: list[WindowScore]) -> dict:
    """KL(base || this model) per scored token over the base's top-k ids plus one "rest" bucket (a lower
    bound of the full-vocabulary KL, exact when the rest mass is ~0), and llama-perplexity's companions:
    same top p (top-1 agreement), Δp of the true token, and the Δp of the base's top token."""
    b_lp, b_rest, b_nll = base["top_lp"].astype(np.float64), base["rest_lp"].astype(np.float64), base["nll"]
    q_lp = np.concatenate([s.at_base for s in scores]).astype(np.float64)  # (N, k)
    q_top = np.concatenate([s.top_ids[:, 0] for s in scores])
    q_nll = np.concatenate([s.nll for s in scores])
    if q_lp.shape != b_lp.shape:
        raise AprError(f"the base holds {b_lp.shape[0]} scored tokens, this run {q_lp.shape[0]}")
    q_rest = rest_logprob(q_lp).astype(np.float64)
    kld = (np.exp(b_lp) * (b_lp - q_lp)).sum(-1) + np.exp(b_rest) * (b_rest - q_rest)  # (N,)
    same = (q_top == base["top_ids"][:, 0]).astype(np.float64)
    dp_true = np.exp(-q_nll.astype(np.float64)) - np.exp(-b_nll.astype(np.float64))
    dp_top = np.exp(q_lp[:, 0]) - np.exp(b_lp[:, 0])
    pct = lambda q: float(np.percentile(kld, q))  # noqa: E731 (linear interpolation, as llama-perplexity)
    mk, ek = _mean_err(kld)
    p_same = float(same.mean())
    n = len(kld)
    mdp, edp = _mean_err(dp_true)
    mtop, etop = _mean_err(dp_top)
    return {"n_tokens": n, "mean_kld": mk, "mean_kld_error": ek, "median_kld": pct(50), "p90_kld": pct(90),
            "p99_kld": pct(99), "p99_9_kld": pct(99.9), "max_kld": float(kld.max()), "min_kld": float(kld.min()),
            "same_top_p": p_same, "same_top_p_error": (p_same * (1 - p_same) / (n - 1)) ** 0.5 if n > 1 else 0.0,
            "mean_dp": mdp, "mean_dp_error": edp, "rms_dp": float(np.sqrt((dp_true ** 2).mean())),
            "mean_dp_base_top": mtop, "mean_dp_base_top_error": etop,
            "ppl_base": perplexity_stats(b_nll)["ppl"], "ppl": perplexity_stats(q_nll)["ppl"],
            "base_rest_mass_mean": float(np.exp(b_rest).mean())}
