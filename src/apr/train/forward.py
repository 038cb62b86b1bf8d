"""The training forward pass: the inference Transformer's own modules, run with autograd over a batch.

Nothing here redefines the model: the embedding, every `Block`, the final norm and the head are the
Transformer's. Each sequence of the batch is one `Segment` of the Block's batched step; attention within
a sequence is causal and needs no KV cache (`_NoCache` hands each segment's k, v straight back).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from apr.errors import AprError
from apr.model.transformer import Segment, Transformer, rope_tables


class _NoCache:
    """Block.forward's cache for whole sequences at position 0: attention over the segment's own keys."""

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor, slot: int = 0):
        assert pos == 0, "training sequences start at position 0"
        return k, v


_NO_CACHE = _NoCache()


def hidden(model: Transformer, ids: torch.Tensor, grad_checkpoint: bool = False) -> torch.Tensor:
    """ids (B, T) -> final-normed hidden states (B*T, dim), with autograd."""
    b, t = ids.shape
    x = model.token_embd(ids.reshape(-1)).float()  # (B*T, dim)
    cos, sin = rope_tables(model.cfg, t)  # (T, hd/2): apply_rope's reference tables, both rope layouts
    cos, sin = cos.repeat(b, 1), sin.repeat(b, 1)  # (B*T, hd/2): one row per token of the batch
    segs = [Segment(i, 0, t) for i in range(b)]
    for block in model.blk:
        if grad_checkpoint and torch.is_grad_enabled():  # keep one block's activations at a time
            x = checkpoint(block, x, 0, cos, sin, _NO_CACHE, None, None, segs, use_reentrant=False)
        else:
            x = block(x, 0, cos, sin, _NO_CACHE, None, segs=segs)
    return model.output_norm(x)


def logits(model: Transformer, ids: torch.Tensor, grad_checkpoint: bool = False) -> torch.Tensor:
    """ids (B, T) -> float32 logits (B*T, vocab)."""
    return model.output(hidden(model, ids, grad_checkpoint)).float()


# The training numerics new runs record. 1: nn.Dropout, full logits + F.cross_entropy. 2: Dropout16 and
# _HeadCrossEntropy in 64-row chunks. 3: 512-row chunks and the LoRA product added by one addmm (lora.py).
# A run is reproduced with its own version, so older ones stay here as they were.
NUMERICS = 3
# Rows of logits alive at once, by version: (64, 151936) float32 is 39 MB where the whole batch's is 622 MB,
# but a 64-row GEMM against the 151936 x 896 head runs at half speed: on a 2-core Zen 4 the two head GEMMs of
# 4 x 256 tokens take 6.9 s in 64-row chunks, 4.0 s in 256-row, 3.2-3.6 s in 512-row (311 MB).
HEAD_CHUNK = {2: 64, 3: 512}


class _HeadCrossEntropy(torch.autograd.Function):
    """Per-row cross entropy of the frozen head's logits, (h (N, dim), targets (N,)) -> (N,), in row chunks.

    The head is frozen, so the only gradient is dL_i/dh_i = (softmax(z_i) - onehot(t_i)) @ W, and it is
    computed in forward, chunk by chunk, while the chunk's logits are still in cache: the (N, vocab) logits,
    their log-softmax and its gradient (three 622 MB tensors for 4 x 256 tokens of the 0.5B) never exist.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, targets: torch.Tensor, head, chunk: int) -> torch.Tensor:
        from apr.train.lora import base_weight

        w, bias = base_weight(head), head._bias32  # (V, dim): dequantized once for forward and gradient
        want_grad = ctx.needs_input_grad[0]
        losses = torch.empty(h.shape[0])
        dh = torch.empty_like(h) if want_grad else None
        for s in range(0, h.shape[0], chunk):
            e, t = min(s + chunk, h.shape[0]), targets[s : s + chunk, None]
            z = F.linear(h[s:e], w, bias)  # (c, V)
            lse = torch.logsumexp(z, 1, keepdim=True)  # (c, 1)
            losses[s:e] = (lse - z.gather(1, t)).squeeze(1)
            if want_grad:
                z.sub_(lse).exp_().scatter_add_(1, t, torch.full(t.shape, -1.0))  # softmax - onehot
                torch.mm(z, w, out=dh[s:e])  # (c, V) @ (V, dim) -> (c, dim)
        ctx.save_for_backward(dh)
        return losses

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (dh,) = ctx.saved_tensors
        return dh * g[:, None], None, None, None  # (N, dim) scaled by each row's upstream gradient


def token_losses(model: Transformer, windows: torch.Tensor, grad_checkpoint: bool = False,
                 numerics: int = NUMERICS) -> torch.Tensor:
    """windows (B, T+1) -> next-token cross entropy per position (B, T)."""
    b, t1 = windows.shape
    targets = windows[:, 1:].reshape(-1)  # (B*T,)
    if numerics == 1:
        z = logits(model, windows[:, :-1], grad_checkpoint)  # (B*T, V)
        return F.cross_entropy(z, targets, reduction="none").view(b, t1 - 1)
    h = hidden(model, windows[:, :-1], grad_checkpoint)  # (B*T, dim)
    head = getattr(model.output, "base", model.output)  # the FrozenLinear's QuantLinear
    return _HeadCrossEntropy.apply(h, targets, head, HEAD_CHUNK[numerics]).view(b, t1 - 1)


@dataclass
class Base:
    path: Path
    sha256: str
    model: Transformer
    tokenizer: object
    metadata: dict


def load_base(spec: str | None, quiet: bool = True) -> Base:
    """A model for training: assembled from its blocks, nothing materialized (no dense copy is made here)."""
    from apr import hub
    from apr.model.load import build_modules
    from apr.runtime import read_model_file
    from apr.tokenizer import Tokenizer

    path = hub.resolve_model(spec, quiet=quiet)
    cfg, metadata, tensors = read_model_file(path)
    model = Transformer(cfg, build_modules(cfg, tensors))
    sha = hub.known_sha256(path) or hub.sha256_file(path)
    return Base(path, sha, model, Tokenizer.from_metadata(metadata), metadata)


def tokenizer_fingerprint(metadata: dict) -> str:
    """sha256 of what decides token ids: the vocabulary, merges, model/pre-tokenizer and special ids."""
    keys = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
            "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")
    h = hashlib.sha256()
    for k in keys:
        v = metadata.get(k)
        v = v.tolist() if hasattr(v, "tolist") else v
        h.update(json.dumps([k, v], default=str).encode())
    return h.hexdigest()


def check_same_vocab(teacher: Base, student: Base) -> None:
    ft, fs = tokenizer_fingerprint(teacher.metadata), tokenizer_fingerprint(student.metadata)
    if ft != fs or teacher.model.cfg.vocab_size != student.model.cfg.vocab_size:
        raise AprError(f"teacher {teacher.path.name} and student {student.path.name} have different vocabularies "
                       f"(tokenizer fingerprints {ft[:12]} vs {fs[:12]}); distillation needs the same tokenizer")
