"""Logging set-up, with API keys scrubbed from every line that is written anywhere."""

from __future__ import annotations

import logging
import os

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


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("dbt_klaviyo_sync").setLevel(level.upper())
