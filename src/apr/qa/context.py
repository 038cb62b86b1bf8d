"""What every gate sees: the model file (read once), the loaded model (loaded once), shared measurements.

Gates return an Outcome or raise Skip (a prerequisite genuinely absent on this machine). Any other
exception is a failure of that gate, reported with its message: a gate never skips because code is missing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from apr.errors import AprError


class Skip(Exception):
    """The gate cannot run here (no GPU, transformers not installed, ...); the message says why."""


@dataclass
class Outcome:
    passed: bool
    message: str
    value: Any = None  # the measured number (or a short string where no single number fits)
    threshold: Any = None


@dataclass
class QAOptions:
    dtype: str | None = None
    backend: str = "auto"
    min_tps: float = 10.0
    quiet: bool = True
    baseline: str | None = None  # a committed baseline file or folder (apr.qa.baseline); None: saved runs


@dataclass
class QAContext:
    spec: str | Path | None
    options: QAOptions = field(default_factory=QAOptions)
    shared: dict = field(default_factory=dict)  # measurements gates reuse (decode tok/s, ...)
    load_s: float | None = None

    def __post_init__(self):
        self._file = self._config = self._lm = self._tok = None
        self._config_error: AprError | None = None
        self._load_error: Exception | None = None

    @classmethod
    def with_model(cls, lm, options: QAOptions | None = None) -> "QAContext":
        """A context around an already loaded model (tests, or a caller that loaded it for other work)."""
        ctx = cls(lm.path, options or QAOptions(dtype=lm.dtype, backend=lm.backend))
        ctx._path, ctx._lm = Path(lm.path), lm
        return ctx

    # -- the file, without running the model --------------------------------------------------------

    @property
    def path(self) -> Path:
        if not hasattr(self, "_path"):
            from apr.hub import resolve_model

            self._path = resolve_model(str(self.spec) if self.spec else None, quiet=self.options.quiet)
        return self._path

    def file(self) -> tuple[dict, dict]:
        """(metadata, raw tensors), memory-mapped: reading tensor data costs nothing until a gate touches it."""
        if self._file is None:
            if self.path.suffix == ".apr":
                from apr.formats.apr import read_apr

                self._config, metadata, tensors = read_apr(self.path)
            else:
                from apr.formats.gguf import config_from_gguf, read_gguf

                g = read_gguf(self.path)
                metadata, tensors = g.metadata, g.tensors
                try:
                    self._config = config_from_gguf(g)
                except AprError as e:  # the gates that need no config (capability_match) still run
                    self._config_error = e
            self._file = (metadata, tensors)
        return self._file

    def config(self):
        self.file()
        if self._config_error is not None:
            raise self._config_error
        return self._config

    def tokenizer(self):
        """The loaded model's tokenizer, or one built from the metadata when no model is loaded."""
        if self._lm is not None:
            return self._lm.tokenizer
        if self._tok is None:
            from apr.tokenizer import Tokenizer

            self._tok = Tokenizer.from_metadata(self.file()[0])
        return self._tok

    def prompt_owner(self):
        """Something `generate.prepare_prompt` accepts (it reads only `.tokenizer`), without loading weights."""
        return self._lm if self._lm is not None else SimpleNamespace(tokenizer=self.tokenizer())

    # -- the model, loaded once ---------------------------------------------------------------------

    def load(self) -> None:
        """Load the model once; a failure is kept and reported by every gate that needs the model."""
        if self._lm is not None or self._load_error is not None:
            return
        from apr.runtime import load_model

        t0 = time.perf_counter()
        try:
            self._lm = load_model(self.path, dtype=self.options.dtype, backend=self.options.backend,
                                  quiet=self.options.quiet)
        except Exception as e:  # noqa: BLE001  (reported per gate; qa must still print its report)
            self._load_error = e
        self.load_s = time.perf_counter() - t0

    @property
    def lm(self):
        self.load()
        if self._load_error is not None:
            e = self._load_error
            raise AprError(f"the model did not load: {type(e).__name__}: {e}")
        return self._lm

    @property
    def loaded(self):
        """The loaded model, or None (gates that can use it but do not need it)."""
        return self._lm

    def sha256(self) -> str:
        if self._lm is not None:
            return self._lm.sha256
        from apr.hub import known_sha256, sha256_file

        return known_sha256(self.path) or sha256_file(self.path)
