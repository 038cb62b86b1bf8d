"""The ship-contract schema (pydantic) and its verdict language.

Every model forbids unknown keys and runs in strict mode, so a typo or a wrong type is an error, never a
silently ignored field. Custom error types (`semver`, `verdict`, ...) map to the PV-E codes in validate.py.

The verdict language is deliberately tiny and has no eval: a clause is `{path, op, value}`, where `path`
is a JSON path into the check command's JSON output (`$`, `.key`, `[3]`, `["odd key"]`) and `op` is one of
OPS. A verdict is one clause or a list of clauses; all must hold.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

STATUSES = ("UNTESTED", "PARTIAL_ALGORITHM_LEVEL", "DISCHARGED", "FALSIFIED", "BLOCKED")
Status = Literal["UNTESTED", "PARTIAL_ALGORITHM_LEVEL", "DISCHARGED", "FALSIFIED", "BLOCKED"]
CONTRACT_STATUSES = Literal["draft", "active", "shipped", "deprecated"]
ORDER_OPS = (">=", "<=", ">", "<")
OPS = ("==", "!=", *ORDER_OPS, "contains", "matches")
# Programs a check may run: apr/pv run through this Python's console scripts; python is for tests
# and one-off probes (validate warns about it), anything else is refused so a contract is not a shell.
PROGRAMS = ("apr", "pv", "python", "python3")

SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
CRITERION_ID = re.compile(r"^[A-Z][A-Z0-9]*(-[A-Z0-9]+)*-\d{3,}$")
_PATH_TOKEN = re.compile(r"""\.([A-Za-z_][A-Za-z0-9_-]*)|\[(-?\d+)\]|\[(?:"([^"]*)"|'([^']*)')\]""")


def _err(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, message)


def parse_path(path: str) -> list[str | int]:
    """`$.a[0]["b c"]` -> ['a', 0, 'b c']; ValueError on anything else."""
    if not isinstance(path, str) or not path.startswith("$"):
        raise ValueError(f"JSON path must start with '$': {path!r}")
    steps: list[str | int] = []
    pos = 1
    while pos < len(path):
        m = _PATH_TOKEN.match(path, pos)
        if not m:
            raise ValueError(f"bad JSON path {path!r} at position {pos}")
        name, index, dq, sq = m.groups()
        steps.append(int(index) if index is not None else next(s for s in (name, dq, sq) if s is not None))
        pos = m.end()
    return steps


_MISSING = object()


def resolve_path(doc: Any, path: str) -> Any:
    """The value at `path` in `doc`, or _MISSING when a step does not exist."""
    cur = doc
    for step in parse_path(path):
        if isinstance(step, int) and isinstance(cur, list) and -len(cur) <= step < len(cur):
            cur = cur[step]
        elif isinstance(step, str) and isinstance(cur, dict) and step in cur:
            cur = cur[step]
        else:
            return _MISSING
    return cur


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not (isinstance(x, float) and math.isnan(x))


