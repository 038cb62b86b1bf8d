"""Loading a model for inference: the one entry point every command goes through."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from apr.errors import AprError
from apr.model.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    path: Path
    sha256: str
    config: ModelConfig
    tokenizer: Any  # apr.tokenizer.Tokenizer
    model: Any  # apr.model.transformer.Transformer
    metadata: dict
    dtype: str
    backend: str
    load_s: float
    backend_chain: list = field(default_factory=list)
    engine: Any = None  # apr.engine.Engine, made on first use (apr.engine.engine_for): it owns the KV cache

    @property
    def activations(self) -> str:
        """How the native kernels round activations: "int8" blocks, or "int8x2" (two rows, see hub.act_split)."""
        return "int8x2" if getattr(self.model, "act_split", False) else "int8"

    @property
    def is_instruct(self) -> bool:
        return bool(self.tokenizer.has_chat_template)


def default_dtype() -> str:
    """bfloat16 where the CPU runs the packed int4 kernels fast (x86 with AVX2 or AVX-512, or an Arm CPU
    with bf16), else float32. float32 is always available with --dtype: the exact reference path."""
    if fast_bf16_cpu():
        return "bfloat16"
    return "float32"


def fast_bf16_cpu() -> bool:
    cap = torch.backends.cpu.get_cpu_capability()
    if cap.startswith(("AVX2", "AVX512")):
        return True
    return cap.startswith("SVE") or bool(getattr(torch.cpu, "_is_arm_bf16_supported", lambda: False)())


def read_model_file(path: Path):
    """(config, metadata, raw tensors) of a .gguf or .apr file."""
    if path.suffix == ".apr":
        from apr.formats import apr as aprfmt

        return aprfmt.read_apr(path)
    from apr.formats.gguf import config_from_gguf, read_gguf

    g = read_gguf(path)
    return config_from_gguf(g), g.metadata, g.tensors


def load_model(spec: str | Path | None, dtype: str | None = None, backend: str = "auto", quiet: bool = False) -> LoadedModel:
    """Resolve, read and prepare a model on the backend the chain selects (see apr.backends)."""
    import sys

    from apr import backends, hub
    from apr.tokenizer import Tokenizer

    t0 = time.perf_counter()
    dtype = dtype or default_dtype()
    if dtype not in DTYPES:
        raise AprError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    if backend != "auto" and backend not in backends.BACKENDS:
        raise AprError(f"unknown backend '{backend}' (choose from auto, {', '.join(backends.BACKENDS)})")
    path = hub.resolve_model(str(spec) if spec else None, quiet=quiet)
    config, metadata, tensors = read_model_file(path)
    tokenizer = Tokenizer.from_metadata(metadata)
    sha = hub.known_sha256(path) or hub.sha256_file(path)
    probe = tokenizer.encode(backends.GATE_PROMPT)[:32] or [0]
    sel = backends.select(backend, config, tensors, DTYPES[dtype], sha, probe)
    sel.model.set_act_split(hub.act_split(sha))  # how the native kernels round activations: per model, measured
    if not quiet and len(sel.chain) > 1:
        print(f"apr: {backends.describe(sel.chain)}", file=sys.stderr)
    return LoadedModel(path, sha, config, tokenizer, sel.model, metadata, dtype, sel.backend,
                       time.perf_counter() - t0, sel.chain)
