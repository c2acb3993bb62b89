"""Settings read from the environment: defaults, valid values and rejected values."""

from __future__ import annotations

import re

import pytest

from alembic_sgp_lock import InvalidSettingError, Settings
from tests.support import REPO_ROOT


def assert_rejected(variable: str, value: str, *expected: str) -> None:
    with pytest.raises(InvalidSettingError) as raised:
        Settings.from_env({variable: value})

    error = raised.value
    assert error.name == variable
    assert error.value == value
    assert str(error).startswith(f"{variable}={value!r} is invalid: ")
    for text in expected:
        assert text in str(error)


def test_defaults_when_unset() -> None:
    settings = Settings.from_env({})

    assert settings.run_migrations is True
    assert settings.max_retries == 3
    assert settings.lock_timeout == 30.0
    assert settings.max_wait_time == 60.0
    assert settings.retry_backoff == 1.0
    assert settings.lock_enabled is True
    assert settings.lock_name is None


def test_valid_values() -> None:
    settings = Settings.from_env(
        {
            "RUN_MIGRATIONS": "No",
            "MIGRATION_MAX_RETRIES": "0",
            "MIGRATION_LOCK_TIMEOUT": "2.5",
            "MIGRATION_MAX_WAIT_TIME": "600",
            "MIGRATION_RETRY_BACKOFF": "250",
            "MIGRATION_LOCK": "off",
            "MIGRATION_LOCK_NAME": "billing-migrations",
        }
    )

    assert settings.run_migrations is False
    assert settings.max_retries == 0
    assert settings.lock_timeout == 2.5
    assert settings.max_wait_time == 600.0
    assert settings.retry_backoff == 0.25
    assert settings.lock_enabled is False
    assert settings.lock_name == "billing-migrations"


def test_zero_lock_timeout_means_try_once() -> None:
    assert Settings.from_env({"MIGRATION_LOCK_TIMEOUT": "0"}).lock_timeout == 0.0


@pytest.mark.parametrize("spelling", ["1", "true", "TRUE", "yes", "On"])
def test_boolean_true_spellings(spelling: str) -> None:
    assert Settings.from_env({"RUN_MIGRATIONS": spelling}).run_migrations is True


@pytest.mark.parametrize("spelling", ["0", "false", "False", "no", "OFF"])
def test_boolean_false_spellings(spelling: str) -> None:
    assert Settings.from_env({"RUN_MIGRATIONS": spelling}).run_migrations is False


@pytest.mark.parametrize(
    ("variable", "value", "accepted"),
    [
        ("RUN_MIGRATIONS", "abc", "use one of true, false"),
        ("RUN_MIGRATIONS", "", "use one of true, false"),
        ("MIGRATION_LOCK", "enabled", "use one of true, false"),
        ("MIGRATION_MAX_RETRIES", "abc", "whole number of 0 or more"),
        ("MIGRATION_MAX_RETRIES", "-1", "whole number of 0 or more"),
        ("MIGRATION_MAX_RETRIES", "", "whole number of 0 or more"),
        ("MIGRATION_MAX_RETRIES", "2.5", "whole number of 0 or more"),
        ("MIGRATION_LOCK_TIMEOUT", "abc", "seconds of 0 or more"),
        ("MIGRATION_LOCK_TIMEOUT", "-5", "seconds of 0 or more"),
        ("MIGRATION_LOCK_TIMEOUT", "", "seconds of 0 or more"),
        ("MIGRATION_LOCK_TIMEOUT", "nan", "seconds of 0 or more"),
        ("MIGRATION_MAX_WAIT_TIME", "abc", "greater than 0"),
        ("MIGRATION_MAX_WAIT_TIME", "-1", "greater than 0"),
        ("MIGRATION_MAX_WAIT_TIME", "0", "greater than 0"),
        ("MIGRATION_MAX_WAIT_TIME", "", "greater than 0"),
        ("MIGRATION_MAX_WAIT_TIME", "inf", "greater than 0"),
        ("MIGRATION_RETRY_BACKOFF", "abc", "milliseconds of 0 or more"),
        ("MIGRATION_RETRY_BACKOFF", "-100", "milliseconds of 0 or more"),
        ("MIGRATION_RETRY_BACKOFF", "", "milliseconds of 0 or more"),
        ("MIGRATION_LOCK_NAME", "", "non-empty name"),
        ("MIGRATION_LOCK_NAME", "   ", "non-empty name"),
    ],
)
def test_invalid_value_names_variable(variable: str, value: str, accepted: str) -> None:
    assert_rejected(variable, value, accepted)


