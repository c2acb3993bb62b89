"""Keeping the plugin's own tables out of Alembic's autogenerate and ``alembic check``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._settings import Settings

IncludeObject = Callable[[Any, str | None, str, bool, Any], bool]


def exclude_plugin_tables(
    include_object: IncludeObject | None = None, settings: Settings | None = None
) -> IncludeObject:
    """Return an ``include_object`` callback that hides the ledger and marker tables.

    Without it, autogenerate finds those tables in the database but not in the
    application's metadata, and writes ``op.drop_table()`` for them.
    ``run_migrations()`` applies it by itself; a hand-written ``env.py``
    passes the result to ``context.configure(include_object=...)``.

    :param include_object: the project's own callback, consulted for every
        other object.
    :param settings: defaults to :meth:`Settings.from_env`, which names the tables.
    """
    settings = settings if settings is not None else Settings.from_env()
    plugin_tables = frozenset({settings.ledger_table, settings.marker_table})

    def include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        if type_ == "table" and name in plugin_tables:
            return False
        if include_object is None:
            return True
        return include_object(obj, name, type_, reflected, compare_to)

    return include
