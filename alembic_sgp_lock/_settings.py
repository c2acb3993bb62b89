"""Settings read once from ``MIGRATION_*`` environment variables and validated up front."""

from __future__ import annotations

import math
import os
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from ._errors import InvalidSettingError

TRUE_SPELLINGS = frozenset({"1", "true", "yes", "on"})
FALSE_SPELLINGS = frozenset({"0", "false", "no", "off"})
BOOLEAN_HELP = "use one of true, false, 1, 0, yes, no, on, off (case-insensitive)"
# A table name that needs no quoting on PostgreSQL, MySQL and SQLite alike.
TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
CHECKSUM_MISMATCH_POLICIES = ("warn", "fail")
UNKNOWN_REVISION_POLICIES = ("fail", "skip")
LOCK_MODES = ("session", "transaction")
# PostgreSQL stores lock_timeout and statement_timeout as an int of milliseconds.
SERVER_TIMEOUT_MAX_SECONDS = (2**31 - 1) // 1000
# The exact forms of numbers, in ASCII digits only. Python's int() and float()
# also accept surrounding whitespace, digits of other scripts (such as
# full-width ones), signs, underscores, exponents and "inf", none of which the
# README allows. A "\d" would match those digits too, so the classes are spelled out.
WHOLE_NUMBER = re.compile(r"[0-9]+")
DECIMAL_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


