"""Per-sequence sampling: logits (vocab,) -> next token id, and the logprobs the server reports."""

from __future__ import annotations

import time

import torch


class Sampler:
    """logits (vocab,) -> token id. Greedy at temperature 0; otherwise temperature, then top-k, top-p and min-p
    filtering, seeded. `probs` is the filtered distribution a sample is drawn from (the speculative
    accept/reject rule needs it), `gen` the generator every draw of this sequence uses."""

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: int | None = None):
        self.greedy = temperature <= 0
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.gen = None if self.greedy else torch.Generator().manual_seed(
            seed if seed is not None else int(time.time_ns() % (2**31)))

    def __call__(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(torch.argmax(logits))
        return int(torch.multinomial(self.probs(logits), 1, generator=self.gen))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The normalised distribution (vocab,) float32 that sampling draws from (one-hot when greedy)."""
        if self.greedy:
            return torch.zeros(logits.shape[-1]).index_fill_(0, torch.argmax(logits).view(1), 1.0)
        logits = logits.float() / self.temperature
        if self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.min_p > 0:
            probs = probs.masked_fill(probs < self.min_p * probs.max(), 0.0)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            # drop tokens once the mass before them already reaches top_p (always keep the first)
            drop = (torch.cumsum(sorted_p, 0) - sorted_p) >= self.top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        return probs / probs.sum()


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: int | None = None) -> Sampler:
    return Sampler(temperature, top_k, top_p, min_p, seed)


def apply_repeat_penalty(logits: torch.Tensor, history: list[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as llama.cpp and transformers): shrink positive logits, grow negative ones."""
    if penalty == 1.0 or not history:
        return logits
    ids = torch.tensor(sorted(set(history)), dtype=torch.long)
    vals = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of `token` under `logits` (vocab,) (before any sampling filter, as the
    OpenAI API reports it) and the `top` most likely (id, logprob) pairs."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    alts: list[tuple[int, float]] = []
    if top > 0:
        vals, ids = torch.topk(lp, min(top, lp.numel()))
        alts = [(int(i), float(v)) for i, v in zip(ids, vals)]
    return float(lp[token]), alts
