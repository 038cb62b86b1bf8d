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

    @property
    def is_instruct(self) -> bool:
        return bool(self.tokenizer.has_chat_template)


def default_dtype() -> str:
    return "float32"


def read_model_file(path: Path):
    """(config, metadata, raw tensors) of a .gguf or .apr file."""
    if path.suffix == ".apr":
        from apr.formats import apr as aprfmt

        return aprfmt.read_apr(path)
    from apr.formats.gguf import config_from_gguf, read_gguf

    g = read_gguf(path)
    return config_from_gguf(g), g.metadata, g.tensors


def load_model(spec: str | Path | None, dtype: str | None = None, backend: str = "auto", quiet: bool = False) -> LoadedModel:
    from apr import hub
    from apr.model.load import build_modules
    from apr.model.transformer import Transformer
    from apr.tokenizer import Tokenizer

    t0 = time.perf_counter()
    dtype = dtype or default_dtype()
    if dtype not in DTYPES:
        raise AprError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    if backend not in ("auto", "cpu"):
        from apr.errors import BackendUnavailable

        raise BackendUnavailable(f"backend '{backend}' is not available on this machine")
    path = hub.resolve_model(str(spec) if spec else None, quiet=quiet)
    config, metadata, tensors = read_model_file(path)
    tokenizer = Tokenizer.from_metadata(metadata)
    model = Transformer(config, build_modules(config, tensors)).materialize(DTYPES[dtype])
    sha = hub.known_sha256(path) or hub.sha256_file(path)
    chain = [{"backend": "cpu", "accepted": True, "reason": "cpu is always available"}]
    return LoadedModel(path, sha, config, tokenizer, model, metadata, dtype, "cpu", time.perf_counter() - t0, chain)
