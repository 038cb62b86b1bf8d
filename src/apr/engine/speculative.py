"""Speculative decoding inside the engine: drafting k tokens cheaply, verifying them in the target's one step.

A sequence that speculates feeds `[last, d1 .. dk]` to the target as k+1 one-row segments of its own slot at
consecutive positions (both step implementations write every row's KV before any row attends, and row i
attends to positions <= its own, so the rows see exactly what one-at-a-time decoding would). Row i's logits
decide token i+1 through the same penalty / grammar / sampler path as a plain decode; a draft that matches
is kept and the next row is read, the first mismatch ends the pass with the target's own token. KV rows past
the accepted length stay in the slot but `Request.fed` ends before them: the next pass overwrites them, and
the prefix cache only trusts a slot's first `fed` tokens.

Lossless: greedy output is the plain decode's token for token; with sampling the accept/reject rule
(accept d with probability min(1, p(d)/q(d)), else draw from norm(max(0, p - q))) keeps the target's
distribution. An n-gram draft is a point mass q = onehot(d).

Drafters:
    NgramDrafter   prompt lookup: the longest recent n-gram that occurred before proposes what followed it
    DraftModel     a smaller model with the same vocabulary (its own KV cache, one slot per engine slot)
"""

from __future__ import annotations

import hashlib

import torch

from apr.errors import AprError
from apr.model.transformer import Segment

MODES = ("ngram", "draft", "off")
# tokens drafted per pass. benchmarks/speculative.py (0.5B, 4 code edits, greedy, load ~3 on 2 cores): ngram k=4
# 0.95x plain decode (68% accepted, 2.24 tokens/pass), k=8 1.31x (53%, 2.58 tokens/pass): a verify pass of 9 rows
# costs little more than 5, so the longer draft wins. Speculation stays off unless asked for (not measured idle).
DRAFT_MAX = {"ngram": 8, "draft": 4}
NGRAM_MAX, NGRAM_MIN = 4, 2  # n-gram lengths tried, longest first
NGRAM_WINDOW = 4096  # how far back the lookup searches (bounds its cost on long contexts)
# process defaults for requests that do not choose (set by `apr serve --speculative`)
DEFAULT = {"mode": "off", "draft_model": None, "draft_max": None}


def configure(mode: str | None, draft_model: str | None = None, draft_max: int | None = None) -> None:
    """Set the process default every new Engine starts from (the server's flags)."""
    DEFAULT.update(mode=mode or "off", draft_model=draft_model, draft_max=draft_max)


def ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def check_mode(mode: str | None, draft_max: int | None) -> None:
    if mode is not None and mode not in MODES:
        raise AprError(f"unknown speculative mode '{mode}' (choose from {', '.join(MODES)})")
    if draft_max is not None and draft_max < 1:
        raise AprError(f"draft_max must be at least 1, got {draft_max}")


def ngram_draft(history: list[int], k: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of history's last n tokens (n from
    NGRAM_MAX down to NGRAM_MIN); [] when none occurred. The code being edited is in the prompt: a rewrite
    copies long runs of it, and a run once entered is found again at every step."""
    h = history[-NGRAM_WINDOW:]
    for n in range(min(NGRAM_MAX, len(h) - 1), NGRAM_MIN - 1, -1):
        tail = h[-n:]
        first = tail[0]
        for i in range(len(h) - n - 1, -1, -1):  # newest first: the nearest copy predicts best
            if h[i] == first and h[i : i + n] == tail:
                return h[i + n : i + n + k]
    return []


def choose(sampler, logits: torch.Tensor, draft: int, q: torch.Tensor | None) -> tuple[int, bool]:
    """The token a row yields given the drafted one -> (token, draft accepted). `logits` are the row's final
    logits (penalty and grammar applied); `q` the draft's distribution (None: a point mass on `draft`)."""
    if sampler.greedy:
        token = int(torch.argmax(logits))
        return token, token == draft
    p = sampler.probs(logits)  # (vocab,)
    qd = 1.0 if q is None else float(q[draft])
    if qd > 0 and float(torch.rand(1, generator=sampler.gen)) * qd < float(p[draft]):  # u < p/q
        return draft, True
    if q is None:
        resid = p.clone()
        resid[draft] = 0.0  # max(0, p - onehot(d))
    else:
        q = q[: p.shape[0]] if q.shape[0] >= p.shape[0] else torch.cat([q, q.new_zeros(p.shape[0] - q.shape[0])])
        resid = (p - q).clamp_min(0.0)
    if float(resid.sum()) <= 0.0:  # p == q up to rounding: a rejection cannot happen, but never divide by 0
        resid = p
    return int(torch.multinomial(resid / resid.sum(), 1, generator=sampler.gen)), False


