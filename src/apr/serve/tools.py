"""Tool calls: OpenAI/Ollama `tools` rendered by the model's own chat template, the model's tool-call output
parsed back into `tool_calls`, and, for tool_choice "required" or a named function, the output constrained to
a call whose arguments validate against the function's JSON schema.

The call format is the one the template teaches the model: Qwen2.5's template asks for
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (Hermes style), which is what is parsed.
"""

from __future__ import annotations

import json
import re
import uuid

from apr.engine.constrain import JSON_DEFAULTS
from apr.serve.errors import bad_request

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)


def check_tools(tools: list | None, param: str = "tools") -> list[dict]:
    """Each tool must be {"type": "function", "function": {"name": str, "parameters": a JSON schema object}}."""
    out = []
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise bad_request("each tool must be {type: function, function: {...}}", f"{param}.{i}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request("a function needs a name", f"{param}.{i}.function.name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad_request("function parameters must be a JSON schema object", f"{param}.{i}.function.parameters")
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    return out


def chosen(tools: list[dict], tool_choice) -> list[dict] | None:
    """The functions a forced call may use: all of them for "required", one for a named choice; None if free."""
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        if not tools:
            raise bad_request("tool_choice 'required' needs tools", "tool_choice")
        return tools
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise bad_request("tool_choice must be none, auto, required or {type: function, function: {name}}",
                          "tool_choice")
    pick = [t for t in tools if t["function"]["name"] == name]
    if not pick:
        raise bad_request(f"tool_choice names '{name}', which is not among the tools", "tool_choice")
    return pick


def forced_grammar(tools: list[dict], tokenizer=None) -> tuple:
    """A lark grammar (llguidance) for exactly one call of one of `tools`, its arguments by the tool's schema.
    Where the vocabulary has the tags as tokens of their own (Qwen2.5: <tool_call> is 151657), the grammar
    names those tokens (`<[id]>`), since the model writes them as one token, not as text."""
    alts = []
    for t in tools:
        fn = t["function"]
        schema = {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
                  "required": ["name", "arguments"], "additionalProperties": False,
                  "x-guidance": JSON_DEFAULTS}  # bounded whitespace, as for response_format
        alts.append("%json " + json.dumps(schema))
    rules = "\n".join(f"call{i}: {a}" for i, a in enumerate(alts))
    start = " | ".join(f"call{i}" for i in range(len(alts)))
    def tag(text: str) -> str:
        i = tokenizer.token_to_id(text) if tokenizer is not None else None
        return f"<[{i}]>" if i is not None else json.dumps(text)

    return "lark", f'start: {tag(OPEN)} "\\n" body "\\n" {tag(CLOSE)}\nbody: {start}\n{rules}\n'


def parse(text: str) -> tuple[str | None, list[dict]]:
    """Model text -> (content outside the calls or None, OpenAI tool_calls). A block that is not a JSON object
    with a string name stays in the content (the model did not make a call)."""
    calls, rest, last = [], [], 0
    for m in _CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", {})
        rest.append(text[last:m.start()])
        last = m.end()
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": obj["name"],
                                   "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    rest.append(text[last:])
    content = "".join(rest).strip()
    return (content or None) if calls else text, calls


def template_calls(tool_calls: list[dict]) -> list[dict]:
    """OpenAI tool_calls (arguments a JSON string) -> what chat templates expect (arguments an object)."""
    out = []
    for c in tool_calls:
        fn = dict(c.get("function") or {})
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                fn["arguments"] = json.loads(args) if args.strip() else {}
            except ValueError:
                pass  # left as the string the client sent
        out.append({**c, "function": fn})
    return out
