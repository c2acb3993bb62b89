"""Benchmark alembic-sgp-lock against plain Alembic on PostgreSQL and SQLite.

Run from the repository root::

    python benchmarks/run.py            # full run, updates benchmarks/README.md
    python benchmarks/run.py --quick    # small run to check that everything works

Every section runs plain Alembic (an unlocked env.py) and the plugin in the
same run, alternating between them. Databases are created on the server at
``POSTGRES_ADMIN_URL`` (default ``postgresql+psycopg2://postgres@127.0.0.1:5432/postgres``)
and dropped at the end; SQLite files live in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from _report import write_chart, write_readme
from _support import (
    FIVE_HEAD,
    FIVE_REVISIONS,
    FIVE_TABLES,
    REPO_ROOT,
    VARIANTS,
    Databases,
    ProcessGroup,
    Project,
    alembic_command,
    build_project,
    compile_package,
    linear_history,
    load_average,
    read_state,
    run_one,
    summarize,
    workspace,
)

BENCH_DIR = Path(__file__).resolve().parent
PROBE = BENCH_DIR / "handoff_probe.py"
BACKENDS = ("postgresql", "sqlite")
PROCESS_TIMEOUT = 600.0
# Known first lines of plain Alembic's failures under contention.
FAILURE_KINDS = (
    ("pg_type_typname_nsp_index", "UniqueViolation on pg_type (two CREATE TABLE at once)"),
    ("DuplicateTable", "DuplicateTable"),
    ("DuplicateColumn", "DuplicateColumn"),
    ("UniqueViolation", "UniqueViolation"),
    ("expected to match one row", "version row already moved (0 rows updated)"),
    ("database is locked", "SQLite: database is locked"),
    ("already exists", "object already exists"),
    ("duplicate column", "duplicate column"),
    ("UNIQUE constraint failed", "UNIQUE constraint failed"),
)


@dataclass(frozen=True)
class Plan:
    """How much of each measurement one run takes."""

    noop_pairs: int
    contention_sizes: tuple[int, ...]
    contention_rounds: int
    handoff_waiters: int
    handoff_rounds: int
    history_length: int
    history_pairs: int


FULL = Plan(
    noop_pairs=20,
    contention_sizes=(8, 32, 64),
    contention_rounds=3,
    handoff_waiters=20,
    handoff_rounds=3,
    history_length=2000,
    history_pairs=6,
)
QUICK = Plan(
    noop_pairs=4,
    contention_sizes=(4, 8),
    contention_rounds=1,
    handoff_waiters=20,
    handoff_rounds=1,
    history_length=200,
    history_pairs=2,
)
SINGLE_RUNS_PER_ROUND = 2
# The plugin's log line after Alembic's run: "Revision after migrating: <heads> (0.05 s)".
MIGRATION_LOG = re.compile(r"Revision after migrating: .*\(([\d.]+) s\)")
SECTIONS = ("noop", "contention", "handoff", "history")
HISTORY_COMMANDS = ("upgrade", "current", "preflight")
# The plugin's console script, installed beside this Python.
SGP_COMMAND = Path(sys.executable).with_name("alembic-sgp-lock")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def point_at(project: Project, url: str) -> None:
    """Rewrite the project's ``sqlalchemy.url``."""
    ini = project.ini.read_text()
    escaped = url.replace("%", "%%")
    project.ini.write_text(
        re.sub(r"^sqlalchemy\.url = .*$", lambda _: f"sqlalchemy.url = {escaped}", ini, flags=re.M)
    )
    project.url = url


def check_ok(result: Any, what: str) -> None:
    if result.returncode != 0:
        raise RuntimeError(f"{what} exited with {result.returncode}:\n{result.output()[-3000:]}")


def failure_kind(output: str) -> str:
    for needle, kind in FAILURE_KINDS:
        if needle in output:
            return kind
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1][:100] if lines else "no output"


def alternate(index: int) -> tuple[str, ...]:
    """Return the variants in the order of round ``index``: plain first, then plugin first."""
    return VARIANTS if index % 2 == 0 else VARIANTS[::-1]


