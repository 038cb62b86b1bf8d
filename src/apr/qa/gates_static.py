"""Gates that read the model file and tokenizer without running the network.

    capability_match       architecture and tensor types against the selected backend
    tensor_contract        presence, shapes, finiteness, degeneracy and value ranges of every tensor
    metadata_plausibility  rope theta, context, epsilon, head sizes, vocabulary, special ids
    tokenizer_roundtrip    decode(encode(x)) == x on a unicode corpus; special tokens are single ids
    chat_template          renders, ends with the assistant header, never wraps twice
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

from apr.errors import AprError
from apr.qa.context import Outcome, Skip

# ---- capability_match ----


def capability_match(ctx) -> Outcome:
    from apr.model.config import SUPPORTED_ARCHITECTURES
    from apr.quant import type_name

    meta, tensors = ctx.file()
    arch, backend = meta.get("general.architecture"), selected_backend(ctx)
    supported = backend_types(backend)
    counts = Counter(type_name(t.qtype) for t in tensors.values())
    missing = sorted({type_name(t.qtype) for t in tensors.values() if int(t.qtype) not in supported})
    problems = []
    if arch not in SUPPORTED_ARCHITECTURES:
        problems.append(f"architecture '{arch}' is not supported (apr runs {', '.join(SUPPORTED_ARCHITECTURES)})")
    if missing:
        problems.append(f"no {backend} kernel for tensor type(s) {', '.join(missing)}")
    kinds = ", ".join(f"{n} x{c}" for n, c in sorted(counts.items()))
    msg = "; ".join(problems) or f"{arch} on {backend}: {len(tensors)} tensors, all types supported ({kinds})"
    return Outcome(not problems, msg, value=len(missing), threshold=0)


def selected_backend(ctx) -> str:
    """The backend the model runs on: the loaded one, the forced one, or the first available in auto's chain."""
    if ctx.loaded is not None:
        return ctx.loaded.backend
    if ctx.options.backend != "auto":
        return ctx.options.backend
    from apr import backends

    return next((n for n in backends.CHAIN if backends.BACKENDS[n].available() is None), "cpu")


def backend_types(name: str) -> set[int]:
    from apr import backends

    if name not in backends.BACKENDS:
        raise AprError(f"unknown backend '{name}' (apr.backends knows {', '.join(backends.BACKENDS)})")
    return {int(t) for t in backends.BACKENDS[name].supported_types()}


# ---- tensor_contract ----

_CHUNK_VALUES = 1 << 22  # values dequantized at a time (16 MiB of float32): memory stays bounded
# Wide bands around real models (qwen2.5-coder-0.5b: weights rms 0.0044..0.059, norms 0.10..7.3, biases
# 0.017..34.7 since qwen2's k bias is large by design): they catch wrong scales (x1000, /1000), not style.
RMS_BOUNDS = {"norm": (1e-3, 1e3), "bias": (0.0, 1e3), "weight": (1e-4, 10.0)}
MAX_ABS = 1e4
MAX_CONSTANT_ROWS = 0.01  # a few dead rows (unused vocabulary) happen; more is a broken tensor


def tensor_contract(ctx) -> Outcome:
    from apr.model.load import expected_shapes

    cfg = ctx.config()
    _, tensors = ctx.file()
    faults = []
    for name, shape in expected_shapes(cfg).items():
        t = tensors.get(name)
        if t is None:
            faults.append(f"{name}: missing")
        elif tuple(t.shape) != shape:
            faults.append(f"{name}: shape {tuple(t.shape)}, expected {shape}")
    n_values, ranges = 0, {}
    for name, t in tensors.items():
        stats = tensor_stats(t, model_dense(ctx, name, t.shape))
        n_values += stats["n"]
        faults += tensor_faults(name, t.shape, stats)
        lo, hi = ranges.get(tensor_kind(name), (math.inf, 0.0))
        ranges[tensor_kind(name)] = (min(lo, stats["rms"]), max(hi, stats["rms"]))
    extra = sorted(set(tensors) - set(expected_shapes(cfg)))
    if faults:
        shown = "; ".join(faults[:4]) + (f"; ... {len(faults) - 4} more" if len(faults) > 4 else "")
        return Outcome(False, shown, value=len(faults), threshold=0)
    spans = ", ".join(f"{k} rms {lo:.3g}..{hi:.3g}" for k, (lo, hi) in sorted(ranges.items()))
    note = f"; {len(extra)} tensor(s) not used by apr: {', '.join(extra[:3])}" if extra else ""
    return Outcome(True, f"{len(tensors)} tensors, {n_values / 1e6:.1f}M values: shapes ok, all finite, "
                         f"none degenerate; {spans}{note}", value=0, threshold=0)


