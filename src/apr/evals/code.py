"""Getting code out of model output, and summarising it with the `ast` module (never by running it)."""

from __future__ import annotations

import ast
import re

_OPEN = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*$", re.M)
_CLOSE = re.compile(r"^[ \t]*```[ \t]*$", re.M)
PYTHON_TAGS = ("python", "py", "python3")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language tag, body) of each fenced block, in order. An unterminated fence (the model ran out of
    tokens mid-block) runs to the end of the text."""
    blocks, pos = [], 0
    while m := _OPEN.search(text, pos):
        body_start = m.end() + 1 if m.end() < len(text) else m.end()
        end = _CLOSE.search(text, body_start)
        body = text[body_start: end.start() if end else len(text)]
        blocks.append((m.group(1).lower(), body.rstrip("\n") + "\n" if body.strip() else ""))
        if not end:
            break
        pos = end.end()
    return blocks


def first_block(text: str) -> str | None:
    """The first ```python block, else the first untagged one, else None."""
    blocks = fenced_blocks(text)
    for wanted in (PYTHON_TAGS, ("",)):
        for tag, body in blocks:
            if tag in wanted:
                return body
    return None


def extract_code(prompt: str, completion: str) -> str:
    """The code a completion stands for: its first fenced python block if it has one (chat models answer
    in markdown), else the prompt continued by the completion (base models continue the code)."""
    block = first_block(completion)
    return block if block is not None else prompt + completion


def ast_summary(code: str) -> dict:
    """{ok, error: {msg, line} | None, node_count, functions, classes} of a piece of Python source."""
    try:
        tree = ast.parse(code)
    except SyntaxError as e:  # IndentationError and TabError are SyntaxErrors too
        return {"ok": False, "error": {"msg": e.msg, "line": e.lineno}, "node_count": 0,
                "functions": [], "classes": []}
    except ValueError as e:  # e.g. a NUL byte in the source
        return {"ok": False, "error": {"msg": str(e), "line": None}, "node_count": 0,
                "functions": [], "classes": []}
    nodes = list(ast.walk(tree))
    defs = sorted((n for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))),
                  key=lambda n: (n.lineno, n.col_offset))  # source order (walk is breadth-first)
    return {"ok": True, "error": None, "node_count": len(nodes),
            "functions": [n.name for n in defs if not isinstance(n, ast.ClassDef)],
            "classes": [n.name for n in defs if isinstance(n, ast.ClassDef)]}


def top_level_names(code: str) -> set[str] | None:
    """Names of the functions and classes defined at module level; None if the code does not parse."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def defines(code: str, name: str) -> bool:
    """Whether the code defines function `name` at module level (a regex when it does not parse)."""
    names = top_level_names(code)
    if names is not None:
        return name in names
    return re.search(rf"^(async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def _is_main_guard(node: ast.stmt) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def strip_drivers(code: str) -> str:
    """Drop top-level demo code that chat models add after a solution (`print(f(3))`, asserts,
    `if __name__ == "__main__":` blocks): it is not the solution, and `input()` in it would fail the run."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return code
    drop = set()
    for node in tree.body:
        is_docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        if (isinstance(node, (ast.Expr, ast.Assert)) and not is_docstring) or _is_main_guard(node):
            drop.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    if not drop:
        return code
    lines = code.splitlines()
    return "\n".join(line for i, line in enumerate(lines, 1) if i not in drop).rstrip() + "\n"


def prompt_context(prompt: str, entry_point: str, code: str) -> str:
    """The imports and helper definitions of a HumanEval prompt that a restated solution left out
    (e.g. `is_palindrome` beside `make_palindrome`), so the restated code can run on its own."""
    try:
        tree = ast.parse(prompt + "\n    pass\n")  # the prompt stops inside the entry point's body
    except (SyntaxError, ValueError):
        return ""
    have = top_level_names(code) or set()
    lines, keep = prompt.splitlines(), []
    for node in tree.body:
        named = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        if isinstance(node, (ast.Import, ast.ImportFrom)) or (
                named and node.name != entry_point and node.name not in have):
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            keep.append("\n".join(lines[start - 1: node.end_lineno]))
    return "\n".join(keep) + "\n" if keep else ""