# Every setting parsed as a number, with part of its message. "10" is valid for each.
NUMERIC_SETTINGS = [
    ("MIGRATION_MAX_RETRIES", "whole number of 0 or more"),
    ("MIGRATION_LOCK_TIMEOUT", "seconds of 0 or more"),
    ("MIGRATION_MAX_WAIT_TIME", "greater than 0"),
    ("MIGRATION_RETRY_BACKOFF", "milliseconds of 0 or more"),
    ("MIGRATION_DDL_LOCK_TIMEOUT", "seconds from 0.001 to 2147483"),
    ("MIGRATION_STATEMENT_TIMEOUT", "seconds from 0.001 to 2147483"),
]
BOOLEAN_SETTINGS = ["RUN_MIGRATIONS", "MIGRATION_LOCK", "MIGRATION_LEDGER"]


@pytest.mark.parametrize(("variable", "accepted"), NUMERIC_SETTINGS)
@pytest.mark.parametrize("padded", ["{} ", " {}", "{}\n", "\t{}\r"])
def test_number_with_whitespace_rejected(variable: str, accepted: str, padded: str) -> None:
    assert_rejected(
        variable, padded.format("10"), accepted, "remove the whitespace around the value"
    )


@pytest.mark.parametrize(("variable", "accepted"), NUMERIC_SETTINGS)
@pytest.mark.parametrize(
    ("digits", "character"),
    [
        ("\uff11\uff10", "U+FF11 FULLWIDTH DIGIT ONE"),
        ("\u0661\u0660", "U+0661 ARABIC-INDIC DIGIT ONE"),
        ("1\u0966", "U+0966 DEVANAGARI DIGIT ZERO"),
    ],
)
def test_number_with_non_ascii_digits_rejected(
    variable: str, accepted: str, digits: str, character: str
) -> None:
    assert_rejected(
        variable,
        digits,
        accepted,
        f"ASCII characters only, because the value contains {character}",
    )


@pytest.mark.parametrize(("variable", "accepted"), NUMERIC_SETTINGS)
@pytest.mark.parametrize("value", ["+10", "1_0", "1e1", "0x10", "1 0", "1,5", "Infinity"])
def test_number_in_python_only_syntax_rejected(variable: str, accepted: str, value: str) -> None:
    assert_rejected(variable, value, accepted)


@pytest.mark.parametrize(("variable", "accepted"), NUMERIC_SETTINGS)
def test_number_plain_form_accepted(variable: str, accepted: str) -> None:
    assert Settings.from_env({variable: "10"}) != Settings()


@pytest.mark.parametrize("value", ["0", "007", "10"])
def test_whole_number_forms(value: str) -> None:
    assert Settings.from_env({"MIGRATION_MAX_RETRIES": value}).max_retries == int(value)


@pytest.mark.parametrize(("value", "seconds"), [("2.5", 2.5), ("2.", 2.0), (".5", 0.5)])
def test_decimal_number_forms(value: str, seconds: float) -> None:
    assert Settings.from_env({"MIGRATION_LOCK_TIMEOUT": value}).lock_timeout == seconds


def test_whole_number_too_long_rejected() -> None:
    # Longer than int() converts by default, so it must not escape as a ValueError.
    assert_rejected("MIGRATION_MAX_RETRIES", "1" * 5000, "whole number of 0 or more")


def test_decimal_number_overflow_rejected() -> None:
    assert_rejected("MIGRATION_LOCK_TIMEOUT", "9" * 400, "seconds of 0 or more")