def tensor_kind(name: str) -> str:
    if "norm" in name:
        return "norm"
    return "bias" if name.endswith(".bias") else "weight"


def tensor_faults(name: str, shape, s: dict) -> list[str]:
    if s["nonfinite"]:
        return [f"{name}: {s['nonfinite']} NaN/Inf value(s) after dequantization"]
    if s["min"] == s["max"]:
        return [f"{name}: every value is {s['min']:g} ({'all-zero' if s['max'] == 0 else 'constant'})"]
    faults = []
    rows = s["rows"]
    if rows > 1 and s["constant_rows"] > MAX_CONSTANT_ROWS * rows:
        faults.append(f"{name}: {s['constant_rows']} of {rows} rows are constant")
    lo, hi = RMS_BOUNDS[tensor_kind(name)]
    if not lo <= s["rms"] <= hi:
        faults.append(f"{name}: rms {s['rms']:.3g} outside [{lo:g}, {hi:g}]")
    if s["max_abs"] > MAX_ABS:
        faults.append(f"{name}: max |value| {s['max_abs']:.3g} > {MAX_ABS:g}")
    return faults


def model_dense(ctx, name: str, shape) -> torch.Tensor | None:
    """The loaded float32 model's weight for tensor `name`: the same dequantized bits as the file's, so the
    gate checks exactly what the network computes with, without dequantizing ~500M values a second time."""
    lm = ctx.loaded
    if lm is None or lm.dtype != "float32" or not name.endswith(".weight"):
        return None
    try:
        w = getattr(lm.model.get_submodule(name.removesuffix(".weight")), "weight", None)
    except AttributeError:
        return None
    ok = isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.device.type == "cpu"
    return w if ok and tuple(w.shape) == tuple(shape) else None


