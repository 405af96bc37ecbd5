"""Typed errors. Each message says what is wrong and what to do about it.

The CLI maps them to exit statuses: a `SyncError` stops the run before anything is sent
(exit 2); a rejected or failed record is never an exception, it is a row in the rejects table.
"""

from __future__ import annotations


class SyncError(Exception):
    """The sync cannot run at all (exit status 2)."""


class ConfigurationError(SyncError):
    """The dbt project, its annotations or the environment are not usable as they are."""


class AnnotationError(ConfigurationError):
    """A model's `klaviyo` meta is invalid; names the model, the column and the fix."""

    def __init__(self, model: str, problem: str, column: str | None = None) -> None:
        where = f"model '{model}'" + (f", column '{column}'" if column else "")
        super().__init__(f"{where}: {problem}")
        self.model = model
        self.column = column


class AnnotationErrors(ConfigurationError):
    """Several annotation problems, reported together so one run shows them all."""

    def __init__(self, problems: list[AnnotationError]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class StateError(SyncError):
    """The state file is locked, damaged or from an unknown version."""


class CredentialsError(SyncError):
    """Klaviyo refused the API key. The message never contains the key itself."""


class ApiUnavailableError(SyncError):
    """Klaviyo could not be reached, or kept failing, so no record can be sent."""


class TransientApiError(Exception):
    """A request failed for a passing reason (429, 5xx, timeout, dropped connection).

    The client retries these; once retries are exhausted, the records involved are left
    pending and sent again on the next run.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
