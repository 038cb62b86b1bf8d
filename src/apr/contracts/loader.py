"""Reading and writing contract YAML: line numbers, duplicate keys, round-trip updates.

ruamel.yaml's round-trip loader keeps comments, key order and each key's line, so errors can point at
`file:line` and `pv discharge` can update a contract without reformatting it. Duplicate keys are found on
the composed node tree (before construction), so every duplicate is reported, not just the first.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark, MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, SequenceNode
from ruamel.yaml.tokens import CommentToken


class ContractError(Exception):
    """A user-facing failure: printed as one line `pv: error: ...`, exit code 2."""

    def __init__(self, message: str, line: int = 0):
        super().__init__(message)
        self.line = line


@dataclass
class Diagnostic:
    file: str
    line: int
    code: str
    severity: str  # "error" | "warning"
    message: str

    def format(self) -> str:
        return f"{self.file}:{self.line}: {self.code} {self.severity}: {self.message}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Loaded:
    path: Path
    text: str
    data: Any  # CommentedMap: the round-trip tree, with line info
    duplicates: list[tuple[int, str]] = field(default_factory=list)  # (line, message)


def _rt(allow_duplicates: bool = False) -> YAML:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = allow_duplicates
    return yaml


def _line(e: YAMLError) -> int:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return mark.line + 1 if mark is not None else 0


def _first_line(e: YAMLError) -> str:
    if isinstance(e, MarkedYAMLError):
        return " ".join(str(s) for s in (e.context, e.problem) if s) or "invalid YAML"
    return str(e).strip().splitlines()[0] if str(e).strip() else "invalid YAML"


def find_duplicates(node: Node | None, where: str = "") -> list[tuple[int, str]]:
    """Every key that repeats in a mapping, anywhere in the tree, with its (1-based) line."""
    found: list[tuple[int, str]] = []
    if isinstance(node, MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value)
            if name in seen:
                found.append((key.start_mark.line + 1, f"duplicate key '{name}'{where} (first at line {seen[name]})"))
            else:
                seen[name] = key.start_mark.line + 1
            found += find_duplicates(value, f" in {name}" if not where else f"{where}.{name}")
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            found += find_duplicates(item, f"{where}[{i}]")
    return found


def read_contract(path: str | Path) -> Loaded:
    """Load a contract file; ContractError (with a line) for unreadable files and bad YAML."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ContractError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ContractError(f"cannot read {path}: {e}") from None
    try:
        duplicates = find_duplicates(_rt().compose(text))
        data = _rt(allow_duplicates=True).load(text)  # duplicates are reported above; keep the first
    except YAMLError as e:
        raise ContractError(f"invalid YAML: {_first_line(e)}", line=_line(e)) from None
    if data is None:
        raise ContractError("empty file: a contract needs metadata and criteria", line=1)
    if not isinstance(data, CommentedMap):
        raise ContractError("a contract must be a YAML mapping with metadata and criteria", line=1)
    return Loaded(path, text, data, duplicates)