@pytest.mark.parametrize("variable", BOOLEAN_SETTINGS)
@pytest.mark.parametrize("value", [" true", "false ", "on\n", "\t1"])
def test_boolean_with_whitespace_rejected(variable: str, value: str) -> None:
    assert_rejected(
        variable, value, "use one of true, false", "remove the whitespace around the value"
    )


@pytest.mark.parametrize("variable", BOOLEAN_SETTINGS)
@pytest.mark.parametrize(
    ("value", "character"),
    [
        ("\uff54\uff52\uff55\uff45", "U+FF54 FULLWIDTH LATIN SMALL LETTER T"),
        ("\uff11", "U+FF11 FULLWIDTH DIGIT ONE"),
    ],
)
def test_boolean_with_non_ascii_rejected(variable: str, value: str, character: str) -> None:
    assert_rejected(
        variable, value, "use one of true, false", f"because the value contains {character}"
    )


@pytest.mark.parametrize(
    ("variable", "value", "accepted"),
    [
        ("MIGRATION_LOCK_MODE", " transaction", "use session"),
        ("MIGRATION_LOCK_MODE", "session\n", "use session"),
        ("MIGRATION_ON_UNKNOWN_REVISION", "skip ", "use one of fail, skip"),
        ("MIGRATION_ON_CHECKSUM_MISMATCH", "\tfail", "use one of"),
        ("MIGRATION_LOCK_NAME", " deploy-lock", "use a non-empty name"),
        ("MIGRATION_DATABASE_URL", "postgresql://app@db:5432/app\n", "SQLAlchemy database URL"),
    ],
)
def test_text_setting_with_whitespace_rejected(variable: str, value: str, accepted: str) -> None:
    assert_rejected(variable, value, accepted, "remove the whitespace around the value")


@pytest.mark.parametrize("variable", ["MIGRATION_DDL_LOCK_TIMEOUT", "MIGRATION_STATEMENT_TIMEOUT"])
@pytest.mark.parametrize("value", [" off", "off ", "\uff4f\uff46\uff46"])
def test_server_timeout_off_exact_spelling(variable: str, value: str) -> None:
    assert_rejected(variable, value, "or 0 or off to switch it off")


