"""`apr bench MODEL`: prefill and decode speed through apr.generate (the one inference path).

Each iteration prefills a fixed prompt of --prompt-tokens ordinary tokens and decodes --gen-tokens
greedily through the engine (apr.engine, batch of one); prefill speed is prompt tokens / time to the first token, decode speed is
the remaining steps / their time. Medians (with min and max) over --iterations; load time, first-token
latency (from the process start to the first token of the first iteration) and peak RSS are reported too.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

from apr.commands._common import add_model_args, load

FILLER = ("def quicksort(items):\n    if len(items) <= 1:\n        return items\n    pivot = items[len(items) // 2]\n"
          "    left = [x for x in items if x < pivot]\n    right = [x for x in items if x > pivot]\n"
          "    return quicksort(left) + [pivot] + quicksort(right)\n\n")


def setup_parser(p):
    add_model_args(p)
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length in tokens (default 512)")
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens to decode per iteration (default 128)")
    p.add_argument("--iterations", type=int, default=5, help="timed iterations (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed short runs first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def bench_prompt(tokenizer, n: int) -> list[int]:
    """Exactly n ordinary token ids: code text, repeated (no special tokens, same ids every run)."""
    ids = tokenizer.encode(FILLER)
    if not ids:
        raise ValueError("the tokenizer encodes the filler text to nothing")
    return (ids * (n // len(ids) + 1))[:n]


def run_once(lm, prompt: list[int], gen_tokens: int) -> tuple[float, float, int, float]:
    """(prefill seconds, decode seconds, decode steps, wall-clock time of the first token), through the engine
    like every command; the prompt is prefilled in full each time (no prefix-cache reuse) and EOS does not stop it."""
    from apr.engine import SamplingParams, engine_for

    req = engine_for(lm).submit(prompt, SamplingParams(max_tokens=gen_tokens, stop_ids=set(), cache_prompt=False))
    for _ in req.events():
        pass
    if req.stop_reason == "error":
        raise RuntimeError(f"generation failed: {req.error}")
    return (req.t_first - req.t_admit, req.t_last - req.t_first, req.decode_steps,
            time.time() - (time.perf_counter() - req.t_first))


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(lm, prompt_tokens: int, gen_tokens: int, iterations: int, warmup: int, t_start: float) -> dict:
    ctx = lm.config.context_length
    prompt_tokens = max(1, min(prompt_tokens, ctx - 2))
    gen_tokens = max(2, min(gen_tokens, ctx - prompt_tokens))
    prompt = bench_prompt(lm.tokenizer, prompt_tokens)
    first_token_s = None
    for _ in range(warmup):  # one-time costs (cache allocation, graph capture) stay out of the timings
        *_, t_first = run_once(lm, prompt[: min(16, prompt_tokens)], 3)
        first_token_s = first_token_s or (t_first - t_start)
    prefill, decode = [], []
    for _ in range(max(1, iterations)):
        pre_s, dec_s, steps, t_first = run_once(lm, prompt, gen_tokens)
        first_token_s = first_token_s or (t_first - t_start)
        prefill.append(prompt_tokens / pre_s)
        decode.append(steps / dec_s if dec_s > 0 else 0.0)
    return {"prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "iterations": len(prefill),
            "prefill": _stats(prefill), "decode": _stats(decode), "first_token_s": first_token_s}


def process_start() -> float:
    """Wall-clock time this process started (Linux /proc), else now: the 'after start' of first-token latency.

    The start is read as an age on the boot clock: /proc/self/stat's start time (clock ticks after boot)
    against /proc/uptime, both on that clock, to 10 ms. /proc/stat's `btime` is whole seconds, and adding the
    ticks to it put the start up to a second too early (the fraction of a second the machine booted at)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, in clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])  # seconds since boot, read now
        return time.time() - max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def native_isa(lm) -> str | None:
    """The native kernels' ISA variant ("avx512", "avx2") when this CPU run uses them, else None."""
    from apr.quant import native

    return native.isa() if lm.backend == "cpu" else None


def main(args):
    import torch

    t_start = process_start()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args, quiet=args.json)
    m = measure(lm, args.prompt_tokens, args.gen_tokens, args.iterations, args.warmup, t_start)
    out = {
        "model": str(lm.path), "model_sha256": lm.sha256, "backend": lm.backend, "dtype": lm.dtype,
        "backend_chain": lm.backend_chain, "threads": torch.get_num_threads(),
        "prompt_tokens": m["prompt_tokens"], "gen_tokens": m["gen_tokens"], "iterations": m["iterations"],
        "prefill_tok_s": round(m["prefill"]["median"], 3), "prefill_tok_s_min": round(m["prefill"]["min"], 3),
        "prefill_tok_s_max": round(m["prefill"]["max"], 3),
        "decode_tok_s": round(m["decode"]["median"], 3), "decode_tok_s_min": round(m["decode"]["min"], 3),
        "decode_tok_s_max": round(m["decode"]["max"], 3),
        "kernel_isa": native_isa(lm), "step_impl": lm.engine.step_impl, "activations": lm.activations, "load_s": round(lm.load_s, 3), "first_token_s": round(m["first_token_s"], 3),
        "peak_rss_mb": round(peak_rss_mb(), 1), "file_mb": round(lm.path.stat().st_size / 2**20, 1),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(format_text(out))
    return 0


def format_text(o: dict) -> str:
    return "\n".join([
        f"{o['model']} [{o['backend']} {o['dtype']}, {o['threads']} threads]",
        f"  prefill  {o['prefill_tok_s']:8.1f} tok/s  (min {o['prefill_tok_s_min']:.1f}, max {o['prefill_tok_s_max']:.1f};"
        f" {o['prompt_tokens']} tokens x {o['iterations']})",
        f"  decode   {o['decode_tok_s']:8.1f} tok/s  (min {o['decode_tok_s_min']:.1f}, max {o['decode_tok_s_max']:.1f};"
        f" {o['gen_tokens']} tokens x {o['iterations']})",
        f"  load {o['load_s']:.2f} s, first token {o['first_token_s']:.2f} s after start, "
        f"peak RSS {o['peak_rss_mb']:.0f} MB ({o['peak_rss_mb'] / max(o['file_mb'], 1e-9):.2f}x the file)",
    ])
