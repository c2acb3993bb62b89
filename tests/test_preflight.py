"""Pre-flight checks, with the database put in each state for real on PostgreSQL and SQLite."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cli_support import (
    CONFIGURED_ENV,
    execute,
    run_cli,
    snapshot,
    use_env,
)
from tests.support import EXAMPLE_HEAD, EXAMPLE_REVISIONS, Project, make_project, read_state

LONG_REVISION = "4d3f0b5e2a34" + "0123456789abcdef0123456789"  # 38 characters
BRANCH_A = "5a0000000001"
BRANCH_B = "5b0000000002"
UNKNOWN = "9f9f9f9f9f9f"


BACKEND_FIXTURES = {"postgresql": "pg_url", "sqlite": "sqlite_url", "mariadb": "mysql_url"}


@pytest.fixture(params=sorted(BACKEND_FIXTURES))
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh database on each backend."""
    url: str = request.getfixturevalue(BACKEND_FIXTURES[request.param])
    return url


def table_revision(table: str) -> str:
    return f'op.create_table("{table}", sa.Column("id", sa.Integer, primary_key=True))'


def upgrade(project: Project, revision: str = "head") -> None:
    finished = project.run("upgrade", revision)
    assert finished.returncode == 0, finished.output


def drop_version_primary_key(url: str) -> None:
    if url.startswith("sqlite"):
        execute(
            url,
            "CREATE TABLE version_copy (version_num VARCHAR(32) NOT NULL)",
            "INSERT INTO version_copy SELECT version_num FROM alembic_version",
            "DROP TABLE alembic_version",
            "ALTER TABLE version_copy RENAME TO alembic_version",
        )
    elif url.startswith("mysql"):
        execute(url, "ALTER TABLE alembic_version DROP PRIMARY KEY")
    else:
        execute(url, "ALTER TABLE alembic_version DROP CONSTRAINT alembic_version_pkc")


def make_missing_version_table(project: Project, url: str) -> None:
    execute(url, "CREATE TABLE customer (id INTEGER PRIMARY KEY, name VARCHAR(100))")


def make_column_too_short(project: Project, url: str) -> None:
    upgrade(project)
    project.add_revision(LONG_REVISION, EXAMPLE_HEAD, table_revision("long_step"))


def make_database_ahead(project: Project, url: str) -> None:
    upgrade(project)
    execute(url, f"UPDATE alembic_version SET version_num = '{UNKNOWN}'")


def make_multiple_heads(project: Project, url: str) -> None:
    upgrade(project)
    project.add_revision(BRANCH_A, EXAMPLE_HEAD, table_revision("branch_a"))
    project.add_revision(BRANCH_B, EXAMPLE_HEAD, table_revision("branch_b"))


def make_duplicate_rows(project: Project, url: str) -> None:
    upgrade(project, EXAMPLE_REVISIONS[1])
    drop_version_primary_key(url)
    execute(url, f"INSERT INTO alembic_version VALUES ('{EXAMPLE_REVISIONS[1]}')")


def make_ancestor_rows(project: Project, url: str) -> None:
    upgrade(project, EXAMPLE_REVISIONS[1])
    execute(url, f"INSERT INTO alembic_version VALUES ('{EXAMPLE_REVISIONS[0]}')")


def make_version_table_elsewhere(project: Project, url: str) -> None:
    upgrade(project, EXAMPLE_REVISIONS[1])
    execute(url, "CREATE SCHEMA other", "ALTER TABLE alembic_version SET SCHEMA other")


@dataclass
class ErrorState:
    code: str
    exit_code: int
    make: Callable[[Project, str], None]
    named: tuple[str, ...]
    fix: str
    backends: tuple[str, ...] = ("postgresql", "sqlite", "mariadb")
    # The fix where it differs from ``fix``, by backend.
    fixes: dict[str, str] = field(default_factory=dict)

    def fix_on(self, backend: str) -> str:
        return self.fixes.get(backend, self.fix)