class Bench:
    """One benchmark run: its workspace, plan and collected results."""

    def __init__(self, folder: Path, databases: Databases, plan: Plan) -> None:
        self.folder = folder
        self.databases = databases
        self.plan = plan
        self.counter = 0

    def scratch(self, name: str) -> Path:
        self.counter += 1
        path = self.folder / f"{self.counter:04d}-{name}"
        path.mkdir()
        return path

    def projects(self, name: str, url: str, revisions: Any) -> dict[str, Project]:
        return {
            variant: build_project(self.scratch(f"{name}-{variant}"), url, variant, revisions)
            for variant in VARIANTS
        }

    def run(self, project: Project, *arguments: str) -> Any:
        return self.run_command(project, alembic_command(project, *arguments))

    def run_command(self, project: Project, command: list[str]) -> Any:
        output = self.scratch("output") / "output.txt"
        return run_one(command, project.path, output, PROCESS_TIMEOUT)

    # -- no-op overhead ------------------------------------------------------------

    def noop(self, backend: str) -> dict[str, Any]:
        """Time ``alembic upgrade head`` on a database already at head, whole process."""
        url = self.databases.new(backend)
        projects = self.projects(f"noop-{backend}", url, FIVE_REVISIONS)
        check_ok(self.run(projects["plugin"], "upgrade", "head"), "first upgrade")
        for variant in VARIANTS:  # compile the revision files and warm the caches
            check_ok(self.run(projects[variant], "upgrade", "head"), f"{variant} warm-up")
        seconds: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        cpu: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        rss: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for index in range(self.plan.noop_pairs):
            for variant in alternate(index):
                result = self.run(projects[variant], "upgrade", "head")
                check_ok(result, f"{variant} no-op upgrade")
                seconds[variant].append(result.seconds)
                cpu[variant].append(result.cpu_seconds)
                rss[variant].append(result.max_rss_kib / 1024)
        self.databases.drop(url)
        return {
            "seconds": {variant: summarize(values) for variant, values in seconds.items()},
            "cpu_seconds": {variant: summarize(values) for variant, values in cpu.items()},
            "max_rss_mib": {variant: summarize(values) for variant, values in rss.items()},
            "ratio": _ratio(seconds),
            "cpu_ratio": _ratio(cpu),
            "raw_seconds": seconds,
        }

    # -- contention ----------------------------------------------------------------

    def contention(self, backend: str) -> dict[str, Any]:
        """Start N processes together on an empty database, plain and plugin, beside the floor."""
        at_head = self.databases.new(backend)
        projects = self.projects(f"contention-{backend}", at_head, FIVE_REVISIONS)
        floor_project = build_project(
            self.scratch(f"floor-{backend}"), at_head, "plain", FIVE_REVISIONS
        )
        check_ok(self.run(projects["plugin"], "upgrade", "head"), "first upgrade")
        for project in (*projects.values(), floor_project):
            check_ok(self.run(project, "upgrade", "head"), "warm-up")

        single: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        single_noop: list[float] = []
        logged_migration: list[float] = []
        single_rss: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        runs: dict[int, dict[str, list[dict[str, Any]]]] = {
            size: {"floor": [], "plain": [], "plugin": []} for size in self.plan.contention_sizes
        }
        for round_index in range(self.plan.contention_rounds):
            # One process alone: its migration time is part of the floor.
            for variant in alternate(round_index) * SINGLE_RUNS_PER_ROUND:
                url = self.databases.new(backend)
                point_at(projects[variant], url)
                result = self.run(projects[variant], "upgrade", "head")
                check_ok(result, f"{variant} single migration")
                single[variant].append(result.seconds)
                single_rss[variant].append(result.max_rss_kib / 1024)
                if variant == "plugin":
                    logged_migration.append(_logged_migration_seconds(result.output()))
                self.databases.drop(url)
            result = self.run(floor_project, "upgrade", "head")
            check_ok(result, "single no-op")
            single_noop.append(result.seconds)

            for size in self.plan.contention_sizes:
                order = ("floor", *alternate(round_index + size))
                for kind in order:
                    log(f"contention {backend} N={size} {kind} (round {round_index + 1})")
                    runs[size][kind].append(
                        self._contend(backend, size, kind, projects, floor_project)
                    )
        self.databases.drop(at_head)

        # The difference of two whole-process medians drowns a migration of a
        # few tens of milliseconds in start-up noise, so the floor takes the
        # migration time that the plugin logs around Alembic's own run.
        migration = _median(logged_migration)
        sizes: dict[str, Any] = {}
        for size, by_kind in runs.items():
            floor_seconds = [run["seconds"] + migration for run in by_kind["floor"]]
            entry: dict[str, Any] = {"floor_seconds": summarize(floor_seconds)}
            for variant in VARIANTS:
                variant_runs = by_kind[variant]
                failures: dict[str, int] = {}
                for run in variant_runs:
                    for kind, count in run["failures"].items():
                        failures[kind] = failures.get(kind, 0) + count
                entry[variant] = {
                    "seconds": summarize([run["seconds"] for run in variant_runs]),
                    "succeeded": [run["succeeded"] for run in variant_runs],
                    "processes": size,
                    "final_state_ok": [run["state_ok"] for run in variant_runs],
                    "failures": failures,
                    "to_floor": _median([run["seconds"] for run in variant_runs])
                    / _median(floor_seconds),
                }
            sizes[str(size)] = entry
        return {
            "single_migration_seconds": {k: summarize(v) for k, v in single.items()},
            "single_noop_seconds": summarize(single_noop),
            "single_migration_max_rss_mib": {k: summarize(v) for k, v in single_rss.items()},
            "migration_seconds": migration,
            "logged_migration_seconds": summarize(logged_migration),
            "process_difference_seconds": _median(single["plain"]) - _median(single_noop),
            "sizes": sizes,
        }

    def _contend(
        self,
        backend: str,
        size: int,
        kind: str,
        projects: dict[str, Project],
        floor_project: Project,
    ) -> dict[str, Any]:
        if kind == "floor":
            project, url = floor_project, floor_project.url
        else:
            project, url = projects[kind], self.databases.new(backend)
            point_at(project, url)
        outputs = self.scratch(f"contend-{kind}-{size}")
        group = ProcessGroup(PROCESS_TIMEOUT)
        command = alembic_command(project, "upgrade", "head")
        for number in range(size):
            group.start(command, project.path, outputs / f"{number}.txt")
        seconds, results = group.wait()
        failures: dict[str, int] = {}
        for result in results:
            if result.returncode != 0:
                reason = failure_kind(result.output())
                failures[reason] = failures.get(reason, 0) + 1
        state = read_state(url)
        tables, versions = state.tables, state.versions
        state_ok = tables >= FIVE_TABLES and versions == [FIVE_HEAD]
        if kind != "floor":
            self.databases.drop(url)
        return {
            "seconds": seconds,
            "succeeded": sum(result.returncode == 0 for result in results),
            "failures": failures,
            "state_ok": state_ok,
        }

    # -- hand-off latency --------------------------------------------------------

    def handoff(self, backend: str) -> dict[str, Any]:
        """Measure release-to-acquisition time along a queue of waiters."""
        url = self.databases.new(backend)
        modes = ("plugin", "blocking", "poll500") if backend == "postgresql" else ("plugin",)
        samples: dict[str, list[float]] = {mode: [] for mode in modes}
        after_unlock: dict[str, list[float]] = {mode: [] for mode in modes}
        snapshots_seen: dict[str, int] = {mode: 0 for mode in modes}
        snapshots_held: dict[str, int] = {mode: 0 for mode in modes}
        for round_index in range(self.plan.handoff_rounds):
            rotated = modes[round_index % len(modes) :] + modes[: round_index % len(modes)]
            for mode in rotated:
                log(f"hand-off {backend} {mode} (round {round_index + 1})")
                handoffs, unlocks, (seen_count, held_count) = self._handoff_round(
                    url, backend, mode
                )
                samples[mode] += handoffs
                after_unlock[mode] += unlocks
                snapshots_seen[mode] = max(snapshots_seen[mode], seen_count)
                snapshots_held[mode] = max(snapshots_held[mode], held_count)
        self.databases.drop(url)
        return {
            "waiters": self.plan.handoff_waiters,
            "milliseconds": {mode: summarize(values) for mode, values in samples.items()},
            "after_unlock_milliseconds": {
                mode: summarize(values) for mode, values in after_unlock.items()
            },
            "max_waiters_seen_with_snapshot": (
                snapshots_seen if backend == "postgresql" else None
            ),
            "max_waiters_holding_snapshot": snapshots_held if backend == "postgresql" else None,
        }

    def _handoff_round(
        self, url: str, backend: str, mode: str
    ) -> tuple[list[float], list[float], tuple[int, int]]:
        sync = self.scratch(f"handoff-{mode}")
        group = ProcessGroup(PROCESS_TIMEOUT)

        def start(role: str, number: int) -> None:
            command = [
                sys.executable,
                str(PROBE),
                "--url",
                url,
                "--mode",
                mode,
                "--role",
                role,
                "--sync-dir",
                str(sync),
                "--result",
                str(sync / f"result-{number}.json"),
            ]
            group.start(command, REPO_ROOT, sync / f"output-{number}.txt")

        start("holder", 0)
        _wait_for(lambda: (sync / "acquired").exists(), 120, "the holder to take the lock")
        for number in range(1, self.plan.handoff_waiters + 1):
            start("waiter", number)
        _wait_for(
            lambda: len(list(sync.glob("ready-*"))) >= self.plan.handoff_waiters,
            300,
            "every waiter to wait",
        )
        # Every waiter is now waiting: sample which of them have a snapshot. A
        # polling waiter has one for the microseconds of each try, so a sample
        # can catch it. A waiter keeps a snapshot while it waits when the same
        # one shows in two samples 50 ms apart.
        seen_count = held_count = 0
        previous: set[tuple[int, str]] = set()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if backend == "postgresql":
                current = _waiters_with_snapshot(self.databases, url)
                seen_count = max(seen_count, len(current))
                held_count = max(held_count, len(current & previous))
                previous = current
            time.sleep(0.05)
        (sync / "release").touch()
        # A process that exits early has failed; group.wait() reports it.
        _wait_for(
            lambda: (
                len(list(sync.glob("result-*.json"))) > self.plan.handoff_waiters
                or any(process.poll() is not None for process, _ in group.processes)
            ),
            PROCESS_TIMEOUT,
            "every process to have had the lock",
            interval=0.1,
        )
        (sync / "done").touch()
        _, results = group.wait()
        for number, result in enumerate(results):
            check_ok(result, f"hand-off process {number}")

        records = [
            json.loads((sync / f"result-{number}.json").read_text())["times"]
            for number in range(len(results))
        ]
        records.sort(key=lambda record: record["acquired"])
        handoffs = [
            (after["acquired"] - before["body_end"]) * 1000 for before, after in pairwise(records)
        ]
        unlocks = [
            (after["acquired"] - before["released"]) * 1000 for before, after in pairwise(records)
        ]
        return handoffs, unlocks, (seen_count, held_count)

    # -- large histories -----------------------------------------------------------

    def history(self, backend: str) -> dict[str, Any]:
        """Time a no-op upgrade, ``alembic current`` and the pre-flight checks, long history."""
        url = self.databases.new(backend)
        revisions = linear_history(self.plan.history_length)
        projects = self.projects(f"history-{backend}", url, revisions)
        check_ok(self.run(projects["plugin"], "stamp", "head"), "stamp head")
        commands = {
            name: {
                variant: history_command(name, variant, projects[variant]) for variant in VARIANTS
            }
            for name in HISTORY_COMMANDS
        }
        for by_variant in commands.values():
            for variant, command in by_variant.items():
                check_ok(self.run_command(projects[variant], command), f"{variant} warm-up")
        seconds = {name: {variant: [] for variant in VARIANTS} for name in commands}
        cpu = {name: {variant: [] for variant in VARIANTS} for name in commands}
        rss: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for index in range(self.plan.history_pairs):
            for name, by_variant in commands.items():
                for variant in alternate(index):
                    result = self.run_command(projects[variant], by_variant[variant])
                    check_ok(result, f"{variant} {name}")
                    seconds[name][variant].append(result.seconds)
                    cpu[name][variant].append(result.cpu_seconds)
                    if name == "upgrade":
                        rss[variant].append(result.max_rss_kib / 1024)
        self.databases.drop(url)
        return {
            "revisions": self.plan.history_length,
            "seconds": {
                name: {variant: summarize(values) for variant, values in by_variant.items()}
                for name, by_variant in seconds.items()
            },
            "ratio": {name: _ratio(by_variant) for name, by_variant in seconds.items()},
            "cpu_ratio": {name: _ratio(by_variant) for name, by_variant in cpu.items()},
            "max_rss_mib": {variant: summarize(values) for variant, values in rss.items()},
        }


