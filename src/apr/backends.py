"""The backend chain behind `--backend auto|cuda|cpu`.

`auto` tries each accelerator in CHAIN order, then cpu. An accelerator is selected only after
1. it is available (a device is there and torch can use it),
2. a preflight: every tensor type has a kernel on it, and the prepared weights fit in its free memory,
3. a parity gate: the first greedy decode steps of a fixed probe prompt, run on the candidate and on the
   cpu path, agree (full-vocabulary logits cosine >= GATE_COSINE and the same argmax at every step).
Otherwise it is rejected with a reason and the next candidate is tried. Every candidate, accepted or
rejected, goes into the chain that `LoadedModel.backend_chain` and `--json` report.
A forced backend (`--backend cuda`) that fails any step raises BackendUnavailable: never a silent downgrade.
Gate results are cached per (model sha256, device, dtype) in $APR_HOME/gates/.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from apr.errors import AprError, BackendUnavailable

CHAIN = ("cuda",)  # accelerators tried by `auto`, in order, before cpu
GATE_COSINE = 0.99
GATE_STEPS = 4  # decode steps compared after the prefill
GATE_PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
_HEADROOM = 1.15  # prepared weights x this (KV cache, activations, allocator slack) must fit in free memory


@dataclass
class Backend:
    """One place to run. `build(config, tensors, dtype, sha256)` returns a materialized Transformer on it."""

    name: str
    available: Callable[[], str | None]  # None when usable, else why not
    device_label: Callable[[], str]  # names the device in the gate cache key ("cuda:NVIDIA H200")
    free_bytes: Callable[[], int]
    build: Callable[..., Any]
    gated: bool = True  # the cpu path is the reference: it is never gated against itself
    supported_types: Callable[[], set] = field(default=lambda: set())


def _cuda_available() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    major, _ = torch.cuda.get_device_capability(0)
    if major < 8:  # the tinygemm int4 kernel needs sm80+ (bf16 tensor cores)
        return f"CUDA device {torch.cuda.get_device_name(0)} is sm{major}x; the int4 kernels need sm80 or newer"
    return None


def _build_on(device: str) -> Callable:
    def build(config, tensors, dtype, sha256: str | None = None):
        from apr.model.load import build_modules
        from apr.model.transformer import Transformer
        from apr.quant import prepared_cache

        model = Transformer(config, build_modules(config, tensors))
        if device == "cpu" and _load_stored(model, config, tensors, dtype):
            return model.materialize(dtype, device)  # a .apr file's prepared states: nothing is packed
        cacheable = device == "cpu" and dtype != torch.float32 and sha256 and prepared_cache.enabled()
        if cacheable and prepared_cache.load(model, sha256, dtype):
            return model.materialize(dtype, device)  # every linear is prepared already: nothing is packed
        model.materialize(dtype, device)
        if cacheable:
            prepared_cache.store(model, sha256, dtype)
        return model

    return build


def _load_stored(model, config, tensors: dict, dtype: torch.dtype) -> bool:
    """Load the prepared states a .apr file stores for `dtype` (tensor.prepared); True if every linear had one."""
    from apr.quant import QuantLinear

    name = str(dtype).removeprefix("torch.")
    used = []
    for mod_name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            src = "token_embd" if mod_name == "output" and config.tied_embeddings else mod_name
            state = getattr(tensors.get(src + ".weight"), "prepared", {}).get(name)
            used.append(bool(state) and module.load_prepared(state, dtype))
    return bool(used) and all(used)


def _all_types() -> set:
    from apr.quant import QUANT_TYPES

    return set(QUANT_TYPES)


BACKENDS: dict[str, Backend] = {
    "cuda": Backend("cuda", _cuda_available, lambda: f"cuda:{torch.cuda.get_device_name(0)}",
                    lambda: torch.cuda.mem_get_info(0)[0], _build_on("cuda"), True, _all_types),
    "cpu": Backend("cpu", lambda: None, lambda: "cpu", lambda: 1 << 62, _build_on("cpu"), False, _all_types),
}


def prepared_bytes(tensors: dict, dtype: torch.dtype) -> int:
    """Bytes the prepared weights take: int4 (1 or 2 planes) + bf16 scales, or dense in `dtype`."""
    from apr.quant import kernels

    total = 0
    for t in tensors.values():
        n = 1
        for d in t.shape:
            n *= int(d)
        if dtype != torch.float32 and int(t.qtype) in kernels.PLANES and len(t.shape) == 2:
            total += kernels.PARTS[int(t.qtype)] * (n // 2 + n // kernels.GROUP * 4)  # nibbles + (scale, zero)
        else:
            total += n * torch.tensor([], dtype=dtype).element_size()
    return total


def preflight(backend: Backend, tensors: dict, dtype: torch.dtype) -> str | None:
    """Why `backend` cannot hold this model (None: it can)."""
    from apr.quant import type_name

    missing = sorted({type_name(t.qtype) for t in tensors.values() if int(t.qtype) not in backend.supported_types()})
    if missing:
        return f"no {backend.name} kernel for tensor types {', '.join(missing)}"
    need, free = int(prepared_bytes(tensors, dtype) * _HEADROOM), backend.free_bytes()
    if need > free:
        return f"needs {need / 2**30:.2f} GiB, {backend.name} has {free / 2**30:.2f} GiB free"
    return None


# ---- the parity gate ----

def gate_logits(model, prompt_ids: list[int], steps: int = GATE_STEPS) -> list[torch.Tensor]:
    """Full-vocab float32 logits (on the host) of the prefill and `steps` greedy decode steps."""
    model.setup_cache(len(prompt_ids) + steps + 1)
    out = [model(torch.tensor(prompt_ids, dtype=torch.long), 0)[-1].float().cpu()]
    pos = len(prompt_ids)
    for _ in range(steps):
        token = int(torch.argmax(out[-1]))
        out.append(model(torch.tensor([token], dtype=torch.long), pos)[-1].float().cpu())
        pos += 1
    return out


def compare_logits(candidate: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[bool, str]:
    """The gate's verdict: every step's cosine >= GATE_COSINE and the same argmax."""
    worst, detail = 1.0, ""
    for i, (c, r) in enumerate(zip(candidate, reference)):
        cos = float(F.cosine_similarity(c.double(), r.double(), dim=0))
        worst = min(worst, cos)
        if int(c.argmax()) != int(r.argmax()):
            return False, f"step {i}: argmax {int(c.argmax())} vs cpu {int(r.argmax())} (cosine {cos:.4f})"
        if not cos >= GATE_COSINE:  # `not >=` also catches NaN
            return False, f"step {i}: logits cosine {cos:.4f} < {GATE_COSINE}"
    detail = f"parity gate passed: {len(candidate)} steps, min cosine {worst:.4f}, same argmax"
    return True, detail


def _gate_path(sha256: str, device: str, dtype: torch.dtype):
    from apr.hub import apr_home

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", device)
    return apr_home() / "gates" / f"{sha256}-{safe}-{str(dtype).removeprefix('torch.')}.json"


def cached_gate(sha256: str, device: str, dtype: torch.dtype) -> dict | None:
    path = _gate_path(sha256, device, dtype)
    try:
        doc = json.loads(path.read_text())
        return doc if isinstance(doc.get("passed"), bool) and isinstance(doc.get("detail"), str) else None
    except (OSError, ValueError, AttributeError):
        return None


def store_gate(sha256: str, device: str, dtype: torch.dtype, passed: bool, detail: str) -> None:
    path = _gate_path(sha256, device, dtype)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"passed": passed, "detail": detail, "sha256": sha256, "device": device,
                                   "dtype": str(dtype).removeprefix("torch."), "steps": GATE_STEPS}))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs a gate run next time


# ---- selection ----

@dataclass
class Selection:
    backend: str
    model: Any
    chain: list[dict]


class _Context:
    """What the chain needs from load_model: the model's tensors, the probe prompt, a lazy cpu model."""

    def __init__(self, config, tensors: dict, dtype: torch.dtype, sha256: str, prompt_ids: list[int]):
        self.config, self.tensors, self.dtype, self.sha256, self.prompt_ids = config, tensors, dtype, sha256, prompt_ids
        self._cpu_model = None
        self._cpu_logits: list[torch.Tensor] | None = None

    def cpu_model(self):
        if self._cpu_model is None:
            self._cpu_model = BACKENDS["cpu"].build(self.config, self.tensors, self.dtype, self.sha256)
        return self._cpu_model

    def cpu_logits(self) -> list[torch.Tensor]:
        if self._cpu_logits is None:
            self._cpu_logits = gate_logits(self.cpu_model(), self.prompt_ids)
        return self._cpu_logits


