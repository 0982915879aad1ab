"""Tables of the results, the targets with pass or miss, and docs/BENCHMARKS.md.

Every figure is the median over the repetitions of one (scenario, target) pair; error
counts are summed. Ratios are given against the direct connection and against nginx.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tests.bench.profile import Profile
from tests.bench.scenarios import Measurement
from tests.bench.stats import median, ratio
from tests.bench.tables import Row, format_number, format_ratio, markdown_table
from tests.bench.targets import target_checks


@dataclass(frozen=True, slots=True)
class Context:
    """Facts about the run that the report prints besides the numbers."""

    title_note: str
    command: str
    date: str
    machine: list[tuple[str, str]]
    setup: list[str]


def aggregate(measurements: Sequence[Measurement]) -> dict[tuple[str, str], Row]:
    """Return the median figures per (scenario, target), in the order first measured."""
    groups: dict[tuple[str, str], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.scenario, m.target), []).append(m)
    rows: dict[tuple[str, str], Row] = {}
    for key, group in groups.items():

        def mid(value: Callable[[Measurement], float], group: list[Measurement] = group) -> float:
            return median([value(m) for m in group])

        row: Row = {
            "rate": mid(
                lambda m: m.load.completed / m.load.elapsed_s if m.load.elapsed_s else math.nan
            ),
            "p50_ms": mid(lambda m: m.load.p50_ms),
            "p99_ms": mid(lambda m: m.load.p99_ms),
            "ttfb_p50_ms": mid(lambda m: m.load.ttfb_p50_ms),
            "ttfb_p99_ms": mid(lambda m: m.load.ttfb_p99_ms),
            "proxy_us": mid(lambda m: m.per_request_us(m.proxy_cpu_s)),
            "upstream_us": mid(lambda m: m.per_request_us(m.upstream_cpu_s)),
            "load_cpu_pct": mid(lambda m: m.load_cpu_percent),
            "redis_per_req": mid(lambda m: m.redis_per_request),
            "redis_routing_per_req": mid(lambda m: m.redis_routing_per_request),
            "completed": float(sum(m.load.completed for m in group)),
            "errors": float(sum(m.load.error_count for m in group)),
            "repetitions": float(len(group)),
        }
        for name in (
            "server_cpu_pct",
            "streams",
            "rss_idle_kib",
            "rss_open_kib",
            "kib_per_stream",
            "fds_open",
        ):
            if name in group[0].extra:
                row[name] = median([m.extra[name] for m in group])
        rows[key] = row
    return rows


def _scenario_rows(rows: dict[tuple[str, str], Row], scenario: str) -> list[tuple[str, Row]]:
    return [(target, row) for (name, target), row in rows.items() if name == scenario]


def _ratios(row: Row, direct: Row | None, nginx: Row | None, key: str) -> str:
    to_direct = ratio(row[key], direct[key]) if direct else math.nan
    to_nginx = ratio(row[key], nginx[key]) if nginx else math.nan
    return f"{format_ratio(to_direct)} / {format_ratio(to_nginx)}"


def throughput_section(rows: dict[tuple[str, str], Row], scenario: str, title: str) -> list[str]:
    """Absolute figures and ratios for a wrk scenario (S1, S2)."""
    found = _scenario_rows(rows, scenario)
    by_target = dict(found)
    direct, nginx = by_target.get("direct"), by_target.get("nginx")
    absolute = [
        [
            target,
            format_number(r["rate"]),
            format_number(r["p50_ms"], 2),
            format_number(r["p99_ms"], 2),
            format_number(r["proxy_us"]),
            format_number(r["upstream_us"]),
            format_number(r.get("server_cpu_pct", math.nan)),
            format_number(r["load_cpu_pct"]),
            format_number(r["redis_per_req"], 3),
            format_number(r["errors"]),
        ]
        for target, r in found
    ]
    ratios = [
        [
            target,
            _ratios(r, direct, nginx, "rate"),
            _ratios(r, direct, nginx, "p50_ms"),
            _ratios(r, direct, nginx, "p99_ms"),
            _ratios(r, None, nginx, "proxy_us"),
        ]
        for target, r in found
        if target != "direct"
    ]
    return [
        f"### {title}",
        "",
        *markdown_table(
            [
                "target",
                "req/s",
                "p50 ms",
                "p99 ms",
                "proxy CPU µs/req",
                "provider CPU µs/req",
                "server CPU %",
                "wrk CPU %",
                "Redis cmds/req",
                "errors",
            ],
            absolute,
        ),
        "",
        "Ratios (x direct / x nginx):",
        "",
        *markdown_table(["target", "req/s", "p50", "p99", "proxy CPU/req"], ratios),
        "",
    ]


def paced_section(rows: dict[tuple[str, str], Row]) -> list[str]:
    """Absolute figures and ratios for S3 (TTFB and total per stream)."""
    found = _scenario_rows(rows, "S3")
    by_target = dict(found)
    direct, nginx = by_target.get("direct"), by_target.get("nginx")
    absolute = [
        [
            target,
            format_number(r["rate"], 1),
            format_number(r["ttfb_p50_ms"], 2),
            format_number(r["ttfb_p99_ms"], 2),
            format_number(r["p50_ms"], 1),
            format_number(r["p99_ms"], 1),
            format_number(r["proxy_us"]),
            format_number(r["upstream_us"]),
            format_number(r.get("server_cpu_pct", math.nan)),
            format_number(r["load_cpu_pct"]),
            format_number(r["redis_per_req"], 3),
            format_number(r["errors"]),
        ]
        for target, r in found
    ]
    ratios = [
        [
            target,
            format_number(r["ttfb_p50_ms"] - direct["ttfb_p50_ms"], 2) if direct else "—",
            _ratios(r, direct, nginx, "ttfb_p50_ms"),
            _ratios(r, direct, nginx, "ttfb_p99_ms"),
            _ratios(r, direct, nginx, "p50_ms"),
            _ratios(r, direct, nginx, "p99_ms"),
            _ratios(r, None, nginx, "proxy_us"),
        ]
        for target, r in found
        if target != "direct"
    ]
    return [
        "### S3: 256-event streams, 2 ms apart, 64 concurrent (asyncio client)",
        "",
        *markdown_table(
            [
                "target",
                "streams/s",
                "TTFB p50 ms",
                "TTFB p99 ms",
                "total p50 ms",
                "total p99 ms",
                "proxy CPU µs/stream",
                "provider CPU µs/stream",
                "server CPU %",
                "client CPU %",
                "Redis cmds/req",
                "errors",
            ],
            absolute,
        ),
        "",
        "Ratios (x direct / x nginx):",
        "",
        *markdown_table(
            [
                "target",
                "TTFB p50 - direct, ms",
                "TTFB p50",
                "TTFB p99",
                "total p50",
                "total p99",
                "proxy CPU/stream",
            ],
            ratios,
        ),
        "",
    ]


def idle_section(rows: dict[tuple[str, str], Row], levels: Sequence[int]) -> list[str]:
    """RSS per held stream and errors for S4, one table over every level."""
    table = []
    for level in levels:
        found = _scenario_rows(rows, f"S4-{level}")
        nginx = dict(found).get("nginx")
        for target, r in found:
            table.append(
                [
                    target,
                    format_number(r.get("streams", math.nan)),
                    format_number(r["completed"]),
                    format_number(r["errors"]),
                    format_number(r.get("rss_idle_kib", math.nan) / 1024, 1),
                    format_number(r.get("rss_open_kib", math.nan) / 1024, 1),
                    format_number(r.get("kib_per_stream", math.nan), 1),
                    format_ratio(ratio(r.get("kib_per_stream", math.nan), nginx["kib_per_stream"]))
                    if nginx and target != "nginx"
                    else "—",
                    format_number(r.get("fds_open", math.nan)),
                    format_number(r["ttfb_p50_ms"], 2),
                    format_number(r["ttfb_p99_ms"], 2),
                    format_number(r["load_cpu_pct"]),
                ]
            )
    return [
        "### S4: idle streams held open",
        "",
        "RSS is the measured process tree's VmRSS: the proxy's, or the fake provider's for "
        "`direct`. KiB/stream = (RSS while held - RSS before) / streams opened.",
        "",
        *markdown_table(
            [
                "target",
                "streams",
                "opened",
                "errors",
                "RSS before MiB",
                "RSS held MiB",
                "KiB/stream",
                "x nginx",
                "open fds",
                "TTFB p50 ms",
                "TTFB p99 ms",
                "client CPU %",
            ],
            table,
        ),
        "",
    ]


def profile_section(profile: Profile | None, note: str) -> list[str]:
    if profile is None:
        return ["## Where the gateway's CPU goes", "", note, ""]
    total = profile.samples or 1

    def share(rows: Sequence[tuple[str, int]]) -> list[list[str]]:
        return [[f"`{name}`", f"{100 * count / total:.1f} %"] for name, count in rows]

    return [
        "## Where the gateway's CPU goes",
        "",
        note,
        "",
        f"{profile.samples} samples. Self time by area of the code (innermost frame):",
        "",
        *markdown_table(["area", "share"], share(profile.self_by_area)),
        "",
        "Functions with the most self time:",
        "",
        *markdown_table(["function", "self"], share(profile.self_by_function)),
        "",
        "Nearest Python callers of the C functions above:",
        "",
        *markdown_table(
            ["C function", "called from (share of all samples)"],
            [
                [
                    f"`{name}`",
                    "; ".join(
                        f"`{caller}` {100 * count / total:.1f} %" for caller, count in callers
                    ),
                ]
                for name, callers in profile.python_callers.items()
            ],
        ),
        "",
        "Python functions on the stack most often (inclusive):",
        "",
        *markdown_table(["function", "inclusive"], share(profile.inclusive_by_function)),
        "",
    ]


def render(
    measurements: Sequence[Measurement],
    levels: Sequence[int],
    context: Context,
    profile: Profile | None,
    profile_note: str,
    warnings: Sequence[tuple[str, int]],
) -> tuple[str, str]:
    """Return (the tables for stdout, the whole BENCHMARKS.md text)."""
    rows = aggregate(measurements)
    warning_lines = [f"- {count} x `{message}`" for message, count in warnings] or ["- none"]
    tables = [
        *throughput_section(rows, "S1", "S1: small non-streaming JSON, 32 connections (wrk)"),
        *throughput_section(rows, "S2", "S2: 64-event streams without delay, 32 connections (wrk)"),
        *paced_section(rows),
        *idle_section(rows, levels),
        "### Targets",
        "",
        *markdown_table(["goal", "measured", "limit", "result"], target_checks(rows, levels)),
        "",
        "### Gateway log: warnings and errors during the run (digits shown as N)",
        "",
        *warning_lines,
        "",
    ]
    document = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m tests.bench.run`); rerun it rather than editing "
        "this page.",
        "",
        context.title_note,
        "",
        f"- Command: `{context.command}`",
        f"- Date: {context.date}",
        *[f"- {name}: {value}" for name, value in context.machine],
        "",
        "## Set-up",
        "",
        *[f"- {line}" for line in context.setup],
        "",
        "## Results",
        "",
        *tables,
        *profile_section(profile, profile_note),
    ]
    return "\n".join(tables), "\n".join(document).rstrip() + "\n"
