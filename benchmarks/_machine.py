"""What the benchmarks read off the machine, and how they print a spread of repeated measurements."""

from __future__ import annotations

import os
import resource
import statistics


def rss_bytes() -> int:
    """This process's resident memory now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (`ru_maxrss`, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: another job on the machine skews every timing."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def span(values: list[float], fmt: str = "{:.3f}") -> str:
    """`median (min–max)` of repeated measurements."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def trl_version() -> str | None:
    """The installed TRL's version (the `bench` extra), None without it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trl")
    except PackageNotFoundError:
        return None