def _equal(a: Any, b: Any) -> bool:
    # true must not equal 1: compare bools only with bools, numbers by value, the rest structurally
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if _is_number(a) and _is_number(b):
        return a == b
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def apply_op(observed: Any, op: str, value: Any) -> bool:
    if op == "==":
        return _equal(observed, value)
    if op == "!=":
        return not _equal(observed, value)
    if op in ORDER_OPS:
        if not (_is_number(observed) and _is_number(value)):
            return False
        return {">=": observed >= value, "<=": observed <= value, ">": observed > value, "<": observed < value}[op]
    if op == "contains":
        if isinstance(observed, str):
            return isinstance(value, str) and value in observed
        return isinstance(observed, list) and any(_equal(item, value) for item in observed)
    if op == "matches":
        return isinstance(observed, str) and re.search(value, observed) is not None
    raise ValueError(f"unknown op {op!r}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


ISA_CLASSES = ("baseline", "avx2", "avx512", "amx")


class Clause(Strict):
    path: str
    op: str
    value: Any
    # a clause that holds only for runs on this machine class (apr.provenance.isa_class); clauses for
    # other classes are not applicable, and a run on a class no clause names fails (see discharge.py)
    isa_class: Literal["baseline", "avx2", "avx512", "amx"] | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        try:
            parse_path(v)
        except ValueError as e:
            raise _err("verdict", str(e)) from None
        return v

    @field_validator("op")
    @classmethod
    def _op(cls, v: str) -> str:
        if v not in OPS:
            raise _err("verdict", f"unknown op {v!r}; use one of {', '.join(OPS)}")
        return v

    @model_validator(mode="after")
    def _value_fits_op(self) -> "Clause":
        if self.op in ORDER_OPS and not _is_number(self.value):
            raise _err("verdict", f"op {self.op!r} needs a number as value, got {self.value!r}")
        if self.op == "matches":
            try:
                re.compile(self.value)
            except (re.error, TypeError) as e:
                raise _err("verdict", f"'matches' needs a valid regular expression: {e}") from None
        return self

    def evaluate(self, doc: Any) -> tuple[bool, Any]:
        """(holds, observed); a missing path never holds and is observed as None."""
        observed = resolve_path(doc, self.path)
        if observed is _MISSING:
            return False, None
        return apply_op(observed, self.op, self.value), observed

    def describe(self) -> str:
        where = f" [on {self.isa_class}]" if self.isa_class else ""
        return f"{self.path} {self.op} {json.dumps(self.value)}{where}"

    def detail(self, observed: Any) -> str:
        """The line a verdict step records (pv discharge writes it, pv validate checks it against the raw output)."""
        return f"{self.describe()} (observed {json.dumps(observed)})"


class Check(Strict):
    command: str
    verdict: list[Clause] = Field(min_length=1)
    timeout_s: float | None = Field(default=None, gt=0)

    @field_validator("verdict", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v  # one clause or a list of clauses

    @field_validator("command")
    @classmethod
    def _command(cls, v: str) -> str:
        try:
            argv = shlex.split(v)
        except ValueError as e:
            raise _err("command", f"check command does not parse: {e}") from None
        if not argv or argv[0] not in PROGRAMS:
            first = argv[0] if argv else ""
            raise _err("command", f"check command must start with one of {', '.join(PROGRAMS)}, not {first!r}")
        return v


class LiveDischarge(Strict):
    date: str
    host: str
    cpu: str | None = None
    gpu: str | None = None
    artifact: str
    artifact_sha256: str
    command: str
    wall_time_s: float
    backend_chain: list[str] = []
    apr_version: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None
    code_fingerprint: str | None = None
    isa_class: str | None = None
    observed: Any = None
    verdict: Literal["PASS", "FAIL"]

    @field_validator("date", mode="before")
    @classmethod
    def _date(cls, v: Any) -> Any:
        return v.isoformat() if hasattr(v, "isoformat") else v  # YAML turns 2025-06-01 into a date

    @field_validator("backend_chain", mode="before")
    @classmethod
    def _chain(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class Criterion(Strict):
    id: str
    rule: str = Field(min_length=1)
    prediction: str
    test: list[str] | None = None
    falsified_by: list[str] | None = None  # tests that plant the fault and see this check come out FALSIFIED
    check: Check
    if_fails: str | None = None
    ship_blocking: bool = True
    # a gate comes before everything else: until it is DISCHARGED on fresh evidence, no other criterion of the
    # model counts towards its ship % (a student whose validation loss is not below its base's ships nothing)
    gate: bool = False
    discharge_status: Status = "UNTESTED"
    evidence_discharged_by: list[str] = []
    live_discharge: LiveDischarge | None = None

    @model_validator(mode="after")
    def _gate_blocks(self) -> "Criterion":
        if self.gate and not self.ship_blocking:
            raise _err("gate", f"{self.id}: a gate must be ship_blocking")
        return self

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not CRITERION_ID.match(v):
            raise _err("criterion_id", f"criterion id {v!r} is not like SHIP-001")
        return v

    @field_validator("prediction", mode="before")
    @classmethod
    def _prediction(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and not v.strip()):
            raise _err("empty_prediction", "prediction is empty: say what observation would falsify the rule")
        return v

    @field_validator("test", "falsified_by", mode="before")
    @classmethod
    def _test(cls, v: Any) -> Any:
        if v is None:
            return v
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(t, str) and is_node_id(t) for t in items):
            raise _err("test_binding", f"test must be a pytest node id (tests/test_x.py::test_y) or a list of them, got {v!r}")
        return items


class ModelRef(Strict):
    name: str = Field(min_length=1)
    artifact_sha256: str

    @field_validator("artifact_sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        if not SHA256.match(v):
            raise _err("sha256", f"artifact_sha256 must be 64 lowercase hex digits, got {v!r}")
        return v


class Metadata(Strict):
    version: str
    description: str = Field(min_length=1)
    references: list[str] = []
    model: ModelRef
    status: CONTRACT_STATUSES = "draft"
    changelog: list[str] = []

    @field_validator("version", mode="before")
    @classmethod
    def _semver(cls, v: Any) -> Any:
        if not isinstance(v, str) or not SEMVER.match(v):
            raise _err("semver", f"version must be semver MAJOR.MINOR.PATCH (quote it in YAML), got {v!r}")
        return v


class Contract(Strict):
    metadata: Metadata
    criteria: list[Criterion] = Field(min_length=1)


def is_node_id(binding: str) -> bool:
    """`path/to/test_x.py` or `path/to/test_x.py::Class::test[param]`."""
    file, *rest = binding.split("::")
    return file.endswith(".py") and not any(c.isspace() for c in file) and all(part for part in rest)


def bump_patch(version: str) -> str:
    major, minor, patch = SEMVER.match(version).groups()[:3]
    return f"{major}.{minor}.{int(patch) + 1}"
