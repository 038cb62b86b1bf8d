"""Run one fuzz target: `python tests/fuzz/run.py TARGET [--seconds S] [--engine atheris|mutate] [-- LIBFUZZER_ARGS]`.

atheris (coverage-guided libFuzzer, `pip install -e .[fuzz]`) is used when it is installed; otherwise a
small mutator over the seed corpus (bit flips, interesting integers, inserts, deletes, splices). Either
way the run ends with a line `executions: N` and exit status 0, or with the failing input saved and a
non-zero status: an exception that is not the project's own, a hang (over --timeout seconds for one
input), or a crash. See docs/fuzzing.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import shutil
import signal
import struct
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to fuzz (default 10)")
    p.add_argument("--timeout", type=int, default=10, help="seconds one input may take before it is a hang")
    p.add_argument("--engine", choices=["auto", "atheris", "mutate"], default="auto")
    p.add_argument("--corpus", default=None, help="corpus dir to grow (default: a temp copy of the seeds)")
    p.add_argument("--artifacts", default=None, help="where failing inputs go (default: a temp dir)")
    p.add_argument("rest", nargs="*", help="extra libFuzzer arguments (after --)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = _args(sys.argv[1:] if argv is None else argv)
    import targets

    if a.target not in targets.TARGETS:
        print(f"unknown target {a.target!r}; targets: {', '.join(targets.TARGETS)}", file=sys.stderr)
        return 2
    corpus = Path(a.corpus or tempfile.mkdtemp(prefix=f"apr-fuzz-{a.target}-"))
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in (HERE / "corpus" / a.target).iterdir():
        shutil.copy(seed, corpus / seed.name)
    artifacts = Path(a.artifacts or tempfile.mkdtemp(prefix="apr-fuzz-artifacts-"))
    engine = a.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "mutate"
    print(f"fuzzing {a.target} with {engine} for {a.seconds:g} s", file=sys.stderr)
    if engine == "atheris":
        return _atheris(a, corpus, artifacts)
    return _mutate(a, targets.TARGETS[a.target], [p.read_bytes() for p in sorted(corpus.iterdir())], artifacts)


def _atheris(a, corpus: Path, artifacts: Path) -> int:
    import atheris

    with atheris.instrument_imports(include=["apr"]):
        import targets

        targets.TARGETS[a.target](b"")  # imports what the target uses, instrumented
    fn = targets.TARGETS[a.target]
    args = [sys.argv[0], f"-max_total_time={max(1, round(a.seconds))}", f"-timeout={a.timeout}",
            "-rss_limit_mb=4096", f"-artifact_prefix={artifacts}/", "-print_final_stats=1", *a.rest, str(corpus)]
    atheris.Setup(args, fn)
    atheris.Fuzz()  # exits the process: 0 when the time is up with no finding
    return 0


INTERESTING = [0, 1, 2, 3, 4, 7, 8, 9, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x10000, 2**31 - 1, 2**31, 2**32 - 1,
               2**32, 2**63 - 1, 2**63, 2**64 - 1]


def _mutation(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:  # flip a bit
            j = rng.randrange(len(b))
            b[j] ^= 1 << rng.randrange(8)
        elif op == 1:  # an interesting integer, 4 or 8 bytes little-endian
            v = rng.choice(INTERESTING)
            w = struct.pack("<Q", v % 2**64) if rng.random() < 0.5 else struct.pack("<I", v % 2**32)
            b[i:i + len(w)] = w
        elif op == 2:  # insert random bytes
            b[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and b:  # delete a run
            del b[i:i + rng.randint(1, 64)]
        elif op == 4 and b:  # duplicate a run
            j = rng.randrange(len(b))
            b[i:i] = b[j:j + rng.randint(1, 256)]
        elif op == 5:  # splice with another input
            other = rng.choice(pool)
            j = rng.randrange(len(other) + 1)
            b = b[:i] + bytearray(other[j:])
    return bytes(b)


def _mutate(a, fn, pool: list[bytes], artifacts: Path) -> int:
    rng = random.Random(int(os.environ.get("APR_FUZZ_SEED", "0")))
    pool = pool or [b""]

    def hang(*_):
        raise TimeoutError(f"one input took more than {a.timeout} s")

    signal.signal(signal.SIGALRM, hang)
    deadline, runs = time.monotonic() + a.seconds, 0
    data = b""
    try:
        # warm-up, not timed: the first call pays the target's imports and lazy set-up (seconds on a loaded
        # box), which is no hang; atheris' path does the same before its timer starts
        data = pool[0]
        fn(data)
        for data in pool:  # every seed first, as is
            signal.alarm(a.timeout)
            fn(data)
            runs += 1
        while time.monotonic() < deadline:
            data = _mutation(rng, rng.choice(pool), pool)
            signal.alarm(a.timeout)
            fn(data)
            signal.alarm(0)
            runs += 1
    except BaseException as e:  # noqa: BLE001  (a finding: keep the input, report, fail)
        signal.alarm(0)
        path = artifacts / f"crash-{hashlib.sha1(data).hexdigest()}"
        path.write_bytes(data)
        import traceback

        traceback.print_exc()
        print(f"finding after {runs} executions: {type(e).__name__}: {e}; input saved to {path}", file=sys.stderr)
        return 1
    signal.alarm(0)
    print(f"executions: {runs}", file=sys.stderr)
    return 0


def executions(stderr: str) -> int | None:
    """The number of executions a run reports (either engine)."""
    m = re.search(r"executions: (\d+)", stderr) or re.search(r"Done (\d+) runs in", stderr) \
        or re.search(r"stat::number_of_executed_units: (\d+)", stderr)
    return int(m.group(1)) if m else None


if __name__ == "__main__":
    sys.exit(main())
