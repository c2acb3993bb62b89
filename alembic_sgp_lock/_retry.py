"""Retry of a whole migration attempt on transient errors, with exponential backoff.

The ``backoff`` library drives the loop. Its own ``max_time`` reads the wall
clock, so the overall deadline here is kept on ``time.monotonic()`` instead:
the wait generator never sleeps past it and the give-up test checks it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import backoff
from sqlalchemy import exc as sa_exc

from ._errors import (
    DdlLockTimeoutError,
    LockTimeoutError,
    MigrationLockError,
    RetriesExhaustedError,
)
from ._log import logger
from ._settings import Settings

# SQLSTATE codes retried on PostgreSQL besides class 08 (connection exception):
# serialization failure, deadlock, lock_not_available (lock_timeout), and the
# server shutting down or starting.
POSTGRES_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57P01", "57P02", "57P03"})
# Texts of PostgreSQL's connection refusals (libpq reports them without
# SQLSTATE): database or role missing, authentication failed, host rejected.
POSTGRES_PERMANENT_REFUSALS = (
    "does not exist",
    "password authentication failed",
    "no pg_hba.conf entry",
)
# MySQL and MariaDB error numbers retried: lock wait timeout, deadlock, and
# cannot connect, server gone away, connection lost during a query.
MYSQL_TRANSIENT_ERRORS = frozenset({1205, 1213, 2003, 2006, 2013})


@dataclass
class Attempt:
    """Record of one attempt, used to decide whether its error may be retried."""

    number: int
    deadline: float
    migrations_started: bool = False
    transactional_ddl: bool = True

    def remaining(self) -> float:
        """Return the seconds left before the overall deadline, never negative."""
        return max(0.0, self.deadline - time.monotonic())


def is_transient(error: BaseException) -> bool:
    """Tell whether ``error`` is worth another attempt after a delay."""
    if isinstance(error, (LockTimeoutError, DdlLockTimeoutError)):
        return True
    if isinstance(error, MigrationLockError):
        return False
    if not isinstance(error, sa_exc.DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    original = error.orig
    sqlstate = getattr(original, "pgcode", None) or getattr(original, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate.startswith("08") or sqlstate in POSTGRES_TRANSIENT_SQLSTATES
    if hasattr(original, "pgcode") or hasattr(original, "sqlstate"):
        # A PostgreSQL driver error without SQLSTATE: could not connect, or the
        # connection was lost. The server's refusals of a wrong database, role
        # or password arrive the same way and never heal by waiting.
        message = str(original)
        if any(refusal in message for refusal in POSTGRES_PERMANENT_REFUSALS):
            return False
        return isinstance(error, sa_exc.OperationalError)
    arguments = getattr(original, "args", ())
    if arguments and isinstance(arguments[0], int):
        return arguments[0] in MYSQL_TRANSIENT_ERRORS
    return isinstance(error, sa_exc.OperationalError) and "database is locked" in str(original)


def may_retry(error: BaseException, attempt: Attempt) -> bool:
    """Tell whether the attempt that raised ``error`` may run again."""
    if not is_transient(error):
        return False
    # NOTE: a revision that used autocommit_block() may have committed part of
    # its work even on PostgreSQL; that case is not detected here yet.
    return not (attempt.migrations_started and not attempt.transactional_ddl)


def _delays(base_seconds: float, deadline: float) -> Generator[float, Any, None]:
    # Full jitter: a uniform delay up to base * 2**n, never past the deadline.
    yield  # type: ignore[misc]
    exponent = 0
    while True:
        ceiling = base_seconds * 2**exponent
        exponent = min(exponent + 1, 32)
        yield min(random.uniform(0, ceiling), max(0.0, deadline - time.monotonic()))


def _summary(error: BaseException) -> str:
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first_line}"


def run_with_retries(run_attempt: Callable[[Attempt], None], settings: Settings) -> None:
    """Call ``run_attempt`` until it succeeds, retrying transient errors.

    At most ``settings.max_retries`` retries follow the first attempt, and no
    attempt starts after ``settings.max_wait_time`` seconds. Raises the error
    itself when it is not transient or there was a single attempt, else
    :class:`RetriesExhaustedError` with the last error as its cause.
    """
    started = time.monotonic()
    deadline = started + settings.max_wait_time
    attempts: list[Attempt] = []
    lock_timeouts: list[LockTimeoutError] = []

    def give_up(error: Exception) -> bool:
        return not may_retry(error, attempts[-1]) or time.monotonic() >= deadline

    def log_retry(details: Any) -> None:
        logger.warning(
            "Attempt %d of %d failed: %s; retrying in %.2f s",
            details["tries"],
            settings.max_retries + 1,
            _summary(details["exception"]),
            details["wait"],
        )

    @backoff.on_exception(
        lambda: _delays(settings.retry_backoff, deadline),
        Exception,
        max_tries=settings.max_retries + 1,
        giveup=give_up,
        jitter=None,
        on_backoff=log_retry,
        logger=None,
    )
    def attempt_once() -> None:
        attempt = Attempt(number=len(attempts) + 1, deadline=deadline)
        attempts.append(attempt)
        try:
            run_attempt(attempt)
        except LockTimeoutError as error:
            lock_timeouts.append(error)
            raise

    try:
        attempt_once()
    except Exception as error:
        elapsed = time.monotonic() - started
        if len(attempts) > 1 and is_transient(error) and may_retry(error, attempts[-1]):
            exhausted = RetriesExhaustedError(len(attempts), elapsed, error, lock_timeouts)
            logger.error(
                "Giving up after %d attempt(s) in %.1f s: %s",
                len(attempts),
                elapsed,
                exhausted.summary,
            )
            raise exhausted from error
        raise
