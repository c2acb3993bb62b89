"""SIGTERM and SIGINT during a migration run: stop at the next Python step and clean up.

The handler raises :class:`MigrationInterruptedError` in the main thread, so
the usual error paths run: a lock wait or a backoff delay ends, an open
revision transaction is rolled back, and the lock is released. A statement
that is running on the server finishes first, because the driver returns to
Python only then. Later signals during that cleanup are logged and ignored.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from ._errors import MigrationInterruptedError
from ._log import logger

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`MigrationInterruptedError` while the body runs.

    Outside the main thread, where Python cannot install signal handlers, the
    body runs with the handlers the process already has.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handle(number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if received:
            logger.warning("Received %s while stopping; still cleaning up", name)
            return
        received.append(number)
        logger.warning("Received %s: stopping the migration run", name)
        raise MigrationInterruptedError(name, number)

    previous: dict[signal.Signals, Any] = {}
    for stop_signal in STOP_SIGNALS:
        previous[stop_signal] = signal.signal(stop_signal, handle)
    try:
        yield
    finally:
        for stop_signal, handler in previous.items():
            # None means a handler installed outside Python; the default is the closest.
            signal.signal(stop_signal, handler if handler is not None else signal.SIG_DFL)
