"""Time to first token of a second chat turn whose ~500-token prefix is already in a KV slot, against the same
turn with the prefix cache off (the whole conversation prefilled again). Both through the engine, in one run.

    python benchmarks/prefix_cache.py [MODEL] [--threads 2] [--prefix-tokens 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from apr.engine import SamplingParams, engine_for
from apr.generate import prepare_messages
from apr.runtime import load_model

CODE = ("def merge(a, b):\n    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
        "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n"
        "            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n\n")


def ttft(eng, ids, cache: bool) -> tuple[float, int]:
    t0 = time.perf_counter()
    req = eng.submit(ids, SamplingParams(max_tokens=1, cache_prompt=cache))
    req.result()
    return req.t_first - t0, req.cached_tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefix-tokens", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model(a.model, quiet=True)
    unit = len(lm.tokenizer.encode(CODE))
    system = "You review this code:\n" + CODE * max(1, a.prefix_tokens // unit)
    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "What does merge do?"}]
    eng = engine_for(lm, 1)
    hot, cold, cached = [], [], 0
    for _ in range(a.repeats):
        _, ids1 = prepare_messages(lm, turn1)
        answer = eng.submit(ids1, SamplingParams(max_tokens=24)).result().text
        turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Make it stable."}]
        _, ids2 = prepare_messages(lm, turn2)
        s, cached = ttft(eng, ids2, cache=True)
        hot.append(s)
        cold.append(ttft(eng, ids2, cache=False)[0])
    n = len(ids2)
    print(f"{a.model}, {a.threads} threads: 2nd turn of {n} tokens, {cached} cached")
    print(f"  first token with the prefix cache    {statistics.median(hot):.3f} s  {[round(x, 3) for x in hot]}")
    print(f"  first token, whole prompt prefilled  {statistics.median(cold):.3f} s  {[round(x, 3) for x in cold]}")
    print(f"  ratio {statistics.median(cold) / statistics.median(hot):.1f}x")


if __name__ == "__main__":
    main()
