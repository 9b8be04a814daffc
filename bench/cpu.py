"""CPU time of the processes a case keeps busy: the consumer, the broker and Redis.

The machine has few cores and all three share them, so a case's throughput depends on the CPU the
broker and Redis spend for it as much as on the consumer's own. Read from ``/proc`` (Linux).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a process has used so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S  # utime, stime


def pids_named(name: str) -> list[int]:
    """PIDs of the processes whose command name is ``name`` (as ``pgrep -x``)."""
    done = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True, check=False)
    return [int(pid) for pid in done.stdout.split()]


@dataclass(frozen=True)
class Services:
    """The local broker's and Redis's PIDs (empty when they run elsewhere)."""

    broker: tuple[int, ...]
    redis: tuple[int, ...]

    @classmethod
    def find(cls) -> Services:
        return cls(tuple(pids_named("beam.smp")), tuple(pids_named("redis-server")))

    def sample(self) -> tuple[float, float]:
        """(broker, Redis) CPU seconds so far."""
        return (
            sum(cpu_seconds(p) for p in self.broker),
            sum(cpu_seconds(p) for p in self.redis),
        )

    def since(self, before: tuple[float, float]) -> tuple[float, float]:
        """(broker, Redis) CPU seconds spent since ``before`` (an earlier ``sample``)."""
        broker, redis = self.sample()
        return broker - before[0], redis - before[1]