def history_command(name: str, variant: str, project: Project) -> list[str]:
    """Return the command that the large-history section times as ``name`` for ``variant``."""
    if name == "upgrade":
        return alembic_command(project, "upgrade", "head")
    if name == "preflight" and variant == "plugin":
        return [str(SGP_COMMAND), "-c", str(project.ini), "preflight"]
    # Plain Alembic has no pre-flight checks. Its nearest command, `current`,
    # also loads the revision map, connects and reads the version table.
    return alembic_command(project, "current")


def _logged_migration_seconds(output: str) -> float:
    match = MIGRATION_LOG.search(output)
    if match is None:
        raise RuntimeError(f"no 'Revision after migrating' line in the output:\n{output[-3000:]}")
    return float(match.group(1))


def _median(values: list[float]) -> float:
    return float(summarize(values)["median"])


def _ratio(seconds: dict[str, list[float]]) -> float:
    return _median(seconds["plugin"]) / _median(seconds["plain"])


def _wait_for(condition: Any, timeout: float, awaited: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {awaited}")
        time.sleep(interval)


def _waiters_with_snapshot(databases: Databases, url: str) -> set[tuple[int, str]]:
    """Return (pid, backend_xmin) of the waiter sessions that have a snapshot or a transaction."""
    import sqlalchemy as sa

    name = sa.make_url(url).database
    with databases.admin.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT pid, coalesce(backend_xmin::text, state) FROM pg_stat_activity "
                "WHERE datname = :name AND application_name LIKE 'sgp-bench-waiter%' "
                "AND (backend_xmin IS NOT NULL OR state LIKE 'idle in transaction%')"
            ),
            {"name": name},
        ).all()
    return {(int(pid), str(snapshot)) for pid, snapshot in rows}


