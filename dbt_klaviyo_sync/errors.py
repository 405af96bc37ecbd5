"""Typed errors. Each message says what is wrong and what to do about it.

One root, two kinds, as dlt has them:
- terminal (`SyncError`): the run, or one model of it, cannot go on as configured; nothing
  more is sent for it, and the exit status is 2. `ModelError` stops only its model: the
  other models go on.
- transient (`TransientApiError`): a request did not get an answer about its records
  (429 beyond the run's patience, 5xx, timeouts, dropped connections, an answer we cannot
  read, an interrupted run). Its records are failed, never rejected, and go again next run.
A rejected record is never an exception: it is a row in the rejects table.
"""

from __future__ import annotations


class KlaviyoSyncError(Exception):
    """The root of every error this package raises on purpose."""


class SyncError(KlaviyoSyncError):
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


class ModelError(SyncError):
    """One model cannot be synced (not built, ephemeral, refused by Klaviyo as a whole,
    over its safety brake): it stops, with this message, and the other models go on."""


class NeverSynced(ConfigurationError):
    """`status` or `rejects` named a model that has no sync recorded in this state (a typo,
    another project, or another state file), in the same words for both."""

    def __init__(self, model: str, synced: list[str]) -> None:
        super().__init__(
            f"model '{model}' has never been synced with this state (synced models: "
            f"{', '.join(sorted(synced)) or 'none'})"
        )


class StateError(SyncError):
    """The state file is locked, damaged or from an unknown version."""


class CredentialsError(SyncError):
    """Klaviyo refused the API key. The message never contains the key itself."""


class ApiUnavailableError(SyncError):
    """Klaviyo could not be reached, or kept failing, so no record can be sent."""


class RedirectRefused(ConfigurationError):
    """Klaviyo's URL answered with a redirect; a sync never follows one (a POST would turn
    into a GET, or its body and key would go to another host)."""


class TransientApiError(KlaviyoSyncError):
    """A request failed for a passing reason (429, 5xx, timeout, dropped connection).

    The client retries these; once retries are exhausted, the records involved are left
    pending and sent again on the next run.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnexpectedAnswer(TransientApiError):
    """Klaviyo answered 2xx without what the operation promises (a job id, a status): we
    cannot tell what became of the records, so they are sent again next run."""


class Interrupted(TransientApiError):
    """The run was asked to stop (SIGINT, SIGTERM): nothing more is sent."""
