"""Layer-by-layer parity of two runs of a network on the same token ids (teacher-forced).

    compare(a, b, ids, tol) -> ParityReport   a, b: LoadedModel (or HFReference for b)
    HFReference(path, config)                 HF transformers on the same GGUF, float32, hooked per layer
    code_text(), code_ids(tok, n)             real Python source (stdlib), the default text to compare on

B is the reference: std ratios are std(A)/std(B) and the KL divergence is KL(B || A).
Both runs prefill the ids in chunks of positions through their KV caches, A first, then B; A's activations
of one chunk wait for B's, so memory holds one chunk's activations and logits, never the whole text's
(2k tokens x 151936 vocab in float32 is 1.2 GB per model).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from apr.errors import AprError
from apr.trace import POINTS

ALL_POINTS = ("embedding",) + POINTS
CODE_MODULES = ("bisect", "fnmatch", "colorsys", "textwrap", "heapq")  # real, stable Python; code before prose


@dataclass
class Tolerance:
    min_cosine: float = 0.99
    std_band: tuple[float, float] = (0.5, 2.0)
    max_kl: float | None = None  # logits only; None: not checked
    min_top1: float | None = None

    def ok(self, m: dict) -> bool:
        # written so that NaN fails every comparison
        lo, hi = self.std_band
        return bool(m["cosine"] >= self.min_cosine and lo <= m["std_ratio"] <= hi)


class _Acc:
    """Running float64 sums of one compared activation over chunks: enough for the cosine, the two stds,
    the max |A-B| and the worst per-position cosine, without keeping the activations."""

    def __init__(self):
        self.n = 0
        self.sa = self.sb = self.qa = self.qb = self.dot = 0.0
        self.max_abs = torch.tensor(0.0, dtype=torch.float64)
        self.min_pos_cos = torch.tensor(1.0, dtype=torch.float64)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double(), b.double()  # (c, w)
        self.n += a.numel()
        self.sa += float(a.sum())
        self.sb += float(b.sum())
        self.qa += float((a * a).sum())
        self.qb += float((b * b).sum())
        self.dot += float((a * b).sum())
        # torch.maximum/minimum propagate NaN, Python's max() would drop it
        self.max_abs = torch.maximum(self.max_abs, (a - b).abs().max())
        self.min_pos_cos = torch.minimum(self.min_pos_cos, _cos_rows(a, b).min())

    def result(self) -> dict:
        n = max(self.n, 1)
        std_a = math.sqrt(max(self.qa / n - (self.sa / n) ** 2, 0.0)) if math.isfinite(self.qa) else math.nan
        std_b = math.sqrt(max(self.qb / n - (self.sb / n) ** 2, 0.0)) if math.isfinite(self.qb) else math.nan
        return {"cosine": _cos(self.dot, self.qa, self.qb), "std_ratio": _ratio(std_a, std_b), "std_a": std_a,
                "std_b": std_b, "max_abs_diff": float(self.max_abs), "min_position_cosine": float(self.min_pos_cos)}


def _cos(dot: float, qa: float, qb: float) -> float:
    if qa == 0 and qb == 0:
        return 1.0  # both all-zero: identical
    return dot / math.sqrt(qa * qb) if qa > 0 and qb > 0 else (0.0 if math.isfinite(qa + qb) else math.nan)


def _cos_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-position cosine of (c, w) rows; two all-zero rows count as identical."""
    dot, na, nb = (a * b).sum(-1), a.norm(dim=-1), b.norm(dim=-1)  # (c,)
    return torch.where((na == 0) & (nb == 0), torch.ones_like(dot), dot / (na * nb).clamp_min(1e-300))


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return 1.0 if a == 0 else math.inf
    return a / b


