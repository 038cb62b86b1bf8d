"""One training run, shared by `apr finetune` and `apr distill`: base + LoRA, data, the Trainer, the outputs."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from apr.errors import AprError
from apr.train import data as D
from apr.train import forward, lora
from apr.train.loop import Task, Trainer, TrainSpec, write_atomic

ADAPTER = "adapter.safetensors"
SUMMARY = "summary.json"
DEFAULT_TARGETS = "attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down"


@dataclass
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: DEFAULT_TARGETS.split(","))
    mode: str = "dequant"  # "dense": keep a float32 copy of every linear (see apr.train.lora)
    numerics: int = forward.NUMERICS  # dropout and loss implementation; a reproduction uses the run's own


@dataclass
class DataSpec:
    path: str
    seq_len: int = 256
    val_fraction: float = 0.1
    val_windows: int = 16


@dataclass
class Prepared:
    base: forward.Base
    corpus: D.Corpus
    train: D.Windows
    val: D.Windows
    adapters: dict
    split: dict


def prepare(model_spec: str | None, lspec: LoraSpec, dspec: DataSpec, tspec: TrainSpec, quiet: bool) -> Prepared:
    """Load the base, split the corpus by file, cut the windows, attach the adapters."""
    tspec.check()
    targets = lora.parse_targets(lspec.targets)  # a bad target fails before anything is loaded
    if dspec.seq_len < 2:
        raise AprError(f"--seq-len must be at least 2, got {dspec.seq_len}")
    corpus = D.open_corpus(dspec.path)
    train_files, val_files = D.split_files(corpus.files, tspec.seed, dspec.val_fraction)
    base = forward.load_base(model_spec, quiet=quiet)
    if dspec.seq_len > base.model.cfg.context_length:
        raise AprError(f"--seq-len {dspec.seq_len} exceeds the model's context of {base.model.cfg.context_length}")
    train = D.make_windows(corpus, train_files, base.tokenizer, dspec.seq_len, tspec.steps * tspec.batch)
    val = D.make_windows(corpus, val_files, base.tokenizer, dspec.seq_len, dspec.val_windows)
    if len(train.ids) < 1 or len(val.ids) < 1:
        raise AprError(f"corpus {dspec.path} is too small: {len(train.ids)} training and {len(val.ids)} validation "
                       f"window(s) of {dspec.seq_len + 1} tokens; give more text or a smaller --seq-len")
    lspec.mode = lora.resolve_mode(base.model, lspec.mode)  # the summary names the mode that ran
    adapters = lora.attach(base.model, targets, lspec.rank, lspec.alpha, lspec.dropout, tspec.seed, lspec.mode,
                           lspec.numerics)
    split = {"seed": tspec.seed, "val_fraction": dspec.val_fraction, "train_files": len(train_files),
             "val_files": [f["path"] for f in val_files], "corpus_fingerprint": corpus.fingerprint,
             "licence": corpus.licence}
    return Prepared(base, corpus, train, val, adapters, split)


def val_loss(model, windows: torch.Tensor, batch: int, grad_checkpoint: bool,
             numerics: int = forward.NUMERICS) -> tuple[float, float]:
    """Mean next-token loss over the validation windows, and its standard error across windows."""
    per = torch.cat([forward.token_losses(model, windows[i : i + batch], grad_checkpoint, numerics).mean(1)
                     for i in range(0, len(windows), batch)])  # (N,) one mean per window
    se = per.std(unbiased=True).item() / len(per) ** 0.5 if len(per) > 1 else float("nan")
    return per.mean().item(), se


def run(p: Prepared, lspec: LoraSpec, tspec: TrainSpec, out: Path, loss: Callable, kind: str,
        resume: bool = False, grad_checkpoint: bool = True, quiet: bool = False, stop_after: int | None = None,
        extra: dict | None = None) -> dict:
    """Train p's adapters with `loss(indices) -> (loss, tokens)`; writes the adapter, log, plot and summary."""
    out.mkdir(parents=True, exist_ok=True)
    model = p.base.model
    # the windows' shape goes with the split so a held-out evaluation can rebuild exactly this split's windows
    data = {"seq_len": int(p.train.ids.shape[1] - 1), "val_windows": len(p.val.ids)}
    training = {"kind": kind, "spec": asdict(tspec), "split": p.split, "data": data, "numerics": lspec.numerics,
                **(extra or {})}

    def save_best(step: int, v: float) -> None:
        meta = dict(rank=lspec.rank, alpha=lspec.alpha, dropout=lspec.dropout, targets=list(lspec.targets),
                    base_sha256=p.base.sha256, base_name=p.base.path.name, n_layers=model.cfg.n_layers,
                    training={**training, "best_step": step, "val_loss": v})
        write_atomic(out / ADAPTER, lambda path: lora.write_adapter(path, p.adapters, **meta))

    params = [t for m in p.adapters.values() for t in (m.lora_a, m.lora_b)]
    identity = {"base_sha256": p.base.sha256, "kind": kind, "corpus": p.corpus.fingerprint,
                "lora": json.dumps({k: v for k, v in asdict(lspec).items() if k != "mode"}, sort_keys=True),
                "seq_len": int(p.train.ids.shape[1] - 1),
                "seed": tspec.seed, "batch": tspec.batch, "steps": tspec.steps}
    task = Task(params=params, loss=loss, val=lambda: val_loss(model, p.val.ids, tspec.batch, grad_checkpoint, lspec.numerics),
                batch_of=lambda s: D.batch_indices(len(p.train.ids), tspec.batch, s, tspec.seed),
                save_best=save_best, identity=identity, modules=[model])
    summary = Trainer(task, tspec, out, quiet).run(resume=resume, stop_after=stop_after)
    summary.update(kind=kind, base=str(p.base.path), base_sha256=p.base.sha256, out=str(out),
                   adapter=str(out / ADAPTER), trainable_params=sum(t.numel() for t in params),
                   train_windows=len(p.train.ids), val_windows=len(p.val.ids), split=p.split,
                   corpus=p.corpus.meta or {"root": str(p.corpus.root)}, threads=torch.get_num_threads(), **(extra or {}))
    write_atomic(out / SUMMARY, lambda path: path.write_text(json.dumps(summary, indent=1, default=str)))
    return summary


def lm_loss(p: Prepared, grad_checkpoint: bool, numerics: int = forward.NUMERICS) -> Callable:
    """Plain next-token cross entropy on the training windows picked by the step."""
    def loss(idx: torch.Tensor):
        w = p.train.ids[idx]  # (B, T+1)
        return forward.token_losses(p.base.model, w, grad_checkpoint, numerics).mean(), int(w[:, 1:].numel())
    return loss
