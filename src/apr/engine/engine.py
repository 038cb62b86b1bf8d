"""The engine: continuous batching over KV-cache slots. Every command generates through it.

Each step (1) retires cancelled sequences, (2) admits waiting requests into free slots, reusing the longest
cached prefix any free slot holds (the prefix cache), (3) prefills the next chunk of every admitted prompt's
uncached rest in one forward (each prompt's rows get the kernels and GEMM shapes they would get alone, so
its logits are bit for bit those of a prefill on its own), and (4) decodes one token for every running sequence in ONE forward (`Transformer.step`), the weights read once
for the whole batch; a speculating sequence adds its drafted tokens as further rows of that forward and keeps
as many as the target agrees with (apr.engine.speculative). Requests join and leave between steps; sampling is per sequence. Which implementation
runs a step is `Transformer.step_impl`, the one place it is decided; the engine reports it.
"""

from __future__ import annotations

import collections
import threading
import time

import torch

from apr.engine import speculative as spec
from apr.engine.request import Event, Request, SamplingParams
from apr.engine.sampling import apply_repeat_penalty, make_sampler, token_logprobs
from apr.errors import AprError, ContextOverflow
from apr.model.transformer import Segment

REPEAT_LAST_N = 64
# rows per prefill forward: bounds a long prompt's activations, and how long running sequences wait for it
PREFILL_CHUNK = 256