def machine(databases: Databases) -> dict[str, Any]:
    """Describe the machine and the versions that the numbers come from."""
    import alembic
    import psycopg2
    import sqlalchemy

    cpu = "unknown"
    memory = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    commit = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "cpus": _cpu_count(),
        "cpu_model": cpu,
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "alembic": alembic.__version__,
        "psycopg2": psycopg2.__version__.split()[0],
        "postgresql": databases.server_version(),
        "sqlite": sqlite3.sqlite_version,
        "commit": commit,
    }


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _stop_on_terminate(signal_number: int, frame: Any) -> None:
    # Turn SIGTERM into an exception so that the databases are dropped on the way out.
    raise SystemExit(f"stopped by signal {signal_number}")


def main() -> int:
    signal.signal(signal.SIGTERM, _stop_on_terminate)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run that checks the setup")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated subset of postgresql, sqlite",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=BENCH_DIR / "results",
        help="folder for the JSON results and the chart (default: benchmarks/results)",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="only redraw the chart and the README section from a results file of a full run",
    )
    arguments = parser.parse_args()
    if arguments.render is not None:
        rendered = json.loads(arguments.render.read_text())
        if "contention" in rendered:
            write_chart(rendered, arguments.render.with_name("latest-contention.png"))
        write_readme(rendered, BENCH_DIR / "README.md")
        return 0
    plan = QUICK if arguments.quick else FULL
    sections = [name.strip() for name in arguments.sections.split(",") if name.strip()]
    backends = [name.strip() for name in arguments.backends.split(",") if name.strip()]
    for name in sections:
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; use some of {', '.join(SECTIONS)}")
    for name in backends:
        if name not in BACKENDS:
            parser.error(f"unknown backend {name!r}; use postgresql or sqlite")
    complete = set(sections) == set(SECTIONS) and set(backends) == set(BACKENDS)
    if arguments.quick:
        prefix = "quick"
    elif complete:
        prefix = "latest"
    else:
        prefix = "partial"

    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    started = time.monotonic()
    results: dict[str, Any] = {
        "command": command.strip(),
        "plan": asdict(plan),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "load_before": load_average(),
    }
    compile_package()
    with workspace() as (folder, databases):
        results["machine"] = machine(databases)
        bench = Bench(folder, databases, plan)
        for section in sections:
            results[section] = {}
            for backend in backends:
                log(f"{section} on {backend} (load {load_average()})")
                section_started = time.monotonic()
                results[section][backend] = getattr(bench, section)(backend)
                results[section][backend]["load_after"] = load_average()
                results[section][backend]["duration_seconds"] = round(
                    time.monotonic() - section_started, 1
                )
    results["load_after"] = load_average()
    results["duration_seconds"] = round(time.monotonic() - started, 1)

    output_dir = arguments.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / f"{prefix}.json"
    json_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    log(f"wrote {json_path}")
    if "contention" in results:
        chart = output_dir / f"{prefix}-contention.png"
        write_chart(results, chart)
        log(f"wrote {chart}")
    if prefix == "latest":
        write_readme(results, BENCH_DIR / "README.md")
        log(f"updated {BENCH_DIR / 'README.md'}")
    log(f"finished in {results['duration_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
