"""User-facing errors. The CLI prints each as one line and exits 2 (never a traceback)."""


def first_line(exc: BaseException, limit: int = 300, default: str | None = None) -> str:
    """The first non-blank line of an exception's message (for one-line errors); `default` (else the
    exception's type name) when the message is empty."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__ if default is None else default
    return lines[0][:limit]


class EdgekdError(Exception):
    """Base of every error that is the user's to fix: bad config, data, checkpoint, or a stage failure."""

    exit_code = 2


class ConfigError(EdgekdError):
    """A pipeline or target-profile file is malformed or holds an impossible value."""


class DataError(EdgekdError):
    """A dataset is missing, empty, or does not fit the models."""


class CheckpointError(EdgekdError):
    """A checkpoint is unsafe, corrupt, or for another architecture."""


class StageError(EdgekdError):
    """A stage could not produce its outputs (conversion failed, parity broke, loss diverged...)."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"stage {stage}: {message}")
        self.stage, self.message = stage, message

    def __reduce__(self):  # picklable, so a distributed build can hand a stage's error from rank 0 to the others
        return type(self), (self.stage, self.message)


class LockedError(EdgekdError):
    """Another build holds the run directory."""
