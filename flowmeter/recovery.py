"""Crash and hang recovery: when a dead or stuck child is restarted, and the record of it.

A child that dies (killed, out of memory, an exception: exit code
``CRASH_EXIT`` or a signal) is started again under its name, at once the
first time; one that keeps dying waits longer each time
(``RESTART_DELAYS_S``), and past ``CRASH_LOOP`` restarts within a minute
the run stops with its error instead of looping. A child that exits with
``CONFIG_EXIT`` (a source that cannot be opened, a permission) is never
restarted: the same start would meet the same error. A child that sends
no report for ``HANG_S`` (stopped, or stuck in a loop; every report is a
heartbeat, ``flowmeter.ipc.lifecycle``) is killed and restarted the same
way; before its first report it has ``START_GRACE_S``.

Every death is an ``Incident``: when, which process, how, and when its
successor started; the summary, the log and ``flowmeter status`` show them.
What the death cost in packets is counted by ``PipelineReport.losses``.
"""
from __future__ import annotations

from dataclasses import dataclass

RESTART_DELAYS_S = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # by restarts of the name in the last minute
CRASH_LOOP = 5  # more restarts than this of one name within CRASH_WINDOW_S: the run stops
CRASH_WINDOW_S = 60.0
# A child that reports nothing for this long is killed and restarted. Meanwhile a stuck worker holds
# back its capture (the batch ring is full), and a live source's kernel buffer fills: kernel drops.
HANG_S = 5.0
START_GRACE_S = 30.0  # ... or nothing at all for this long after it started (opening a source can take a while)


@dataclass
class Incident:
    at_s: float  # seconds after the pipeline started
    name: str
    how: str  # "killed by signal 9", "exited with code 70", "hung: no report for 10 s"
    restart_s: float | None = None  # when its successor started (seconds after the pipeline started)

    def line(self) -> str:
        then = (f"restarted {self.restart_s - self.at_s:.1f} s later" if self.restart_s is not None
                else "not restarted")
        return f"{self.name} {self.how} at {self.at_s:.1f} s; {then}"


class Restarts:
    """The incidents of one run, and the delay before each restart (``None``: a crash loop, give up)."""

    def __init__(self) -> None:
        self.incidents: list[Incident] = []
        self._times: dict[str, list[float]] = {}

    def died(self, name: str, how: str, at_s: float) -> Incident:
        incident = Incident(at_s, name, how)
        self.incidents.append(incident)
        return incident

    def delay(self, name: str, at_s: float) -> float | None:
        """Seconds to wait before ``name`` is started again; None once it is in a crash loop."""
        recent = [t for t in self._times.get(name, []) if at_s - t < CRASH_WINDOW_S]
        if len(recent) >= CRASH_LOOP:
            return None
        recent.append(at_s)
        self._times[name] = recent
        return RESTART_DELAYS_S[min(len(recent) - 1, len(RESTART_DELAYS_S) - 1)]

    def count(self, name: str | None = None) -> int:
        return sum(1 for i in self.incidents if name is None or i.name == name)