def tensor_stats(t, dense: torch.Tensor | None = None) -> dict:
    """n, nonfinite, mean, std, rms, min, max, max_abs and constant rows of a tensor's float values,
    dequantized a chunk of rows at a time."""
    from apr.quant import dequantize

    rows, cols = math.prod(t.shape[:-1]), t.shape[-1]
    acc = _Stats(rows)
    step = max(1, _CHUNK_VALUES // cols)
    if dense is not None:
        flat = dense.reshape(rows, cols)
        for a in range(0, rows, step):
            acc.add(flat[a : a + step])
        return acc.result()
    from apr.quant.pages import release_file_pages

    raw = torch.from_numpy(t.data.view("uint8")).reshape(rows, -1)  # (rows, row_bytes)
    for a in range(0, rows, step):
        acc.add(dequantize(raw[a : a + step], t.qtype, (min(step, rows - a), cols)))
    release_file_pages(raw)  # reading the whole file must not leave all of it resident
    return acc.result()


class _Stats:
    """Float64 running sums over (r, cols) chunks; NaN/Inf are counted, then left out of the other stats."""

    def __init__(self, rows: int):
        self.rows, self.n, self.nonfinite, self.constant_rows = rows, 0, 0, 0
        self.s = self.sq = 0.0
        self.min, self.max = math.inf, -math.inf

    def add(self, w: torch.Tensor) -> None:
        s, sq = float(w.sum(dtype=torch.float64)), float(w.square().sum(dtype=torch.float64))
        if not math.isfinite(s + sq):  # rare: count exactly, then measure the finite values
            finite = torch.isfinite(w)
            self.nonfinite += int((~finite).sum())
            w = w.double().where(finite, 0.0)
            s, sq = float(w.sum()), float(w.square().sum())
        lo, hi = torch.aminmax(w, dim=1)  # (r,) each
        self.n += w.numel()
        self.s, self.sq = self.s + s, self.sq + sq
        self.min, self.max = min(self.min, float(lo.min())), max(self.max, float(hi.max()))
        if w.shape[1] > 1:
            self.constant_rows += int((lo == hi).sum())

    def result(self) -> dict:
        n = max(self.n, 1)
        mean = self.s / n
        return {"n": self.n, "rows": self.rows, "nonfinite": self.nonfinite, "mean": mean,
                "std": math.sqrt(max(self.sq / n - mean * mean, 0.0)), "rms": math.sqrt(self.sq / n),
                "min": self.min, "max": self.max, "max_abs": max(abs(self.min), abs(self.max)),
                "constant_rows": self.constant_rows}


# ---- metadata_plausibility ----

ROPE_THETA = {"qwen2": (1e5, math.inf), "llama": (1e3, 1e7)}
CONTEXT = (128, 1_048_576)
MAX_EPS = 0.01


def metadata_plausibility(ctx) -> Outcome:
    cfg = ctx.config()
    meta, tensors = ctx.file()
    problems = [*_rope_problems(cfg), *_size_problems(cfg), *_vocab_problems(cfg, meta, tensors)]
    summary = (f"rope theta {cfg.rope_theta:g}, context {cfg.context_length}, rms eps {cfg.norm_eps:.3g}, "
               f"heads {cfg.n_heads}/{cfg.n_kv_heads} x {cfg.head_dim}, vocab {cfg.vocab_size}")
    if problems:
        return Outcome(False, "; ".join(problems), value=cfg.rope_theta, threshold=_theta_range(cfg.architecture))
    return Outcome(True, summary, value=cfg.rope_theta, threshold=_theta_range(cfg.architecture))


def _theta_range(arch: str) -> str:
    lo, hi = ROPE_THETA.get(arch, (1e3, 1e7))
    return f">= {lo:g}" if hi == math.inf else f"[{lo:g}, {hi:g}]"


def _rope_problems(cfg) -> list[str]:
    lo, hi = ROPE_THETA.get(cfg.architecture, (1e3, 1e7))
    if not lo <= cfg.rope_theta <= hi:  # qwen2 trained at 1e6: 1e4 (llama's default) wrecks long prompts
        want = _theta_range(cfg.architecture)
        return [f"rope theta {cfg.rope_theta:g} is implausible for {cfg.architecture} (want {want})"]
    return []


def _size_problems(cfg) -> list[str]:
    p = []
    if not CONTEXT[0] <= cfg.context_length <= CONTEXT[1]:
        p.append(f"context length {cfg.context_length} outside [{CONTEXT[0]}, {CONTEXT[1]}]")
    if not 0 < cfg.norm_eps <= MAX_EPS:
        p.append(f"rms epsilon {cfg.norm_eps:g} outside (0, {MAX_EPS}]")
    if cfg.n_heads * cfg.head_dim != cfg.dim:
        p.append(f"{cfg.n_heads} heads x {cfg.head_dim} != embedding length {cfg.dim}")
    if cfg.n_kv_heads <= 0 or cfg.n_heads % cfg.n_kv_heads:
        p.append(f"{cfg.n_heads} heads are not a multiple of {cfg.n_kv_heads} kv heads")
    if cfg.head_dim % 2:
        p.append(f"head size {cfg.head_dim} is odd (rope rotates pairs)")
    return p


def _vocab_problems(cfg, meta: dict, tensors: dict) -> list[str]:
    p = []
    n_tokens = len(meta.get("tokenizer.ggml.tokens") or [])
    rows = tensors["token_embd.weight"].shape[0] if "token_embd.weight" in tensors else None
    if n_tokens != rows:
        p.append(f"the tokenizer has {n_tokens} tokens but token_embd has {rows} rows")
    declared = meta.get(f"{cfg.architecture}.vocab_size")
    if declared is not None and declared != rows:
        p.append(f"{cfg.architecture}.vocab_size {declared} != token_embd rows {rows}")
    for key, value in meta.items():
        m = re.fullmatch(r"tokenizer\.ggml\.(\w+)_token_id", key)
        if m and not (isinstance(value, int) and 0 <= value < min(n_tokens, rows or n_tokens)):
            p.append(f"{m.group(1)} token id {value} is outside the vocabulary ({n_tokens} tokens)")
    return p


# ---- tokenizer_roundtrip ----

CORPUS = (
    "Hello, world!", "  two leading spaces, two trailing  ", "tabs\tand\nnewlines\r\n\n\n",
    "def square(x: int) -> int:\n    return x ** 2  # comment\n", "if (a && b) { c[i] += 0x1F; }",
    "naïve café résumé Ünïcödé Straße", "日本語のテキストです。", "中文测试：你好，世界！", "한국어 문장입니다",
    "Привет, мир", "مرحبا بالعالم", "שלום עולם", "Ελληνικά κείμενα", "हिन्दी पाठ", "ภาษาไทย",
    "emoji 🎉👍🏽 and a family 👨\u200d👩\u200d👧", "math ∑∫√∞ ≤ ≥ ≠ π", "decomposed e\u0301 vs é",
    "zero\u200bwidth and\u00a0nbsp", "numbers 123 4567 89.0e-3 1,000,000", "mixed Latin, Кириллица, 漢字",
)


def tokenizer_roundtrip(ctx) -> Outcome:
    tok = ctx.tokenizer()
    bad_text = [(x, y) for x in CORPUS if (y := tok.decode(tok.encode(x, add_bos=False))) != x]
    named = (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id)
    specials = sorted(set(tok.special_ids) | {i for i in named if i is not None})
    bad_special = [(i, tok.id_to_token(i), got) for i in specials
                   if (got := tok.encode(tok.id_to_token(i), add_bos=False)) != [i]]
    problems = [f"{x!r} decodes back as {y!r}" for x, y in bad_text[:3]]
    problems += [f"special token {s!r} (id {i}) encodes as {got}" for i, s, got in bad_special[:3]]
    n_bad = len(bad_text) + len(bad_special)
    msg = "; ".join(problems) if problems else \
        f"{len(CORPUS)} unicode texts round-trip; {len(specials)} special tokens are single ids"
    return Outcome(not problems, msg, value=n_bad, threshold=0)


# ---- chat_template ----

PROBE_USER, PROBE_ASSISTANT = "qa-probe-question", "qa-probe-answer"


def chat_template(ctx) -> Outcome:
    from apr.generate import prepare_prompt

    tok = ctx.tokenizer()
    if not tok.has_chat_template:
        raise Skip("the model has no chat template (a base model): prompts run raw")
    from apr.template_limits import TemplateLimit

    user = [{"role": "user", "content": PROBE_USER}]
    try:
        gen = tok.render_chat(user, add_generation_prompt=True)
        plain = tok.render_chat(user, add_generation_prompt=False)
        header = assistant_header(tok, user, plain)
    except TemplateLimit as e:  # a template that needs more time or room than a render is given
        return Outcome(False, f"the template needs more than the render bound: {e}", value=1, threshold=0)
    problems = []
    if PROBE_USER not in gen:
        problems.append("the rendered prompt lacks the user's message")
    if gen == plain or not gen.startswith(plain):
        problems.append("add_generation_prompt adds no assistant header")
    elif header and not gen.endswith(header):
        problems.append(f"the generation prompt ends {gen[-30:]!r}, not with the assistant header {header!r}")
    owner = ctx.prompt_owner()
    rendered, ids = prepare_prompt(owner, "What is 2+2?")
    again, ids_again = prepare_prompt(owner, rendered)
    if again != rendered or ids_again != ids:
        problems.append("an already templated prompt was wrapped again")
    eot = tok.chat.end_of_turn
    if eot and tok.token_to_id(eot) not in tok.stop_ids:
        problems.append(f"the end-of-turn token {eot!r} does not stop generation")
    shown = header if header else gen[len(plain):]
    return Outcome(not problems, "; ".join(problems) or f"renders; generation prompt ends with {shown!r}; "
                   "a templated prompt is not wrapped again", value=len(problems), threshold=0)


def assistant_header(tok, user: list[dict], plain: str) -> str | None:
    """What the template writes between the user's turn and an assistant's answer (None: not derivable)."""
    full = tok.render_chat(user + [{"role": "assistant", "content": PROBE_ASSISTANT}], add_generation_prompt=False)
    if PROBE_ASSISTANT not in full:
        return None
    before = full.split(PROBE_ASSISTANT, 1)[0]
    if not before.startswith(plain):  # the template rewrites earlier turns: no clean split
        return None
    return before[len(plain):] or None
