"""LoRA over the frozen, still-quantized base: linears whose weight is dequantized on the fly.

`attach(model, ...)` swaps the Transformer's QuantLinear modules (named after the GGUF tensors) for
autograd-capable wrappers: targeted ones get float32 adapters A (r, in) and B (out, r), every other one
(and the output head) becomes a frozen linear that still passes gradients to its input. In "dequant" mode
the base weight is rebuilt from its ggml blocks in forward and again in backward (for dX), so no dense
float32 copy of the model is kept; "dense" mode keeps one per linear (faster when it fits: measure).
The adapter file format is docs/training.md's `apr-lora/1`.
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from torch import nn

from apr.errors import AprError
from apr.model.load import LINEARS
from apr.quant import QuantLinear, dequantize

FORMAT = "apr-lora/1"


def base_weight(lin: QuantLinear) -> torch.Tensor:
    """The (out, in) float32 weight: the dense copy if one is prepared, else dequantized from the blocks now."""
    p = lin.prepared
    if p is not None and p.dtype == torch.float32 and lin.weight is not None:
        return lin.weight
    return dequantize(lin.raw, lin.qtype, (lin.out_features, lin.in_features))


class _DequantMatmul(torch.autograd.Function):
    """y = x @ W.T (+ b) with W frozen: W is not saved for backward but rebuilt from the blocks there."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lin: QuantLinear) -> torch.Tensor:
        ctx.lin = lin
        return F.linear(x, base_weight(lin), lin._bias32)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        return gy @ base_weight(ctx.lin), None  # (..., out) @ (out, in) -> (..., in)


class FrozenLinear(nn.Module):
    """A base linear for training: no parameters, gradient to its input only."""

    kind = "train"  # apr.quant.linear.fused runs modules that are not "ggml" one by one

    def __init__(self, base: QuantLinear):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantMatmul.apply(x, self.base)


