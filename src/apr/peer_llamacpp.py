"""`apr parity MODEL llama.cpp`: does a GGUF load in llama.cpp and compute what apr computes? Same text, each
engine's own tokenizer (the two id lists must be identical), then one teacher-forced pass each over apr's ids
and the top-1 next token compared at every position.

llama.cpp runs as llama-cpp-python in its own virtual environment (a benchmark peer, never a dependency of
apr): `--peer-python PATH`, else $APR_LLAMACPP_PYTHON, else the venv `shared/peer/build-llamacpp.sh` makes
(/tmp/venv-llamacpp-*). It sees only the file, the text and the thread count.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import tempfile
from pathlib import Path

from apr.errors import AprError

PEER = r"""
import json, sys
import numpy as np
import llama_cpp
from llama_cpp import Llama
job = json.load(open(sys.argv[1]))
n = len(job["ids"])
llm = Llama(model_path=job["model"], logits_all=True, n_ctx=n + 8, n_batch=min(512, n + 8), n_threads=job["threads"],
            n_threads_batch=job["threads"], verbose=False)
own = llm.tokenize(job["text"].encode("utf-8"), add_bos=False, special=False)
llm.eval(job["ids"])
top1 = np.asarray(llm.scores[:n], dtype=np.float32).argmax(-1).tolist()  # row j predicts ids[j + 1]
print(json.dumps({"tokens": own, "top1": top1, "version": llama_cpp.__version__}))
"""


def find_peer(explicit: str | None = None) -> str:
    cands = [explicit] if explicit else []
    cands += [os.environ.get("APR_LLAMACPP_PYTHON") or ""] + sorted(glob.glob("/tmp/venv-llamacpp*/bin/python"))
    for c in cands:
        if c and Path(c).is_file():
            return c
    raise AprError("llama-cpp-python was not found: build it with `bash shared/peer/build-llamacpp.sh` and pass "
                   "--peer-python VENV/bin/python (or set APR_LLAMACPP_PYTHON)")


def _peer_run(python: str, path: Path, text: str, ids: list[int], threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="apr-peer-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"model": str(path), "text": text, "ids": ids, "threads": threads}))
        r = subprocess.run([python, "-c", PEER, str(job)], capture_output=True, text=True, timeout=1800)
    if r.returncode:
        last = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        raise AprError(f"llama.cpp could not run {path.name}: {last}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def apr_top1(lm, ids: list[int]) -> list[int]:
    from apr.evals.perplexity import forward_sequences

    return forward_sequences(lm.model, ids, 1, len(ids)).argmax(-1).tolist()  # (T, V) -> (T,)


def cross_engine(lm, text: str, max_tokens: int, peer_python: str | None, threads: int) -> dict:
    """Tokenization and top-1 of apr (lm, already loaded) against llama.cpp on the same file and text."""
    python = find_peer(peer_python)
    ids = lm.tokenizer.encode_plain(text)[:max_tokens]
    if len(ids) < 16:
        raise AprError(f"the text has {len(ids)} tokens; the comparison needs at least 16")
    text = lm.tokenizer.decode(ids)  # the text both engines tokenize is exactly the ids' text
    ids = lm.tokenizer.encode_plain(text)
    peer = _peer_run(python, Path(lm.path), text, ids, threads)
    ours = apr_top1(lm, ids)
    same_tok = peer["tokens"] == ids
    first_diff = next((i for i, (a, b) in enumerate(zip(peer["tokens"], ids)) if a != b),
                      None if same_tok else min(len(ids), len(peer["tokens"])))
    agree = sum(a == b for a, b in zip(ours, peer["top1"]))
    return {"model": str(lm.path), "sha256": lm.sha256, "tokens": len(ids), "peer_tokens": len(peer["tokens"]),
            "tokenization_identical": same_tok, "first_token_mismatch": first_diff,
            "top1_agreement": round(agree / len(ids), 5), "top1_agree": agree,
            "apr": {"dtype": lm.dtype, "backend_chain": lm.backend_chain},
            "peer": {"engine": "llama.cpp (llama-cpp-python)", "version": peer["version"], "python": python},
            "threads": threads}