def _try(backend: Backend, ctx: _Context) -> tuple[Any, str]:
    """(model, reason accepted) or raise _Rejected(reason)."""
    reason = backend.available()
    if reason:
        raise _Rejected(reason)
    reason = preflight(backend, ctx.tensors, ctx.dtype)
    if reason:
        raise _Rejected(f"preflight: {reason}")
    if not backend.gated:
        model = ctx.cpu_model() if backend.name == "cpu" else backend.build(ctx.config, ctx.tensors, ctx.dtype, ctx.sha256)
        return model, f"{backend.name} is the reference path"
    label = backend.device_label()
    cached = cached_gate(ctx.sha256, label, ctx.dtype)
    if cached is not None and not cached["passed"]:
        raise _Rejected(f"parity gate failed on {label} (cached): {cached['detail']}")
    model = backend.build(ctx.config, ctx.tensors, ctx.dtype, ctx.sha256)
    if cached is not None:
        return model, f"{cached['detail']} (cached for {label})"
    passed, detail = compare_logits(gate_logits(model, ctx.prompt_ids), ctx.cpu_logits())
    store_gate(ctx.sha256, label, ctx.dtype, passed, detail)
    if not passed:
        raise _Rejected(f"parity gate failed on {label}: {detail}")
    return model, detail


