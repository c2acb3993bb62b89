"""The plugin's logger.

It is a child of ``alembic``, so the logging section of the stock
``alembic.ini`` shows its INFO lines, and ``logging.config.fileConfig`` in
``env.py`` does not disable it. The plugin never sets levels or handlers.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("alembic.sgp_lock")
