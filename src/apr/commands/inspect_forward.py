"""`apr inspect --forward`: build the model as `apr run` does and run it once, so "loads" means runs.

A prefill over a short, fixed piece of Python and one decode step after it (on CPUs with AVX2, the C
decode block). Reported: whether every logit is finite, and the mean next-token loss over the text's
positions: a model whose kernels return garbage scores near ln(vocab) (~12 for Qwen), a working one
far below (the threshold and its derivation are in the contracts).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

TEXT = ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
        "    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\nif __name__ == \"__main__\":\n    print(fibonacci(10))\n")


def forward_check(path: Path) -> dict:
    import torch
    import torch.nn.functional as F

    from apr.qa.refparity import step_impl
    from apr.runtime import load_model

    t0 = time.perf_counter()
    lm = load_model(path, quiet=True)  # the default dtype and backend
    load_s = time.perf_counter() - t0
    ids = lm.tokenizer.encode(TEXT)
    model = lm.model
    model.setup_cache(len(ids) + 1)
    t = torch.tensor(ids, dtype=torch.long)
    prefill = model(t[:-1], 0, all_logits=True).float()  # (n-1, vocab): predicts ids[1:]
    step = model(t[-1:], len(ids) - 1).float()  # one decode step at the last position
    logits = torch.cat([prefill, step.reshape(1, -1)])
    finite = bool(torch.isfinite(logits).all())
    nll = float(F.cross_entropy(prefill, t[1:])) if finite else math.inf
    return {"ok": finite and math.isfinite(nll), "tokens": len(ids), "finite": finite, "nll": round(nll, 4),
            "vocab": int(logits.shape[-1]), "next_token": int(step.argmax()), "load_s": round(load_s, 3),
            "dtype": lm.dtype, "backend": lm.backend, "step_impl": step_impl(lm)}