@dataclass(frozen=True)
class Settings:
    """Validated settings of one migration run.

    Times are in seconds. ``retry_backoff`` is stored in seconds although its
    environment variable is given in milliseconds.
    """

    run_migrations: bool = True
    max_retries: int = 3
    lock_timeout: float = 30.0
    max_wait_time: float = 60.0
    retry_backoff: float = 1.0
    lock_enabled: bool = True
    lock_name: str | None = None
    ledger: bool = False
    ledger_table: str = "alembic_sgp_ledger"
    on_checksum_mismatch: str = "warn"
    #: What an upgrade does when the database contains a revision that the
    #: scripts do not: ``fail``, or ``skip`` (log a warning, migrate nothing).
    on_unknown_revision: str = "fail"
    marker_table: str = "alembic_sgp_lock_in_progress"
    #: PostgreSQL ``lock_timeout`` while migrating; None leaves the server's value.
    ddl_lock_timeout: float | None = None
    #: PostgreSQL ``statement_timeout`` while migrating; None leaves the server's value.
    statement_timeout: float | None = None
    #: URL that replaces the configured one for migrations, such as a direct URL past a pooler.
    database_url: str | None = None
    #: ``session`` (a session-level lock) or ``transaction`` (one transaction-scoped lock).
    lock_mode: str = "session"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from ``environ`` (default: ``os.environ``).

        An unset variable takes its default. A set one, even if empty, must be
        valid. Raises :class:`InvalidSettingError` naming the first invalid one.
        """
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            run_migrations=_boolean(env, "RUN_MIGRATIONS", defaults.run_migrations),
            max_retries=_count(env, "MIGRATION_MAX_RETRIES", defaults.max_retries),
            lock_timeout=_seconds(
                env, "MIGRATION_LOCK_TIMEOUT", defaults.lock_timeout, allow_zero=True
            ),
            max_wait_time=_seconds(
                env, "MIGRATION_MAX_WAIT_TIME", defaults.max_wait_time, allow_zero=False
            ),
            retry_backoff=_milliseconds(env, "MIGRATION_RETRY_BACKOFF", defaults.retry_backoff),
            lock_enabled=_boolean(env, "MIGRATION_LOCK", defaults.lock_enabled),
            lock_name=_lock_name(env, "MIGRATION_LOCK_NAME"),
            ledger=_boolean(env, "MIGRATION_LEDGER", defaults.ledger),
            ledger_table=_table_name(env, "MIGRATION_LEDGER_TABLE", defaults.ledger_table),
            on_checksum_mismatch=_choice(
                env,
                "MIGRATION_ON_CHECKSUM_MISMATCH",
                CHECKSUM_MISMATCH_POLICIES,
                defaults.on_checksum_mismatch,
            ),
            on_unknown_revision=_choice(
                env,
                "MIGRATION_ON_UNKNOWN_REVISION",
                UNKNOWN_REVISION_POLICIES,
                defaults.on_unknown_revision,
            ),
            marker_table=_table_name(env, "MIGRATION_MARKER_TABLE", defaults.marker_table),
            ddl_lock_timeout=_server_timeout(env, "MIGRATION_DDL_LOCK_TIMEOUT"),
            statement_timeout=_server_timeout(env, "MIGRATION_STATEMENT_TIMEOUT"),
            database_url=_database_url(env, "MIGRATION_DATABASE_URL"),
            lock_mode=_lock_mode(env, "MIGRATION_LOCK_MODE", defaults.lock_mode),
        )


def parse_boolean(name: str, raw: str) -> bool:
    """Parse ``raw`` with the one set of boolean spellings that every setting accepts."""
    value = raw.lower()
    if value in TRUE_SPELLINGS:
        return True
    if value in FALSE_SPELLINGS:
        return False
    raise _invalid(name, raw, BOOLEAN_HELP)


def _invalid(name: str, raw: str, accepted: str) -> InvalidSettingError:
    """Build the error for ``raw``, naming any surrounding whitespace or non-ASCII character.

    Both are easy to miss in the quoted value, such as a trailing space or a
    full-width digit that looks like an ASCII one.
    """
    if raw != raw.strip():
        accepted += "; remove the whitespace around the value"
    foreign = next((character for character in raw if not character.isascii()), None)
    if foreign is not None:
        code_point = f"U+{ord(foreign):04X}"
        name_of_character = unicodedata.name(foreign, "")
        described = f"{code_point} {name_of_character}" if name_of_character else code_point
        accepted += f"; use ASCII characters only, because the value contains {described}"
    return InvalidSettingError(name, raw, accepted)


def _boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    return default if raw is None else parse_boolean(name, raw)


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    accepted = "use a whole number of 0 or more, such as 3"
    if not WHOLE_NUMBER.fullmatch(raw):
        raise _invalid(name, raw, accepted)
    try:
        return int(raw)
    except ValueError:
        # More digits than int() converts by default (sys.get_int_max_str_digits(),
        # 4300 since Python 3.11 and 3.10.7).
        raise InvalidSettingError(name, raw, accepted) from None


def _number(env: Mapping[str, str], name: str, accepted: str) -> float | None:
    """Parse a number of 0 or more, such as 2.5, or return None when ``name`` is unset."""
    raw = env.get(name)
    if raw is None:
        return None
    if not DECIMAL_NUMBER.fullmatch(raw):
        raise _invalid(name, raw, accepted)
    value = float(raw)
    # A number above about 1.8e308, which has 309 digits, overflows to inf.
    if not math.isfinite(value):
        raise InvalidSettingError(name, raw, accepted)
    return value


def _seconds(env: Mapping[str, str], name: str, default: float, *, allow_zero: bool) -> float:
    if allow_zero:
        accepted = "use a number of seconds of 0 or more, such as 30 (0 tries once, no wait)"
    else:
        accepted = "use a number of seconds greater than 0, such as 60"
    value = _number(env, name, accepted)
    if value is None:
        return default
    if value == 0 and not allow_zero:
        raise InvalidSettingError(name, env[name], accepted)
    return value


def _milliseconds(env: Mapping[str, str], name: str, default_seconds: float) -> float:
    accepted = "use a number of milliseconds of 0 or more, such as 1000"
    value = _number(env, name, accepted)
    if value is None:
        return default_seconds
    return value / 1000.0


def _lock_name(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name)
    if raw is None:
        return None
    if not raw.strip() or raw != raw.strip():
        raise _invalid(
            name, raw, "use a non-empty name, or unset it to name the lock after the version table"
        )
    return raw


def _table_name(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name)
    if raw is None:
        return default
    if not TABLE_NAME.fullmatch(raw):
        raise InvalidSettingError(
            name,
            raw,
            "use 1 to 63 letters, digits or underscores, not starting with a digit, "
            f"such as {default}",
        )
    return raw


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.lower()
    if value not in choices:
        raise _invalid(name, raw, f"use one of {', '.join(choices)} (case-insensitive)")
    return value


def _server_timeout(env: Mapping[str, str], name: str) -> float | None:
    # 0 and "off" switch the timeout off, as 0 does in PostgreSQL itself.
    accepted = (
        "use a number of seconds from 0.001 to "
        f"{SERVER_TIMEOUT_MAX_SECONDS}, such as 5, or 0 or off to switch it off"
    )
    raw = env.get(name)
    if raw is None or raw.lower() == "off":
        return None
    value = _number(env, name, accepted)
    assert value is not None
    if value == 0:
        return None
    # The server counts whole milliseconds, so less than 1 ms would mean "off".
    if value < 0.001 or value > SERVER_TIMEOUT_MAX_SECONDS:
        raise InvalidSettingError(name, raw, accepted)
    return value


def _database_url(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name)
    if raw is None:
        return None
    accepted = (
        "use a SQLAlchemy database URL such as postgresql://user@db-host:5432/app, "
        "or unset it to use the configured URL"
    )
    if not raw.strip() or raw != raw.strip():
        # The message must not echo a URL that may contain a password.
        raise _invalid(name, without_password(raw), accepted)
    try:
        make_url(raw)
    except ArgumentError:
        raise InvalidSettingError(name, without_password(raw), accepted) from None
    return raw


def without_password(raw: str) -> str:
    """Return a URL as typed, with any password replaced by ``***``, even if it does not parse."""
    head, at, host = raw.rpartition("@")
    scheme, separator, credentials = head.rpartition("://")
    if not at or ":" not in credentials:
        return raw
    user = credentials.split(":", 1)[0]
    return f"{scheme}{separator}{user}:***@{host}"


def _lock_mode(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.lower()
    if value not in LOCK_MODES:
        raise _invalid(
            name,
            raw,
            "use session (a session-level lock, the default) or transaction "
            "(a transaction-scoped lock for transaction-mode poolers; it rejects "
            "transaction_per_migration and autocommit_block)",
        )
    return value
