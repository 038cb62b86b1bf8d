"""ModelConfig: everything the Transformer needs, as one frozen dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float
    norm_eps: float
    # llama GGUFs store q/k permuted for ggml's "normal" rope (rotate adjacent pairs);
    # qwen2 uses NEOX rope (rotate the two halves), with unpermuted weights.
    rope_interleaved: bool
    qkv_bias: bool
    tied_embeddings: bool

    def to_dict(self) -> dict:
        return asdict(self)
