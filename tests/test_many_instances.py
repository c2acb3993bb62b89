"""64 alembic processes at once: one connection each, within the server's connection limit."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import EXAMPLE_HEAD, make_project, read_state

pytestmark = [pytest.mark.postgresql, pytest.mark.slow]

PROCESSES = 64


class ConnectionSampler:
    """Sample pg_stat_activity every 20 ms and keep, per application_name, the peak count."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(
            url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT"
        )
        self.database = sa.engine.make_url(url).database
        self.peak_per_process: dict[str, int] = defaultdict(int)
        self.backends_per_process: dict[str, set[int]] = defaultdict(set)
        self.peak_total = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.engine.connect() as connection:
            while not self._stop.is_set():
                rows = connection.execute(
                    sa.text(
                        "SELECT pid, application_name FROM pg_stat_activity "
                        "WHERE datname = :database AND application_name LIKE 'instance-%'"
                    ),
                    {"database": self.database},
                ).all()
                self.samples += 1
                counts: dict[str, int] = defaultdict(int)
                for pid, application_name in rows:
                    # The holder's name carries a tag after a space.
                    process = application_name.split(" ")[0]
                    counts[process] += 1
                    self.backends_per_process[process].add(pid)
                for process, count in counts.items():
                    self.peak_per_process[process] = max(self.peak_per_process[process], count)
                self.peak_total = max(self.peak_total, len(rows))
                time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.engine.dispose()


def run_instances(project, url: str) -> tuple[list[tuple[int, str]], ConnectionSampler, float]:
    sampler = ConnectionSampler(url)
    started = time.monotonic()
    processes = [
        project.start("upgrade", "head", PGAPPNAME=f"instance-{number}")
        for number in range(PROCESSES)
    ]
    results = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=600)
            results.append((process.returncode, output))
    finally:
        elapsed = time.monotonic() - started
        sampler.stop()
    return results, sampler, elapsed


def max_connections(url: str) -> int:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            return int(connection.execute(sa.text("SHOW max_connections")).scalar_one())
    finally:
        engine.dispose()


def check_connections(sampler: ConnectionSampler, url: str) -> None:
    assert sampler.samples > 10
    assert sampler.peak_per_process, "the sampler saw no instance"
    assert max(sampler.peak_per_process.values()) == 1
    assert sampler.peak_total <= PROCESSES
    assert sampler.peak_total < max_connections(url)


def test_64_instances_on_empty_database(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)

    results, sampler, elapsed = run_instances(project, pg_url)

    print(
        f"64 on empty database: {elapsed:.1f} s, peak {sampler.peak_total} connections, "
        f"{len(sampler.peak_per_process)} instances seen, backends per instance max "
        f"{max(len(pids) for pids in sampler.backends_per_process.values())}"
    )
    for returncode, output in results:
        assert returncode == 0, output
    outputs = "".join(output for _, output in results)
    assert outputs.count("Running upgrade  -> 1a0c7e2b9d01") == 1
    state = read_state(pg_url)
    assert state.versions == [EXAMPLE_HEAD]
    assert state.customers == 1
    check_connections(sampler, pg_url)


def test_64_instances_at_head(tmp_path: Path, pg_url: str) -> None:
    project = make_project(tmp_path, pg_url)
    assert project.run("upgrade", "head").returncode == 0

    results, sampler, elapsed = run_instances(project, pg_url)

    print(
        f"64 at head: {elapsed:.1f} s, peak {sampler.peak_total} connections, "
        f"{len(sampler.peak_per_process)} instances seen"
    )
    for returncode, output in results:
        assert returncode == 0, output
        assert "nothing to migrate, lock not taken" in output
    assert read_state(pg_url).versions == [EXAMPLE_HEAD]
    check_connections(sampler, pg_url)
