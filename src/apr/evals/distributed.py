"""Evals spread over a Ray cluster (`apr eval ... --ray [auto|ADDRESS]`).

One actor per worker holds one loaded model: each resolves the MODEL argument on its own node (a registry
name is pulled there, and the file's sha256 must equal the driver's), so no weights travel through Ray.
Items go to whichever actor is free (a work queue, not fixed shards); results are handed back in item
order, so every eval's own merging, recording and resuming code runs unchanged on top. An actor that dies
loses only the item it was running: that item goes back to the front of the queue for another actor. Each
result names the node and process it ran on.

Every actor runs the same code as the single-process eval on its item, with greedy decoding and no
prefix-cache reuse, so per-item results equal the single-process run's.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections import deque
from types import SimpleNamespace
from typing import Any

from apr.errors import AprError

WAIT_S = 30.0  # ray.wait wakes this often, so a lost cluster is noticed rather than waited on forever
# An actor waits for free CPUs and then loads (maybe pulls) the model; past this it is given up on.
START_TIMEOUT_S = float(os.environ.get("APR_RAY_START_TIMEOUT_S", "1800"))


class _Worker:
    """The actor body: loads the model once, then runs items of any eval on it."""

    def __init__(self, spec: str, sha256: str | None, dtype: str | None, backend: str, threads: int):
        import torch

        from apr.runtime import load_model

        torch.set_num_threads(max(1, threads))
        self.lm = load_model(spec, dtype=dtype, backend=backend, quiet=True)
        if sha256 and self.lm.sha256 != sha256:
            raise AprError(f"{spec} on {socket.gethostname()} has sha256 {self.lm.sha256[:12]}..., "
                           f"the driver's has {sha256[:12]}...")

    def describe(self) -> dict:
        import ray

        lm = self.lm
        return {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
                "pid": os.getpid(), "model_path": str(lm.path), "model_sha256": lm.sha256,
                "is_instruct": bool(lm.is_instruct), "dtype": lm.dtype, "backend": lm.backend}

    def run(self, kind: str, args: tuple) -> Any:
        return RUNNERS[kind](self.lm, *args)


def _humaneval_item(lm, problem: dict, idx: int, temperature: float, max_tokens: int, seed: int):
    from apr.evals import humaneval
    from apr.generate import generate

    sample = humaneval.make_sampler(lm, generate, bool(lm.is_instruct), temperature, max_tokens, seed)
    return sample(problem, idx)


def _syntax_item(lm, prompt: str, max_tokens: int) -> dict:
    from apr.evals import python_syntax
    from apr.generate import generate

    return python_syntax.run(lm, generate, [prompt], max_tokens)["results"][0]


def _perplexity_prepare(lm, text: str, ctx: int):
    from apr.evals import perplexity_run

    return perplexity_run.prepare(lm, text, ctx)


def _perplexity_item(lm, group: list, base_ids: list | None):
    from apr.evals import perplexity as ppl

    return ppl.score_windows(lm, group, ppl.TOP_K, base_ids)


RUNNERS = {"humaneval": _humaneval_item, "python-syntax": _syntax_item, "perplexity-prepare": _perplexity_prepare,
           "perplexity": _perplexity_item}


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A named cluster that does not answer is one error line now, not a long wait inside ray.init."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise AprError(f"--ray wants auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise AprError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def connect(address: str) -> bool:
    """Join the cluster (auto: the one RAY_ADDRESS names, else a new one on this machine). Returns whether
    this call started Ray in this process (and so should shut it down)."""
    try:
        import ray
    except ImportError:
        raise AprError("--ray needs Ray: pip install 'apr[ray]'") from None
    if ray.is_initialized():
        return False
    check_reachable(address)
    import logging

    try:
        ray.init(address=None if address == "auto" else address, include_dashboard=False,
                 logging_level=logging.ERROR, log_to_driver=False, configure_logging=True)
    except Exception as e:  # ConnectionError, an auth error, a version mismatch: Ray's message, one line
        raise AprError(f"cannot join the Ray cluster at {address}: {str(e).strip().splitlines()[0]} (a cluster "
                       "with token auth needs its token here: RAY_AUTH_MODE=token and ~/.ray/auth_token)") from None
    return True


def _lost(e: BaseException) -> bool:
    """Whether an error means the actor (its process or node) is gone, rather than the item failing."""
    import ray.exceptions as rex

    return isinstance(e, (rex.RayActorError, rex.ActorUnavailableError, rex.NodeDiedError, rex.WorkerCrashedError))


def _last_line(e: BaseException) -> str:
    lines = [x for x in str(getattr(e, "cause", None) or e).strip().splitlines() if x.strip()]
    return lines[-1][:300] if lines else type(e).__name__


class Pool:
    """Actors holding the model, and a queue of items for them. `submit` queues an item, `result` waits for
    it (dispatching queued items to free actors meanwhile)."""

    def __init__(self, spec: str, *, actors: int | None = None, cpus: float = 1.0, dtype: str | None = None,
                 backend: str = "auto", sha256: str | None = None):
        import ray

        n = actors or max(1, len([x for x in ray.nodes() if x.get("Alive")]))
        total = ray.cluster_resources().get("CPU", 0)
        if n * cpus > total:  # such actors would wait for CPUs forever
            raise AprError(f"{n} Ray actors of {cpus:g} CPUs need {n * cpus:g} CPUs; the cluster has {total:g}")
        remote = ray.remote(num_cpus=cpus, max_restarts=0)(_Worker)
        pending = [remote.options(scheduling_strategy="SPREAD").remote(spec, sha256, dtype, backend, int(cpus))
                   for _ in range(n)]
        self.actors, self.info, errors = [], {}, []
        deadline = time.monotonic() + START_TIMEOUT_S
        for actor in pending:
            try:
                info = ray.get(actor.describe.remote(), timeout=max(1.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                errors.append(f"not started within {START_TIMEOUT_S:g}s (are the cluster's CPUs taken?)")
                ray.kill(actor)
                continue
            except Exception as e:  # a model that does not load there, or an actor that cannot start
                errors.append(_last_line(e))
                continue
            self.actors.append(actor)
            self.info[actor] = info
        if not self.actors:
            raise AprError(f"no Ray worker could load {spec}: {errors[0] if errors else 'none started'}")
        if errors:
            print(f"apr: {len(errors)} of {n} Ray workers did not start: {errors[0]}", file=sys.stderr)
        shas = {i["model_sha256"] for i in self.info.values()}
        if len(shas) > 1:
            raise AprError(f"the Ray workers loaded different files for {spec} (sha256 {', '.join(sorted(shas))})")
        first = next(iter(self.info.values()))
        self.model = SimpleNamespace(path=first["model_path"], sha256=first["model_sha256"],
                                     is_instruct=first["is_instruct"], dtype=first["dtype"], backend=first["backend"])
        self.free = deque(self.actors)
        self.queue: deque = deque()
        self.jobs: dict[int, tuple] = {}
        self.running: dict = {}  # ObjectRef -> (job id, actor)
        self.done: dict[int, Any] = {}
        self.retried, self.lost = 0, []

    @property
    def size(self) -> int:
        return len(self.free) + len({a for _, a in self.running.values()})

    def submit(self, kind: str, *args) -> int:
        jid = len(self.jobs)
        self.jobs[jid] = (kind, args)
        self.queue.append(jid)
        self._dispatch()
        return jid

    def result(self, jid: int) -> tuple[Any, dict]:
        """(the item's result, where it ran)."""
        while jid not in self.done:
            self._pump()
        return self.done.pop(jid)

    def _dispatch(self) -> None:
        while self.queue and self.free:
            jid, actor = self.queue.popleft(), self.free.popleft()
            kind, args = self.jobs[jid]
            self.running[actor.run.remote(kind, args)] = (jid, actor)

    def _pump(self) -> None:
        import ray

        self._dispatch()
        if not self.running:
            raise AprError("every Ray worker was lost" + (f" (the last: {self.lost[-1]['error']})" if self.lost else ""))
        ready, _ = ray.wait(list(self.running), num_returns=1, timeout=WAIT_S)
        for ref in ready:
            jid, actor = self.running.pop(ref)
            try:
                value = ray.get(ref)
            except Exception as e:
                if not _lost(e):
                    raise AprError(f"item {jid} failed on a Ray worker: {_last_line(e)}") from None
                self._lose(actor, e)
                self.queue.appendleft(jid)  # first in line for the next free actor
                self.retried += 1
                continue
            w = self.info[actor]
            self.done[jid] = (value, {"node_id": w["node_id"], "hostname": w["hostname"], "pid": w["pid"]})
            self.free.append(actor)
        self._dispatch()  # the freed actors start on the queue before the caller looks at the result

    def _lose(self, actor, e: BaseException) -> None:
        w = self.info[actor]
        self.lost.append({"hostname": w["hostname"], "pid": w["pid"], "error": _last_line(e)})
        print(f"apr: Ray worker {w['hostname']}:{w['pid']} was lost ({_last_line(e)}); its item goes to another",
              file=sys.stderr)
        if actor in self.free:
            self.free.remove(actor)

    def report(self, address: str) -> dict:
        """What the evidence keeps of the cluster: each worker, and what was lost and retried."""
        return {"address": address, "workers": [{k: v for k, v in w.items() if k in ("node_id", "hostname", "pid")}
                                                for w in self.info.values()],
                "retried_items": self.retried, "lost_workers": self.lost}

    def close(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass


def open_pool(args) -> tuple[Pool, bool]:
    """Connect as `--ray` says and start the actors for `args.model`. Returns (pool, whether to shut Ray down)."""
    from apr import hub

    if args.ray_actors is not None and args.ray_actors < 1:
        raise AprError("--ray-actors must be at least 1")
    if args.ray_cpus <= 0:
        raise AprError("--ray-cpus must be more than 0")
    owned = connect(args.ray)
    try:
        sha = _driver_sha(args.model, hub)
        return Pool(args.model, actors=args.ray_actors, cpus=args.ray_cpus, dtype=args.dtype, backend=args.backend,
                    sha256=sha), owned
    except BaseException:
        if owned:
            shutdown()
        raise


def _driver_sha(spec: str, hub) -> str | None:
    """The sha256 every worker's file must have: the registry's, or the driver's own copy's. A path that
    exists only on the workers is checked among them (they must agree)."""
    if spec in hub.REGISTRY:
        return hub.REGISTRY[spec].sha256
    path = os.path.expanduser(spec)
    return hub.sha256_file(path) if os.path.isfile(path) else None


def shutdown() -> None:
    import ray

    ray.shutdown()


def humaneval_sampler(pool: Pool, temperature: float, max_tokens: int, seed: int):
    """A HumanEval sampler (see humaneval.make_sampler) whose items run on the pool; its info says where."""
    def start(problem: dict, idx: int):
        jid = pool.submit("humaneval", problem, idx, temperature, max_tokens, seed)

        def finish() -> tuple[str, dict]:
            (text, info), where = pool.result(jid)
            return text, {**info, "worker": where}

        return finish

    def sample(problem: dict, idx: int):
        return start(problem, idx)()

    sample.start = start
    return sample


def python_syntax(pool: Pool, prompts: list[str], max_tokens: int) -> dict:
    """The python-syntax body of python_syntax.run, its items run on the pool, with one progress bar."""
    from tqdm import tqdm

    jobs = [pool.submit("python-syntax", p, max_tokens) for p in prompts]
    results = []
    for jid in tqdm(jobs, desc="python-syntax", file=sys.stderr, disable=None):
        value, where = pool.result(jid)
        results.append({**value, "worker": where})
    n_ok = sum(r["ok"] for r in results)
    return {"prompt_style": "chat" if pool.model.is_instruct else "completion", "n_prompts": len(results),
            "n_ok": n_ok, "pass_rate": round(n_ok / len(results), 6) if results else 0.0, "results": results}


def perplexity(pool: Pool, text: str, ctx: int, batch: int | None = None, save_logits: str | None = None,
               kl_base: str | None = None) -> dict:
    """perplexity_run.run with its batches of windows scored on the pool: the same groups of windows as the
    single-process run (so the same forwards), merged and reduced by the same functions, the base's log-probs
    saved as each batch lands (an interrupted run resumes) or compared with. Each batch names its worker."""
    from tqdm import tqdm

    from apr.evals import logits_file
    from apr.evals import perplexity as ppl
    from apr.evals import perplexity_run

    if save_logits and kl_base:
        raise AprError("give --save-logits (score the base) or --kl-base (compare with it), not both")
    batch = batch or perplexity_run.default_batch(ctx)
    if batch < 1:
        raise AprError("--batch must be at least 1")
    (wins, header), _ = pool.result(pool.submit("perplexity-prepare", text, ctx))  # tokenized on a worker
    n = ppl.n_scored(ctx)
    base = perplexity_run._base(kl_base, header) if kl_base else None
    parts = logits_file.Parts(save_logits, header) if save_logits else None
    done = parts.load() if parts else {}
    if parts:
        parts.start()
    todo = [w for w in wins if w.index not in done]
    groups = [todo[at:at + batch] for at in range(0, len(todo), batch)]
    jobs = [pool.submit("perplexity", g, [base["top_ids"][w.index * n:(w.index + 1) * n] for w in g] if base else None)
            for g in groups]
    scores, running, shards, t0 = dict(done), ppl.Running(), [], time.perf_counter()
    for i in sorted(done):
        running.add(done[i].nll)
    bar = tqdm(total=len(wins), initial=len(done), desc="perplexity", unit="window", file=sys.stderr, disable=None)
    for group, jid in zip(groups, jobs):
        got, where = pool.result(jid)
        for sc in got:
            scores[sc.index] = sc
            running.add(sc.nll)
            if parts:
                parts.add(sc)
        shards.append({"windows": [w.index for w in group], **where})
        bar.set_postfix_str(f"ppl {running.text()}")
        bar.update(len(group))
    bar.close()
    wall = time.perf_counter() - t0
    return {**perplexity_run.finish(ctx, batch, wins, done, todo, wall, header, scores, parts, save_logits, base,
                                    kl_base), "shards": shards}