class _LogitAcc(_Acc):
    """Logit agreement per position: KL(B || A), top-1 agreement, and each run's next-token NLL."""

    def __init__(self):
        super().__init__()
        self.kl = self.nll_a = self.nll_b = 0.0
        self.top1 = self.positions = self.scored = 0

    def add_logits(self, la: torch.Tensor, lb: torch.Tensor, targets: torch.Tensor) -> None:
        """la, lb (c, vocab); targets (c,) the next token id of each position, -1 where there is none."""
        self.add(la, lb)
        lpa, lpb = F.log_softmax(la.float(), -1), F.log_softmax(lb.float(), -1)  # (c, vocab)
        kl = (lpb.exp() * (lpb - lpa)).sum(-1)  # (c,) KL(B || A) per position
        self.kl += float(kl.clamp_min(0).sum())  # float32 rounding can dip an exact match below 0
        self.top1 += int((la.argmax(-1) == lb.argmax(-1)).sum())
        self.positions += la.shape[0]
        has = targets >= 0
        if has.any():
            t = targets[has].unsqueeze(1)  # (k, 1)
            self.nll_a -= float(lpa[has].gather(1, t).sum())
            self.nll_b -= float(lpb[has].gather(1, t).sum())
            self.scored += int(has.sum())

    def result(self) -> dict:
        r = super().result()
        p, s = max(self.positions, 1), max(self.scored, 1)
        r.update(kl=self.kl / p, top1=self.top1 / p, positions=self.positions, nll_a=self.nll_a / s,
                 nll_b=self.nll_b / s, ppl_a=_exp(self.nll_a / s), ppl_b=_exp(self.nll_b / s))
        return r


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


@dataclass
class ParityReport:
    a: dict  # {model, sha256, dtype, backend}
    b: dict
    tokens: int
    tolerance: Tolerance
    layers: list[dict]  # [{"layer": i, "points": {point: metrics + "ok"}, "ok": bool}]; layer -1: embedding
    logits: dict  # cosine, kl, top1, std_ratio, max_abs_diff, nll/ppl of each, ok
    first_divergent_layer: int | None = None  # n_layers when only the logits fail
    first_divergent_point: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.first_divergent_point is None

    def to_dict(self) -> dict:
        return {"passed": self.passed, "first_divergent_layer": self.first_divergent_layer,
                "first_divergent_point": self.first_divergent_point, "a": self.a, "b": self.b,
                "tokens": self.tokens, "tolerance": asdict(self.tolerance), "layers": self.layers,
                "logits": self.logits, "notes": self.notes}


class _AprRunner:
    def __init__(self, lm):
        self.lm, self.config = lm, lm.config
        self.info = {"model": str(lm.path), "sha256": lm.sha256, "dtype": lm.dtype, "backend": lm.backend}

    def start(self, n: int) -> None:
        self.lm.model.setup_cache(n)

    def run(self, ids: torch.Tensor, pos: int, capture) -> torch.Tensor:
        """ids (c,) at [pos, pos+c) -> float32 logits (c, vocab), calling capture(layer, point, x)."""
        model = self.lm.model
        old, model.tap = model.tap, capture  # host ids on every backend: the embedding table stays on the host
        try:
            return model(ids, pos, all_logits=True)
        finally:
            model.tap = old


def _runner(x):
    return x if hasattr(x, "run") else _AprRunner(x)


