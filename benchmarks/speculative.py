"""Speculative decoding on code-editing prompts: apr plain vs `--speculative ngram` vs llama.cpp, in one run.

    python benchmarks/speculative.py [--model qwen2.5-coder-0.5b-instruct] [--draft-max 4 8 12]
        [--gen-tokens 160] [--threads 2] [--llama-python /tmp/venv-llamacpp/bin/python] [--lookup 2 10]
        [--target qwen2.5-coder-1.5b-instruct --draft qwen2.5-coder-0.5b-instruct] [--skip-draft]

Each prompt gives a function and asks for it back with a small change (greedy): the answer copies most of the
prompt, which is what prompt lookup drafts from. Every engine decodes the same prompt token ids (the model's
chat template rendered by apr); decode tok/s = tokens after the first / their time, summed over the prompts.
apr runs in this process through apr.generate (the engine); llama-cpp-python (a peer tool, never an apr
dependency) in its own interpreter: plain `Llama` and `Llama(draft_model=LlamaPromptLookupDecoding(...))`.
apr's speculative tokens are checked identical to its plain greedy tokens. The load average is printed:
the box may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

FUNCS = [
    ("def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total / len(xs)\n",
     "Rename the function to average and keep everything else the same."),
    ("def fizzbuzz(n):\n    out = []\n    for i in range(1, n + 1):\n        if i % 15 == 0:\n            out.append('FizzBuzz')\n"
     "        elif i % 3 == 0:\n            out.append('Fizz')\n        elif i % 5 == 0:\n            out.append('Buzz')\n"
     "        else:\n            out.append(str(i))\n    return out\n",
     "Change it so it returns a single string joined with newlines instead of a list."),
    ("class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self.items.append(item)\n\n"
     "    def pop(self):\n        return self.items.pop()\n\n    def peek(self):\n        return self.items[-1]\n\n"
     "    def size(self):\n        return len(self.items)\n",
     "Add an is_empty method; keep the rest unchanged."),
    ("def parse_line(line):\n    parts = line.strip().split(',')\n    name = parts[0]\n    age = int(parts[1])\n"
     "    city = parts[2]\n    return {'name': name, 'age': age, 'city': city}\n",
     "Add type hints to the function; change nothing else."),
]


def prompts() -> list[str]:
    return [f"{ask}\n\n```python\n{code}```\nReply with the whole rewritten code only." for code, ask in FUNCS]


LLAMA_CHILD = r"""
import json, sys, time
from llama_cpp import Llama
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
job = json.loads(sys.argv[1])
draft = LlamaPromptLookupDecoding(num_pred_tokens=job["lookup"]) if job["lookup"] else None
llm = Llama(model_path=job["path"], n_ctx=2048, n_threads=job["threads"], n_threads_batch=job["threads"],
            draft_model=draft, verbose=False)
eos = llm.token_eos()
tok_n = dec_s = 0.0
for ids in job["ids"]:
    n, t0, t1 = 0, time.perf_counter(), None
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        t1 = t1 or time.perf_counter()
        if tok == eos:
            break
        n += 1
        if n >= job["gen"]:
            break
    dec_s += time.perf_counter() - t1
    tok_n += n - 1
