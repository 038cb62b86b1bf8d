"""`python-syntax`: does the model write Python that parses? The code is parsed with `ast`, never run."""

from __future__ import annotations

import json
from pathlib import Path

from apr.errors import AprError
from apr.evals.code import ast_summary, extract_code
from apr.evals.humaneval import CHAT_TEMPLATE, STOP, truncate_completion

DEFAULT_PROMPTS = [
    "def fib(n):",
    "def is_prime(n: int) -> bool:",
    "def reverse_words(sentence: str) -> str:",
    "def binary_search(items: list, target) -> int:",
    "class Stack:",
    "def merge_sorted(a: list, b: list) -> list:",
]


def load_prompts(path: str) -> list[str]:
    """Prompts from a file: a JSON list, JSONL (one string or {"prompt": ...} per line), or plain text with
    one prompt per line (use JSON for prompts that span lines)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise AprError(f"cannot read prompts {path}: {e.strerror}") from None
    try:
        if p.suffix == ".json":
            items = json.loads(text)
        elif p.suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            items = [line for line in text.splitlines() if line.strip()]
    except ValueError as e:
        raise AprError(f"{path} is not valid {p.suffix[1:].upper()}: {e}") from None
    prompts = [i["prompt"] if isinstance(i, dict) and "prompt" in i else i for i in items]
    if not prompts or not all(isinstance(x, str) and x.strip() for x in prompts):
        raise AprError(f"{path} holds no prompts (want strings, or objects with a \"prompt\")")
    return prompts


def check_one(prompt: str, completion: str, chat: bool) -> dict:
    """Summarise the code one completion stands for."""
    if not chat and "```" not in completion:
        completion = truncate_completion(completion)  # in case the runtime let a stop sequence through
    code = extract_code(prompt, completion)
    return {"prompt": prompt, "completion": completion, "code": code, **ast_summary(code)}


def run(lm, generate, prompts: list[str], max_tokens: int) -> dict:
    """Generate for each prompt (instruct models through their chat template, as for HumanEval) and parse."""
    chat = bool(lm.is_instruct)
    results = []
    for prompt in prompts:
        r = generate(lm, CHAT_TEMPLATE.format(prompt=prompt) if chat else prompt, chat=chat,
                     max_tokens=max_tokens, temperature=0.0, stop=None if chat else list(STOP))
        tokens = r.tokens if isinstance(r.tokens, int) else len(r.tokens)
        results.append({**check_one(prompt, r.text, chat), "tokens": tokens, "stop_reason": r.stop_reason,
                        "decode_tok_s": r.decode_tok_s})
    n_ok = sum(r["ok"] for r in results)
    return {"prompt_style": "chat" if chat else "completion", "n_prompts": len(results), "n_ok": n_ok,
            "pass_rate": round(n_ok / len(results), 6) if results else 0.0, "results": results}


def format_text(report: dict) -> str:
    lines = []
    for r in report["results"]:
        if r["ok"]:
            names = ", ".join(r["functions"]) or "-"
            head = f"[ok]    {r['prompt']!r}: {r['node_count']} AST nodes, functions: {names}"
        else:
            head = f"[error] {r['prompt']!r}: line {r['error']['line']}: {r['error']['msg']}"
        lines += [head, *("    " + line for line in r["code"].rstrip().splitlines()), ""]
    lines.append(f"python-syntax: {report['n_ok']}/{report['n_prompts']} parse ({100 * report['pass_rate']:.1f}%) "
                 f"in {report['wall_s']:.1f}s, {report['model']}")
    return "\n".join(lines)