class Dropout16(nn.Module):
    """Inverted dropout whose mask comes from 16-bit uniforms, four to each 64-bit draw of torch's generator.

    `nn.Dropout` draws one Bernoulli per element (27 ms for a (1024, 4864) mask on 2 cores, 168 masks a step);
    here one `random_` over a quarter of the elements gives the mask in 4 ms. The drop probability is p
    rounded to a multiple of 1/65536 (0.05 -> 0.0500030...) and the kept values are scaled by 1/(1 - that),
    so E[dropout(x)] = x exactly. Numerics versions 2 and 3 (`apr.train.forward.NUMERICS`); version 1 is nn.Dropout.
    """

    def __init__(self, p: float):
        super().__init__()
        self.cut = round(p * 65536)  # drop when u < cut, u uniform in [0, 65536)
        self.scale = 65536.0 / (65536 - self.cut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.cut == 0:
            return x
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # full 64-bit range
        u = words.view(torch.int16)[:n].view(x.shape)  # uniform in [-32768, 32768)
        keep = (u >= self.cut - 32768).to(x.dtype).mul_(self.scale)
        return x * keep


class LoRALinear(FrozenLinear):
    """base(x) + (alpha / r) · B(A(dropout(x))); B starts at zero, so the output starts equal to the base's."""

    def __init__(self, base: QuantLinear, rank: int, alpha: float, dropout: float, gen: torch.Generator,
                 numerics: int = 3):
        super().__init__(base)
        self.rank, self.scale = rank, alpha / rank
        a = torch.empty(rank, base.in_features)
        bound = 1.0 / math.sqrt(base.in_features)  # kaiming-uniform(a=sqrt(5)), as nn.Linear and peft do
        a.uniform_(-bound, bound, generator=gen)
        self.lora_a = nn.Parameter(a)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        drop = nn.Dropout if numerics == 1 else Dropout16
        self.drop = drop(dropout) if dropout > 0 else nn.Identity()
        self.numerics = numerics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantMatmul.apply(x, self.base)
        if self.numerics < 3:
            return y + self.scale * F.linear(F.linear(self.drop(x), self.lora_a), self.lora_b)
        # Version 3: the scale goes on the (N, r) intermediate and B's product is added by addmm's beta = 1,
        # so no (N, out) temporaries for the scaled product and the sum exist, forward or backward.
        u = F.linear(self.drop(x), self.lora_a).reshape(-1, self.rank) * self.scale  # (N, r)
        return torch.addmm(y.reshape(-1, y.shape[-1]), u, self.lora_b.t()).view(y.shape)  # (N, out) -> y's shape


def parse_targets(text: str | list[str]) -> list[str]:
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    bad = [t for t in names if t not in LINEARS]
    if bad or not names:
        raise AprError(f"LoRA target {','.join(bad) or '(none)'} names no module (choose from {','.join(LINEARS)})")
    return list(dict.fromkeys(names))


def attach(model, targets: list[str], rank: int, alpha: float, dropout: float, seed: int,
           mode: str = "dequant", numerics: int = 3) -> dict[str, LoRALinear]:
    """Wrap every linear of `model` in place; returns the adapters by GGUF name (`blk.3.attn_q`).
    `numerics` picks the dropout (apr.train.forward.NUMERICS): a run is reproduced with the version it ran."""
    if rank < 1:
        raise AprError(f"--rank must be at least 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise AprError(f"--dropout must be in [0, 1), got {dropout}")
    if numerics not in (1, 2, 3):
        raise AprError(f"training numerics version {numerics} is unknown (this apr has 1, 2 and 3)")
    targets = parse_targets(targets)
    mode = resolve_mode(model, mode)
    gen = torch.Generator().manual_seed(seed)
    adapters: dict[str, LoRALinear] = {}
    for p in model.parameters():
        p.requires_grad_(False)
    for i, block in enumerate(model.blk):
        for name in LINEARS:
            base = getattr(block, name)
            if not isinstance(base, QuantLinear):
                raise AprError(f"blk.{i}.{name} is already wrapped; load the base again")
            _prepare(base, mode)
            wrapped = LoRALinear(base, rank, alpha, dropout, gen, numerics) if name in targets else FrozenLinear(base)
            setattr(block, name, wrapped)
            if name in targets:
                adapters[f"blk.{i}.{name}"] = wrapped
    _prepare(model.output, mode)
    model.output = FrozenLinear(model.output)
    return adapters


def resolve_mode(model, mode: str) -> str:
    """"auto": the dense copy when it takes under half the memory available now (measured faster on the 0.5B:
    docs/training.md), else dequantize on the fly."""
    if mode != "auto":
        return mode
    import os

    lins = [m for m in model.modules() if isinstance(m, QuantLinear)]
    dense = sum(m.in_features * m.out_features * 4 for m in lins)  # float32 bytes
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return "dequant"
    return "dense" if dense < free // 2 else "dequant"


def _prepare(lin: QuantLinear, mode: str) -> None:
    if mode == "dense":
        lin.materialize(torch.float32)  # the dense (out, in) float32 weight, kept
    elif mode != "dequant":
        raise AprError(f"unknown weight mode '{mode}' (choose auto, dequant or dense)")


def adapter_tensors(adapters: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in adapters.items():
        out[f"{name}.lora_a"] = m.lora_a.detach().clone().contiguous()
        out[f"{name}.lora_b"] = m.lora_b.detach().clone().contiguous()
    return out


def load_tensors(adapters: dict[str, LoRALinear], tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, m in adapters.items():
            m.lora_a.copy_(tensors[f"{name}.lora_a"])
            m.lora_b.copy_(tensors[f"{name}.lora_b"])


def write_adapter(path, adapters: dict[str, LoRALinear], *, rank: int, alpha: float, dropout: float,
                  targets: list[str], base_sha256: str, base_name: str, n_layers: int, training: dict) -> None:
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "rank": str(rank), "alpha": str(alpha), "dropout": str(dropout),
            "targets": ",".join(targets), "base_sha256": base_sha256, "base_name": base_name,
            "n_layers": str(n_layers), "training": json.dumps(training, sort_keys=True)}
    save_file(adapter_tensors(adapters), str(path), metadata=meta)


def read_adapter(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of an `apr-lora/1` file; meta has rank/alpha/dropout as numbers, targets as a list."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # not a safetensors file, truncated, missing
        raise AprError(f"{path}: not a readable adapter file ({type(e).__name__}: {e})") from None
    if raw.get("format") != FORMAT:
        raise AprError(f"{path}: not an {FORMAT} adapter (format {raw.get('format')!r})")
    meta = dict(raw, rank=int(raw["rank"]), alpha=float(raw["alpha"]), dropout=float(raw["dropout"]),
                targets=raw["targets"].split(","), n_layers=int(raw["n_layers"]),
                training=json.loads(raw.get("training") or "{}"))
    return tensors, meta