def chunk_length(cfg, points, vocab: int, budget_bytes: int = 512 << 20) -> int:
    """Positions per chunk so one chunk's captured activations (float32) and logit work fit the budget."""
    hd = cfg.head_dim
    width = {"embedding": cfg.dim, "attn_norm": cfg.dim, "q": cfg.n_heads * hd, "k": cfg.n_kv_heads * hd,
             "v": cfg.n_kv_heads * hd, "attn_out": cfg.dim, "ffn_norm": cfg.dim, "gate": cfg.ffn_dim,
             "up": cfg.ffn_dim, "swiglu": cfg.ffn_dim, "ffn_out": cfg.dim, "residual": cfg.dim}
    per_token = 4 * cfg.n_layers * sum(width[p] for p in points) + 40 * vocab  # logits: two runs, log-softmax, f64
    return max(16, min(512, budget_bytes // per_token))


def compare(a, b, ids: list[int], tol: Tolerance | None = None, points=None, chunk: int | None = None) -> ParityReport:
    """Run A then B over `ids` chunk by chunk, comparing every captured point and the logits."""
    tol = tol or Tolerance()
    ra, rb = _runner(a), _runner(b)
    points = ALL_POINTS if points is None else tuple(points)  # (): logits only, no taps
    if not ids:
        raise AprError("nothing to compare: no tokens")
    n = len(ids)
    for r in (ra, rb):
        if n > r.config.context_length:
            raise AprError(f"{n} tokens exceed the context of {r.info['model']} ({r.config.context_length})")
    chunk = chunk or chunk_length(ra.config, points, ra.config.vocab_size)
    ra.start(n)
    rb.start(n)
    ids_t = torch.tensor(ids, dtype=torch.long)
    targets = torch.cat([ids_t[1:], torch.tensor([-1])])  # (n,) next token of each position
    accs: dict[tuple[int, str], _Acc] = {}
    logits = _LogitAcc()
    for pos in range(0, n, chunk):
        c_ids = ids_t[pos : pos + chunk]
        la, lb = _run_pair(ra, rb, c_ids, pos, points, accs)
        if la.shape != lb.shape:
            raise AprError(f"A and B disagree on the vocabulary: logits {tuple(la.shape)} vs {tuple(lb.shape)}")
        logits.add_logits(la, lb, targets[pos : pos + chunk])
    return _report(ra, rb, n, tol, accs, logits, points)


def _run_pair(ra, rb, ids: torch.Tensor, pos: int, points, accs) -> tuple[torch.Tensor, torch.Tensor]:
    held: dict[tuple[int, str], torch.Tensor] = {}

    def keep(layer: int, point: str, x: torch.Tensor) -> None:
        if point in points:
            held[(layer, point)] = x.detach().to("cpu", torch.float32, copy=True)

    def check(layer: int, point: str, x: torch.Tensor) -> None:
        a = held.pop((layer, point), None)
        if a is None:
            return
        if a.shape != x.shape:
            raise AprError(f"A and B differ in shape at layer {layer} {point}: {tuple(a.shape)} vs {tuple(x.shape)}")
        accs.setdefault((layer, point), _Acc()).add(a, x.detach().to("cpu", torch.float32))

    # compared on the CPU, so a cuda run can be checked against a cpu one. Without points nothing is
    # tapped, so each model runs exactly as it generates (taps keep apr on its torch block)
    la = ra.run(ids, pos, keep if points else None).float().cpu()
    lb = rb.run(ids, pos, check if points else None).float().cpu()
    return la, lb


def _report(ra, rb, n: int, tol: Tolerance, accs: dict, logits: _LogitAcc, points) -> ParityReport:
    layers: dict[int, dict] = {}
    first = None
    for (layer, point), acc in sorted(accs.items(), key=lambda kv: (kv[0][0], ALL_POINTS.index(kv[0][1]))):
        m = acc.result()
        m["ok"] = tol.ok(m)
        entry = layers.setdefault(layer, {"layer": layer, "points": {}, "ok": True})
        entry["points"][point] = m
        entry["ok"] = entry["ok"] and m["ok"]
        if not m["ok"] and first is None:
            first = (layer, point)
    lg = logits.result()
    lg["ok"] = tol.ok(lg) and (tol.max_kl is None or lg["kl"] <= tol.max_kl) and (
        tol.min_top1 is None or lg["top1"] >= tol.min_top1)
    if first is None and not lg["ok"]:
        first = (ra.config.n_layers, "logits")
    notes = []
    if ra.config.n_layers != rb.config.n_layers:
        notes.append(f"A has {ra.config.n_layers} layers, B {rb.config.n_layers}: layers compared by index")
    missing = [p for p in points if p not in {q for _, q in accs}]
    if missing:
        notes.append(f"not compared (one run does not produce them): {', '.join(missing)}")
    return ParityReport(ra.info, rb.info, n, tol, [layers[k] for k in sorted(layers)], lg,
                        first[0] if first else None, first[1] if first else None, notes)


class HFReference:
    """HF transformers' own implementation of the same GGUF (dequantized to float32) as parity's B.

    Forward hooks on the decoder layers capture the residual stream (each layer's output) and, through the
    submodules, the other tap points. q and k are skipped for llama: llama.cpp stores their rows permuted
    and HF un-permutes them at load, so the two orders differ although the attention is the same."""

    HF_POINTS = {"attn_norm": ("input_layernorm", "out"), "q": ("self_attn.q_proj", "out"),
              "k": ("self_attn.k_proj", "out"), "v": ("self_attn.v_proj", "out"),
              "attn_out": ("self_attn.o_proj", "out"), "ffn_norm": ("post_attention_layernorm", "out"),
              "gate": ("mlp.gate_proj", "out"), "up": ("mlp.up_proj", "out"), "swiglu": ("mlp.down_proj", "in"),
              "ffn_out": ("mlp.down_proj", "out")}

    def __init__(self, path, config, quiet: bool = False):
        try:
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise AprError("the hf reference needs HF transformers: pip install transformers accelerate") from None
        if str(path).endswith(".apr"):
            raise AprError("the hf reference reads GGUF files only; export the .apr file to GGUF first")
        self.config, self.capture = config, None
        self.info = {"model": str(path), "sha256": None, "dtype": "float32", "backend": "hf-transformers"}
        if quiet:
            hf_logging.disable_progress_bar()
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                          dtype=torch.float32).eval()
        self._hook()
        params = inspect.signature(self.model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x

    def _hook(self) -> None:
        base = self.model.model
        base.embed_tokens.register_forward_hook(lambda m, i, o: self._emit(-1, "embedding", o))
        for n, layer in enumerate(base.layers):
            layer.register_forward_hook(lambda m, i, o, n=n: self._emit(n, "residual", o))
            for point, (name, side) in self.HF_POINTS.items():
                if point in ("q", "k") and self.config.architecture == "llama":
                    continue
                mod = layer.get_submodule(name)
                mod.register_forward_hook(lambda m, i, o, n=n, p=point, s=side: self._emit(n, p, i if s == "in" else o))

    def _emit(self, layer: int, point: str, x) -> None:
        while isinstance(x, (tuple, list)):  # layer outputs were tuples before transformers 5
            x = x[0]
        if self.capture is not None:
            self.capture(layer, point, x[0])  # (1, c, w) -> (c, w)

    def start(self, n: int) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, pos: int, capture) -> torch.Tensor:
        self.capture = capture
        try:
            out = self.model(input_ids=ids.unsqueeze(0), use_cache=True, **{self.cache_kw: self.cache})
        finally:
            self.capture = None
        return out.logits[0].float()  # (c, vocab)


def code_ids(tokenizer, n_tokens: int = 2048) -> list[int]:
    """The first `n_tokens` ids of code_text(): the speed report's quality text."""
    return tokenizer.encode(code_text())[:n_tokens]


def code_text() -> str:
    """Real Python source of a few stdlib modules (~56 KB, ~14k Qwen tokens; the first 2k tokens are
    bisect and most of fnmatch): a code model's natural input, nothing committed, and identical for
    everyone on the same Python version."""
    import importlib

    parts = []
    for name in CODE_MODULES:
        try:
            parts.append(inspect.getsource(importlib.import_module(name)))
        except (OSError, TypeError):  # a Python installed without sources
            continue
    if not parts:
        raise AprError("this Python has no stdlib sources to build the default text; pass --text-file FILE")
    return "\n\n".join(parts)
