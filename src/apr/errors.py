"""Errors that reach the user as one line and a non-zero exit code."""


class AprError(Exception):
    """A user-facing error: printed as `apr: error: <message>`, never as a traceback."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ModelNotFound(AprError):
    exit_code = 3


class BadModelFile(AprError):
    """A file that is not a GGUF/.apr we can run: truncated, hostile, unsupported."""

    exit_code = 4


class BackendUnavailable(AprError):
    """A forced backend that cannot run here (never silently downgraded)."""

    exit_code = 6


class ContextOverflow(AprError):
    exit_code = 7