ERROR_STATES = {
    "missing": ErrorState(
        "version-table-missing", 6, make_missing_version_table, ("customer",), "alembic stamp"
    ),
    # SQLite stores any length in VARCHAR(32), so the state is harmless there.
    "too-short": ErrorState(
        "version-column-too-short",
        6,
        make_column_too_short,
        (LONG_REVISION, "VARCHAR(32)"),
        "ALTER TABLE alembic_version ALTER COLUMN version_num TYPE VARCHAR(38)",
        backends=("postgresql", "mariadb"),
        fixes={"mariadb": "ALTER TABLE alembic_version MODIFY version_num VARCHAR(38) NOT NULL"},
    ),
    "ahead": ErrorState(
        "database-ahead", 7, make_database_ahead, (UNKNOWN,), "MIGRATION_ON_UNKNOWN_REVISION"
    ),
    "heads": ErrorState(
        "multiple-heads", 6, make_multiple_heads, (BRANCH_A, BRANCH_B), "alembic merge heads"
    ),
    "duplicate": ErrorState(
        "duplicate-version-rows",
        6,
        make_duplicate_rows,
        (EXAMPLE_REVISIONS[1],),
        f"alembic stamp --purge {EXAMPLE_REVISIONS[1]}",
    ),
    "ancestor": ErrorState(
        "ancestor-version-rows",
        6,
        make_ancestor_rows,
        (f"{EXAMPLE_REVISIONS[0]} is an ancestor of {EXAMPLE_REVISIONS[1]}",),
        f"alembic stamp --purge {EXAMPLE_REVISIONS[1]}",
    ),
    # Schemas that a connection cannot see are a PostgreSQL notion.
    "elsewhere": ErrorState(
        "version-table-elsewhere",
        6,
        make_version_table_elsewhere,
        ("other.alembic_version", "search_path"),
        "version_table_schema='other'",
        backends=("postgresql",),
    ),
}


def backend_of(url: str) -> str:
    if url.startswith("sqlite"):
        return "sqlite"
    return "mariadb" if url.startswith("mysql") else "postgresql"


@pytest.mark.parametrize("state_name", sorted(ERROR_STATES))
def test_error_state_upgrade_changes_nothing(tmp_path: Path, db_url: str, state_name: str) -> None:
    state = ERROR_STATES[state_name]
    if backend_of(db_url) not in state.backends:
        pytest.skip(f"{state_name} is not an error state on {backend_of(db_url)}")
    project = make_project(tmp_path, db_url)
    state.make(project, db_url)
    before = snapshot(db_url)

    through_hook = project.run("upgrade", "head")
    through_cli = run_cli(project, "upgrade", "head")

    assert through_hook.returncode != 0, through_hook.output
    assert f"[{state.code}]" in through_hook.output
    assert through_cli.returncode == state.exit_code, through_cli.output
    assert f"[{state.code}]" in through_cli.stderr
    for name in state.named:
        assert name in through_cli.stderr
    assert state.fix_on(backend_of(db_url)) in through_cli.stderr
    assert "Running upgrade" not in through_hook.output + through_cli.output
    assert snapshot(db_url) == before


@pytest.mark.parametrize("state_name", sorted(ERROR_STATES))
def test_preflight_json_reports_state(tmp_path: Path, db_url: str, state_name: str) -> None:
    state = ERROR_STATES[state_name]
    if backend_of(db_url) not in state.backends:
        pytest.skip(f"{state_name} is not an error state on {backend_of(db_url)}")
    project = make_project(tmp_path, db_url)
    state.make(project, db_url)
    before = snapshot(db_url)

    finished = run_cli(project, "preflight", "--format", "json")

    assert finished.returncode == state.exit_code, finished.output
    report = json.loads(finished.stdout)
    assert report["ok"] is False
    assert report["exit_code"] == state.exit_code
    codes = [finding["code"] for finding in report["findings"]]
    assert codes == [state.code]
    finding = report["findings"][0]
    assert finding["severity"] == "error"
    assert state.fix_on(backend_of(db_url)) in finding["fix"]
    for name in state.named:
        assert name in finding["message"]
    assert snapshot(db_url) == before


