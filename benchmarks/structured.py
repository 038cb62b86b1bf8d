"""Constrained decoding cost: decode tok/s with a JSON schema against unconstrained decode, through apr's engine,
and llama-cpp-python's `response_format` json_schema on the same GGUF and prompts, in one run.

    python benchmarks/structured.py [MODEL] [--threads 2] [--max-tokens 96] [--repeats 3]
        [--llamacpp-venv VENV]   (a virtual environment with llama-cpp-python installed)

apr's two modes alternate in one process (the same load affects both); each figure is the median over the prompts
and repeats of (generated tokens - 1) / (time from the first to the last token). Also reported: grammar compile
time (the median over several schemas, after the first use has built the tokenizer view), and the time the mask
and the matcher take per constrained token (timed inside the run), which, unlike a tok/s ratio, does not move
with the machine's load. llama-cpp-python runs in its own venv, same thread count, same prompts, same schema.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "language": {"type": "string", "enum": ["python", "rust", "go", "c"]},
    "lines": {"type": "integer", "minimum": 1, "maximum": 500},
    "steps": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 4}},
    "required": ["name", "language", "lines", "steps"], "additionalProperties": False}
PROMPTS = ["Describe a small program that sorts a list, as JSON with its name, language, size and steps.",
           "Describe a command-line tool that counts words, as JSON with its name, language, size and steps.",
           "Describe a web scraper, as JSON with its name, language, size and steps."]

PEER = r'''
import json, sys, time
from llama_cpp import Llama
a = json.loads(sys.argv[1])
llm = Llama(a["model"], n_threads=a["threads"], n_ctx=1024, verbose=False)
out = []
for _ in range(a["repeats"]):
    for p in a["prompts"]:
        t0, first, n = time.perf_counter(), None, 0
        for chunk in llm.create_chat_completion([{"role": "user", "content": p}], max_tokens=a["max_tokens"],
                                                 temperature=0.0, stream=True,
                                                 response_format={"type": "json_object", "schema": a["schema"]}):
            if chunk["choices"][0]["delta"].get("content"):
                n += 1
                first = first or time.perf_counter()
        out.append((n - 1) / (time.perf_counter() - first) if n > 1 else 0.0)
print(json.dumps(out))
'''


class MaskClock:
    """Time spent in Constraint.mask and .consume, per constrained token."""

    def __init__(self):
        from apr.engine.constrain import Constraint

        self.per_token: list[float] = []  # seconds of mask + consume, one entry per constrained token
        for name in ("mask", "consume"):
            setattr(Constraint, name, self._timed(getattr(Constraint, name), name == "mask"))

    def _timed(self, fn, starts_a_token: bool):
        def wrapper(c, *args):
            t0 = time.perf_counter()
            try:
                return fn(c, *args)
            finally:
                if starts_a_token:
                    self.per_token.append(0.0)
                self.per_token[-1] += time.perf_counter() - t0
        return wrapper


def apr_rates(lm, prompts, max_tokens, repeats, constrained: bool) -> list[float]:
    from apr.engine import SamplingParams, engine_for
    from apr.generate import prepare_prompt

    rates = []
    for _ in range(repeats):
        for p in prompts:
            _, ids = prepare_prompt(lm, p)
            r = engine_for(lm).submit(ids, SamplingParams(max_tokens=max_tokens, cache_prompt=False,
                                                          constraint=("json_schema", SCHEMA) if constrained else None))
            res = r.result()
            rates.append(res.decode_tok_s)
    return rates


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--llamacpp-venv", default=None)
    a = ap.parse_args()
    import torch

    from apr.engine.constrain import Constraint
    from apr.runtime import load_model

    torch.set_num_threads(a.threads)
    lm = load_model(a.model, quiet=True)
    t0 = time.perf_counter()
    Constraint(lm, "json_schema", SCHEMA)  # the tokenizer view and the first compile: once per model
    first = time.perf_counter() - t0
    compiles = []
    for i in range(7):  # distinct schemas: nothing compiled before is reused
        t0 = time.perf_counter()
        Constraint(lm, "json_schema", dict(SCHEMA, title=f"schema {i}"))
        compiles.append(time.perf_counter() - t0)
    again = statistics.median(compiles)
    clock = MaskClock()
    free, cons = [], []
    for _ in range(a.repeats):  # alternate, so both see the same machine
        free += apr_rates(lm, PROMPTS, a.max_tokens, 1, False)
        cons += apr_rates(lm, PROMPTS, a.max_tokens, 1, True)
    f, c = statistics.median(free), statistics.median(cons)
    print(f"{a.model}, {a.threads} threads")
    print(f"  grammar: first use {first:.2f} s (tokenizer view + compile), another schema {again * 1000:.1f} ms")
    print(f"  apr unconstrained decode  {f:6.2f} tok/s")
    print(f"  apr json_schema decode    {c:6.2f} tok/s  ({c / f:.1%} of unconstrained)")
    med, mean = statistics.median(clock.per_token), statistics.mean(clock.per_token)
    print(f"  mask + matcher per constrained token: median {med * 1e6:.0f} us, mean {mean * 1e6:.0f} us"
          f" ({len(clock.per_token)} tokens); the mean is {mean * f:.2%} of an unconstrained step")
    print(f"  load average during the run: {os.getloadavg()[0]:.1f} (1 min)")
    if a.llamacpp_venv:
        from apr import hub

        arg = json.dumps({"model": str(hub.resolve_model(a.model, quiet=True)), "threads": a.threads,
                          "prompts": PROMPTS, "max_tokens": a.max_tokens, "repeats": a.repeats, "schema": SCHEMA})
        out = subprocess.run([f"{a.llamacpp_venv}/bin/python", "-c", PEER, arg], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"llama-cpp-python failed: {out.stderr.strip().splitlines()[-1:]}")
        peer = statistics.median(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  llama-cpp-python json_schema decode {peer:6.2f} tok/s;  apr / llama.cpp = {c / peer:.2f}x")


if __name__ == "__main__":
    main()
