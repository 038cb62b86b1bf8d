"""Prefill tile size: one whole forward of T rows with dequantized tiles forced, for several tile sizes (values
per tile, apr.quant.kernels._DEQUANT_VALUES), best of 3, and whether the logits equal the first size's bit for bit.

    python benchmarks/tile_size.py [MODEL] [ROWS,...] [VALUES,...]
"""

from __future__ import annotations

import json
import sys

import torch

from prefill_batch import best_of  # this folder is on sys.path when the script runs


def main() -> int:
    from apr import hub
    from apr.model.transformer import Segment
    from apr.quant import kernels, linear, native
    from apr.runtime import load_model

    torch.set_num_threads(2)
    name = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-1.5b-instruct"
    rows = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "28,64,128").split(",")]
    sizes = [int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "4194304,1048576,524288,262144").split(",")]
    m = load_model(str(hub.resolve_model(name)), quiet=True).model
    native.MAX_ROWS = linear.FEW_ROWS_BF16_GEMM = 0  # tiles for every row count
    for t in rows:
        ids = torch.randint(0, 5000, (t,), generator=torch.Generator().manual_seed(0))
        m.setup_cache(t + 1, slots=1)
        run = lambda: m.step(ids, [Segment(0, 0, t)])  # noqa: E731
        base = None
        for dv in sizes:
            kernels._DEQUANT_VALUES = dv
            kernels._tiles.__dict__.pop("bufs", None)  # buffers of the new size
            out = run()
            base = out if base is None else base
            ms = best_of(run, 3) * 1e3
            print(json.dumps({"model": name, "rows": t, "tile_values": dv, "ms": round(ms, 1),
                              "bit_identical": bool(torch.equal(out, base))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
