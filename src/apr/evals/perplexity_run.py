"""`apr eval perplexity` on one process: windows in order, batched, with a running estimate, the base's
log-probs saved (`--save-logits`, resumable) or compared against (`--kl-base`). A sharded caller uses the
pieces in apr.evals.perplexity directly and reduces with the same functions."""

from __future__ import annotations

import hashlib
import sys
import time

import numpy as np

from apr.errors import AprError
from apr.evals import logits_file
from apr.evals import perplexity as ppl

MAX_ROWS = 2048  # rows per forward by default, as llama-perplexity's default n_batch (4 windows of 512)


def default_batch(ctx: int) -> int:
    return max(1, MAX_ROWS // ctx)


def prepare(lm, text: str, ctx: int, chunks: int | None = None) -> tuple[list[ppl.Window], dict]:
    """The windows of `text` (the first `chunks` of them, as llama-perplexity's --chunks) and the header that
    identifies them (for logits files and resume)."""
    if ctx > lm.config.context_length:
        raise AprError(f"--ctx {ctx} exceeds the model's context length ({lm.config.context_length})")
    if ctx % 2:
        raise AprError(f"--ctx must be even (got {ctx}): the second half of each window is scored")
    tok = lm.tokenizer
    ids = ppl.tokenize(tok, text)
    wins = ppl.windows(ids, ctx, tok.bos_id if tok.add_bos else None)
    if chunks is not None:
        if chunks < 2:
            raise AprError("--chunks must be at least 2")
        wins = wins[:chunks]
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return wins, logits_file.make_header(lm, text_sha, ctx, len(wins), ppl.TOP_K)


def run(lm, text: str, ctx: int, batch: int | None = None, save_logits: str | None = None,
        kl_base: str | None = None, progress: bool = True, chunks: int | None = None) -> dict:
    if save_logits and kl_base:
        raise AprError("give --save-logits (score the base) or --kl-base (compare with it), not both")
    batch = batch or default_batch(ctx)
    if batch < 1:
        raise AprError("--batch must be at least 1")
    wins, header = prepare(lm, text, ctx, chunks)
    n = ppl.n_scored(ctx)
    base = _base(kl_base, header) if kl_base else None
    parts = logits_file.Parts(save_logits, header) if save_logits else None
    done = parts.load() if parts else {}
    if parts:
        parts.start()
    todo = [w for w in wins if w.index not in done]
    scores, t0 = dict(done), time.perf_counter()
    running = ppl.Running()
    for i in sorted(done):
        running.add(done[i].nll)
    bar = _bar(len(wins), len(done), progress)
    for at in range(0, len(todo), batch):
        group = todo[at:at + batch]
        ids = [base["top_ids"][w.index * n:(w.index + 1) * n] for w in group] if base else None
        for s in ppl.score_windows(lm, group, ppl.TOP_K, ids):
            scores[s.index] = s
            running.add(s.nll)
            if parts:
                parts.add(s)
        bar.set_postfix_str(f"ppl {running.text()}")
        bar.update(len(group))
    bar.close()
    wall = time.perf_counter() - t0
    return finish(ctx, batch, wins, done, todo, wall, header, scores, parts, save_logits, base, kl_base)


def _base(path: str, header: dict) -> dict:
    base = logits_file.read(path)
    logits_file.check_compatible(base["header"], header, path)
    if len(base["nll"]) != header["n_windows"] * ppl.n_scored(header["ctx"]):
        raise AprError(f"{path} holds {len(base['nll'])} scored tokens, not the "
                       f"{header['n_windows'] * ppl.n_scored(header['ctx'])} of these windows")
    return base


def _bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="perplexity", unit="window", file=sys.stderr,
                disable=not enabled, dynamic_ncols=True)


def format_text(r: dict) -> str:
    lines = [f"perplexity: PPL = {r['ppl']:.4f} +/- {r['ppl_error']:.5f} over {r['n_windows']} windows of "
             f"{r['ctx']} tokens ({r['n_tokens_scored']} scored)"
             + (f", {r['tok_s']:.1f} tok/s" if r.get("tok_s") else "")
             + (f", {r['windows_resumed']} windows resumed" if r.get("windows_resumed") else "")]
    if r.get("saved_logits"):
        lines.append(f"base log-probs saved to {r['saved_logits']}")
    kl = r.get("kl")
    if kl:
        lines += [f"KL vs {kl['base']} (base {kl['base_dtype']}, PPL(base) {kl['ppl_base']:.4f}):",
                  f"  mean KLD   {kl['mean_kld']:.6f} +/- {kl['mean_kld_error']:.6f}",
                  f"  median {kl['median_kld']:.6f}  p90 {kl['p90_kld']:.6f}  p99 {kl['p99_kld']:.6f}  "
                  f"max {kl['max_kld']:.6f}",
                  f"  same top p {100 * kl['same_top_p']:.3f} +/- {100 * kl['same_top_p_error']:.3f} %",
                  f"  mean dp (true token) {100 * kl['mean_dp']:.3f} +/- {100 * kl['mean_dp_error']:.3f} %, "
                  f"RMS {100 * kl['rms_dp']:.3f} %",
                  f"  mean dp (base's top token) {100 * kl['mean_dp_base_top']:.3f} +/- "
                  f"{100 * kl['mean_dp_base_top_error']:.3f} %"]
    return "\n".join(lines)


def finish(ctx, batch, wins, done, todo, wall, header, scores, parts, save_logits, base, kl_base) -> dict:
    """The run's report from its scored windows (one process or a Ray pool: the same reduction): the logits
    file written when scoring a base, the KL figures when comparing with one."""
    merged = ppl.merge([scores.values()])
    report = {"ctx": ctx, "batch": batch, "n_windows": len(wins), "windows_resumed": len(done),
              "tokens_evaluated": len(todo) * ctx, "score_s": round(wall, 3),
              "tok_s": round(len(todo) * ctx / wall, 2) if todo and wall > 0 else None,
              "add_bos": header["add_bos"], "text_sha256": header["text_sha256"],
              "tokenizer_sha256": header["tokenizer_sha256"],
              **ppl.perplexity_stats(np.concatenate([s.nll for s in merged]))}
    if save_logits:
        logits_file.write(save_logits, header, merged)
        parts.finish()
        report["saved_logits"] = save_logits
    if base:
        report["kl"] = {"base": kl_base, "base_model_sha256": base["header"]["model_sha256"],
                        "base_dtype": base["header"]["dtype"], **ppl.kl_stats(base, merged)}
    return report
