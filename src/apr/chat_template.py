"""Chat templates: render a model's own `tokenizer.chat_template` exactly as transformers does.

The environment mirrors `transformers.utils.chat_template_utils._compile_jinja_template`
(sandboxed, trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`, `strftime_now`,
a `tojson` that does not HTML-escape), so `render` is byte-identical to
`tokenizer.apply_chat_template(messages, tokenize=False)`.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from functools import cached_property

from apr import template_limits as limits
from apr.errors import AprError

# transformers' historical default (ChatML), used when a GGUF carries no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MAX_SOURCE_CHARS = 1_000_000  # real templates are a few kB; parsing and compiling is not otherwise bounded

# Probe contents: word joiners make a collision with real template text impossible in practice.
_PROBE_USER = "\u2060apr-probe-user\u2060"
_PROBE_ASSISTANT = "\u2060apr-probe-assistant\u2060"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes `<>&'`; transformers overrides it with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _build_env():
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant spans for training masks;
        # for rendering it only passes its body through (as transformers does with no tracker).
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    class Namespace(jinja2.utils.Namespace):
        # Like transformers: no underscore attributes, so templates cannot reach CPython internals.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            limits.tick()  # `{% set ns.s = ns.s ~ ns.s %}` in a loop: growth across iterations goes through here
            jinja2.utils.Namespace.__setitem__(self, name, limits.check_result(value))

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")

    env = _bounded_sandbox_class(ImmutableSandboxedEnvironment)(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=raise_exception, strftime_now=_strftime_now, namespace=Namespace,
                       lipsum=_bounded_lipsum(env.globals["lipsum"]))
    return env


def _bounded_sandbox_class(base):
    """The sandbox with every hook a template cannot avoid checking the render's bounds (apr.template_limits)."""
    import jinja2.nodes as nodes

    class BoundedSandbox(base):
        intercepted_binops = frozenset({"+", "*", "**", "%", "//"})

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805  (jinja's own signature)
            limits.check_args(args, kwargs, getattr(__obj, "__self__", None))  # a method's object counts too
            return limits.check_result(super().call(__context, __obj, *args, **kwargs))

        def getattr(self, obj, attribute):
            limits.tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            limits.tick()
            return super().getitem(obj, argument)

        def call_binop(self, context, operator, left, right):
            if operator == "+":
                limits.tick()
                if limits.size(left) + limits.size(right) > limits.max_chars_now():
                    raise limits.TemplateLimit(limits.too_big_message("value grew"))
            else:
                limits.check_args((left, right), {})
                if operator == "%" and isinstance(left, str):
                    limits.check_format_string(left)
            return limits.check_result(super().call_binop(context, operator, left, right))

        def wrap_str_format(self, value):
            fmt = super().wrap_str_format(value)
            if fmt is not None:
                limits.check_format_string(value.__self__)
            return fmt

        def _parse(self, source, name, filename):
            # Every loop iterates through a deadline check: `{% for a in s %}{% for b in s %}` calls nothing.
            tree = super()._parse(source, name, filename)
            guard = nodes.ImportedName("apr.template_limits.bounded_iter")
            for loop in tree.find_all(nodes.For):
                loop.iter = nodes.Call(guard, [loop.iter], [], None, None, lineno=loop.lineno)
            return tree

    return BoundedSandbox


def _bounded_filter(f):
    @functools.wraps(f)  # keeps jinja's pass_context/pass_eval_context marker
    def run(*args, **kwargs):
        if not limits.active():  # jinja folds constant filters at compile time, where nothing is bounded:
            raise limits.TemplateLimit("not rendering")  # any error there makes it leave the call to render
        limits.check_args(args, kwargs)
        return limits.check_result(f(*args, **kwargs))

    return run


def _bounded_lipsum(lipsum):
    def bounded(n=5, html=True, min=20, max=100):
        if n > 100 or max > 1000:
            raise limits.TemplateLimit(limits.too_big_message("lipsum went"))
        return lipsum(n=n, html=html, min=min, max=max)

    return bounded


def _plain_messages(messages) -> list[dict]:
    # transformers drops None-valued keys (APIs send content=None) and copies each message.
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise AprError(f"chat messages must be dicts with 'role' and 'content', got {type(m).__name__}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


class ChatTemplate:
    """A model's chat template plus what apr derives from it (turn markers, end-of-turn token)."""

    def __init__(self, source: str | None, special_tokens: dict[str, str | None], markers: list[str]):
        """`special_tokens`: bos_token/eos_token/unk_token/pad_token strings passed to the template;
        `markers`: the vocabulary's control/user-defined token strings, used to find turn markers."""
        self.has_template = bool(source)
        self.source = source if source else CHATML_TEMPLATE
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        if not self.has_template:
            markers = [*markers, "<|im_start|>", "<|im_end|>"]
        ordered = sorted(set(m for m in markers if m), key=len, reverse=True)
        self._marker_re = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @cached_property
    def _compiled(self):
        import jinja2

        if len(self.source) > MAX_SOURCE_CHARS:
            raise AprError(f"chat template is {len(self.source)} characters (limit {MAX_SOURCE_CHARS})")
        try:
            return _build_env().from_string(self.source)
        except (jinja2.TemplateError, RecursionError, MemoryError, ValueError, SyntaxError) as e:
            raise AprError(f"chat template does not compile: {_one_line(e)}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for `messages`; any template failure becomes a one-line AprError."""
        template = self._compiled
        context = {**self.special_tokens, **kwargs}
        try:
            with limits.Bounded():
                chunks, total = [], 0
                # tools and documents (OpenAI `tools`, RAG documents) reach templates that have sections for them
                context.setdefault("tools", None)
                context.setdefault("documents", None)
                for chunk in template.generate(messages=_plain_messages(messages),
                                               add_generation_prompt=add_generation_prompt, **context):
                    total += len(chunk)
                    limits.check_output(total)
                    chunks.append(chunk)
                return "".join(chunks)
        except AprError:
            raise
        except Exception as e:  # jinja2.TemplateError, or TypeError etc. from template expressions
            raise AprError(f"chat template error: {_one_line(e)}") from None

    @cached_property
    def _probe(self) -> tuple[list[str], str | None]:
        """(markers before the user text, first marker after the assistant text) of a probe chat."""
        if self._marker_re is None:
            return [], None
        chat = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ASSISTANT}]
        try:
            text = self.render(chat, add_generation_prompt=False)
        except AprError:  # a template that rejects the probe simply has no detectable markers
            return [], None
        head = text.split(_PROBE_USER, 1)[0]
        starts = self._marker_re.findall(head)
        after = text.split(_PROBE_ASSISTANT, 1)
        end = self._marker_re.search(after[1]) if len(after) == 2 else None
        return starts, end.group(0) if end else None

    @property
    def start_markers(self) -> tuple[str, ...]:
        """Tokens a templated prompt starts with: the first marker, and the next one when the
        first is just BOS (Llama 3 opens with <|begin_of_text|><|start_header_id|>)."""
        starts = self._probe[0]
        if not starts:
            return ()
        if starts[0] == self.special_tokens.get("bos_token") and len(starts) > 1:
            return (starts[0], starts[1])
        return (starts[0],)

    @property
    def start_marker(self) -> str | None:
        markers = self.start_markers
        return markers[0] if markers else None

    @property
    def end_of_turn(self) -> str | None:
        """The token the template closes an assistant turn with (<|im_end|>, <|eot_id|>, ...)."""
        return self._probe[1]

    def is_templated(self, prompt: str) -> bool:
        """True when `prompt` already starts with the template's start marker (avoid wrapping twice)."""
        text = prompt.lstrip()
        return any(text.startswith(m) for m in self.start_markers)
