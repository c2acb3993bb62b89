"""The contention chart and the results section of benchmarks/README.md."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

START_MARK = "<!-- results:start (written by benchmarks/run.py) -->"
END_MARK = "<!-- results:end -->"
BACKEND_TITLES = {"postgresql": "PostgreSQL", "sqlite": "SQLite file"}
HISTORY_LABELS = {
    "upgrade": "upgrade head (no-op)",
    "current": "current",
    "preflight": "preflight (plain: current)",
}


def write_chart(results: dict[str, Any], path: Path) -> None:
    """Draw time to the last exit and the share of successful processes against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(results["contention"])
    figure, axes = plt.subplots(
        2,
        len(backends),
        figsize=(4.4 * len(backends), 5.6),
        dpi=110,
        squeeze=False,
        gridspec_kw={"height_ratios": [2, 1]},
    )
    colors = {"floor": "0.55", "plain": "tab:red", "plugin": "tab:blue"}
    labels = {"floor": "floor", "plain": "plain Alembic", "plugin": "plugin"}
    for column, backend in enumerate(backends):
        sizes = results["contention"][backend]["sizes"]
        counts = sorted(int(size) for size in sizes)
        positions = list(range(len(counts)))
        time_axis, success_axis = axes[0][column], axes[1][column]

        floor = [sizes[str(n)]["floor_seconds"]["median"] for n in counts]
        time_axis.plot(
            positions, floor, color=colors["floor"], linestyle="--", marker="o", label="floor"
        )
        for variant, marker in (("plain", "s"), ("plugin", "^")):
            medians = [sizes[str(n)][variant]["seconds"]["median"] for n in counts]
            time_axis.plot(
                positions, medians, color=colors[variant], marker=marker, label=labels[variant]
            )
        time_axis.set_title(BACKEND_TITLES.get(backend, backend), fontsize=10)
        time_axis.set_ylim(bottom=0)
        time_axis.set_xticks(positions, [str(n) for n in counts])
        time_axis.grid(alpha=0.3)

        width = 0.36
        for offset, variant in ((-width / 2, "plain"), (width / 2, "plugin")):
            shares = []
            for n in counts:
                succeeded = sizes[str(n)][variant]["succeeded"]
                shares.append(100 * sum(succeeded) / (n * len(succeeded)))
            bars = success_axis.bar(
                [position + offset for position in positions],
                shares,
                width,
                color=colors[variant],
                label=labels[variant],
            )
            success_axis.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        success_axis.set_ylim(0, 118)
        success_axis.set_xticks(positions, [str(n) for n in counts])
        success_axis.set_xlabel("processes started together (N)")
        success_axis.grid(alpha=0.3, axis="y")

    axes[0][0].set_ylabel("seconds to the last exit\n(median)")
    axes[1][0].set_ylabel("processes that\nsucceeded (%)")
    axes[0][-1].legend(fontsize=8, loc="upper left")
    figure.suptitle("N x alembic upgrade head on an empty database with 5 revisions", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _spread(summary: dict[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    if not summary.get("n"):
        return "n/a"
    median = summary["median"] * scale
    low = summary["p25"] * scale
    high = summary["p75"] * scale
    return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def _verdict(value: float, goal: float) -> str:
    return "met" if value <= goal else "**missed**"


def results_markdown(results: dict[str, Any]) -> str:
    """Render the measured numbers as Markdown tables."""
    lines: list[str] = []
    machine = results["machine"]
    lines += [
        f"Run `{results['command']}` on {results['started']}, "
        f"{results['duration_seconds'] / 60:.1f} minutes, commit `{machine['commit']}`.",
        "",
        f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), {machine['memory']} memory, "
        f"Linux {machine['kernel']}; Python {machine['python']}, SQLAlchemy "
        f"{machine['sqlalchemy']}, Alembic {machine['alembic']}, psycopg2 {machine['psycopg2']}, "
        f"PostgreSQL {machine['postgresql']}, SQLite {machine['sqlite']}.",
        "",
        f"Load average (1, 5, 15 min) before: {results['load_before']}, "
        f"after: {results['load_after']}.",
        "",
        "Times are medians with the interquartile range in brackets.",
        "",
    ]
    if "noop" in results:
        lines += [
            "### No-op overhead",
            "",
            "`alembic upgrade head` on a database already at head, whole process.",
            "",
            "| backend | runs of each | plain (s) | plugin (s) | plugin / plain | goal <= 1.05 "
            "| CPU time plugin / plain |",
            "|---|---|---|---|---|---|---|",
        ]
        for backend, data in results["noop"].items():
            runs = data["seconds"]["plain"]["n"]
            lines.append(
                f"| {backend} | {runs} "
                f"| {_spread(data['seconds']['plain'], digits=3)} "
                f"| {_spread(data['seconds']['plugin'], digits=3)} | {data['ratio']:.3f} "
                f"| {_verdict(data['ratio'], 1.05)} | {data['cpu_ratio']:.3f} |"
            )
        lines.append("")
    if "contention" in results:
        lines += [
            "### Contention",
            "",
            "N processes started together on an empty database with five revisions. "
            "Floor: N plain processes on a database at head, plus one process's migration "
            "time as the plugin logs it in a run alone ("
            + ", ".join(
                f"{backend} {data['migration_seconds']:.2f} s"
                for backend, data in results["contention"].items()
            )
            + "). Successes are per round.",
            "",
            "| backend | N | floor (s) | plain (s) | plain ok | plugin (s) | plugin ok "
            "| plugin / floor | goal at N = 32 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for backend, data in results["contention"].items():
            for size, entry in sorted(data["sizes"].items(), key=lambda item: int(item[0])):
                plain, plugin = entry["plain"], entry["plugin"]
                complete = all(count == int(size) for count in plugin["succeeded"]) and all(
                    plugin["final_state_ok"]
                )
                goal = ""
                if size == "32":
                    goal = "met" if complete and plugin["to_floor"] <= 1.2 else "**missed**"
                lines.append(
                    f"| {backend} | {size} | {_spread(entry['floor_seconds'])} "
                    f"| {_spread(plain['seconds'])} | {_counts(plain['succeeded'], size)} "
                    f"| {_spread(plugin['seconds'])} | {_counts(plugin['succeeded'], size)} "
                    f"| {plugin['to_floor']:.2f} | {goal} |"
                )
        lines += ["", "Plain Alembic's failures, summed over the rounds:", ""]
        for backend, data in results["contention"].items():
            for size, entry in sorted(data["sizes"].items(), key=lambda item: int(item[0])):
                failures = entry["plain"]["failures"]
                if failures:
                    listed = "; ".join(f"{kind}: {count}" for kind, count in failures.items())
                    lines.append(f"- {backend}, N = {size}: {listed}")
        lines += ["", "![contention chart](results/latest-contention.png)", ""]
    if "handoff" in results:
        lines += [
            "### Hand-off latency",
            "",
            "Milliseconds from the holder leaving its locked block (before the release "
            "transaction) to the next waiter's acquisition, along a queue of "
            f"{next(iter(results['handoff'].values()))['waiters']} waiters. "
            "Goal for the plugin: p50 < 5 ms, p99 < 20 ms.",
            "",
            "| backend | waiter | samples | p50 | p99 | max "
            "| waiters holding a snapshot while waiting | seen with one in a sample |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for backend, data in results["handoff"].items():
            for mode, summary in data["milliseconds"].items():
                keeping = _per_mode(data.get("max_waiters_holding_snapshot"), mode)
                seen = _per_mode(data.get("max_waiters_seen_with_snapshot"), mode)
                lines.append(
                    f"| {backend} | {mode} | {summary['n']} | {summary['median']:.1f} "
                    f"| {summary['p99']:.1f} | {summary['max']:.1f} | {keeping} | {seen} |"
                )
        lines += [
            "",
            "Every 50 ms while the waiters wait, `pg_stat_activity` is read for waiter "
            "sessions with a snapshot. A waiter holds one while waiting when the same "
            "snapshot shows in two samples in a row; a sample can also catch a polling "
            "waiter during one of its tries.",
            "",
        ]
    if "history" in results:
        first = next(iter(results["history"].values()))
        lines += [
            "### Large histories",
            "",
            f"{first['revisions']} linear revisions, database at head. Plain Alembic has no "
            "pre-flight checks, so `alembic-sgp-lock preflight` is compared with plain "
            "`alembic current`, which also loads the revision map and reads the version table.",
            "",
            "| backend | command | plain (s) | plugin (s) | plugin / plain | goal <= 1.10 "
            "| CPU time plugin / plain |",
            "|---|---|---|---|---|---|---|",
        ]
        for backend, data in results["history"].items():
            for name, by_variant in data["seconds"].items():
                label = HISTORY_LABELS.get(name, name)
                ratio = data["ratio"][name]
                lines.append(
                    f"| {backend} | {label} | {_spread(by_variant['plain'])} "
                    f"| {_spread(by_variant['plugin'])} | {ratio:.3f} | {_verdict(ratio, 1.10)} "
                    f"| {data['cpu_ratio'][name]:.3f} |"
                )
        lines.append("")
    lines += _memory_lines(results)
    return "\n".join(lines)


def _per_mode(counts: dict[str, int] | None, mode: str) -> str:
    return "n/a" if counts is None else str(counts[mode])


def _counts(succeeded: list[int], size: str) -> str:
    return ", ".join(f"{count}/{size}" for count in succeeded)


def _memory_lines(results: dict[str, Any]) -> list[str]:
    rows = []
    for backend, data in results.get("noop", {}).items():
        rows.append((backend, "no-op upgrade, 5 revisions", data["max_rss_mib"]))
    for backend, data in results.get("contention", {}).items():
        rows.append(
            (backend, "migration alone, 5 revisions", data["single_migration_max_rss_mib"])
        )
    for backend, data in results.get("history", {}).items():
        rows.append(
            (backend, f"no-op upgrade, {data['revisions']} revisions", data["max_rss_mib"])
        )
    if not rows:
        return []
    lines = [
        "### Peak memory",
        "",
        "Maximum resident set size of the `alembic` process (`ru_maxrss`), MiB.",
        "",
        "| backend | run | plain | plugin | plugin - plain |",
        "|---|---|---|---|---|",
    ]
    for backend, label, by_variant in rows:
        plain = by_variant["plain"]["median"]
        plugin = by_variant["plugin"]["median"]
        lines.append(
            f"| {backend} | {label} | {plain:.1f} | {plugin:.1f} | {plugin - plain:+.1f} |"
        )
    lines.append("")
    return lines


def write_readme(results: dict[str, Any], path: Path) -> None:
    """Replace the results section of ``path`` with the numbers of ``results``."""
    text = path.read_text()
    block = f"{START_MARK}\n\n{results_markdown(results)}\n{END_MARK}"
    pattern = re.compile(re.escape(START_MARK) + ".*?" + re.escape(END_MARK), re.S)
    if not pattern.search(text):
        raise RuntimeError(f"{path} has no {START_MARK!r} ... {END_MARK!r} section to replace")
    path.write_text(pattern.sub(lambda _: block, text))
