"""Per ggml type: the error and speed of each candidate bf16 representation (the table in apr/quant/kernels.py).

    python benchmarks/kernel_table.py [--rows 4864 --cols 896] [--threads 1] [--repeat 30]
    python benchmarks/kernel_table.py --isa-ab MODEL [--threads 2] [--repeat 8] [--gen-tokens 32]

Error: relative Frobenius error of the weight each representation computes with, against the exact
float32 dequantization (random ggml blocks from apr.quant.testing). Speed: median time of one matvec
(T=1, bf16 activations) and of a T=128 prefill tile, 1 thread by default (A/B comparisons on a shared box).
--isa-ab: whole-model decode tok/s of each native ISA variant this CPU runs (apr.quant.native.VARIANTS),
the variants alternated pass by pass in one process (APR_KERNEL_ISA switches the library per call), so a
shifting load falls on all of them alike; prints each variant's median, min and max.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from apr.quant import QuantLinear, dequantize, row_bytes
from apr.quant import kernels_int4 as k4
from apr.quant.table import _lookup
from apr.quant.testing import random_blocks

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q8_0, Q.Q6_K, Q.Q3_K, Q.Q2_K]


def timed(fns: dict, repeat: int) -> dict:
    """Median microseconds per named fn, the fns interleaved round by round (fair under a shifting load)."""
    for fn in fns.values():
        fn()
    times: dict = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e6 for name, ts in times.items()}


def _kernel_only(ql, x):
    """The int4 kernel itself on a prefill tile (apr would dequantize tiles and run a dense GEMM)."""
    os.environ["APR_PREFILL_ROWS"] = "1000000"
    try:
        return ql(x)
    finally:
        del os.environ["APR_PREFILL_ROWS"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def int8_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The best per-row int8 weight-only form of w (what `_weight_int8pack_mm` can hold)."""
    s = w.abs().amax(1).clamp_min(1e-12) / 127  # (N,)
    return (w / s[:, None]).round().clamp(-128, 127).to(torch.int8), s


def row(qtype: int, n: int, k: int, repeat: int) -> dict:
    qt = _lookup(qtype)
    if k % qt.block_size:  # K-quants need K % 256 == 0: use the transposed shape (like ffn_down)
        n, k = k, n
    raw = random_blocks(qtype, n * k // qt.block_size).reshape(n, row_bytes(qtype, k))  # (N, row_bytes)
    w = dequantize(raw, qtype, (n, k))
    ql = QuantLinear(raw, qtype, k, n)
    ql.materialize(torch.bfloat16)
    p = ql.prepared
    chosen = k4.dequant_rows(p, 0, n, k).float() if p.kind == "int4" else p.tensors["weight"].float()
    q8, s8 = int8_rowwise(w)
    out = {"type": qt.name, "kind": p.kind + (f"x{p.parts}" if p.parts > 1 else ""),
           "err": rel(chosen, w), "err_bf16": rel(w.bfloat16(), w), "err_int8row": rel(q8.float() * s8[:, None], w)}
    x1, x128 = torch.randn(1, k).bfloat16(), torch.randn(128, k).bfloat16()
    wb, s8b = w.bfloat16(), s8.bfloat16()
    out.update(timed({"us_chosen": lambda: ql(x1), "us_bf16": lambda: F.linear(x1, wb),
                      "us_int8row": lambda: torch.ops.aten._weight_int8pack_mm(x1, q8, s8b)}, repeat))
    tiles = {"ms_prefill128": lambda: ql(x128)}
    if p.kind == "int4":
        tiles["ms_kernel128"] = lambda: _kernel_only(ql, x128)
    out.update({name: us / 1e3 for name, us in timed(tiles, max(3, repeat // 4)).items()})
    out.setdefault("ms_kernel128", float("nan"))
    out["shape"] = f"{n}x{k}"
    return out


def isa_ab(model: str, repeat: int, gen_tokens: int) -> None:
    from apr.commands.bench import bench_prompt, run_once
    from apr.quant import native
    from apr.runtime import load_model

    lm = load_model(model, dtype="bfloat16", quiet=True)
    prompt = bench_prompt(lm.tokenizer, 16)
    rates: dict = {isa: [] for isa in native.runnable_isas()}
    for i in range(repeat + 1):  # pass 0 of each variant is a warm-up
        for isa in rates:
            os.environ["APR_KERNEL_ISA"] = isa
            _, dec_s, steps, _ = run_once(lm, prompt, gen_tokens)
            if i:
                rates[isa].append(steps / dec_s)
    os.environ.pop("APR_KERNEL_ISA")
    for isa, r in rates.items():
        print(f"| {lm.path.name} | {isa} | {statistics.median(r):.2f} | {min(r):.2f} | {max(r):.2f} | {len(r)} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4864)
    ap.add_argument("--cols", type=int, default=896)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--isa-ab", metavar="MODEL", help="decode tok/s of each native ISA variant on MODEL, alternated")
    ap.add_argument("--gen-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.isa_ab:
        print(f"# decode A/B, {args.threads} thread(s), load {os.getloadavg()[0]:.1f}")
        print("| model | isa | decode tok/s median | min | max | passes |\n|---|---|---|---|---|---|")
        return isa_ab(args.isa_ab, args.repeat, args.gen_tokens)
    print(f"# {args.rows}x{args.cols}, {args.threads} thread(s), load {os.getloadavg()[0]:.1f}, "
          f"cpu block {k4.cpu_block_n()}, torch {torch.__version__}")
    print("| type | shape | chosen | err | bf16 dense err | int8/row err | matvec us chosen | bf16 dense | int8/row "
          "| T=128 ms (apr path) | T=128 ms (int4 kernel) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for qtype in TYPES:
        r = row(qtype, args.rows, args.cols, args.repeat)
        print(f"| {r['type']} | {r['shape']} | {r['kind']} | {r['err']:.2e} | {r['err_bf16']:.2e} | {r['err_int8row']:.2e} | "
              f"{r['us_chosen']:.0f} | {r['us_bf16']:.0f} | {r['us_int8row']:.0f} | {r['ms_prefill128']:.1f} | {r['ms_kernel128']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
