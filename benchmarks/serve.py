"""Serving throughput: 1, 2, 4 and 8 concurrent clients sending the same prompt set to `apr serve`, to
llama.cpp's `llama-server` (continuous batching) and to llama-cpp-python's server (one request at a time),
on the same GGUF, in one run. Reports aggregate generated tok/s, time to first token p50/p95 and the ratios.

    python benchmarks/serve.py [MODEL] [--threads 2] [--max-tokens 64] [--clients 1,2,4,8]
        [--llama-server PATH] [--llamacpp-venv PATH] [--only apr,llama-server,llama-cpp-python] [--json OUT]

Each server runs in its own process with the same thread count, one at a time. Every level sends the whole
prompt set (chat completions, greedy, streamed); clients take the next prompt as soon as their last one ends.
Peers: /work/shared/peer/build-llama-server.sh and build-llamacpp.sh print the binary and venv paths
(llama-cpp-python's server also needs its [server] extras in that venv).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Write a Python function that counts the words in a text file.",
    "Write a Python class for a stack with push, pop and peek.",
    "Write a Python function that flattens a nested list.",
    "Write a Python function that returns the prime numbers below n.",
    "Write a Python function that parses a CSV line with quoted fields.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_commands(a, model: str, port: int) -> dict[str, list[str]]:
    t = str(a.threads)
    cmds = {"apr": [sys.executable, "-m", "apr.cli", "serve", model, "--port", str(port), "--threads", t,
                    "--parallel", str(max(a.clients))]}
    if a.llama_server:
        cmds["llama-server"] = [a.llama_server, "-m", model, "--port", str(port), "--host", "127.0.0.1", "-t", t,
                                "-tb", t, "-np", str(max(a.clients)), "-c", str(1024 * max(a.clients)), "--jinja"]
    if a.llamacpp_venv:
        cmds["llama-cpp-python"] = [os.path.join(a.llamacpp_venv, "bin", "python"), "-m", "llama_cpp.server",
                                    "--model", model, "--port", str(port), "--host", "127.0.0.1", "--n_threads", t,
                                    "--n_threads_batch", t, "--n_ctx", "2048",
                                    "--interrupt_requests", "False"]  # queue concurrent requests, not cut them
    return {k: v for k, v in cmds.items() if k in a.only}


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


def one_request(client: httpx.Client, url: str, prompt: str, max_tokens: int, messages: list | None = None) -> dict:
    body = {"model": "m", "messages": messages or [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            usage = doc.get("usage") or usage
            for ch in doc.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    ttft = ttft or time.perf_counter() - t0
                    chunks += 1
    tokens = usage["completion_tokens"] if usage else chunks  # a peer without usage: one chunk per token
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
    return {"ttft": ttft or time.perf_counter() - t0, "tokens": tokens, "wall": time.perf_counter() - t0,
            "prompt_tokens": (usage or {}).get("prompt_tokens"), "cached_tokens": cached}


def second_turn(url: str) -> dict:
    """A chat's second turn after a first one with a ~500-token system prompt: its time to first token shows
    whether the server reuses the first turn's KV (the issue's target: <= 0.25 s)."""
    system = "You review Python code. " + " ".join(f"Rule {i}: keep functions short and name them well." for i in range(45))
    first = [{"role": "system", "content": system}, {"role": "user", "content": PROMPTS[0]}]
    with httpx.Client(timeout=600) as c:
        one = one_request(c, url, "", 16, first)
        reply = "def is_palindrome(s):\n    return s == s[::-1]"
        two = one_request(c, url, "", 16, first + [{"role": "assistant", "content": reply},
                                                   {"role": "user", "content": "Now ignore case."}])
    return {"turn1_ttft": round(one["ttft"], 3), "turn2_ttft": round(two["ttft"], 3),
            "prompt_tokens": two["prompt_tokens"], "cached_tokens": two["cached_tokens"]}


def run_level(url: str, clients: int, max_tokens: int, rounds: int) -> dict:
    work: queue.Queue = queue.Queue()
    for p in PROMPTS * rounds:
        work.put(p)
    results, errors = [], []

    def worker():
        with httpx.Client(timeout=600) as c:
            while True:
                try:
                    p = work.get_nowait()
                except queue.Empty:
                    return
                try:
                    results.append(one_request(c, url, p, max_tokens))
                except Exception as e:  # noqa: BLE001 - counted, reported
                    errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "errors": errors[:3], "n_errors": len(errors),
            "generated_tokens": tokens, "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 2) if wall else 0.0,
            "ttft_p50": round(statistics.median(ttfts), 3) if ttfts else None,
            "ttft_p95": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3) if ttfts else None}


def bench_server(name: str, cmd: list[str], url: str, a) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    os.makedirs(a.log_dir, exist_ok=True)
    log = open(os.path.join(a.log_dir, f"serve-bench-{name}.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(url, proc)
        one_request(httpx.Client(timeout=600), url, PROMPTS[0], 8)  # warm-up: first-call costs out of the table
        levels = []
        for c in a.clients:
            row = run_level(url, c, a.max_tokens, a.rounds)
            print(f"{name:18s} clients {c}: {row['tok_s']:7.2f} tok/s, TTFT p50 {row['ttft_p50']} s, "
                  f"p95 {row['ttft_p95']} s ({row['requests']} requests, {row['n_errors']} errors)", flush=True)
            levels.append(row)
        try:
            turn = second_turn(url)
        except httpx.HTTPError as e:  # e.g. a model whose context cannot hold the long system prompt
            turn = {"turn1_ttft": None, "turn2_ttft": None, "prompt_tokens": None, "cached_tokens": None, "error": str(e)}
        print(f"{name:18s} second turn: TTFT {turn['turn2_ttft']} s (first turn {turn['turn1_ttft']} s), "
              f"{turn['cached_tokens']} of {turn['prompt_tokens']} prompt tokens cached", flush=True)
        return levels + [turn]
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def table(results: dict[str, list[dict]], clients: list[int]) -> str:
    """One row per client count; the last entry of each server's list is its second-turn measurement."""
    names = list(results)
    head = "| clients | " + " | ".join(f"{n} tok/s | {n} TTFT p50 / p95 (s)" for n in names)
    if "apr" in results:
        head += "".join(f" | apr / {n}" for n in names if n != "apr")
    lines = [head + " |", "|" + "---|" * (1 + 2 * len(names) + (len(names) - 1 if "apr" in results else 0))]
    for i, c in enumerate(clients):
        cells = [str(c)]
        for n in names:
            r = results[n][i]
            cells += [f"{r['tok_s']:.1f}", f"{r['ttft_p50']} / {r['ttft_p95']}"]
        if "apr" in results:
            cells += [f"{results['apr'][i]['tok_s'] / results[n][i]['tok_s']:.2f}x" if results[n][i]["tok_s"] else "-"
                      for n in names if n != "apr"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| server | 2nd-turn TTFT (s) | 1st-turn TTFT (s) | cached / prompt tokens |")
    lines.append("|---|---|---|---|")
    for n in names:
        t = results[n][-1]
        lines.append(f"| {n} | {t['turn2_ttft']} | {t['turn1_ttft']} | {t['cached_tokens']} / {t['prompt_tokens']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=1, help="times each level sends the prompt set")
    ap.add_argument("--llama-server", default=None, help="path of llama.cpp's llama-server binary")
    ap.add_argument("--llamacpp-venv", default=None, help="venv with llama-cpp-python[server]")
    ap.add_argument("--only", default="apr,llama-server,llama-cpp-python")
    ap.add_argument("--log-dir", default="/tmp")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    a.clients = [int(c) for c in a.clients.split(",")]
    a.only = a.only.split(",")
    from apr import hub

    model = str(hub.resolve_model(a.model))
    results = {}
    for name in ["apr", "llama-server", "llama-cpp-python"]:
        port = free_port()
        cmd = server_commands(a, model, port).get(name)
        if cmd:
            results[name] = bench_server(name, cmd, f"http://127.0.0.1:{port}", a)
    load = os.getloadavg()
    print(f"\n# {os.path.basename(model)}, {a.threads} threads, {a.max_tokens} tokens per request, "
          f"{len(PROMPTS) * a.rounds} requests per level; load average {load[0]:.1f} at the end\n")
    print(table(results, a.clients))
    if "apr" in results and results["apr"][0]["tok_s"]:
        top = results["apr"][-2]["tok_s"] / results["apr"][0]["tok_s"]
        print(f"\napr at {a.clients[-1]} clients / apr at {a.clients[0]}: {top:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": model, "threads": a.threads, "max_tokens": a.max_tokens, "results": results,
                       "loadavg": load}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
