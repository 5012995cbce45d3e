"""Where the CPU went during a scenario, from /proc (Linux only; elsewhere nothing is measured).

On a 2-core machine the server's workers, PostgreSQL and wrk share the cores, so "what limits
this scenario" starts with CPU time per request of each of them, and with how much of the
machine other processes took meanwhile (another test run makes every figure lower).

Counting is approximate: a process that starts and exits between two snapshots (a PostgreSQL
backend for a pool overflow connection) is not seen at all.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Snapshot:
    per_process: dict[int, tuple[str, float]]  # pid -> (role, CPU seconds so far)
    machine_busy: float  # CPU seconds of every process on the machine (all cores)
    machine_total: float  # CPU seconds elapsed on all cores, busy or idle


@dataclass(frozen=True)
class CpuUsage:
    seconds: dict[str, float]  # role -> CPU seconds used between the two snapshots
    machine_busy: float
    machine_total: float

    @property
    def others(self) -> float:
        """CPU seconds of processes that are none of ours (other test runs, builds...)."""
        return max(0.0, self.machine_busy - sum(self.seconds.values()))

    def per_request_ms(self, role: str, requests: int) -> float | None:
        if requests <= 0 or role not in self.seconds:
            return None
        return 1000.0 * self.seconds[role] / requests

    def share(self, seconds: float) -> float:
        return seconds / self.machine_total if self.machine_total > 0 else 0.0


def parse_stat(text: str) -> tuple[str, int, float]:
    """(command name, process group, user+system CPU seconds) from a /proc/<pid>/stat line."""
    close = text.rindex(")")
    comm = text[text.index("(") + 1:close]
    fields = text[close + 2:].split()
    # fields[0] is field 3 (state): pgrp is field 5, utime 14, stime 15
    return comm, int(fields[2]), (int(fields[11]) + int(fields[12])) / _TICK


def parse_machine(text: str) -> tuple[float, float]:
    """(busy, total) CPU seconds from the ``cpu`` line of /proc/stat."""
    values = [int(v) for v in text.splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return (total - idle) / _TICK, total / _TICK


def snapshot(*, server_pgid: int | None, database: str | None) -> Snapshot | None:
    """Roles: ``server`` (the process group of ``yilian serve``) and ``postgres`` (backends of
    ``database``). wrk has exited by the second snapshot: its CPU time comes from
    :func:`children_seconds` instead."""
    if not (PROC / "stat").exists():
        return None
    per_process: dict[int, tuple[str, float]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm, pgrp, seconds = parse_stat((entry / "stat").read_text())
            role = None
            if server_pgid is not None and pgrp == server_pgid:
                role = "server"
            elif comm == "postgres" and database:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if f" {database} " in cmdline:
                    role = "postgres"
        except (OSError, ValueError, IndexError):
            continue  # the process ended meanwhile
        if role is not None:
            per_process[int(entry.name)] = (role, seconds)
    busy, total = parse_machine((PROC / "stat").read_text())
    return Snapshot(per_process, busy, total)


def children_seconds() -> float:
    """User + system CPU seconds of this process's finished (waited-for) children, e.g. wrk."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def usage(before: Snapshot | None, after: Snapshot | None, *, wrk_seconds: float | None = None) -> CpuUsage | None:
    if before is None or after is None:
        return None
    seconds: dict[str, float] = {"server": 0.0}
    if wrk_seconds is not None:
        seconds["wrk"] = wrk_seconds
    for pid, (role, cpu) in after.per_process.items():
        start = before.per_process.get(pid, (role, 0.0))[1]
        seconds[role] = seconds.get(role, 0.0) + max(0.0, cpu - start)
    return CpuUsage(seconds, after.machine_busy - before.machine_busy, after.machine_total - before.machine_total)


def speed_probe_ms(iterations: int = 1_000_000) -> float:
    """CPU milliseconds this process needs for a fixed pure-Python loop: how fast the machine
    is right now. Here it varied by half within an hour (a shared host). A hint only: a loop
    that stays in the core's caches does not see a neighbour that slows memory-bound work
    (the database) down."""
    began = time.process_time()
    x = 0
    for i in range(iterations):
        x += i * i % 7
    return (time.process_time() - began) * 1000
