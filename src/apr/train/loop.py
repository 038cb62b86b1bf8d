"""The training loop shared by finetune and distill: AdamW, warm-up + cosine decay, gradient clipping,
validation every N steps, early stopping, checkpoints and resume, a progress bar and a JSON log per step.

Determinism: the batches of step k are a function of (seed, k) (apr.train.data.batch_indices) and the
dropout RNG state is saved in each checkpoint, so the same seed repeats the same losses bit for bit on the
same machine and thread count, and a resumed run continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from apr.errors import AprError

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
PLOT = "loss.png"


@dataclass
class TrainSpec:
    steps: int = 200
    lr: float = 2e-4
    batch: int = 4
    warmup: int = 10
    val_every: int = 50
    patience: int = 0  # validations without improvement before stopping (0: never stop early)
    seed: int = 0
    clip: float = 1.0
    weight_decay: float = 0.0

    def check(self) -> None:
        for name in ("steps", "batch", "val_every"):
            if getattr(self, name) < 1:
                raise AprError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.warmup < 0 or self.patience < 0:
            raise AprError("--lr must be positive and --warmup, --early-stop-patience not negative")


def lr_factor(step: int, spec: TrainSpec) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `steps`."""
    if step < spec.warmup:
        return (step + 1) / (spec.warmup + 1)
    span = max(1, spec.steps - spec.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - spec.warmup) / span)))


@dataclass
class Task:
    """What a run trains: `loss(indices) -> (loss, tokens)` over training windows, `val() -> (mean, stderr)`."""
    params: list
    loss: Callable[[torch.Tensor], tuple[torch.Tensor, int]]
    val: Callable[[], tuple[float, float]]
    batch_of: Callable[[int], torch.Tensor]  # step -> window indices
    save_best: Callable[[int, float], None]  # (step, val loss) -> write the adapter
    identity: dict  # what a checkpoint must match to be resumed (base sha256, ...)
    modules: list  # set to train/eval around validation (dropout)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:  # OSError, or torch's / safetensors' own wrappers of a failed write (a full disk)
        tmp.unlink(missing_ok=True)
        raise AprError(f"cannot write {path}: {getattr(e, 'strerror', None) or e}") from None


