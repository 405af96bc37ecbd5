"""Logging set-up, with API keys scrubbed from every line that is written anywhere."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

KEY_VARIABLES = ("KLAVIYO_PRIVATE_API_KEY", "KLAVIYO_PUBLIC_API_KEY")


def secrets() -> list[str]:
    """The key values in this process's environment, longest first."""
    values = {os.environ.get(name, "") for name in KEY_VARIABLES}
    return sorted((v for v in values if len(v) >= 4), key=len, reverse=True)


def redact(text: str) -> str:
    """Replace any API key in `text` with a marker that says which one it was."""
    for value in secrets():
        text = text.replace(value, "[redacted key]")
    return text


class RedactingFilter(logging.Filter):
    """A last line of defence: our own messages never contain keys, but a library's might."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever `sys.stderr` is when a line is logged, so that lines logged while
    a progress bar is live go above the bar instead of through it."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _: TextIO) -> None:
        pass


#: Our own loggers; everything else is quiet below WARNING.
_OURS = "dbt_klaviyo_sync"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: str = "INFO") -> None:
    """Log to stderr at `level` (DEBUG, INFO, WARNING or ERROR); keys are always scrubbed."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(RedactingFilter())
    handler.setLevel(level.upper())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger(_OURS).setLevel(min(handler.level, logging.INFO))


@contextmanager
def add_log_file(path: Path) -> Iterator[None]:
    """Also log to `path` (appending, at INFO or finer, with times), keys scrubbed, as
    dbt keeps logs/dbt.log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(RedactingFilter())
    ours = logging.getLogger(_OURS)
    level = ours.level
    handler.setLevel(min(ours.getEffectiveLevel(), logging.INFO))
    ours.setLevel(handler.level)  # the Python API may run with logging never configured
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        ours.setLevel(level)
        handler.close()