class QueueFull(AprError):
    """More requests wait than the engine's max_queue."""


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Engine:
    def __init__(self, lm, parallel: int | None = None, max_queue: int = 64):
        self.lm, self.model, self.tok = lm, lm.model, lm.tokenizer
        self.ctx = lm.config.context_length
        self.parallel, self.max_queue = max(1, parallel or 1), max_queue
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.slot_tokens: list[list[int]] = [[] for _ in range(self.parallel)]  # whose KV each slot holds
        self.slot_used = [0.0] * self.parallel
        self._lock = threading.Lock()  # guards waiting/running between submitters and the step
        self._step_lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = self._accepting_closed = False
        self._cache_seen = None
        self.step_impl = "none"
        self.counters = collections.Counter()
        self.last_batch_size = 0
        self._decode_window: collections.deque = collections.deque(maxlen=64)  # (time, tokens) per decode step
        self.spec_default = dict(spec.DEFAULT)  # for requests that do not choose (`apr serve --speculative`)
        self._drafters: dict[str, spec.DraftModel] = {}
        self._draft_lock = threading.Lock()
        if self.spec_default["mode"] != "off":  # a bad default (an unloadable draft) fails at start, not per request
            self._spec_for(SamplingParams())

    # ---- submitting ----

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        if not prompt_ids:
            raise ContextOverflow("the prompt is empty")
        if len(prompt_ids) >= self.ctx:
            raise ContextOverflow(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.ctx}")
        if params.max_tokens < 0:
            raise AprError(f"max_tokens must be >= 0, got {params.max_tokens}")
        params.max_tokens = min(params.max_tokens, self.ctx - len(prompt_ids))
        req = Request(self, prompt_ids, params, self.tok.stream_decoder(), self.tok.stop_ids)
        req.sampler = make_sampler(params.temperature, params.top_k, params.top_p, params.min_p, params.seed)
        req.spec = self._spec_for(params)
        if params.constraint is not None:  # compiled here, so a bad grammar is the submitter's error
            from apr.engine.constrain import Constraint

            req.constraint = Constraint(self.lm, *params.constraint)
        with self._lock:
            if self._accepting_closed:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue {self.max_queue})")
            self.waiting.append(req)
            self.counters["requests_total"] += 1
            self._wakeup.notify_all()
        return req

    def _spec_for(self, params: SamplingParams) -> dict | None:
        """The request's speculation (mode, k, drafter, history) or None; loads a draft model on first use."""
        mode = params.speculative or self.spec_default["mode"]
        spec.check_mode(mode, params.draft_max)
        if mode == "off":
            return None
        drafter = None
        if mode == "draft":
            name = params.draft_model or self.spec_default["draft_model"]
            if not name:
                raise AprError("--speculative draft needs --draft-model NAME (a smaller model with the same vocabulary)")
            with self._draft_lock:  # one load per name, even with concurrent submitters
                drafter = self._drafters.get(name) or self._drafters.setdefault(name, spec.DraftModel(self.lm, name))
        k = params.draft_max or self.spec_default["draft_max"] or spec.DRAFT_MAX[mode]
        return {"mode": mode, "k": k, "drafter": drafter, "history": []}

    def _wake(self) -> None:
        with self._lock:
            self._wakeup.notify_all()

    # ---- driving: a background loop (serve) or the caller's thread (commands) ----

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="apr-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.waiting and not self.running:
                    self._wakeup.wait()
                if self._stopping and not self.running and not self.waiting:  # drained (or all cancelled)
                    return
            self.step()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; with `drain`, let in-flight requests finish (else cancel them); end the loop."""
        with self._lock:
            self._accepting_closed = True
            if not drain:
                for r in list(self.waiting) + self.running:
                    r._cancel.set()
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def cancel_all(self) -> None:
        """Cancel every waiting and running request (a caller abandoning its whole batch: HumanEval's workers
        after an error or Ctrl-C); each ends "cancelled" at the next step instead of generating on."""
        with self._lock:
            for r in list(self.waiting) + self.running:
                r._cancel.set()
            self._wakeup.notify_all()

    def drive_once(self) -> bool:
        """Run one step from the caller's thread when no background loop runs; False when it did not."""
        if self._thread is not None:
            return False
        self.step()
        return True

    def idle(self) -> bool:
        with self._lock:
            return not self.waiting and not self.running

    # ---- the step ----

    def step(self) -> None:
        with self._step_lock:
            try:
                self._check_cache()
                self._retire_cancelled()
                self._admit()
                prefilling = [r for r in self.running if r.fed < len(r.prompt_ids)]
                for batch in self._prefill_batches(prefilling):  # one chunk each per step
                    self._prefill(batch)
                self._decode([r for r in self.running if r not in prefilling])
            except Exception as e:  # a failed step fails its sequences, never the loop
                msg = f"{type(e).__name__}: {e}"
                with self._lock:
                    for r in self.running:
                        r.finish("error", error=msg)
                    self.running = []
                self.slot_tokens = [[] for _ in range(self.parallel)]
                if not isinstance(e, (AprError, RuntimeError, ValueError)):
                    raise

    def _check_cache(self) -> None:
        """Anything that ran the model outside the engine (trace, parity) may have written slot 0 or replaced the
        cache: then no slot's contents can be trusted for the prefix cache."""
        seen = self._cache_state()
        if seen != self._cache_seen:
            self.slot_tokens = [[] for _ in range(self.parallel)]
            self._cache_seen = seen

    def _cache_state(self) -> tuple:
        """What the slots' contents depend on: the cache buffers, direct model calls, and the prepared weights
        (a re-prepared linear, e.g. a test swapping rows, makes every cached KV row another model's)."""
        from apr.quant.linear import prepared_version

        m = self.model
        return id(m.cache.k) if m.cache is not None else None, getattr(m, "direct_steps", 0), prepared_version()

    def _retire_cancelled(self) -> None:
        with self._lock:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                r.finish("cancelled")
            for r in [r for r in self.running if r.cancelled]:
                self._release(r)
                r.finish("cancelled")

    def _release(self, req: Request) -> None:
        """Take `req` out of the batch (lock held); its slot keeps its KV for the prefix cache."""
        if req in self.running:
            self.running.remove(req)
        if req.slot is not None:
            self.slot_tokens[req.slot] = (req.prompt_ids + req.tokens)[: req.fed]
            self.slot_used[req.slot] = time.perf_counter()

    def _admit(self) -> None:
        admitted = []
        with self._lock:
            busy = {r.slot for r in self.running}
            free = [s for s in range(self.parallel) if s not in busy]
            while free and self.waiting:
                req = self.waiting.popleft()
                slot = max(free, key=lambda s: (_common_prefix(self.slot_tokens[s], req.prompt_ids), -self.slot_used[s]))
                free.remove(slot)
                reuse = req.params.cache_prompt and not req.params.echo_logprobs
                hit = 0 if not reuse else _common_prefix(self.slot_tokens[slot], req.prompt_ids)
                req.slot, req.fed = slot, min(hit, len(req.prompt_ids) - 1)  # >= 1 row to prefill: its logits
                req.cached_tokens = req.fed
                req.t_admit = time.perf_counter()
                self.slot_tokens[slot] = []  # overwritten from here on
                self.running.append(req)
                admitted.append(req)
        if admitted:
            need = max(len(r.prompt_ids) + r.params.max_tokens for r in self.running)
            cap = self.model.cache.capacity if self.model.cache is not None else 0
            if need > cap:
                grown = max(need, min(2 * cap, self.ctx))  # doubling: a long chat rarely reallocates
                self.model.setup_cache(grown, slots=self.parallel, keep=True)
            elif self.model.cache.slots < self.parallel:
                self.model.setup_cache(cap, slots=self.parallel, keep=True)
            self._cache_seen = self._cache_state()

    @staticmethod
    def _prefill_batches(reqs: list[Request]) -> list[list[Request]]:
        """One forward for every prompt being prefilled; a prompt scoring its own tokens (echo) needs every
        row's logits and goes alone, so the others' rows do not pay for the vocabulary head."""
        plain = [r for r in reqs if not r.params.echo_logprobs]
        return ([plain] if plain else []) + [[r] for r in reqs if r.params.echo_logprobs]

    def _prefill(self, batch: list[Request]) -> None:
        """The next chunk of each request's uncached prompt, in one forward; after a prompt's last chunk its
        first token is sampled."""
        spans = [(r.fed, min(r.fed + PREFILL_CHUNK, len(r.prompt_ids))) for r in batch]
        segs = [Segment(r.slot, a, b - a) for r, (a, b) in zip(batch, spans)]
        ids = [t for r, (a, b) in zip(batch, spans) for t in r.prompt_ids[a:b]]
        echo = batch[0].params.echo_logprobs  # then the batch is this one request (_prefill_batches)
        self.step_impl = self.model.step_impl(segs)
        logits = self.model.step(torch.tensor(ids, dtype=torch.long), segs, all_logits=echo)  # (n, vocab) or (segs, vocab)
        self.counters["prefill_forwards_total"] += 1
        for i, (req, (a, b)) in enumerate(zip(batch, spans)):
            req.fed = b
            self.counters["prompt_tokens_total"] += b - a
            if echo:
                top = req.params.logprobs or 0
                req.prompt_logprobs = (req.prompt_logprobs or [None]) + [
                    token_logprobs(logits[j - a], req.prompt_ids[j + 1], top) for j in range(a, min(b, len(req.prompt_ids) - 1))]
            if b == len(req.prompt_ids):
                self._prefilled(req, logits[-1] if echo else logits[i])

    def _prefilled(self, req: Request, last: torch.Tensor) -> None:
        """The prompt is in the cache: sample its first token from the last row's logits (or end at max_tokens 0)."""
        self.counters["cached_tokens_total"] += req.cached_tokens
        if req.params.max_tokens == 0:
            with self._lock:
                self._release(req)
            req.finish("length")
            return
        self._sample(req, last)

    def _decode(self, batch: list[Request]) -> None:
        """One forward for the batch: each sequence's last token, and after it the tokens it drafted (one-row
        segments of its slot at consecutive positions: each row's logits come back)."""
        if not batch:
            return
        drafts = [self._draft(r) for r in batch]  # (tokens, q per token or None)
        segs, ids = [], []
        for r, (d, _) in zip(batch, drafts):
            segs += [Segment(r.slot, r.fed + i, 1) for i in range(len(d) + 1)]
            ids += [r.tokens[-1]] + d
        self.step_impl = self.model.step_impl(segs)
        logits = self.model.step(torch.tensor(ids, dtype=torch.long), segs)  # (rows, vocab): one per segment
        self.last_batch_size = len(batch)
        self.counters["steps_total"] += 1
        self.counters[f"batch_size_{len(batch)}"] += 1
        before, row = self.counters["generated_tokens_total"], 0
        for r, (d, qs) in zip(batch, drafts):
            self._verify(r, logits[row : row + len(d) + 1], d, qs)
            row += len(d) + 1
        self._decode_window.append((time.perf_counter(), self.counters["generated_tokens_total"] - before))

    def _draft(self, req: Request) -> tuple[list[int], list | None]:
        s = req.spec
        # room: every row's position inside the cache, and no more tokens than the request may still take
        k = 0 if s is None else min(s["k"], req.params.max_tokens - len(req.tokens) - 1,
                                    self.model.cache.capacity - req.fed - 1)
        if k <= 0:
            return [], None
        hist = s["history"]  # prompt + generated, extended in place (both only grow)
        if not hist:
            hist += req.prompt_ids
        hist += req.tokens[len(hist) - len(req.prompt_ids) :]
        if s["drafter"] is None:
            return spec.ngram_draft(hist, k), None
        return s["drafter"].draft(req.slot, hist, k, req.sampler)

    def _verify(self, req: Request, rows: torch.Tensor, draft: list[int], qs: list | None) -> None:
        """Row i's logits give the token after row i's input; keep going while they agree with the draft.
        `fed` counts only rows whose input is the sequence's real token: a rejected draft's KV is never trusted."""
        req.fed += 1  # the last token's row
        req.passes += 1
        self.counters["seq_passes_total"] += 1
        if draft:
            req.spec_passes += 1
            req.spec_drafted += len(draft)
            self.counters["spec_drafted_total"] += len(draft)
        for i in range(rows.shape[0]):
            d = draft[i] if i < len(draft) else None
            token, accepted, finished = self._sample(req, rows[i], d, qs[i] if qs else None)
            self.counters["decode_tokens_total"] += 1
            if accepted:
                req.spec_accepted += 1
                self.counters["spec_accepted_total"] += 1
                if token not in req.stop_ids:  # appended: its row's KV is the sequence's
                    req.fed += 1
            if finished or not accepted:
                return

    def _sample(self, req: Request, logits: torch.Tensor, draft: int | None = None,
                q: torch.Tensor | None = None) -> tuple[int, bool, bool]:
        """Choose, report and take one token -> (token, it is the drafted one, the sequence finished)."""
        if req.params.repeat_penalty != 1.0:  # the last REPEAT_LAST_N ids, without copying the whole history
            tail = req.tokens[-REPEAT_LAST_N:]
            short = REPEAT_LAST_N - len(tail)
            history = (req.prompt_ids[-short:] if short else []) + tail
            logits = apply_repeat_penalty(logits, history, req.params.repeat_penalty)
        c = req.constraint
        if c is not None:  # before sampling, greedy or not: what the grammar forbids cannot be drawn
            logits = c.mask(logits)
        if draft is None:
            token, accepted = req.sampler(logits), False
        else:
            token, accepted = spec.choose(req.sampler, logits, draft, q)
        lp = top = None
        if req.params.logprobs is not None:
            lp, top = token_logprobs(logits, token, req.params.logprobs)
        self.counters["generated_tokens_total"] += 1
        try:
            if c is not None and token not in req.stop_ids:
                c.consume(token)
        except AprError as e:  # this sequence fails; the rest of the batch goes on
            req.finish("error", error=str(e))
            finished = True
        else:
            finished = req.on_token(token, lp, top)
            if not finished and c is not None and c.done:  # the object is complete: nothing may follow
                req.finish("grammar")
                finished = True
        if finished:
            with self._lock:
                self._release(req)
        return token, accepted, finished

    # ---- reporting ----

    def stats(self) -> dict:
        w = self._decode_window
        span = w[-1][0] - w[0][0] if len(w) > 1 else 0.0
        tok_s = sum(n for _, n in list(w)[1:]) / span if span > 0 else 0.0
        with self._lock:
            return {**{k: self.counters[k] for k in ("requests_total", "prompt_tokens_total", "generated_tokens_total",
                                                     "cached_tokens_total", "steps_total", "prefill_forwards_total",
                                                     "spec_drafted_total", "spec_accepted_total")},
                    "acceptance_rate": spec.ratio(self.counters["spec_accepted_total"], self.counters["spec_drafted_total"]),
                    "tokens_per_pass": spec.ratio(self.counters["decode_tokens_total"], self.counters["seq_passes_total"]),
                    "queue_depth": len(self.waiting), "active": len(self.running),
                    "last_batch_size": self.last_batch_size, "decode_tok_s": round(tok_s, 3),
                    "step_impl": self.step_impl, "parallel": self.parallel,
                    "batch_sizes": {int(k.rsplit("_", 1)[1]): v for k, v in self.counters.items()
                                    if k.startswith("batch_size_")}}


_ENGINE_FOR = threading.Lock()


def engine_for(lm, parallel: int = 1) -> Engine:
    """The model's engine (one per loaded model: it owns the model's KV cache), with at least `parallel` slots.
    Locked: callers on several threads (HumanEval --parallel) must never each make one, two engines writing
    the same cache."""
    with _ENGINE_FOR:
        eng = getattr(lm, "engine", None)
        if eng is None or (eng.parallel < parallel and eng.idle() and eng._thread is None):
            eng = Engine(lm, parallel)
            lm.engine = eng
        return eng


__all__ = ["Engine", "Event", "QueueFull", "Request", "SamplingParams", "engine_for"]