def test_preflight_passes_at_head(tmp_path: Path, db_url: str) -> None:
    project = make_project(tmp_path, db_url)
    upgrade(project)

    text = run_cli(project, "preflight")
    as_json = run_cli(project, "preflight", "--format", "json")

    assert text.returncode == 0, text.output
    assert "0 error(s), 0 warning(s)" in text.stdout
    assert f"Database revision(s): {EXAMPLE_HEAD}" in text.stdout
    assert as_json.returncode == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert report["ok"] is True
    assert report["findings"] == []
    assert report["revisions"] == [EXAMPLE_HEAD]


def test_preflight_text_names_fix(tmp_path: Path, db_url: str) -> None:
    project = make_project(tmp_path, db_url)
    make_multiple_heads(project, db_url)

    finished = run_cli(project, "preflight")

    assert finished.returncode == 6, finished.output
    assert f"error [multiple-heads] The migration scripts have 2 heads ({BRANCH_A}, " in (
        finished.stdout
    )
    assert '  fix: alembic merge heads -m "merge heads"' in finished.stdout
    assert "1 error(s), 0 warning(s)" in finished.stdout


def test_unknown_revision_skip_succeeds(tmp_path: Path, db_url: str) -> None:
    project = make_project(tmp_path, db_url)
    make_database_ahead(project, db_url)
    before = snapshot(db_url)

    through_hook = project.run("upgrade", "head", MIGRATION_ON_UNKNOWN_REVISION="skip")
    through_cli = run_cli(project, "upgrade", "head", MIGRATION_ON_UNKNOWN_REVISION="skip")
    report = run_cli(
        project, "preflight", "--format", "json", MIGRATION_ON_UNKNOWN_REVISION="skip"
    )

    assert through_hook.returncode == 0, through_hook.output
    assert "Skipping the upgrade" in through_hook.output
    assert through_cli.returncode == 0, through_cli.output
    assert "Skipping the upgrade" in through_cli.output
    assert report.returncode == 0, report.output
    findings = json.loads(report.stdout)["findings"]
    assert [(f["code"], f["severity"]) for f in findings] == [("database-ahead", "warning")]
    assert "MIGRATION_ON_UNKNOWN_REVISION=skip" not in findings[0]["fix"]
    assert snapshot(db_url) == before


def test_invalid_unknown_revision_policy(tmp_path: Path, db_url: str) -> None:
    project = make_project(tmp_path, db_url)

    finished = run_cli(project, "upgrade", "head", MIGRATION_ON_UNKNOWN_REVISION="ignore")

    assert finished.returncode == 3, finished.output
    assert "MIGRATION_ON_UNKNOWN_REVISION='ignore' is invalid: use one of fail, skip" in (
        finished.stderr
    )
    assert snapshot(db_url) == {}


def test_sqlite_long_revision_id_upgrades(tmp_path: Path, sqlite_url: str) -> None:
    # SQLite does not enforce VARCHAR lengths, so the column check stays silent.
    project = make_project(tmp_path, sqlite_url)
    make_column_too_short(project, sqlite_url)

    finished = run_cli(project, "upgrade", "head")

    assert finished.returncode == 0, finished.output
    assert read_state(sqlite_url).versions == [LONG_REVISION]


def test_missing_table_on_empty_database_passes(tmp_path: Path, db_url: str) -> None:
    project = make_project(tmp_path, db_url)

    finished = run_cli(project, "preflight", "--format", "json")

    assert finished.returncode == 0, finished.output
    assert json.loads(finished.stdout)["findings"] == []


def test_multiple_heads_other_targets_pass(tmp_path: Path, db_url: str) -> None:
    project = make_project(tmp_path, db_url)
    make_multiple_heads(project, db_url)

    preflight_heads = run_cli(project, "preflight", "--target", "heads")
    upgrade_heads = run_cli(project, "upgrade", "heads")

    assert preflight_heads.returncode == 0, preflight_heads.output
    assert upgrade_heads.returncode == 0, upgrade_heads.output
    assert sorted(read_state(db_url).versions) == [BRANCH_A, BRANCH_B]


