"""HumanEval results that cannot lie: the candidate may answer only with plain data."""

from __future__ import annotations

import pytest

from apr.evals import humaneval
from apr.evals.sandbox import run_program

PROBLEMS = humaneval.load_problems()

FAKERS = {
    "__eq__ always true": "class A:\n    def __eq__(self, other):\n        return True\n",
    "__bool__ and an __eq__ returning itself": "class A:\n    def __bool__(self):\n        return True\n"
                                              "    def __eq__(self, other):\n        return self\n",
    "a float subclass with a lying __eq__": "class A(float):\n    def __eq__(self, other):\n        return True\n",
    "a str subclass with a lying __eq__": "class A(str):\n    def __eq__(self, other):\n        return True\n",
    "an int subclass": "class A(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n",
    "a class whose metaclass lies": "class M(type):\n    def __eq__(cls, other):\n        return True\n"
                                    "    __hash__ = type.__hash__\nclass A(metaclass=M):\n    pass\nA = (lambda c: lambda: c)(A)\n",
}


def _faker_program(task: str, faker: str, wrap: str = "A()") -> str:
    p = PROBLEMS[task]
    entry = p["entry_point"]
    code = f"{faker}\ndef {entry}(*args, **kwargs):\n    return {wrap}\n"
    return humaneval.program(p, code)


@pytest.mark.parametrize("name", FAKERS)
@pytest.mark.parametrize("task", ["HumanEval/0", "HumanEval/2"])
def test_fakers_fail_with_their_own_status(task, name):
    r = run_program(_faker_program(task, FAKERS[name]))
    assert not r.passed and r.status == "not_plain_value", (r.status, r.stderr[-300:])
    assert "not plain data" in r.stderr


def test_a_faker_nested_in_a_list_fails():
    r = run_program(_faker_program("HumanEval/3", FAKERS["__eq__ always true"], "[A()]"))
    assert r.status == "not_plain_value"


def test_the_unchecked_harness_would_have_been_fooled():
    # the same program without the harness mark: the hole this closes is real
    src = _faker_program("HumanEval/0", FAKERS["__eq__ always true"])
    unmarked = src.replace("  " + humaneval.PLAIN_MARK.decode(), "")
    assert run_program(unmarked).passed


@pytest.mark.parametrize("attack", [
    # rewrite the checking wrapper's code through the test's frame
    "import sys\ndef has_close_elements(*a, **k):\n    f = sys._getframe(1)\n"
    "    while f is not None and 'candidate' not in f.f_locals:\n        f = f.f_back\n"
    "    f.f_locals['candidate'].__code__ = (lambda *a, **k: True).__code__\n    return True\n",
    # blunt the checker through its defaults
    "import sys\ndef has_close_elements(*a, **k):\n    c = sys._getframe(1).f_locals['k'][0]\n"
    "    c.__defaults__ = (lambda v: float,) * len(c.__defaults__)\n    return True\n",
    # a trace function could rewrite locals after the check
    "import sys\nsys.settrace(lambda *a: None)\ndef has_close_elements(*a, **k):\n    return True\n",
], ids=["code", "defaults", "settrace"])
def test_the_checker_cannot_be_disarmed(attack):
    r = run_program(humaneval.program(PROBLEMS["HumanEval/0"], attack))
    assert not r.passed and "not allowed" in r.stderr, (r.status, r.stderr[-300:])


def test_plain_answers_of_every_kind_pass():
    p = {"prompt": "", "entry_point": "f",
         "test": "def check(candidate):\n    assert candidate() == [None, True, 1, 1.5, 2j, 's', b'b', (1,), {1: [2]},"
                 " {3}, frozenset({4})]\n"}
    code = "def f():\n    return [None, True, 1, 1.5, 2j, 's', b'b', (1,), {1: [2]}, {3}, frozenset({4})]\n"
    assert run_program(humaneval.program(p, code)).passed
