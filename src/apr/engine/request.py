"""A request in the engine: its sampling parameters, its text stream (stop strings held back and cut), and the
events a caller reads, from a thread (`events`) or an asyncio handler (`aevents`). See API.md beside this file."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

_ids = itertools.count(1)
# internal stop reasons -> OpenAI's finish_reason
FINISH = {"eos": "stop", "stop": "stop", "grammar": "stop", "length": "length", "cancelled": "cancelled",
          "error": "error"}  # "grammar": a constrained output is complete and admits nothing more


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and its top-k alternatives
    echo_logprobs: bool = False  # score the prompt tokens too (a full prefill: no prefix-cache reuse)
    stop_ids: set[int] | None = None  # ids that end the sequence (default: the tokenizer's)
    cache_prompt: bool = True  # reuse a slot's KV for a shared prompt prefix (bench turns it off)
    constraint: tuple | None = None  # (kind, spec): kind in apr.engine.constrain.KINDS; the output must match it
    speculative: str | None = None  # "ngram" | "draft" | "off" (None: the engine's default, apr.engine.speculative)
    draft_model: str | None = None  # with "draft": the drafting model (same vocabulary as the target)
    draft_max: int | None = None  # tokens drafted per pass (None: the mode's default)


@dataclass
class Event:
    token: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    usage: dict | None = None


class Request:
    """One sequence's life: waiting, running in a KV slot, finished. Mutated only by the engine's step."""

    def __init__(self, engine, prompt_ids: list[int], params: SamplingParams, decoder, stop_ids):
        self.id = f"req-{next(_ids)}"
        self.engine, self.prompt_ids, self.params = engine, list(prompt_ids), params
        self.stop_ids = frozenset(params.stop_ids if params.stop_ids is not None else stop_ids)
        self.cached_tokens = 0
        self.constraint = None  # apr.engine.constrain.Constraint, set by the engine
        self.stop_reason: str | None = None
        self.error: str | None = None
        self.prompt_logprobs: list | None = None
        self.tokens: list[int] = []
        self.text = ""
        self.slot: int | None = None
        self.fed = 0  # tokens of prompt + generated whose KV is in the slot
        self._decoder, self._sent = decoder, 0
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._aloop = self._aq = None
        self.t_submit = time.perf_counter()
        self.t_admit = self.t_first = self.t_last = None
        self.decode_steps = -1  # the first token costs the prefill, not a decode step
        self.spec: dict | None = None  # speculation (apr.engine.speculative), set by the engine
        self.passes = self.spec_passes = self.spec_drafted = self.spec_accepted = 0  # decode forwards, drafts

    # ---- caller side ----

    @property
    def finish_reason(self) -> str | None:
        return FINISH.get(self.stop_reason) if self.stop_reason else None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self._cancel.set()
        self.engine._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The events in order, ending with the final one. Without a background loop the caller's thread drives
        the engine's steps (commands); with one (serve) it waits."""
        while True:
            try:
                ev = self._q.get_nowait()
            except queue.Empty:
                if self.done:  # the final event was read before
                    return
                if not self.engine.drive_once():
                    ev = self._q.get(timeout=timeout)
                else:
                    continue
            yield ev
            if ev.finish_reason is not None:
                return

    async def aevents(self) -> AsyncIterator[Event]:
        with self._lock:
            self._aloop, self._aq = asyncio.get_running_loop(), asyncio.Queue()
            while True:  # what came before the handler asked
                try:
                    self._aq.put_nowait(self._q.get_nowait())
                except queue.Empty:
                    break
        while True:
            ev = await self._aq.get()
            yield ev
            if ev.finish_reason is not None:
                return

    def result(self):
        """Block until finished -> apr.generate.GenerationResult (rendered_prompt left empty)."""
        if not self.done:
            for _ in self.events():
                pass
        from apr.generate import GenerationResult

        t_first = self.t_first or time.perf_counter()
        t_last = self.t_last or t_first
        return GenerationResult(self.text, self.tokens, self.prompt_ids, "", self.stop_reason or "error",
                                t_first - (self.t_admit or t_first), t_last - t_first, max(self.decode_steps, 0),
                                self.spec_report())

    def spec_report(self) -> dict | None:
        """Speculation's figures: drafted and accepted tokens, their ratio, and decode tokens per target pass."""
        if self.spec is None:
            return None
        from apr.engine.speculative import ratio

        d = self.spec["drafter"]
        return {"mode": self.spec["mode"], "draft_model": d.name if d else None, "draft_max": self.spec["k"],
                "drafted": self.spec_drafted, "accepted": self.spec_accepted,
                "acceptance_rate": ratio(self.spec_accepted, self.spec_drafted), "passes": self.passes,
                "tokens_per_pass": ratio(max(self.decode_steps, 0), self.passes)}

    # ---- engine side ----

    def _emit(self, ev: Event) -> None:
        with self._lock:
            if self._aloop is not None:
                self._aloop.call_soon_threadsafe(self._aq.put_nowait, ev)
            else:
                self._q.put(ev)

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.tokens),
                "cached_tokens": self.cached_tokens}

    def on_token(self, token: int, logprob=None, top=None) -> bool:
        """Take a sampled token; emit its text. True when the sequence is finished."""
        now = time.perf_counter()
        self.t_first = self.t_first or now
        self.t_last = now
        self.decode_steps += 1
        if token in self.stop_ids:
            self.finish("eos", Event(None, "", logprob, top))
            return True
        self.tokens.append(token)
        new = self._decoder.push(token)  # only whole characters; a partial UTF-8 sequence waits
        # a new match ends in the new text, so it starts at most (longest stop - 1) characters before it
        start = max(0, len(self.text) - self._hold)
        self.text += new
        cut = _stop_at(self.text, self.params.stop, start) if new and self.params.stop else -1
        if cut >= 0:
            self.text = self.text[:cut]
            self.finish("stop", Event(token, "", logprob, top))
            return True
        if len(self.tokens) >= self.params.max_tokens:
            self.finish("length", Event(token, "", logprob, top))
            return True
        ready = len(self.text) - self._hold  # hold back what may be the start of a stop string
        piece = self.text[self._sent:ready] if ready > self._sent else ""
        self._sent = max(self._sent, ready)
        self._emit(Event(token, piece, logprob, top))
        return False

    def finish(self, reason: str, last: Event | None = None, error: str | None = None) -> None:
        if self.done:
            return
        if reason != "stop":  # a stop string cut the text; anything else keeps the decoder's last bytes
            self.text += self._decoder.flush()
        self.stop_reason, self.error = reason, error
        ev = last or Event(None, "")
        ev.text += self.text[self._sent:]
        self._sent = len(self.text)
        ev.finish_reason, ev.usage = FINISH[reason], self.usage()
        self._emit(ev)
        self._done.set()


def _stop_at(text: str, stops: list[str], start: int = 0) -> int:
    """The first position at or after `start` where a stop string begins, or -1."""
    cut = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(cut) if cut else -1
