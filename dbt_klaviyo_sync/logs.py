"""API keys: read from the environment in one place, and scrubbed from every text that is
written anywhere (logs, errors, rejects), whatever form they come back in."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import orjson

from dbt_klaviyo_sync.errors import ConfigurationError

KEY_VARIABLES = ("KLAVIYO_PRIVATE_API_KEY", "KLAVIYO_PUBLIC_API_KEY")
REDACTED = "[redacted key]"
#: Anything shaped like a private key, whether or not it is ours.
_PRIVATE_KEY_SHAPE = re.compile(r"pk_\w{6,}")
#: The credential after an authorization scheme, as a server or proxy may echo it back.
_AFTER_SCHEME = re.compile(
    r"\b(Klaviyo-API-Key|Bearer)(\s+)(?!" + re.escape(REDACTED) + r")[^\s\"',;]+", re.IGNORECASE
)
#: What a key may hold: printable ASCII without spaces (it travels in a header).
_KEY_CHARACTERS = re.compile(r"[\x21-\x7e]+")


def checked_key(name: str, value: str | None) -> str | None:
    """`value` without surrounding whitespace (the trailing newline of a Kubernetes secret,
    the \\r of a CRLF .env file), or None when empty. Whitespace, control or non-ASCII
    characters inside it are refused with an error that names `name`, never the value."""
    value = (value or "").strip()
    if not value:
        return None
    if not _KEY_CHARACTERS.fullmatch(value):
        raise ConfigurationError(
            f"{name} has a space, a control character or a non-ASCII character inside it; "
            "set it to the key alone, as Klaviyo shows it (the value is not shown here)."
        )
    return value


def api_key(name: str) -> str | None:
    """The key in environment variable `name` (see `checked_key`); None when unset."""
    return checked_key(name, os.environ.get(name))


def secrets() -> list[str]:
    """The key values in this process's environment, longest first."""
    values = {(os.environ.get(name) or "").strip() for name in KEY_VARIABLES}
    return sorted((v for v in values if len(v) >= 4), key=len, reverse=True)


def redact(text: str, keys: Iterable[str | None] = ()) -> str:
    """`text` with every API key replaced by a marker: the keys in the environment and
    `keys` (longest first), anything shaped like a private key, and the credential after
    `Klaviyo-API-Key ` or `Bearer `."""
    known = {*secrets(), *(key for key in keys if key and len(key) >= 4)}
    for value in sorted(known, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    text = _AFTER_SCHEME.sub(lambda found: found[1] + found[2] + REDACTED, text)
    return _PRIVATE_KEY_SHAPE.sub(REDACTED, text)


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


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors: time (UTC), level, logger, message,
    and the traceback when there is one. The message is the one RedactingFilter scrubbed."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(entry).decode()


#: The CLI's choice of format (--log-format), for stderr and the log file alike.
_log_format = "text"


def _formatter(text_format: str) -> logging.Formatter:
    return JsonFormatter() if _log_format == "json" else logging.Formatter(text_format)


def configure(level: str | None = None, log_format: str | None = None) -> None:
    """Log to stderr at `level` (DEBUG, INFO, WARNING or ERROR; as before when None), as
    text or as JSON lines (`log_format`, as before when None); keys are always scrubbed."""
    global _log_format
    _log_format = (log_format or _log_format).lower()
    before = [h.level for h in logging.getLogger().handlers if isinstance(h, _StderrHandler)]
    handler = _StderrHandler()
    handler.setFormatter(_formatter("%(message)s"))
    handler.addFilter(RedactingFilter())
    handler.setLevel(level.upper() if level else (before[0] if before else logging.INFO))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger(_OURS).setLevel(min(handler.level, logging.INFO))


@contextmanager
def root_logger_kept() -> Iterator[None]:
    """Leave the root logger as the host application set it. dbt's dependencies configure
    it when first imported (snowplow_tracker calls `logging.basicConfig()`), which in an
    orchestrator's process would print every library's warnings, and ours, to stderr."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@contextmanager
def add_log_file(path: Path) -> Iterator[None]:
    """Also log to `path` (appending, at INFO or finer, with times), keys scrubbed, as
    dbt keeps logs/dbt.log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(_formatter(_FORMAT))
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