class Trainer:
    def __init__(self, task: Task, spec: TrainSpec, out: Path, quiet: bool = False):
        spec.check()
        self.task, self.spec, self.out, self.quiet = task, spec, out, quiet
        self.opt = torch.optim.AdamW(task.params, lr=spec.lr, weight_decay=spec.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, spec))
        self.step, self.best, self.bad, self.base_val = 0, math.inf, 0, None
        self.losses: list[float] = []

    # ---- checkpoints ----

    def _save(self) -> None:
        state = {"step": self.step, "identity": self.task.identity, "spec": asdict(self.spec),
                 "params": [p.detach().clone() for p in self.task.params], "opt": self.opt.state_dict(),
                 "sched": self.sched.state_dict(), "rng": torch.get_rng_state(), "best": self.best, "bad": self.bad,
                 "base_val": self.base_val}
        write_atomic(self.out / CHECKPOINT, lambda p: torch.save(state, p))

    def _resume(self) -> None:
        path = self.out / CHECKPOINT
        if not path.is_file():
            raise AprError(f"--resume: no checkpoint at {path}")
        try:
            ck = torch.load(path, weights_only=False)
        except Exception as e:
            raise AprError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__})") from None
        mine, theirs = self.task.identity, ck.get("identity", {})
        for key in mine:
            if theirs.get(key) != mine[key]:
                raise AprError(f"--resume: checkpoint {path} is from another run ({key}: {str(theirs.get(key))[:16]} "
                               f"vs {str(mine[key])[:16]})")
        with torch.no_grad():
            for p, q in zip(self.task.params, ck["params"], strict=True):
                p.copy_(q)
        self.opt.load_state_dict(ck["opt"])
        self.sched.load_state_dict(ck["sched"])
        torch.set_rng_state(ck["rng"])
        self.step, self.best, self.bad, self.base_val = ck["step"], ck["best"], ck["bad"], ck["base_val"]
        kept = [ln for ln in self._log_lines() if ln.get("step", 0) <= self.step]  # drop steps after the checkpoint
        write_atomic(self.out / LOG, lambda p: p.write_text("".join(json.dumps(ln) + "\n" for ln in kept)))

    def _log_lines(self) -> list[dict]:
        path = self.out / LOG
        return [json.loads(s) for s in path.read_text().splitlines() if s.strip()] if path.is_file() else []

    def _log(self, line: dict) -> None:
        try:
            with open(self.out / LOG, "a") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as e:
            raise AprError(f"cannot write {self.out / LOG}: {e.strerror or e}") from None

    # ---- the loop ----

    def _validate(self) -> tuple[float, float]:
        for m in self.task.modules:
            m.train(False)
        with torch.no_grad():
            v = self.task.val()
        for m in self.task.modules:
            m.train(True)
        return v

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict:
        """Train to `spec.steps` (or early stop); `stop_after` ends this call after that step, as an interrupt would."""
        from tqdm import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(self.spec.seed)  # dropout's stream
        if resume:
            self._resume()
        else:
            (self.out / LOG).unlink(missing_ok=True)
            v, se = self._validate()
            self.base_val = (v, se)
            self._log({"step": 0, "val_loss": v, "val_stderr": se})
        t_run, tokens, stopped = time.perf_counter(), 0, "steps"
        bar = tqdm(total=self.spec.steps, initial=self.step, disable=self.quiet or None, unit="step", dynamic_ncols=True)
        try:
            while self.step < self.spec.steps:
                line = self._one_step()
                tokens += line["tokens"]
                bar.update(1)
                bar.set_postfix(loss=f"{line['loss']:.4f}", tok_s=f"{line['tok_s']:.0f}")
                if self.step % self.spec.val_every == 0 or self.step == self.spec.steps:
                    if self._validation_step(bar):
                        stopped = "early-stop"
                        break
                if stop_after is not None and self.step >= stop_after:
                    self._save()
                    stopped = "stopped"
                    break
        except KeyboardInterrupt:
            self._save()  # the last completed step: --resume loses nothing
            raise AprError(f"interrupted after step {self.step}; --resume continues from there", 130) from None
        finally:
            bar.close()
        elapsed = time.perf_counter() - t_run
        self.plot()
        return {"steps_done": self.step, "stopped": stopped, "best_val_loss": self.best,
                "base_val_loss": self.base_val[0], "base_val_stderr": self.base_val[1],
                "train_tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0, "elapsed_s": elapsed,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "first_losses": self.losses[:20]}

    def _one_step(self) -> dict:
        t0 = time.perf_counter()
        idx = self.task.batch_of(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss, ntok = self.task.loss(idx)
        if not torch.isfinite(loss):
            raise AprError(f"loss is {loss.item()} at step {self.step + 1}; lower --lr")
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.task.params, self.spec.clip)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.step += 1
        dt = time.perf_counter() - t0
        self.losses.append(loss.item())
        line = {"step": self.step, "loss": loss.item(), "lr": lr, "grad_norm": float(norm), "tokens": ntok,
                "step_s": dt, "tok_s": ntok / dt}
        self._log(line)
        return line

    def _validation_step(self, bar) -> bool:
        """Validate, keep the best adapter, checkpoint; True when early stopping says stop."""
        v, se = self._validate()
        improved = v < self.best
        if improved:
            self.best, self.bad = v, 0
            self.task.save_best(self.step, v)
        else:
            self.bad += 1
        self._log({"step": self.step, "val_loss": v, "val_stderr": se, "best": improved})
        if not self.quiet:  # stderr: stdout carries only the --json summary
            bar.write(f"step {self.step}: val_loss {v:.4f} ± {se:.4f}" + (" (best)" if improved else ""), file=sys.stderr)
        self._save()
        return bool(self.spec.patience) and self.bad >= self.spec.patience

    def plot(self) -> Path | None:
        """loss.png beside the adapter: train loss per step and validation loss (with its standard error)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None  # the `train` extra is not installed: the log has every figure the plot would show
        lines = self._log_lines()
        tr = [(ln["step"], ln["loss"]) for ln in lines if "loss" in ln]
        va = [(ln["step"], ln["val_loss"], ln["val_stderr"]) for ln in lines if "val_loss" in ln]
        fig, ax = plt.subplots(figsize=(7, 4))
        if tr:
            ax.plot(*zip(*tr), label="train", lw=0.8)
        if va:
            s, v, e = zip(*va)
            ax.errorbar(s, v, yerr=e, label="validation", marker="o", capsize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        fig.tight_layout()
        path = self.out / PLOT
        write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))
        plt.close(fig)
        return path