print(json.dumps({"decode": tok_n / dec_s, "tokens": tok_n}))
"""


def load() -> float:
    return round(os.getloadavg()[0], 1)


def run_apr(lm, all_ids: list[list[int]], gen: int, **spec) -> dict:
    """Decode tok/s over all prompts, the tokens, and acceptance (passes and drafted over all of them)."""
    from apr.engine import SamplingParams, engine_for

    eng = engine_for(lm)
    toks, n, secs, acc, drafted, passes, dec = [], 0, 0.0, 0, 0, 0, 0
    for ids in all_ids:
        r = eng.submit(ids, SamplingParams(max_tokens=gen, cache_prompt=False, **spec)).result()
        toks.append(r.tokens)
        n += r.decode_steps
        secs += r.decode_s
        s = r.speculative or {}
        acc, drafted = acc + s.get("accepted", 0), drafted + s.get("drafted", 0)
        passes, dec = passes + s.get("passes", 0), dec + r.decode_steps
    return {"decode": n / secs, "tokens": toks, "acceptance": acc / drafted if drafted else None,
            "tokens_per_pass": dec / passes if passes else None}


def run_llama(py: str, path: str, all_ids, gen: int, threads: int, lookup: int) -> dict:
    job = json.dumps({"path": path, "ids": all_ids, "gen": gen, "threads": threads, "lookup": lookup})
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run([py, "-c", LLAMA_CHILD, job], capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1][:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def row(name: str, res: dict, base: float | None, note: str = "") -> str:
    if "error" in res:
        return f"| {name} | error: {res['error']} | | | | {load()} |"
    acc = f"{100 * res['acceptance']:.0f}%" if res.get("acceptance") is not None else "-"
    tpp = f"{res['tokens_per_pass']:.2f}" if res.get("tokens_per_pass") else "-"
    ratio = f"{res['decode'] / base:.2f}x" if base else "-"
    return f"| {name} | {res['decode']:.1f} | {ratio} | {acc} | {tpp} | {load()} | {note}"


def table_head(a, path, ids) -> float | None:
    """The table's header and its first row, llama.cpp's plain decode: the base every ratio is taken against."""
    print("| engine | decode tok/s | vs llama.cpp plain | drafts accepted | tokens/pass | load avg | note")
    print("|---|---|---|---|---|---|---|")
    peer = {"error": "skipped"} if a.skip_llama else run_llama(a.llama_python, str(path), ids, a.gen_tokens, a.threads, 0)
    print(row("llama.cpp plain", peer, peer.get("decode")), flush=True)
    return peer.get("decode")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--draft-max", type=int, nargs="+", default=[4, 8, 12], help="ngram draft lengths to try")
    ap.add_argument("--gen-tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-python", default="/tmp/venv-llamacpp/bin/python")
    ap.add_argument("--lookup", type=int, nargs="+", default=[2, 10],
                    help="LlamaPromptLookupDecoding num_pred_tokens values (10 is its default)")
    ap.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--draft-k", type=int, nargs="+", default=[4])
    ap.add_argument("--skip-draft", action="store_true")
    ap.add_argument("--skip-llama", action="store_true", help="apr only (no peer rows)")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from apr.generate import prepare_prompt
    from apr.runtime import load_model

    lm = load_model(a.model, backend="cpu", quiet=True)
    all_ids = [prepare_prompt(lm, p)[1] for p in prompts()]
    print(f"{a.model}: {len(all_ids)} code-editing prompts ({', '.join(str(len(i)) for i in all_ids)} tokens), greedy, "
          f"<= {a.gen_tokens} generated, {a.threads} threads, {lm.backend} {lm.dtype}\n")
    base = table_head(a, lm.path, all_ids)
    for k in [] if a.skip_llama else a.lookup:
        print(row(f"llama.cpp PromptLookup({k})", run_llama(a.llama_python, str(lm.path), all_ids, a.gen_tokens,
                                                           a.threads, k), base), flush=True)
    plain = run_apr(lm, all_ids, a.gen_tokens, speculative="off")
    print(row("apr plain", plain, base), flush=True)
    for k in a.draft_max:
        res = run_apr(lm, all_ids, a.gen_tokens, speculative="ngram", draft_max=k)
        same = "identical tokens" if res["tokens"] == plain["tokens"] else "TOKENS DIFFER"
        print(row(f"apr --speculative ngram --draft-max {k}", res, base,
                  f"{res['decode'] / plain['decode']:.2f}x apr plain; {same}"), flush=True)
    if a.skip_draft:
        return
    del lm
    target = load_model(a.target, backend="cpu", quiet=True)
    ids = [prepare_prompt(target, p)[1] for p in prompts()]
    print(f"\n{a.target} with {a.draft} drafting (same prompts)\n")
    base = table_head(a, target.path, ids)
    plain = run_apr(target, ids, a.gen_tokens, speculative="off")
    print(row("apr plain", plain, base), flush=True)
    res = run_apr(target, ids, a.gen_tokens, speculative="ngram", draft_max=a.draft_max[0])
    same = "identical tokens" if res["tokens"] == plain["tokens"] else "TOKENS DIFFER"
    print(row(f"apr ngram --draft-max {a.draft_max[0]}", res, base,
              f"{res['decode'] / plain['decode']:.2f}x apr plain; {same}"), flush=True)
    for k in a.draft_k:
        res = run_apr(target, ids, a.gen_tokens, speculative="draft", draft_model=a.draft, draft_max=k)
        same = "identical tokens" if res["tokens"] == plain["tokens"] else "TOKENS DIFFER"
        print(row(f"apr --draft-model {a.draft.split('-')[2]} --draft-max {k}", res, base,
                  f"{res['decode'] / plain['decode']:.2f}x apr plain; {same}"), flush=True)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"\n({time.time() - t0:.0f} s)")
