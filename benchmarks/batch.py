"""The engine's batched decode step: aggregate decode tok/s at batch 1, 2, 4, 8, before and after the multi-row kernel.

    python benchmarks/batch.py qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct [--threads 2]
        [--batches 1,2,4,8] [--gen-tokens 32] [--repeat 2] [--json]
    python benchmarks/batch.py MODEL... --kernels [--passes 10]

For each model and batch size B, B sequences (20-token code prompts, greedy, EOS ignored) are prefilled through
the engine, then only their decode steps are timed. Two settings of the native matmul alternate in one process
(apr.quant.native.set_row_tile): "one-row" sends every activation row through the one-row dot, unpacking each
weight block once per row (the kernel before csrc/matmul_multi.c); "multi-row" unpacks each block once for a
tile of rows. Both give the same bits, and the script checks that the generated tokens are equal. Each cell is
the median of --repeat runs, the runs alternating between the settings so a shifting load falls on both.

--kernels times only the matmuls of one decode step: every quantized linear of the model (the blocks' weights
and the output head) on M rows of activations, the settings alternating pass by pass, the best of --passes
passes each (the least disturbed by other work on a shared box), as weights read per second and M x tok/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

SETTINGS = {"one-row": 1, "multi-row": 0}  # row tile: 1 = one-row dots, 0 = the ISA variant's default tile


def decode_once(eng, prompts: list[list[int]], gen_tokens: int) -> tuple[float, list[list[int]]]:
    """(aggregate decode tok/s, the tokens of each sequence): prefill every prompt, then time the decode steps."""
    from apr.engine import SamplingParams

    reqs = [eng.submit(list(p), SamplingParams(max_tokens=gen_tokens, stop_ids=set(), cache_prompt=False))
            for p in prompts]
    while any(r not in eng.running or r.fed < len(r.prompt_ids) for r in reqs if not r.done):
        eng.step()  # admission and prefill (each finishing prefill samples its first token)
    before = sum(len(r.tokens) for r in reqs)
    t0 = time.perf_counter()
    while not eng.idle():
        eng.step()
    dt = time.perf_counter() - t0
    if any(r.stop_reason == "error" for r in reqs):
        raise RuntimeError(f"generation failed: {[r.error for r in reqs if r.error]}")
    return (sum(len(r.tokens) for r in reqs) - before) / dt, [list(r.tokens) for r in reqs]


def bench_model(name: str, batches: list[int], gen_tokens: int, repeat: int) -> dict:
    from apr.commands.bench import bench_prompt
    from apr.engine import engine_for
    from apr.quant import native
    from apr.runtime import load_model

    lm = load_model(name, quiet=True)
    eng = engine_for(lm, max(batches))
    ids = bench_prompt(lm.tokenizer, 20 + max(batches))
    rates: dict[tuple[str, int], list[float]] = {}
    decode_once(eng, [ids[:20]], 4)  # warm-up: caches, kernel build
    for b in batches:
        prompts = [ids[i:i + 20] for i in range(b)]  # different prompts per sequence
        tokens = {}
        for _ in range(repeat):
            for setting, tile in SETTINGS.items():
                old = native.set_row_tile(tile)
                try:
                    rate, tokens[setting] = decode_once(eng, prompts, gen_tokens)
                finally:
                    native.set_row_tile(old)
                rates.setdefault((setting, b), []).append(rate)
                print(f"# {name} batch {b} {setting}: {rate:.1f} tok/s (load {os.getloadavg()[0]:.1f})",
                      file=sys.stderr, flush=True)
        if tokens["one-row"] != tokens["multi-row"]:
            raise SystemExit(f"{name}: batch {b}: the two settings generated different tokens")
    rows = [{"batch": b, **{s: statistics.median(rates[s, b]) for s in SETTINGS},
             **{f"{s}_runs": rates[s, b] for s in SETTINGS}} for b in batches]
    return {"model": name, "isa": native.isa(), "step_impl": eng.step_impl, "rows": rows}


def kernel_passes(name: str, batches: list[int], passes: int) -> dict:
    """Best-of-`passes` seconds of one pass over every quantized linear at M rows, per setting and M."""
    from apr.quant import QuantLinear, native
    from apr.runtime import load_model

    lm = load_model(name, quiet=True)
    mods = [m for m in lm.model.modules() if isinstance(m, QuantLinear) and native.supports(m.qtype)]
    nbytes = sum(m.raw.shape[0] * m.raw.stride(0) for m in mods)
    rows = []
    for b in batches:
        xs = [torch.randn(b, m.in_features) for m in mods]
        best = {s: float("inf") for s in SETTINGS}
        for _ in range(passes):
            for setting, tile in SETTINGS.items():
                old = native.set_row_tile(tile)
                try:
                    t0 = time.perf_counter()
                    for m, x in zip(mods, xs):
                        native.matmul(x, m.raw, m.qtype, m.out_features, m._bias32)
                    best[setting] = min(best[setting], time.perf_counter() - t0)
                finally:
                    native.set_row_tile(old)
        rows.append({"batch": b, **{f"{s}_ms": best[s] * 1e3 for s in SETTINGS}})
        print(f"# {name} M={b}: " + ", ".join(f"{s} {best[s] * 1e3:.1f} ms" for s in SETTINGS)
              + f" (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    return {"model": name, "isa": native.isa(), "weights_mb": nbytes / 1e6, "rows": rows}


def print_kernels(out: list[dict], passes: int) -> None:
    for m in out:
        print(f"\n{m['model']}: {len(m['rows'])} batch sizes, {m['weights_mb']:.0f} MB of quantized linears per pass, "
              f"{m['isa']} kernels, best of {passes}\n")
        print("| M rows | one-row ms | multi-row ms | speed-up | multi-row GB/s | multi-row M x passes/s |")
        print("|---|---|---|---|---|---|")
        for r in m["rows"]:
            one, multi = r["one-row_ms"], r["multi-row_ms"]
            print(f"| {r['batch']} | {one:.1f} | {multi:.1f} | {one / multi:.2f}x | {m['weights_mb'] / multi:.1f} "
                  f"| {r['batch'] * 1e3 / multi:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--kernels", action="store_true", help="time only the matmuls of a decode step (see above)")
    ap.add_argument("--passes", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    load0 = os.getloadavg()[0]
    if args.kernels:
        out = [kernel_passes(m, batches, args.passes) for m in args.models]
        if args.json:
            json.dump({"threads": args.threads, "load_before": load0, "load_after": os.getloadavg()[0], "models": out},
                      sys.stdout, indent=1)
            return
        print(f"# {args.threads} threads; load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after")
        print_kernels(out, args.passes)
        return
    out = [bench_model(m, batches, args.gen_tokens, args.repeat) for m in args.models]
    if args.json:
        json.dump({"threads": args.threads, "load_before": load0, "load_after": os.getloadavg()[0], "models": out},
                  sys.stdout, indent=1)
        return
    print(f"# {args.threads} threads, {args.gen_tokens} tokens per sequence, median of {args.repeat}; "
          f"load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after")
    for m in out:
        print(f"\n{m['model']} ({m['step_impl']}, {m['isa']} kernels)\n")
        print("| batch | one-row tok/s | multi-row tok/s | multi / one | multi-row vs its batch 1 |")
        print("|---|---|---|---|---|")
        base = m["rows"][0]["multi-row"]
        for r in m["rows"]:
            runs = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(r["one-row_runs"], r["multi-row_runs"]))
            print(f"| {r['batch']} | {r['one-row']:.1f} | {r['multi-row']:.1f} | {r['multi-row'] / r['one-row']:.2f}x "
                  f"| {r['multi-row'] / base:.2f}x | runs (one/multi): {runs}")


if __name__ == "__main__":
    main()
