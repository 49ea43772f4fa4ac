"""A file of prompts, one a line: read for `pixelrun sample --prompts-file`, sample.prompts_file (the
training grids) and eval.prompts_file (the evaluations), with the same one-line refusals, each
naming the flag or key it came from."""

from __future__ import annotations

from pathlib import Path

from pixelrun.config import ConfigError


def read_prompts_file(path: str, key: str) -> list[str]:
    """The non-blank lines of the UTF-8 text file `path`, stripped, in order. A file that cannot be
    read, is not UTF-8, holds NUL bytes or no prompt at all is a ConfigError naming `key`."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not a UTF-8 text file (one prompt per line)") from None
    if "\x00" in text:
        raise ConfigError(key, f"{path} holds NUL bytes: not a text file of prompts")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(key, f"{path} holds no prompt (one prompt per line)")
    return prompts