def to_plain(data: Any) -> Any:
    """ruamel's comment-carrying types -> plain dict/list/str/int/float for pydantic's strict mode."""
    if isinstance(data, dict):
        return {str(k) if not isinstance(k, (int, float, bool)) else k: to_plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [to_plain(v) for v in data]
    if isinstance(data, bool) or data is None or isinstance(data, (dt.date, dt.datetime)):
        return data
    if isinstance(data, int):
        return int(data)
    if isinstance(data, float):
        return float(data)
    if isinstance(data, str):
        return str(data)
    return str(getattr(data, "value", data))  # tagged scalars and other oddities


def line_of(data: Any, loc: tuple) -> tuple[int, str]:
    """(1-based line, dotted path) of a pydantic error location in the round-trip tree.

    Steps that are not in the data (a missing field, pydantic's own tags) are skipped, except a final
    field name, which is shown in the path; the line is that of the deepest step that exists.
    """
    line, parts, cur = 1, [], data
    for i, step in enumerate(loc):
        if isinstance(cur, CommentedMap) and step in cur:
            line = cur.lc.key(step)[0] + 1
            parts.append(str(step))
            cur = cur[step]
        elif isinstance(cur, CommentedSeq) and isinstance(step, int) and 0 <= step < len(cur):
            line = cur.lc.item(step)[0] + 1
            parts[-1:] = [f"{parts[-1]}[{step}]"] if parts else [f"[{step}]"]
            cur = cur[step]
        elif i == len(loc) - 1 and isinstance(step, str):
            parts.append(step)
    return line, ".".join(parts)


def _block(node: Any) -> bool:
    return isinstance(node, (CommentedMap, CommentedSeq)) and len(node) > 0 and not node.fa.flow_style()


def guess_indent(data: CommentedMap) -> tuple[int, int, int]:
    """(mapping, sequence, offset) as ruamel's YAML.indent() wants them, read off the tree's columns:
    a nested mapping's key column minus its parent key's column, and a block sequence's item column
    minus its key's column (the dash sits 2 columns before the item)."""
    mapping, sequence, todo = None, None, [data]
    while todo and (mapping is None or sequence is None):
        node = todo.pop(0)
        items = node.items() if isinstance(node, CommentedMap) else enumerate(node)
        for key, child in items:
            if not _block(child):
                continue
            todo.append(child)
            if not isinstance(node, CommentedMap):
                continue
            col = node.lc.key(key)[1]
            if isinstance(child, CommentedMap) and mapping is None:
                mapping = child.lc.key(next(iter(child)))[1] - col
            elif isinstance(child, CommentedSeq) and sequence is None:
                sequence = child.lc.item(0)[1] - col
    mapping = mapping if mapping and mapping > 0 else 2
    sequence = sequence if sequence and sequence >= 2 else mapping
    return mapping, sequence, sequence - 2


def load_for_update(path: Path) -> tuple[YAML, Any]:
    """A round-trip tree plus a dumper set to the file's own indentation, so a rewrite changes only
    what the caller changes (comments, key order and quoting survive)."""
    text = path.read_text(encoding="utf-8")
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap long lines
    data = yaml.load(text)
    mapping, sequence, offset = guess_indent(data)
    yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
    return yaml, data


def _last_slot(node: Any) -> tuple[Any, Any, int] | None:
    """(container, key, comment index) of the deepest last scalar in a block collection: where
    ruamel keeps the blank lines and comments that follow the collection in the file."""
    while _block(node):
        key = next(reversed(node)) if isinstance(node, CommentedMap) else len(node) - 1
        if not _block(node[key]):
            return node, key, 2 if isinstance(node, CommentedMap) else 0
        node = node[key]
    return None


def take_trailer(node: Any) -> str:
    """Detach the blank lines/comments after `node` (not its end-of-line comment) and return them."""
    slot = _last_slot(node)
    tokens = slot[0].ca.items.get(slot[1]) if slot else None
    token = tokens[slot[2]] if tokens and len(tokens) > slot[2] else None
    if token is None or "\n" not in token.value:
        return ""
    eol, _, rest = token.value.partition("\n")
    token.value = eol + "\n"
    return rest


def put_trailer(node: Any, rest: str) -> None:
    """Attach `rest` (from take_trailer) after the new last element of `node`, so appending keys or items
    keeps the blank line/comments that separated `node` from what follows."""
    slot = _last_slot(node)
    if not rest or slot is None:
        return
    container, key, index = slot
    tokens = container.ca.items.setdefault(key, [None, None, None, None])
    if tokens[index] is not None:
        tokens[index].value = tokens[index].value.rstrip("\n") + "\n" + rest
    else:
        tokens[index] = CommentToken("\n" + rest, CommentMark(0), None)


def dump(yaml: YAML, data: Any) -> str:
    buf = io.StringIO()
    yaml.dump(data, buf)
    return buf.getvalue()


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same folder + os.replace: readers see the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
