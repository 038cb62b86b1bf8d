"""HumanEval --parallel N is the sequential run, N at a time: the same generate, the same records, the same
errors in the same order. Regression for SHIP-005 with --parallel on the small-context falsify fixture: the
batched path went to the engine around the bound `generate` (apr.generate.submit), so the planted answers
never reached it, the tiny model's 512-token context met HumanEval/1's 620-token prompt at submission, and
the check printed no JSON; nor was HumanEval/0, queued ahead of it, ever generated or recorded."""

from __future__ import annotations

import json
import threading
import time

import pytest

from test_falsify import CONTRACTS, IDS, _answers, criterion, in_repo, judge, run_check  # noqa: F401 (fixture)


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def _planted(crit, tiny_qwen, capsys, monkeypatch, out, solve: bool, parallel: int) -> dict:
    from apr.evals.humaneval import load_problems

    problems = {p["prompt"][-200:]: p for p in load_problems(2).values()}

    def text_for(prompt):
        p = next((v for k, v in problems.items() if k.strip() in prompt), None)
        return f"```python\n{p['prompt']}{p['canonical_solution']}```" if solve and p else "I cannot help with that."

    _answers(monkeypatch, text_for)
    return run_check(crit, tiny_qwen, capsys, "--limit", "2", "--max-tokens", "8", "--out", str(out),
                     "--parallel", str(parallel))


@pytest.mark.parametrize("contract", CONTRACTS, ids=IDS)
def test_ship005_falsification_holds_under_parallel(contract, tiny_qwen, capsys, monkeypatch, in_repo, tmp_path):
    crit = criterion(contract, "SHIP-005")
    for solve, want, verdict in ((True, 1.0, "DISCHARGED"), (False, 0.0, "FALSIFIED")):
        seq = _planted(crit, tiny_qwen, capsys, monkeypatch, tmp_path / f"seq{solve}", solve, 1)
        par = _planted(crit, tiny_qwen, capsys, monkeypatch, tmp_path / f"par{solve}", solve, 4)
        assert seq["pass@1"] == par["pass@1"] == want and judge(crit, par) == verdict
        keep = ("task_id", "completion", "passed", "status")
        assert [{k: r[k] for k in keep} for r in _records(tmp_path / f"par{solve}")] == \
               [{k: r[k] for k in keep} for r in _records(tmp_path / f"seq{solve}")]


def test_parallel_fails_like_sequential_on_a_small_context(tiny_qwen, capsys, monkeypatch, tmp_path):
    """The real engine on the tiny model: HumanEval/0 fits its 512 tokens, HumanEval/1 (620) does not. Both
    runs record HumanEval/0 with the same greedy text, then stop on HumanEval/1 with the same error (the
    batched one with HumanEval/2 still in flight: cancelled, not recorded)."""
    from apr.cli import main

    monkeypatch.setenv("APR_HOME", str(tmp_path / "home"))
    seen = {}
    for n in (1, 4):
        capsys.readouterr()
        rc = main(["eval", "humaneval", str(tiny_qwen), "--limit", "3", "--max-tokens", "8", "--json",
                   "--parallel", str(n), "--out", str(tmp_path / f"p{n}")])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        seen[n] = rc, err, [(r["task_id"], r["completion"], r["status"]) for r in _records(tmp_path / f"p{n}")]
    assert seen[4] == seen[1]
    rc, err, recs = seen[1]
    assert rc != 0 and "the prompt has 620 tokens; the context holds 512" in err
    assert [t for t, *_ in recs] == ["HumanEval/0"]


def test_parallel_calls_the_bound_generate_at_once():
    """Every problem goes through the `generate` the sampler is bound to, up to `parallel` of them at once
    (the barrier passes only when 3 calls are in together), each asking for an engine of that many slots."""
    from apr.evals import humaneval

    barrier, calls = threading.Barrier(3, timeout=10), []

    def generate(lm, prompt, **kw):
        calls.append(kw["parallel"])
        barrier.wait()
        return type("R", (), {"text": prompt[-12:], "tokens": [1], "stop_reason": "eos", "decode_tok_s": 1.0})()

    sample = humaneval.make_sampler(object(), generate, True, 0.0, 8, 0, parallel=3)
    probs = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n"} for i in range(3)]
    finishes = [sample.start(p, 0) for p in probs]
    texts = [f()[0] for f in finishes]
    assert calls == [3, 3, 3] and texts == [humaneval.chat_prompt(p)[-12:] for p in probs]


def test_engine_for_makes_one_engine_across_threads(tiny_qwen, monkeypatch):
    """Worker threads asking for the model's engine at once get one: two would write the same KV cache."""
    from apr.engine import engine as eng_mod
    from apr.runtime import load_model

    lm = load_model(tiny_qwen, quiet=True)
    real = eng_mod.Engine

    class Slow(real):
        def __init__(self, *a, **k):
            time.sleep(0.05)  # widens the window in which an unlocked engine_for makes a second one
            super().__init__(*a, **k)

    monkeypatch.setattr(eng_mod, "Engine", Slow)
    got, start = [], threading.Barrier(6)

    def ask():
        start.wait()
        got.append(eng_mod.engine_for(lm, 4))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(e) for e in got}) == 1 and got[0] is lm.engine and lm.engine.parallel == 4


def test_an_abandoned_parallel_run_cancels_its_calls(tmp_path):
    """HumanEval/1 fails while HumanEval/2 still generates: the run records HumanEval/0, raises HumanEval/1's
    error, and cancels HumanEval/2 on the engine instead of leaving its worker generating to the end."""
    from types import SimpleNamespace

    from apr.errors import AprError, ContextOverflow
    from apr.evals import humaneval

    cancelled = threading.Event()
    lm = SimpleNamespace(engine=SimpleNamespace(cancel_all=cancelled.set))
    problems = humaneval.load_problems(3)
    answer = f"```python\n{problems['HumanEval/0']['prompt']}{problems['HumanEval/0']['canonical_solution']}```"

    def generate(lm, prompt, **kw):
        if problems["HumanEval/1"]["entry_point"] in prompt:
            raise ContextOverflow("the prompt has 620 tokens; the context holds 512")
        if problems["HumanEval/2"]["entry_point"] in prompt:
            assert cancelled.wait(30), "never cancelled"
        return SimpleNamespace(text=answer, tokens=[1], stop_reason="eos", decode_tok_s=1.0)

    sample = humaneval.make_sampler(lm, generate, True, 0.0, 8, 0, parallel=3)
    meta = {"prompt_style": "chat", "temperature": 0.0, "max_tokens": 8, "seed": 0}
    with pytest.raises(AprError, match="620 tokens"):
        humaneval.run_generation(sample, problems, tmp_path, meta, parallel=3)
    assert cancelled.is_set()
    assert [(r["task_id"], r["status"]) for r in _records(tmp_path)] == [("HumanEval/0", "passed")]
