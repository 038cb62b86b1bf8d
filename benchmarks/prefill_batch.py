"""Batched prefill: N prompts prefilled in one forward against the same prompts one forward each, and the
row count from which a prompt's linears are faster as dequantized tiles + GEMM than through the native row kernel.

    python benchmarks/prefill_batch.py [MODEL ...] [--threads 2] [--prompts 8] [--prompt-tokens 42]
        [--rows 16,20,24,28,32,40,48] [--repeat 3] [--json OUT]

Together: one `Transformer.step` over N segments (each prompt in its own KV slot); alone: N steps of one
segment. The script checks that both give bit-identical logits (each prompt's rows get the kernel and GEMM
shape they get alone: apr.quant.linear.sequence_rows) and reports the best of --repeat runs of each.
Crossover: one prompt of T rows, whole forward, with the row kernel forced (native.MAX_ROWS and
linear.FEW_ROWS_BF16_GEMM set above T) and with tiles forced (both set to 0), best of --repeat.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up: tile buffers, native groups
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def together_vs_alone(m, n: int, length: int, repeat: int) -> dict:
    from apr.model.transformer import Segment

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 5000, (length,), generator=g) for _ in range(n)]
    m.setup_cache(length + 1, slots=n)
    segs = [Segment(s, 0, length) for s in range(n)]
    together = m.step(torch.cat(prompts), segs)
    alone = torch.cat([m.step(p, [Segment(s, 0, length)]) for s, p in enumerate(prompts)])
    t_tog = best_of(lambda: m.step(torch.cat(prompts), segs), repeat)
    t_alone = best_of(lambda: [m.step(p, [Segment(s, 0, length)]) for s, p in enumerate(prompts)], repeat)
    return {"prompts": n, "prompt_tokens": length, "bit_identical": bool(torch.equal(together, alone)),
            "together_s": round(t_tog, 4), "alone_s": round(t_alone, 4),
            "together_tok_s": round(n * length / t_tog, 1), "alone_tok_s": round(n * length / t_alone, 1),
            "speedup": round(t_alone / t_tog, 2)}


def crossover(m, rows: list[int], repeat: int) -> list[dict]:
    from apr.model.transformer import Segment
    from apr.quant import linear, native

    saved = native.MAX_ROWS, linear.FEW_ROWS_BF16_GEMM
    out = []
    try:
        for t in rows:
            ids = torch.randint(0, 5000, (t,))
            m.setup_cache(t + 1, slots=1)
            run = lambda: m.step(ids, [Segment(0, 0, t)])  # noqa: E731
            native.MAX_ROWS = linear.FEW_ROWS_BF16_GEMM = t + 1
            kernel = best_of(run, repeat)
            native.MAX_ROWS = linear.FEW_ROWS_BF16_GEMM = 0
            tiles = best_of(run, repeat)
            out.append({"rows": t, "row_kernel_ms": round(kernel * 1e3, 1), "tiles_ms": round(tiles * 1e3, 1)})
    finally:
        native.MAX_ROWS, linear.FEW_ROWS_BF16_GEMM = saved
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", default=["qwen2.5-coder-0.5b-instruct"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=42, help="about a short chat request's length")
    ap.add_argument("--rows", default="16,20,24,28,32,40,48")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from apr import hub
    from apr.quant import linear
    from apr.runtime import load_model

    results = {}
    for name in a.models:
        lm = load_model(str(hub.resolve_model(name)), quiet=True)
        m = lm.model
        r = {"batch": together_vs_alone(m, a.prompts, a.prompt_tokens, a.repeat),
             "crossover": crossover(m, [int(x) for x in a.rows.split(",")], a.repeat),
             "few_rows_max": linear.few_rows_max()}
        b = r["batch"]
        print(f"{name}: {b['prompts']} x {b['prompt_tokens']} tokens together {b['together_s'] * 1e3:.0f} ms "
              f"({b['together_tok_s']} tok/s), alone {b['alone_s'] * 1e3:.0f} ms ({b['alone_tok_s']} tok/s): "
              f"{b['speedup']}x, bit-identical {b['bit_identical']}")
        print("| rows | row kernel ms | tiles ms |\n|---|---|---|")
        for c in r["crossover"]:
            print(f"| {c['rows']} | {c['row_kernel_ms']} | {c['tiles_ms']} |")
        print(f"(the row kernel is used up to {r['few_rows_max']} rows per prompt on this CPU)\n")
        results[name] = r
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