def tokenizer_fingerprint(tok) -> str:
    """sha256 over a tokenizer's token strings and stop/bos ids: equal exactly when ids mean the same text."""
    h = hashlib.sha256()
    for i in range(tok.vocab_size):
        h.update(tok.id_to_token(i).encode("utf-8", "surrogatepass") + b"\0")
    h.update(repr((tok.bos_id, tok.eos_id, sorted(tok.stop_ids))).encode())
    return h.hexdigest()


class DraftModel:
    """A second, smaller model proposing tokens; it keeps its own KV cache with one slot per engine slot and
    remembers which tokens each slot holds, so each pass feeds only what it has not seen."""

    def __init__(self, target_lm, name: str):
        from apr.runtime import load_model

        self.name = name
        self.lm = load_model(name, dtype=target_lm.dtype, backend=target_lm.backend, quiet=True)
        mine, theirs = tokenizer_fingerprint(self.lm.tokenizer), tokenizer_fingerprint(target_lm.tokenizer)
        if mine != theirs:
            raise AprError(f"draft model {name} has a different vocabulary from {target_lm.path.name} "
                           f"(tokenizer fingerprint {mine[:12]} != {theirs[:12]}): drafts would be other tokens")
        self.model = self.lm.model
        self.slot_tokens: dict[int, list[int]] = {}

    def draft(self, slot: int, history: list[int], k: int, sampler) -> tuple[list[int], list[torch.Tensor] | None]:
        """k tokens following `history`, drawn as the target would draw them (greedy, or from the draft's own
        filtered distribution q, returned for the accept rule)."""
        m = self.model
        need, cache = len(history) + k, self.model.cache
        if cache is None or cache.capacity < need or cache.slots <= slot:
            cap = max(need, 2 * cache.capacity if cache is not None else need)
            m.setup_cache(min(cap, self.lm.config.context_length), slots=max(slot + 1, cache.slots if cache else 1),
                          keep=True)
        have = self.slot_tokens.get(slot, [])
        start = 0
        while start < min(len(have), len(history)) and have[start] == history[start]:
            start += 1
        start = min(start, len(history) - 1)  # at least one row: its logits propose d1
        fed = history[:start]
        self.slot_tokens[slot] = fed  # the rows from `start` on are overwritten from here (also if a step fails)
        ids, pos = history[start:], start
        out: list[int] = []
        qs: list[torch.Tensor] | None = None if sampler.greedy else []
        while len(out) < k:
            logits = m.step(torch.tensor(ids, dtype=torch.long), [Segment(slot, pos, len(ids))])[-1]  # (vocab,)
            fed.extend(ids)
            pos += len(ids)
            if sampler.greedy:
                tok = int(torch.argmax(logits))
            else:
                q = sampler.probs(logits)
                tok = int(torch.multinomial(q, 1, generator=sampler.gen))
                qs.append(q)
            out.append(tok)
            ids = [tok]
        # d_k's KV is not written: the next pass starts from the kept prefix
        return out, qs

    def forget(self) -> None:
        self.slot_tokens = {}