def test_readme_defaults_match_code() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| [^|]+\| `([^`]*)` \|$", readme, re.MULTILINE))
    defaults = Settings()

    assert rows["RUN_MIGRATIONS"] == "true"
    assert defaults.run_migrations is True
    assert int(rows["MIGRATION_MAX_RETRIES"]) == defaults.max_retries
    assert float(rows["MIGRATION_LOCK_TIMEOUT"]) == defaults.lock_timeout
    assert float(rows["MIGRATION_MAX_WAIT_TIME"]) == defaults.max_wait_time
    assert float(rows["MIGRATION_RETRY_BACKOFF"]) / 1000 == defaults.retry_backoff
    assert rows["MIGRATION_LOCK"] == "true"
    assert defaults.lock_enabled is True
    assert rows["MIGRATION_LOCK_NAME"] == "unset"
    assert defaults.lock_name is None


def test_production_settings_defaults() -> None:
    settings = Settings.from_env({})

    assert settings.ddl_lock_timeout is None
    assert settings.statement_timeout is None
    assert settings.database_url is None
    assert settings.lock_mode == "session"


def test_production_settings_valid_values() -> None:
    settings = Settings.from_env(
        {
            "MIGRATION_DDL_LOCK_TIMEOUT": "2.5",
            "MIGRATION_STATEMENT_TIMEOUT": "600",
            "MIGRATION_DATABASE_URL": "postgresql://app@db-direct:5432/app",
            "MIGRATION_LOCK_MODE": "Transaction",
        }
    )

    assert settings.ddl_lock_timeout == 2.5
    assert settings.statement_timeout == 600.0
    assert settings.database_url == "postgresql://app@db-direct:5432/app"
    assert settings.lock_mode == "transaction"


@pytest.mark.parametrize("spelling", ["0", "off", "OFF", "0.0"])
def test_server_timeout_off_spellings(spelling: str) -> None:
    settings = Settings.from_env(
        {"MIGRATION_DDL_LOCK_TIMEOUT": spelling, "MIGRATION_STATEMENT_TIMEOUT": spelling}
    )

    assert settings.ddl_lock_timeout is None
    assert settings.statement_timeout is None


@pytest.mark.parametrize(
    ("variable", "value", "accepted"),
    [
        ("MIGRATION_DDL_LOCK_TIMEOUT", "abc", "seconds from 0.001 to 2147483"),
        ("MIGRATION_DDL_LOCK_TIMEOUT", "-1", "seconds from 0.001 to 2147483"),
        ("MIGRATION_DDL_LOCK_TIMEOUT", "", "seconds from 0.001 to 2147483"),
        ("MIGRATION_DDL_LOCK_TIMEOUT", "0.0001", "seconds from 0.001 to 2147483"),
        ("MIGRATION_DDL_LOCK_TIMEOUT", "3000000", "seconds from 0.001 to 2147483"),
        ("MIGRATION_DDL_LOCK_TIMEOUT", "inf", "seconds from 0.001 to 2147483"),
        ("MIGRATION_STATEMENT_TIMEOUT", "5s", "seconds from 0.001 to 2147483"),
        ("MIGRATION_STATEMENT_TIMEOUT", "nan", "seconds from 0.001 to 2147483"),
        ("MIGRATION_DATABASE_URL", "", "SQLAlchemy database URL"),
        ("MIGRATION_DATABASE_URL", "   ", "SQLAlchemy database URL"),
        ("MIGRATION_DATABASE_URL", "db-host:5432/app", "SQLAlchemy database URL"),
        ("MIGRATION_LOCK_MODE", "", "use session"),
        ("MIGRATION_LOCK_MODE", "table", "use session"),
    ],
)
def test_invalid_production_setting(variable: str, value: str, accepted: str) -> None:
    assert_rejected(variable, value, accepted)


def test_invalid_database_url_hides_password() -> None:
    with pytest.raises(InvalidSettingError) as raised:
        Settings.from_env({"MIGRATION_DATABASE_URL": "app:s3cret@db-host/app"})

    assert "s3cret" not in str(raised.value)
    assert "app:***@db-host/app" in str(raised.value)


def readme_settings_rows() -> dict[str, str]:
    readme = (REPO_ROOT / "README.md").read_text()
    return dict(re.findall(r"^\| `([A-Z_]+)` \| [^|]+\| `([^`]*)` \|$", readme, re.MULTILINE))


def test_readme_newer_defaults_match_code() -> None:
    rows = readme_settings_rows()
    defaults = Settings()

    assert rows["MIGRATION_DDL_LOCK_TIMEOUT"] == "off"
    assert defaults.ddl_lock_timeout is None
    assert rows["MIGRATION_STATEMENT_TIMEOUT"] == "off"
    assert defaults.statement_timeout is None
    assert rows["MIGRATION_DATABASE_URL"] == "unset"
    assert defaults.database_url is None
    assert rows["MIGRATION_LOCK_MODE"] == defaults.lock_mode
    assert rows["MIGRATION_ON_UNKNOWN_REVISION"] == defaults.on_unknown_revision
    assert rows["MIGRATION_MARKER_TABLE"] == defaults.marker_table
    assert rows["MIGRATION_LEDGER"] == "false"
    assert defaults.ledger is False
    assert rows["MIGRATION_LEDGER_TABLE"] == defaults.ledger_table
    assert rows["MIGRATION_ON_CHECKSUM_MISMATCH"] == defaults.on_checksum_mismatch


def test_readme_lists_every_variable() -> None:
    source = (REPO_ROOT / "alembic_sgp_lock" / "_settings.py").read_text()
    read_by_code = set(re.findall(r'"((?:RUN_|MIGRATION_)[A-Z_]+)"', source))
    documented = set(readme_settings_rows())

    assert "MIGRATION_LEDGER" in read_by_code
    assert read_by_code - documented == set()