class _Rejected(Exception):
    pass


def select(requested: str, config, tensors: dict, dtype: torch.dtype, sha256: str,
           prompt_ids: list[int]) -> Selection:
    """Run the chain for `requested` ("auto" or a backend name) and return the chosen model and chain."""
    if requested != "auto" and requested not in BACKENDS:
        raise AprError(f"unknown backend '{requested}' (choose from auto, {', '.join(BACKENDS)})")
    names = [*CHAIN, "cpu"] if requested == "auto" else [requested]
    ctx, chain = _Context(config, tensors, dtype, sha256, prompt_ids), []
    for name in names:
        try:
            model, reason = _try(BACKENDS[name], ctx)
        except _Rejected as e:
            chain.append({"backend": name, "accepted": False, "reason": str(e)})
            if requested != "auto":
                raise BackendUnavailable(f"backend '{name}' is not available: {e}") from None
            continue
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # a driver or allocation failure mid-build
            chain.append({"backend": name, "accepted": False, "reason": f"{type(e).__name__}: {e}"[:300]})
            if requested != "auto":
                raise BackendUnavailable(f"backend '{name}' failed: {e}") from None
            continue
        chain.append({"backend": name, "accepted": True, "reason": reason})
        return Selection(name, model, chain)
    raise BackendUnavailable("no backend could run this model: " + "; ".join(c["reason"] for c in chain))


def describe(chain: list[dict]) -> str:
    """One line for humans: `cuda rejected (no CUDA device ...) -> cpu`."""
    parts = [c["backend"] if c["accepted"] else f"{c['backend']} rejected ({c['reason']})" for c in chain]
    return "backend: " + " -> ".join(parts)
