"""Prefill tile size: one whole forward of T rows with dequantized tiles forced, for several tile sizes (values
per tile, apr.quant.kernels._DEQUANT_VALUES), best of 3, and whether the logits equal the first size's bit for bit.

    python benchmarks/tile_size.py [MODEL] [ROWS,...] [VALUES,...]
"""
import sys, time, json
import torch
torch.set_num_threads(2)
from apr import hub
from apr.runtime import load_model
from apr.model.transformer import Segment
from apr.quant import kernels, linear, native

name = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-1.5b-instruct"
rows = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "28,64,128").split(",")]
sizes = [int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "4194304,1048576,524288,262144").split(",")]
m = load_model(str(hub.resolve_model(name)), quiet=True).model
native.MAX_ROWS = linear.FEW_ROWS_BF16_GEMM = 0

def best(fn, n=3):
    fn(); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return min(ts)

for t in rows:
    ids = torch.randint(0, 5000, (t,), generator=torch.Generator().manual_seed(0))
    m.setup_cache(t + 1, slots=1)
    run = lambda: m.step(ids, [Segment(0, 0, t)])
    base = None
    for dv in sizes:
        kernels._DEQUANT_VALUES = dv
        kernels._tiles.__dict__.pop("bufs", None)
        out = run()
        same = True if base is None else bool(torch.equal(out, base))
        base = out if base is None else base
        print(json.dumps({"model": name, "rows": t, "tile_values": dv, "ms": round(best(run) * 1e3, 1), "bit_identical": same}), flush=True)
