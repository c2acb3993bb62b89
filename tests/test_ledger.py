"""The revision ledger on real databases: rows per step, baseline, checksum drift."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.cli_support import run_cli
from tests.support import EXAMPLE_HEAD, EXAMPLE_REVISIONS, Project, make_project, read_state

DATABASES = [
    pytest.param("pg_url", marks=pytest.mark.postgresql, id="postgresql"),
    pytest.param("sqlite_url", id="sqlite"),
    pytest.param("mysql_url", marks=pytest.mark.mysql, id="mariadb"),
]


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(request.param))


def ledger_rows(url: str) -> list[dict[str, object]]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            result = connection.execute(sa.text("SELECT * FROM alembic_sgp_ledger ORDER BY id"))
            return [dict(row._mapping) for row in result]
    finally:
        engine.dispose()


def revision_file(project: Project, revision: str) -> Path:
    return next((project.path / "migrations" / "versions").glob(f"{revision}_*.py"))


def test_concurrent_upgrade_one_row_per_step(tmp_path: Path, database_url: str) -> None:
    project = make_project(tmp_path, database_url)

    processes = [project.start("upgrade", "head", MIGRATION_LEDGER="true") for _ in range(8)]
    outputs = [process.communicate(timeout=180)[0] for process in processes]

    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output
    rows = ledger_rows(database_url)
    assert [row["revision"] for row in rows] == list(EXAMPLE_REVISIONS)
    assert {row["direction"] for row in rows} == {"upgrade"}
    assert {row["outcome"] for row in rows} == {"applied"}
    for row in rows:
        assert str(row["checksum"]).startswith("sha256:")
        assert row["host"]
        assert row["pid"]
        assert row["started_at"] is not None
        assert row["finished_at"] is not None
        assert float(row["duration_ms"]) >= 0  # type: ignore[arg-type]
        assert row["alembic_version"]
        assert row["plugin_version"]
    assert read_state(database_url).customers == 1


def test_baseline_for_database_migrated_before(tmp_path: Path, database_url: str) -> None:
    project = make_project(tmp_path, database_url)
    assert project.run("upgrade", "head").returncode == 0

    finished = project.run("upgrade", "head", MIGRATION_LEDGER="true")

    assert finished.returncode == 0, finished.output
    rows = ledger_rows(database_url)
    assert [row["revision"] for row in rows] == list(EXAMPLE_REVISIONS)
    assert {row["direction"] for row in rows} == {"baseline"}
    assert all("before the ledger existed" in str(row["note"]) for row in rows)


def test_downgrade_recorded(tmp_path: Path, database_url: str) -> None:
    project = make_project(tmp_path, database_url)
    assert project.run("upgrade", "head", MIGRATION_LEDGER="true").returncode == 0

    finished = project.run("downgrade", "-1", MIGRATION_LEDGER="true")

    assert finished.returncode == 0, finished.output
    last = ledger_rows(database_url)[-1]
    assert last["direction"] == "downgrade"
    assert last["revision"] == EXAMPLE_HEAD
    assert read_state(database_url).versions == [EXAMPLE_REVISIONS[1]]


@pytest.mark.parametrize(
    "rewrite",
    [
        pytest.param(lambda data: data.replace(b"\n", b"\r\n"), id="crlf"),
        pytest.param(lambda data: b"\xef\xbb\xbf" + data, id="bom"),
        pytest.param(lambda data: data.replace(b"\n", b"   \n"), id="trailing-spaces"),
    ],
)
def test_cosmetic_change_not_drift(tmp_path: Path, sqlite_url: str, rewrite) -> None:  # type: ignore[no-untyped-def]
    project = make_project(tmp_path, sqlite_url)
    assert project.run("upgrade", EXAMPLE_REVISIONS[1], MIGRATION_LEDGER="true").returncode == 0
    path = revision_file(project, EXAMPLE_REVISIONS[0])
    path.write_bytes(rewrite(path.read_bytes()))

    finished = project.run(
        "upgrade", "head", MIGRATION_LEDGER="true", MIGRATION_ON_CHECKSUM_MISMATCH="fail"
    )

    assert finished.returncode == 0, finished.output
    assert "changed after" not in finished.output
    assert read_state(sqlite_url).versions == [EXAMPLE_HEAD]


def edit_first_revision(project: Project) -> None:
    path = revision_file(project, EXAMPLE_REVISIONS[0])
    path.write_text(path.read_text().replace("sa.String(100)", "sa.String(200)"))


def test_real_edit_warns(tmp_path: Path, database_url: str) -> None:
    project = make_project(tmp_path, database_url)
    assert project.run("upgrade", EXAMPLE_REVISIONS[1], MIGRATION_LEDGER="true").returncode == 0
    edit_first_revision(project)

    finished = project.run("upgrade", "head", MIGRATION_LEDGER="true")

    assert finished.returncode == 0, finished.output
    assert "Pre-flight warning [checksum-mismatch]" in finished.output
    assert f"Revision {EXAMPLE_REVISIONS[0]} (" in finished.output
    assert "changed after it was applied at" in finished.output
    assert read_state(database_url).versions == [EXAMPLE_HEAD]


def test_real_edit_fails_when_policy_fail(tmp_path: Path, database_url: str) -> None:
    project = make_project(tmp_path, database_url)
    assert project.run("upgrade", EXAMPLE_REVISIONS[1], MIGRATION_LEDGER="true").returncode == 0
    edit_first_revision(project)
    rows_before = ledger_rows(database_url)

    finished = project.run(
        "upgrade", "head", MIGRATION_LEDGER="true", MIGRATION_ON_CHECKSUM_MISMATCH="fail"
    )

    assert finished.returncode != 0
    assert "Pre-flight checks failed; nothing was migrated" in finished.output
    assert f"[checksum-mismatch] Revision {EXAMPLE_REVISIONS[0]} (" in finished.output
    assert "the ledger recorded sha256:" in finished.output
    assert "the file is now sha256:" in finished.output
    assert f"accept-checksum {EXAMPLE_REVISIONS[0]}" in finished.output
    assert "Pre-flight checks passed" not in finished.output
    assert read_state(database_url).versions == [EXAMPLE_REVISIONS[1]]
    assert ledger_rows(database_url) == rows_before


def test_command_checks_checksums_under_lock(tmp_path: Path, database_url: str) -> None:
    project = make_project(tmp_path, database_url)
    assert project.run("upgrade", EXAMPLE_REVISIONS[1], MIGRATION_LEDGER="true").returncode == 0
    edit_first_revision(project)
    rows_before = ledger_rows(database_url)

    finished = run_cli(
        project,
        "upgrade",
        "head",
        MIGRATION_LEDGER="true",
        MIGRATION_ON_CHECKSUM_MISMATCH="fail",
    )

    assert finished.returncode == 6, finished.output
    assert f"[checksum-mismatch] Revision {EXAMPLE_REVISIONS[0]} (" in finished.stderr
    assert "Pre-flight checks passed" not in finished.output
    # The command's own checks under its lock stop it before Alembic runs env.py.
    assert "is already held by this process" not in finished.output
    assert read_state(database_url).versions == [EXAMPLE_REVISIONS[1]]
    assert ledger_rows(database_url) == rows_before


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MIGRATION_LEDGER", "sometimes"),
        ("MIGRATION_LEDGER_TABLE", "bad name"),
        ("MIGRATION_LEDGER_TABLE", ""),
        ("MIGRATION_ON_CHECKSUM_MISMATCH", "ignore"),
    ],
)
def test_invalid_ledger_setting(
    tmp_path: Path, sqlite_url: str, variable: str, value: str
) -> None:
    project = make_project(tmp_path, sqlite_url)

    finished = project.run("upgrade", "head", **{variable: value})

    assert finished.returncode != 0
    assert f"{variable}={value!r} is invalid" in finished.output
    assert read_state(sqlite_url).tables == set()


def test_ledger_command_text_and_json(tmp_path: Path, database_url: str) -> None:
    project = make_project(tmp_path, database_url)
    assert project.run("upgrade", "head", MIGRATION_LEDGER="true").returncode == 0

    text = run_cli(project, "ledger")
    as_json = run_cli(project, "ledger", "--format", "json")

    assert text.returncode == 0, text.output
    header = text.stdout.splitlines()[0].split()
    assert header[:4] == ["id", "revision", "direction", "outcome"]
    for revision in EXAMPLE_REVISIONS:
        assert revision in text.stdout
    assert as_json.returncode == 0, as_json.output
    rows = json.loads(as_json.stdout)
    assert [row["revision"] for row in rows] == list(EXAMPLE_REVISIONS)
    assert all(row["direction"] == "upgrade" for row in rows)
    assert all(row["checksum"].startswith("sha256:") for row in rows)
    now = datetime.now(timezone.utc)
    for row in rows:
        finished_at = datetime.fromisoformat(row["finished_at"])
        assert finished_at.utcoffset() == timedelta(0), row["finished_at"]
        assert abs(now - finished_at) < timedelta(minutes=10), row["finished_at"]
    assert "+00:00" in text.stdout


def test_preflight_reports_checksum_mismatch(tmp_path: Path, database_url: str) -> None:
    project = make_project(tmp_path, database_url)
    assert project.run("upgrade", "head", MIGRATION_LEDGER="true").returncode == 0
    edit_first_revision(project)

    warned = run_cli(project, "preflight", "--format", "json")
    failed = run_cli(
        project, "preflight", "--format", "json", MIGRATION_ON_CHECKSUM_MISMATCH="fail"
    )

    assert warned.returncode == 0, warned.output
    finding = json.loads(warned.stdout)["findings"][0]
    assert finding["code"] == "checksum-mismatch"
    assert finding["severity"] == "warning"
    assert finding["revisions"] == [EXAMPLE_REVISIONS[0]]
    assert failed.returncode == 6, failed.output
    assert json.loads(failed.stdout)["findings"][0]["severity"] == "error"


def test_accept_checksum_clears_drift(tmp_path: Path, database_url: str) -> None:
    project = make_project(tmp_path, database_url)
    assert project.run("upgrade", EXAMPLE_REVISIONS[1], MIGRATION_LEDGER="true").returncode == 0
    edit_first_revision(project)

    accepted = run_cli(
        project, "accept-checksum", EXAMPLE_REVISIONS[0], "--note", "widened name, reviewed"
    )
    finished = project.run(
        "upgrade", "head", MIGRATION_LEDGER="true", MIGRATION_ON_CHECKSUM_MISMATCH="fail"
    )

    assert accepted.returncode == 0, accepted.output
    assert f"Accepted the current file of {EXAMPLE_REVISIONS[0]}" in accepted.stdout
    assert finished.returncode == 0, finished.output
    rows = ledger_rows(database_url)
    accept_rows = [row for row in rows if row["direction"] == "accept"]
    assert len(accept_rows) == 1
    assert accept_rows[0]["revision"] == EXAMPLE_REVISIONS[0]
    assert accept_rows[0]["note"] == "widened name, reviewed"
    assert accept_rows[0]["outcome"] == "accepted"
    assert read_state(database_url).versions == [EXAMPLE_HEAD]


def test_drift_after_accept_names_accept(tmp_path: Path, database_url: str) -> None:
    project = make_project(tmp_path, database_url)
    assert project.run("upgrade", EXAMPLE_REVISIONS[1], MIGRATION_LEDGER="true").returncode == 0
    edit_first_revision(project)
    assert run_cli(project, "accept-checksum", EXAMPLE_REVISIONS[0]).returncode == 0
    path = revision_file(project, EXAMPLE_REVISIONS[0])
    path.write_text(path.read_text().replace("sa.String(200)", "sa.String(300)"))

    checked = run_cli(project, "preflight", MIGRATION_LEDGER="true")

    assert checked.returncode == 0, checked.output
    assert "changed after it was accepted at" in checked.stdout
    assert "changed after it was applied at" not in checked.stdout


def test_accept_checksum_unknown_revision(tmp_path: Path, sqlite_url: str) -> None:
    project = make_project(tmp_path, sqlite_url)

    finished = run_cli(project, "accept-checksum", "ffffffffffff")

    assert finished.returncode == 1
    assert "Revision 'ffffffffffff' is not in the scripts" in finished.stderr
    assert read_state(sqlite_url).tables == set()


def test_edit_reported_when_at_head(tmp_path: Path, database_url: str) -> None:
    project = make_project(tmp_path, database_url)
    assert project.run("upgrade", "head", MIGRATION_LEDGER="true").returncode == 0
    edit_first_revision(project)

    warned = project.run("upgrade", "head", MIGRATION_LEDGER="true")
    failed = project.run(
        "upgrade", "head", MIGRATION_LEDGER="true", MIGRATION_ON_CHECKSUM_MISMATCH="fail"
    )

    assert warned.returncode == 0, warned.output
    assert "Pre-flight warning [checksum-mismatch]" in warned.output
    assert "nothing to migrate, lock not taken" in warned.output
    assert failed.returncode != 0
    assert f"[checksum-mismatch] Revision {EXAMPLE_REVISIONS[0]}" in failed.output


AUTOGENERATE_ENV = """
from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context

import alembic_sgp_lock

fileConfig(context.config.config_file_name)
alembic_sgp_lock.run_migrations(target_metadata=sa.MetaData())
"""


def test_autogenerate_ignores_plugin_tables(tmp_path: Path, sqlite_url: str) -> None:
    project = make_project(tmp_path, sqlite_url)
    project.add_revision("4d3f0b5e2a34", EXAMPLE_HEAD, 'op.execute("SELECT 1")')
    assert project.run("upgrade", "head", MIGRATION_LEDGER="true").returncode == 0
    assert {"alembic_sgp_ledger", "alembic_sgp_lock_in_progress"} <= read_state(sqlite_url).tables
    (project.path / "migrations" / "env.py").write_text(AUTOGENERATE_ENV)

    finished = project.run(
        "revision", "--autogenerate", "-m", "compare", "--rev-id", "9a9a9a9a9a9a"
    )

    assert finished.returncode == 0, finished.output
    generated = revision_file(project, "9a9a9a9a9a9a").read_text()
    # The empty metadata makes autogenerate drop the application's tables...
    assert "op.drop_table('customer')" in generated
    # ...but never the plugin's own.
    assert "alembic_sgp_ledger" not in generated
    assert "alembic_sgp_lock_in_progress" not in generated