def test_branch_label_target_passes(tmp_path: Path, db_url: str) -> None:
    project = make_project(tmp_path, db_url)
    upgrade(project)
    project.add_revision(BRANCH_A, EXAMPLE_HEAD, table_revision("branch_a"))
    project.add_revision(BRANCH_B, EXAMPLE_HEAD, table_revision("branch_b"))
    revision_file = project.path / "migrations" / "versions" / f"{BRANCH_A}_test.py"
    text = revision_file.read_text().replace("branch_labels = None", "branch_labels = ('left',)")
    revision_file.write_text(text)

    preflight = run_cli(project, "preflight", "--target", "left@head")
    upgraded = project.run("upgrade", "left@head")

    assert preflight.returncode == 0, preflight.output
    assert upgraded.returncode == 0, upgraded.output
    assert read_state(db_url).versions == [BRANCH_A]


@pytest.mark.parametrize("target", ["nosuchrev", "nosuchlabel@head"])
def test_unknown_target_rejected(tmp_path: Path, db_url: str, target: str) -> None:
    project = make_project(tmp_path, db_url)
    assert project.run("upgrade", EXAMPLE_REVISIONS[0]).returncode == 0
    before = snapshot(db_url)

    checked = run_cli(project, "preflight", "--target", target, "--format", "json")
    upgraded = run_cli(project, "upgrade", target)

    assert checked.returncode == 6, checked.output
    (finding,) = json.loads(checked.stdout)["findings"]
    assert finding["code"] == "unknown-target"
    assert target in finding["message"]
    assert upgraded.returncode == 6, upgraded.output
    assert "[unknown-target]" in upgraded.stderr
    assert snapshot(db_url) == before


@pytest.mark.parametrize("target", ["+1", f"{EXAMPLE_REVISIONS[0][:4]}+1", "base"])
def test_relative_and_base_targets_pass(tmp_path: Path, db_url: str, target: str) -> None:
    project = make_project(tmp_path, db_url)
    assert project.run("upgrade", EXAMPLE_REVISIONS[0]).returncode == 0

    checked = run_cli(project, "preflight", "--target", target)

    assert checked.returncode == 0, checked.output
    assert "unknown-target" not in checked.output


@pytest.mark.postgresql
def test_configured_version_table_and_schema(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    use_env(project, CONFIGURED_ENV)
    execute(pg_url, "CREATE SCHEMA app")
    settings = {"TEST_VERSION_TABLE": "deploy_versions", "TEST_VERSION_TABLE_SCHEMA": "app"}
    table_options = ("--version-table", "deploy_versions", "--version-table-schema", "app")
    upgraded = project.run("upgrade", "head", **settings)
    assert upgraded.returncode == 0, upgraded.output
    execute(pg_url, f"UPDATE app.deploy_versions SET version_num = '{UNKNOWN}'")
    before = snapshot(pg_url)

    with_options = run_cli(project, *table_options, "preflight", "--format", "json")
    through_cli = run_cli(project, *table_options, "upgrade", "head", **settings)
    through_hook = project.run("upgrade", "head", **settings)

    assert with_options.returncode == 7, with_options.output
    report = json.loads(with_options.stdout)
    assert report["version_table"] == "app.deploy_versions"
    assert report["revisions"] == [UNKNOWN]
    assert through_cli.returncode == 7, through_cli.output
    assert through_hook.returncode != 0, through_hook.output
    assert "[database-ahead]" in through_hook.output
    assert snapshot(pg_url) == before


@pytest.mark.postgresql
def test_configured_schema_table_in_public(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    upgrade(project, EXAMPLE_REVISIONS[1])
    execute(pg_url, "CREATE SCHEMA app")
    use_env(project, CONFIGURED_ENV)
    before = snapshot(pg_url)

    through_hook = project.run("upgrade", "head", TEST_VERSION_TABLE_SCHEMA="app")
    preflight = run_cli(project, "--version-table-schema", "app", "preflight")

    assert through_hook.returncode != 0, through_hook.output
    assert "[version-table-elsewhere]" in through_hook.output
    assert "app.alembic_version does not exist, but public.alembic_version does" in (
        through_hook.output
    )
    assert preflight.returncode == 6, preflight.output
    assert "version_table_schema='public'" in preflight.stdout
    assert snapshot(pg_url) == before
