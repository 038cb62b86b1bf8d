"""`apr finetune --reproduce RUN`: train a finished run's first N steps again from its recorded configuration and
seed, and compare the losses with the ones its log.jsonl holds, bit for bit.

Everything is read from the run itself (the adapter's header: LoRA config, weight mode, the TrainSpec, the split
and data shape; summary.json: the base): nothing is typed again, so the check reruns what was run. Bit for bit
holds on the same machine class and thread count (float32 sums in another order differ in the last bits).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from apr.errors import AprError


def _recorded(run: Path) -> tuple[dict, dict, list[float]]:
    from apr.train.lora import read_adapter
    from apr.train.loop import LOG
    from apr.train.session import ADAPTER, SUMMARY

    for name in (ADAPTER, SUMMARY, LOG):
        if not (run / name).is_file():
            raise AprError(f"{run}: no {name}; --reproduce needs a finished run's folder")
    _, meta = read_adapter(run / ADAPTER)
    summary = json.loads((run / SUMMARY).read_text())
    lines = [json.loads(s) for s in (run / LOG).read_text().splitlines() if s.strip()]
    losses = [ln["loss"] for ln in sorted((ln for ln in lines if "loss" in ln), key=lambda ln: ln["step"])]
    return meta, summary, losses


def reproduce(run: str, n: int, data: str | None, model: str | None) -> dict:
    from apr.train import session
    from apr.train.loop import TrainSpec
    from apr.train.session import DataSpec, LoraSpec

    run_dir = Path(run).expanduser()
    meta, summary, recorded = _recorded(run_dir)
    training = json.loads(meta["training"]) if isinstance(meta.get("training"), str) else meta.get("training") or {}
    if training.get("kind") not in ("finetune", "distill"):
        raise AprError(f"{run_dir}: --reproduce reruns finetune and distill runs; this one is {training.get('kind')!r}")
    if len(recorded) < n:
        raise AprError(f"{run_dir}: its log has {len(recorded)} training steps, fewer than the {n} to compare")
    spec = TrainSpec(**training["spec"])
    split, shape = training["split"], training["data"]
    lspec = LoraSpec(int(meta["rank"]), float(meta["alpha"]), float(meta["dropout"]), list(meta["targets"]),
                     training.get("weights", "dense"), int(training.get("numerics", 1)))  # runs before 2 ran 1
    from apr.train import data as D

    dspec = DataSpec(data or str(D.default_corpus_dir()), int(shape["seq_len"]), float(split["val_fraction"]),
                     int(shape["val_windows"]))
    gc = bool(training.get("grad_checkpoint", True))
    if model is None:
        model = _by_sha256(meta["base_sha256"], summary["base"])
    p = session.prepare(model, lspec, dspec, spec, quiet=True)
    if p.base.sha256 != meta["base_sha256"]:
        raise AprError(f"{p.base.path} is not the base the run trained (sha256 {meta['base_sha256'][:12]}…)")
    if p.corpus.fingerprint != split["corpus_fingerprint"]:
        raise AprError(f"corpus {dspec.path} has fingerprint {p.corpus.fingerprint[:12]}…, the run used "
                       f"{split['corpus_fingerprint'][:12]}…")
    with tempfile.TemporaryDirectory(prefix="apr-reproduce-") as tmp:
        again = session.run(p, lspec, spec, Path(tmp), _loss(p, training, spec, gc, n, lspec), training["kind"], grad_checkpoint=gc,
                            quiet=True, stop_after=n, extra={"weights": lspec.mode, "grad_checkpoint": gc})["first_losses"][:n]
    diffs = [abs(a - b) for a, b in zip(again, recorded[:n], strict=True)]
    mismatch = next((i + 1 for i, d in enumerate(diffs) if d != 0.0), None)
    import torch

    return {"run": str(run_dir), "kind": training["kind"], "steps_compared": len(diffs), "identical": mismatch is None,
            "first_mismatch_step": mismatch, "max_abs_diff": max(diffs), "recorded": recorded[:n], "rerun": again,
            "seed": spec.seed, "weights": lspec.mode, "threads": torch.get_num_threads(),
            "base_sha256": p.base.sha256, "corpus_fingerprint": p.corpus.fingerprint}


def _by_sha256(sha256: str, path: str) -> str:
    """The registry model a run names by sha256, else the path it ran on."""
    from apr.hub import registry_entry_for_sha256

    entry = registry_entry_for_sha256(sha256)
    return entry.name if entry else path


def _loss(p, training: dict, spec, gc: bool, n: int, lspec):
    """The run's loss: cross entropy for a finetune run; for a distill run, the same KD loss against the teacher's
    top-k computed again through the inference path, for the windows the first n steps train on (only those:
    the other windows' entries are never read by those steps, and the whole teacher pass takes minutes)."""
    from apr.train import session

    if training["kind"] == "finetune":
        return session.lm_loss(p, gc, lspec.numerics)
    import torch

    from apr.train import data as D
    from apr.train import distill, forward

    teacher_spec = _by_sha256(training["teacher_sha256"], training["teacher"])
    teacher = forward.load_base(teacher_spec, quiet=True)  # memory-mapped: metadata and sha only
    if teacher.sha256 != training["teacher_sha256"]:
        raise AprError(f"{teacher.path} is not the teacher the run used (sha256 {training['teacher_sha256'][:12]}…)")
    forward.check_same_vocab(teacher, p.base)
    used = sorted({int(i) for s in range(n) for i in D.batch_indices(len(p.train.ids), spec.batch, s, spec.seed)})
    k, tau = int(training["top_k"]), float(training["temperature"])
    got_ids, got_logp = distill.teacher_topk(teacher_spec, p.train.ids[used], k, tau, quiet=True)
    n_win, t = p.train.ids.shape[0], p.train.ids.shape[1] - 1
    ids = torch.zeros(n_win, t, k, dtype=torch.int32)  # (N, T, k): only the used windows' rows are filled
    logp = torch.full((n_win, t, k), float("nan"))  # a step reading an unfilled row would give a NaN loss
    ids[used], logp[used] = got_ids, got_logp
    return distill.distill_loss(p, ids, logp, tau, float(training["kd_alpha"]), gc)
