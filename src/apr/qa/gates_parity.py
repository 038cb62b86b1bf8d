"""Gates that compare the model with another implementation of itself, through apr.parity.

    reference_parity  the default path (as `apr run` generates) against HF transformers float32 (top-1, KL)
    format_parity     the GGUF against its .apr conversion (or a .apr against its GGUF export)
    backend_parity    every available accelerator against the cpu path
"""

from __future__ import annotations

import gc
import importlib.util
import math
import tempfile
from contextlib import contextmanager
from pathlib import Path

from apr.qa.context import Outcome, Skip

REFERENCE_TOKENS = 256  # scored positions after the prefill: the HF load (~1 min) dominates anyway
FORMAT_PROMPT, FORMAT_TOKENS, FORMAT_TEXT_TOKENS = "def fib(n):", 24, 64
STD_BAND = (0.5, 2.0)
BACKEND_TEXT_TOKENS, MIN_COSINE = 32, 0.99


@contextmanager
def _model_as(ctx, dtype: str, backend: str, path: Path | None = None):
    """The shared model when it already is `path` in `dtype` on `backend`; else a second load, freed after."""
    from apr.runtime import load_model

    lm = ctx.lm
    if path is None and lm.dtype == dtype and lm.backend == backend:
        yield lm
        return
    other = load_model(path or lm.path, dtype=dtype, backend=backend, quiet=True)
    try:
        yield other
    finally:
        del other
        gc.collect()  # a 0.5B float32 copy is ~2 GB: give it back before the next gate


# ---- reference_parity ----

def reference_parity(ctx) -> Outcome:
    """The path `apr run` takes (the loaded model's dtype and backend: bf16 and the native C decode block by
    default; a prefill, then one token per step) against HF transformers in float32, teacher-forced over
    REFERENCE_TOKENS positions of stdlib source."""
    if importlib.util.find_spec("transformers") is None:
        raise Skip("HF transformers is not installed (pip install transformers accelerate)")
    from apr.parity import HFReference, code_ids
    from apr.qa.refparity import MAX_KL, MIN_TOP1, PREFILL, generation_parity

    lm = ctx.lm
    with tempfile.TemporaryDirectory(prefix="apr-qa-") as tmp:
        gguf = lm.path if lm.path.suffix == ".gguf" else _convert(lm.path, Path(tmp))  # HF reads GGUF only
        ids = code_ids(lm.tokenizer, PREFILL + REFERENCE_TOKENS)
        ref = HFReference(Path(gguf), lm.config, quiet=True)
        try:
            r = generation_parity(lm, ref, ids)
        finally:
            del ref
            gc.collect()
    ok = r["top1"] >= MIN_TOP1 and r["kl"] <= MAX_KL
    msg = (f"{lm.dtype}/{lm.backend} ({r['step_impl']}, {r.get('activations', 'int8')} activations), prefill {r['prefill']} then one token per step, vs "
           f"transformers float32: top-1 agreement {r['top1']:.2%} over {r['positions']} positions (>= {MIN_TOP1:.0%}), "
           f"mean KL {r['kl']:.3g} (<= {MAX_KL}); ppl apr {r['ppl_apr']:.3f} vs transformers {r['ppl_ref']:.3f}")
    if not ok:
        msg += f"; find the drifting layer with: apr parity {lm.path} hf --points residual"
    return Outcome(ok, msg, value=round(r["top1"], 6), threshold=MIN_TOP1)


# ---- format_parity ----

def _convert(src: Path, tmp: Path) -> Path:
    """GGUF -> .apr (apr convert), or .apr -> GGUF (apr export), into `tmp`."""
    if src.suffix == ".apr":
        from apr.formats.apr_export import export_gguf

        dst = tmp / (src.stem + ".gguf")
        export_gguf(src, dst, progress=False)
        return dst
    from apr.formats.apr_write import convert_gguf

    dst = tmp / (src.stem + ".apr")
    convert_gguf(src, dst, "keep", progress=False, prepare_dtype=None)  # raw blocks only: a small file
    return dst


def format_parity(ctx) -> Outcome:
    from apr.generate import generate
    from apr.parity import Tolerance, code_ids, compare

    lm = ctx.lm
    with tempfile.TemporaryDirectory(prefix="apr-qa-") as tmp:
        other_path = _convert(lm.path, Path(tmp))
        with _model_as(ctx, lm.dtype, lm.backend, other_path) as other:
            mine = generate(lm, FORMAT_PROMPT, max_tokens=FORMAT_TOKENS).tokens
            theirs = generate(other, FORMAT_PROMPT, max_tokens=FORMAT_TOKENS).tokens
            # B (the reference) is the file we were given; A its conversion
            r = compare(other, lm, code_ids(lm.tokenizer, FORMAT_TEXT_TOKENS), Tolerance(std_band=STD_BAND))
    ratios = [m["std_ratio"] for layer in r.layers for m in layer["points"].values()] + [r.logits["std_ratio"]]
    worst = max(ratios, key=_distance_from_one)
    problems = []
    if mine != theirs:
        k = next((i for i, (x, y) in enumerate(zip(mine, theirs)) if x != y), min(len(mine), len(theirs)))
        problems.append(f"greedy tokens differ at token {k}")
    if not all(STD_BAND[0] <= x <= STD_BAND[1] for x in ratios):
        problems.append(f"std ratio {worst:.3f} outside {list(STD_BAND)} (first at layer {r.first_divergent_layer} "
                        f"{r.first_divergent_point})")
    msg = "; ".join(problems) or (f"{other_path.suffix} conversion: {len(mine)} identical greedy tokens; "
                                  f"std ratios of {len(ratios)} points, the farthest from 1 is {worst:.6f}; "
                                  f"logits cosine {r.logits['cosine']:.6f}")
    return Outcome(not problems, msg, value=round(worst, 6), threshold=f"[{STD_BAND[0]}, {STD_BAND[1]}]")


def _distance_from_one(x: float) -> float:
    return abs(math.log(x)) if x > 0 and math.isfinite(x) else math.inf


# ---- backend_parity ----

def accelerators() -> list[str]:
    """Accelerators apr can use on this machine (in auto's chain order)."""
    import torch

    if not torch.cuda.is_available():
        raise Skip("no accelerator: torch.cuda.is_available() is False")
    from apr import backends

    usable = [n for n in backends.CHAIN if backends.BACKENDS[n].available() is None]
    if not usable:
        why = "; ".join(f"{n}: {backends.BACKENDS[n].available()}" for n in backends.CHAIN)
        raise Skip(f"no usable accelerator ({why})")
    return usable


def backend_parity(ctx) -> Outcome:
    from apr.parity import code_ids, compare

    names, lm = accelerators(), ctx.lm
    ids = code_ids(lm.tokenizer, BACKEND_TEXT_TOKENS)
    notes, ok, worst = [], True, 1.0
    for name in names:
        with _model_as(ctx, lm.dtype, name) as acc, _model_as(ctx, lm.dtype, "cpu") as cpu:
            lg = compare(acc, cpu, ids, points=("residual",)).logits
        same = lg["top1"] == 1.0  # the same argmax at every position
        good = same and lg["cosine"] >= MIN_COSINE
        ok, worst = ok and good, min(worst, lg["cosine"])
        notes.append(f"{name} vs cpu ({lm.dtype}): logits cosine {lg['cosine']:.6f}, argmax agreement "
                     f"{lg['top1']:.2%} over {len(ids)} positions {'ok' if good else 'FAIL'}")
    return Outcome(ok, "; ".join(notes), value=round(worst, 6), threshold=MIN_COSINE)
