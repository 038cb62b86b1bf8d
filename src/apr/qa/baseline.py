"""The performance baseline that `performance_regression` compares with.

For ship decisions the baseline is a file committed in the repository, one per machine class
(`qa-baselines/<isa_class>.json`, apr.provenance.isa_class): a speed measured on an AVX2-only machine says
nothing about an AVX-512 one, so a run only ever compares with its own class. `apr qa --baseline DIR`
picks the file of this machine's class; `--baseline FILE` names one (of this class, or the gate fails).
Without --baseline the newest saved run of the same model, dtype and backend is used ($APR_HOME/qa-reports).
No baseline at all is a SKIP, never a pass.

    python -m apr.qa.baseline MODEL DIR   measure decode tok/s as the gate does (the median of 5 runs) and record
                                          it in DIR/<class>.json
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from apr.errors import AprError
from apr.qa.context import Skip

SCHEMA = "apr-qa-baseline-v1"


def _read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AprError(f"baseline {path} is not readable JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("entries"), list):
        raise AprError(f"baseline {path} is not an {SCHEMA} file")
    return doc


def _from_file(spec: str, sha: str, dtype: str, backend: str) -> dict:
    from apr.provenance import isa_class

    isa, path = isa_class(), Path(spec)
    if path.suffix != ".json":  # a folder of <isa_class>.json files (which may not have this class yet)
        path = path / f"{isa}.json"
        if not path.is_file():
            raise Skip(f"no performance baseline for machine class {isa} ({path} does not exist)")
    elif not path.is_file():
        raise AprError(f"baseline file {path} does not exist")
    doc = _read(path)
    if doc.get("isa_class") != isa:
        raise AprError(f"baseline {path} is for machine class {doc.get('isa_class')}, this machine is {isa}")
    for e in doc["entries"]:
        if (e.get("sha256"), e.get("dtype"), e.get("backend")) == (sha, dtype, backend):
            return {"decode_tok_s": float(e["decode_tok_s"]), "source": f"{path.name}, measured {e.get('measured')}"}
    raise Skip(f"{path} has no baseline for this model on {backend}/{dtype}")


def find_baseline(spec: str | None, sha: str, dtype: str, backend: str) -> dict:
    """{decode_tok_s, source}; Skip when there is no baseline to compare with."""
    if spec:
        return _from_file(spec, sha, dtype, backend)
    from apr.qa.report import baseline

    base = baseline(sha, dtype, backend)
    if base is None:
        raise Skip(f"no baseline: no saved run of this model on {backend}/{dtype} (pass --baseline)")
    return {"decode_tok_s": base["decode_tok_s"], "source": f"saved run {base['timestamp']}"}


def record(spec: str, folder: Path) -> dict:
    """Measure decode tok/s the way the gate does and add it to folder/<isa_class>.json."""
    from apr.provenance import provenance
    from apr.qa.context import QAContext, QAOptions
    from apr.qa.gates_live import decode_speed
    from apr.qa.report import now_iso

    ctx = QAContext(spec, QAOptions())
    lm = ctx.lm
    speed = decode_speed(ctx)
    prov = provenance({"dtype": lm.dtype, "backend": lm.backend})
    entry = {"model": Path(lm.path).name, "sha256": lm.sha256, "dtype": lm.dtype, "backend": lm.backend,
             "decode_tok_s": round(speed["decode_tok_s"], 3), "runs_tok_s": speed.get("runs_tok_s"),
             "steps": speed["steps"], "measured": now_iso(),
             "code_fingerprint": prov["code_fingerprint"], "git_commit": prov["git_commit"],
             "git_dirty": prov["git_dirty"], "cpu_model": prov["cpu_model"], "threads": prov["threads"],
             "apr_env": prov["apr_env"]}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prov['isa_class']}.json"
    doc = _read(path) if path.exists() else {"schema": SCHEMA, "isa_class": prov["isa_class"], "entries": []}
    doc["entries"] = [e for e in doc["entries"] if (e.get("sha256"), e.get("dtype"), e.get("backend"))
                      != (entry["sha256"], entry["dtype"], entry["backend"])] + [entry]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return entry


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m apr.qa.baseline MODEL DIR")
    print(json.dumps(record(sys.argv[1], Path(sys.argv[2]))))
