"""The errors that stop pixelrun with one line (pixelrun/cli): ConfigError for a bad config value or flag
(exit code 2), RunFailed for work that cannot go on (exit code 1)."""

from __future__ import annotations


class ConfigError(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class RunFailed(RuntimeError):
    """Work that cannot go on for a reason its message states in one line (the CLI exits 1): a
    training run whose updates stay non-finite, a checkpoint that cannot be written."""
