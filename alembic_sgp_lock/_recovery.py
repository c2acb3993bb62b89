"""Recovery from a half-applied revision: clear its marker, optionally stamping a revision."""

from __future__ import annotations

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import make_url

from . import _compat
from ._errors import MigrationLockError
from ._lock import hold_lock
from ._log import logger
from ._marker import HalfAppliedMarker, delete_marker, marker_table, read_marker
from ._settings import Settings


def clear_half_applied(
    config: Config,
    *,
    url: str | None = None,
    stamp: str | None = None,
    version_table: str = "alembic_version",
    version_table_schema: str | None = None,
    settings: Settings | None = None,
    lock_timeout: float = 0.0,
) -> HalfAppliedMarker:
    """Delete the half-applied marker after the schema was repaired by hand.

    Run it once the schema matches either the revision before the marked one
    (pass no ``stamp``) or a revision whose changes are now all in place (pass
    it as ``stamp``). It takes the migration lock first, so it fails while
    another migration runs. With ``stamp``, the version table is stamped
    through Alembic in the same transaction that deletes the marker.

    :param config: the project's Alembic configuration; it supplies the
        scripts and, without ``url``, ``sqlalchemy.url``.
    :param url: database URL, such as the one ``env.py`` reads from ``DATABASE_URL``.
    :param stamp: a revision id, ``head`` or ``base`` to write to the version table.
    :param version_table: the ``version_table`` that ``env.py`` passes to Alembic.
    :param version_table_schema: the ``version_table_schema`` that ``env.py`` passes.
    :param settings: defaults to :meth:`Settings.from_env`; supplies the marker
        table name and the lock name.
    :param lock_timeout: seconds to wait for the lock; 0 fails at once when it is held.
    :returns: the marker that was deleted.
    :raises LockTimeoutError: another migration holds the lock.
    :raises MigrationLockError: no database URL, or no marker for ``version_table``.
    :raises alembic.util.CommandError: ``stamp`` is not a revision of these scripts.
    """
    settings = settings if settings is not None else Settings.from_env()
    database_url = url or config.get_main_option("sqlalchemy.url")
    if not database_url:
        raise MigrationLockError(
            "No database URL: pass url= or set sqlalchemy.url in "
            f"{config.config_file_name or 'alembic.ini'}"
        )
    engine = create_engine(
        _compat.with_installed_driver(make_url(database_url)), poolclass=pool.NullPool
    )
    try:
        with (
            engine.connect() as connection,
            hold_lock(
                connection,
                settings=settings,
                version_table=version_table,
                version_table_schema=version_table_schema,
                timeout=lock_timeout,
            ),
        ):
            marker = read_marker(
                connection,
                marker_table_name=settings.marker_table,
                version_table=version_table,
                version_table_schema=version_table_schema,
            )
            if marker is None:
                raise MigrationLockError(
                    f"No half-applied revision is marked for {version_table} in table "
                    f"{settings.marker_table}, so there is nothing to clear. Check "
                    "MIGRATION_MARKER_TABLE and the version table name if a migration "
                    "reported one."
                )
            with connection.begin():
                if stamp is not None:
                    migration_context = MigrationContext.configure(
                        connection,
                        opts={
                            "version_table": version_table,
                            "version_table_schema": version_table_schema,
                        },
                    )
                    migration_context.stamp(ScriptDirectory.from_config(config), stamp)
                delete_marker(
                    connection,
                    marker_table(settings.marker_table, version_table_schema),
                    version_table,
                )
    finally:
        engine.dispose()
    if stamp is None:
        logger.info("Cleared the half-applied marker of revision %s", marker.revision)
    else:
        logger.info(
            "Cleared the half-applied marker of revision %s and stamped %s",
            marker.revision,
            stamp,
        )
    return marker
