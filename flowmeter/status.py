"""What a pipeline tells the operator: the summary, per-source lines, the status file, ``flowmeter status``.

The supervisor keeps one ``ChildInfo`` per child with the last counters it
reported (``flowmeter.ipc.counters``); a ``PipelineReport`` reads them:

* ``totals()``: the counters of each role, summed over its processes
  (``replay --stats`` writes them as JSON);
* ``summary()``: the lines printed when a pipeline ends (packets, flows,
  records by flowEndReason, what was not metered and why, per collector
  what was sent and not sent, per live source its own counts);
* ``source_lines()``: one line per live source, logged every 10 s;
* ``write_status()``: the status file in the run's private directory,
  rewritten whole every second, which ``flowmeter status`` reads
  (``running_status``, ``describe_runs``): with the packet rate of each
  source over the last second and each running process's CPU seconds and
  resident memory (``process_usage``, read from the kernel by psutil);
* ``lost_packets()``, ``packets_by_source()``: figures ``flowmeter.metrics``
  serves to Prometheus as well.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from typing import Any, TextIO

from flowmeter.ipc.counters import BY_ROLE, END_REASONS, RoleCounters, merge, to_wire

STATUS_FILE = "status.json"
STATUS_MAX = 4 << 20  # octets of a status file read at most (a run writes a few kilobytes)
STATUS_WRITE_S = 1.0  # the status file is rewritten this often
SOURCE_LOG_S = 10.0  # a line per live source this often in the run's log
ROLES = ("capture", "worker", "exporter")

log = logging.getLogger("flowmeter.status")


@dataclass
class ChildInfo:
    """The supervisor's view of one child: its process and the last counters it reported."""

    name: str
    role: str
    process: Any  # multiprocessing.Process
    counters: RoleCounters | None = None
    error: str = ""
    ended_s: float = 0.0  # when it exited, seconds after the pipeline started
    started: float = 0.0  # time.monotonic() when it was started
    heard: float = 0.0  # time.monotonic() of its last report (its heartbeat); 0 before the first
    replaced: bool = False  # it died and a successor of the same name took over (or will)
    hung: bool = False  # killed by the supervisor for reporting nothing for ``HANG_S``
    final: bool = False  # its last report (``Report.final``) has arrived


class PipelineReport:
    """Reports of one pipeline (see the module notes); ``children`` is the supervisor's live list."""

    def __init__(self, children: list[ChildInfo], *, profile: str, sources: list[str], what: str, workers: int,
                 captures: int, err: TextIO, progress: bool) -> None:
        self.children = children
        self.profile = profile
        self.sources = sources
        self.what = what  # "2 capture file(s), 1 live source(s)"
        self.workers, self.captures = workers, captures
        self.err = err
        self.progress = progress
        self.started = 0.0  # time.monotonic() when the children were started
        self.elapsed = 0.0  # seconds the pipeline ran, once it ended
        self.incidents: list = []  # flowmeter.recovery.Incident: children that died or hung, and their restarts
        self.files_of: dict[str, str] = {}  # capture process reading files -> "pcap:A,pcap:B" (its metrics label)
        self._rates_from: tuple[float, dict[str, int]] = (0.0, {})  # (time, packets per source) at the last write
        self.rates: dict[str, float] = {}  # packets/s per source over the last interval of the status file
        self._status_written = 0.0
        self._sources_logged = 0.0

    def _seconds(self) -> float:
        return max(self.elapsed or time.monotonic() - self.started, 1e-9)

    def totals(self) -> dict[str, RoleCounters]:
        """The counters of every role, summed over its processes (zero for a role with none)."""
        out = {}
        for role in ROLES:
            values = [c.counters for c in self.children if c.role == role and c.counters is not None]
            out[role] = merge(values) if values else BY_ROLE[role]()
        return out

    def summary(self) -> str:
        t = self.totals()
        cap, wrk, exp = t["capture"], t["worker"], t["exporter"]
        dt = self._seconds()
        lines = [
            f"{self.what}, {cap.frames:,} frames, {cap.packets:,} packets metered ({cap.octets:,} layer-3 octets) "
            f"in {dt:.2f} s = {cap.packets / dt:,.0f} packets/s with {self.workers} worker(s)"
            + (f" and {self.captures} capture processes" if self.captures > 1 else ""),
            f"flows: {wrk.flows:,}; flow records made: {wrk.records_out:,} "
            f"({', '.join(f'{k} {wrk.end_reasons[k]:,}' for k in END_REASONS if wrk.end_reasons.get(k))})",
        ]
        lost = {**cap.not_metered, "other direction": cap.other_direction, **wrk.dropped}
        for cause, n in exp.dropped.items():
            lost[cause] = lost.get(cause, 0) + n
        lines.append("not metered: " + (", ".join(f"{k} {v:,}" for k, v in sorted(lost.items()) if v) or "none"))
        for name, c in exp.collectors.items():
            lines.append(f"collector {name}: {c.flow_records:,} records ({c.packets:,} packets) sent in "
                         f"{c.messages:,} messages; {c.not_sent_records:,} records ({c.not_sent_packets:,} packets) "
                         "not sent")
        if not exp.collectors:
            lines.append("exporting is off: no records were sent")
        if self.incidents:
            lines.append("restarts: " + "; ".join(i.line() for i in self.incidents))
        lines.append("lost: " + ("; ".join(self.losses()) or "none"))
        return "\n".join(lines + self.source_lines())

    def in_flight(self) -> int:
        """Packets metered that the exporter has not received yet: in the workers' flow tables
        (until their flows end) or on their way."""
        t = self.totals()
        return max(t["capture"].packets - t["exporter"].packets, 0)

    def ignored_packets(self) -> int:
        """Packets metered and then lost inside flowmeter, as known while it runs (the statistics
        records' ignoredPacketTotalCount): flows held by workers that died, batches given up for them,
        frames read by a capture process that died before metering them."""
        return sum(self.lost_packets().values())

    def lost_packets(self) -> dict[str, int]:
        """``ignored_packets`` by the role of the processes that held them (the metrics' labels)."""
        return {"capture": self._unread(), "worker": self._lost_in_workers()}

    def _lost_in_workers(self) -> int:
        lost = 0
        for c in self.children:
            w = c.counters
            if c.role != "worker" or w is None:
                continue
            lost += w.given_up_packets
            if c.process.exitcode not in (None, 0):
                lost += max(w.packets - w.packets_out, 0)
        return lost

    def _unread(self) -> int:
        """Frames a live source handed to a capture process that died before it metered them: what the
        source read (its count is kept across restarts) less what every process of that name took."""
        unread = 0
        for name in {c.name for c in self.children if c.role == "capture"}:
            gens = [c.counters for c in self.children if c.name == name and c.counters is not None]
            read = max((g.source_counters.get("frames read", 0) for g in gens), default=0)
            if read:
                unread += max(read - sum(g.frames for g in gens), 0)
        return unread

    def losses(self, running: bool = False) -> list[str]:
        """What was metered and did not reach the collectors, by where it was lost (empty: nothing).

        ``running``: while the pipeline runs, packets metered and not yet at
        the exporter are mostly in the workers' flow tables, not lost: only
        what is known lost (``ignored_packets``) is said for them.

        Counted from the processes' reports, summed over every process of a
        name (a restarted child's predecessors too): packets metered that no
        exporter received (a worker that died with its flows, batches on
        their way to a process that died), records an exporter did not send
        (per collector and cause), and records an exporter that died still
        held. A killed process's figures are those of its last report, sent
        at most ``URGENT_S`` after each change while it was busy; the parts
        add up to every packet metered that a collector was not sent.
        """
        t = self.totals()
        cap, wrk, exp = t["capture"], t["worker"], t["exporter"]
        out = []
        inside = cap.packets - exp.packets + self._unread()
        if running:
            known = self.ignored_packets()
            if known:
                out.append(f"{known:,} packets metered or read were lost by processes that died")
        elif inside:
            held = f"; {wrk.active_flows:,} flows were held by workers that ended without flushing them" \
                if wrk.active_flows else ""
            out.append(f"{inside:,} packets metered or read never reached the exporter{held}")
        for name, c in exp.collectors.items():
            if c.not_sent_records:
                causes = ", ".join(f"{k} {v:,}" for k, v in sorted(c.errors.items()))
                out.append(f"collector {name}: {c.not_sent_records:,} records ({c.not_sent_packets:,} packets) "
                           f"not sent" + (f" ({causes})" if causes else ""))
        for child in self.children:
            if child.role != "exporter" or child.counters is None or child.process.exitcode in (None, 0):
                continue
            for name, c in child.counters.collectors.items():
                held = child.counters.packets - c.packets - c.not_sent_packets
                if held:
                    out.append(f"collector {name}: {held:,} packets held by {child.name} (pid {child.process.pid}) "
                               "when it died")
        return out

    def source_lines(self) -> list[str]:
        """Per live source: packets metered, rate, what it did not meter, the kernel's and the source's counts."""
        lines = []
        dt = self._seconds()
        for c in self.children:
            s = c.counters
            if c.role != "capture" or s is None or not s.source:
                continue
            extra = "".join(f", {k} {v:,}" for k, v in s.source_counters.items())
            lines.append(f"{c.name} {s.source}: {s.packets:,} packets metered ({s.packets / dt:,.0f}/s), "
                         f"not metered {sum(s.not_metered.values()):,}{extra}")
        return lines

    def log_sources(self, now: float) -> None:
        """The per-source lines on the run's log, every ``SOURCE_LOG_S``."""
        if now - self._sources_logged < SOURCE_LOG_S:
            return
        self._sources_logged = now
        for line in self.source_lines():
            log.info("%s", line)

    def packets_by_source(self) -> dict[str, int]:
        """Packets metered per source (a live source, or a capture process's files), every process counted."""
        out: dict[str, int] = {}
        for c in self.children:
            if c.role == "capture" and c.counters is not None:
                label = c.counters.source or self.files_of.get(c.name, "pcap")
                out[label] = out.get(label, 0) + c.counters.packets
        return out

    def show_progress(self) -> None:
        """The replay's progress line on a terminal: share of the files read, packets, rate."""
        if not self.progress:
            return
        cap = [c.counters for c in self.children if c.role == "capture" and c.counters is not None]
        done = sum(s.file_octets for s in cap)
        size = sum(s.file_size for s in cap) or 1
        packets = sum(s.packets for s in cap)
        self.err.write(f"\r\033[Kreplay: {100 * done / size:5.1f}%  {packets:,} packets  "
                       f"{packets / self._seconds():,.0f} packets/s")
        self.err.flush()

    def end_progress(self) -> None:
        if self.progress:
            self.err.write("\r\033[K")

    def write_status(self, rundir: str, now: float) -> None:
        """The live counters in the runtime directory, for ``flowmeter status`` (rewritten whole, atomically)."""
        if now - self._status_written < STATUS_WRITE_S:
            return
        # the current rate: packets per source since the last write (the log's lines give the average)
        then, before = self._rates_from
        packets = self.packets_by_source()
        interval = now - then if then else 0.0
        rates = {k: round((v - before.get(k, 0)) / interval, 1) for k, v in packets.items()} if interval else {}
        self._rates_from = (now, packets)
        self.rates = rates
        self._status_written = now
        usage = {name: {"cpu_s": round(cpu, 2), "rss": rss} for name, _role, cpu, rss in
                 process_usage([c for c in self.children if not c.replaced])}
        doc = {"pid": os.getpid(), "profile": self.profile, "uptime_s": round(now - self.started, 1),
               "sources": self.sources, "lines": self.source_lines(), "rates": rates,
               "interval_s": round(interval, 2), "processes": usage,
               "incidents": [i.line() for i in self.incidents], "lost": self.losses(running=True),
               "in_flight": self.in_flight(),
               "children": {c.name: {"role": c.role, "pid": c.process.pid, "alive": c.process.exitcode is None,
                                     "counters": to_wire(c.counters) if c.counters is not None else {}}
                            for c in self.children}}
        tmp = os.path.join(rundir, STATUS_FILE + ".new")
        try:
            with open(tmp, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, os.path.join(rundir, STATUS_FILE))
        except OSError:
            pass  # the status file is a convenience; metering goes on


def runtime_base() -> str:
    """Where a run makes its runtime directory: the unit's ``RuntimeDirectory`` under systemd
    (``RUNTIME_DIRECTORY``, its first entry); else, as root, ``SERVICE_RUNTIME`` (``/run/flowmeter``:
    not root's ``XDG_RUNTIME_DIR``, which the profile's ``User`` could not reach); else
    ``XDG_RUNTIME_DIR``, else the temporary directory. ``flowmeter status`` and ``reload`` look there."""
    unit = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if unit:
        return unit
    if os.geteuid() == 0:
        return SERVICE_RUNTIME
    return os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()


def make_runtime_dir() -> str:
    """A new run's own directory (mode 0700, a name no one can guess or take first) under
    ``runtime_base()``. ``SERVICE_RUNTIME`` is made if missing (0755, root's) and used only while
    it is a directory (not a link) that only root may write; otherwise, or where ``/run`` cannot
    be written, the run's directory goes to the temporary directory instead."""
    base = runtime_base()
    if base == SERVICE_RUNTIME:
        try:
            os.mkdir(base, 0o755)
        except FileExistsError:
            pass
        except OSError:
            base = tempfile.gettempdir()
        if base == SERVICE_RUNTIME:
            st = os.lstat(base)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
                log.warning("%s is not a directory only root may write: the run's directory is made in %s",
                            base, tempfile.gettempdir())
                base = tempfile.gettempdir()
            else:
                _remove_left_behind(base)
    return tempfile.mkdtemp(prefix="flowmeter-", dir=base)


LEFT_BEHIND_S = 60.0  # an empty run directory untouched this long belongs to no starting run


def _remove_left_behind(base: str) -> None:
    """The empty directories of ended runs that ran as ``User``: such a run empties its directory
    but cannot remove it from root's ``base``. A directory changed in the last minute may be a
    starting run's, and one with anything in it a running one's: both stay."""
    now = time.time()
    for path in glob.glob(os.path.join(base, "flowmeter-*")):
        try:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode) and now - st.st_mtime > LEFT_BEHIND_S:
                os.rmdir(path)
        except OSError:
            pass


# The systemd units' RuntimeDirectory (deploy/systemd/): flowmeter.service's, and under it one per
# instance of flowmeter@NAME. Looked in by status and reload besides this shell's runtime_base().
SERVICE_RUNTIME = "/run/flowmeter"


def status_files(base: str | None = None) -> list[str]:
    """The status files of the runs under ``base``; by default under ``runtime_base()`` and the
    service units' runtime directories (each file once, however it was reached)."""
    bases = [base] if base else [runtime_base(), SERVICE_RUNTIME, os.path.join(SERVICE_RUNTIME, "*")]
    found: dict[str, str] = {}
    for where in bases:
        for path in sorted(glob.glob(os.path.join(where, "flowmeter-*", STATUS_FILE))):
            found.setdefault(os.path.realpath(path), path)
    return list(found.values())


def trusted(path: str) -> bool:
    """Whether a status file may be believed: a regular file (not a link) in a run directory (not a
    link) of the same owner that no one else may write, and that owner the caller or root. Root
    also reads another user's run, but only below a directory that only root or that user may
    write (the units' runtime directories, ``/run/flowmeter``), never one all may write like
    ``/tmp``, where anyone could have left a run directory of their own making."""
    rundir = os.path.dirname(path)
    try:
        st, run, base = os.lstat(path), os.lstat(rundir), os.stat(os.path.dirname(rundir))
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or not stat.S_ISDIR(run.st_mode) or run.st_mode & 0o022:
        return False
    if st.st_uid != run.st_uid:
        return False
    me = os.geteuid()
    if st.st_uid in (me, 0):
        return True
    return me == 0 and base.st_uid in (0, st.st_uid) and not base.st_mode & 0o022


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))}


def printable(value: Any) -> Any:
    """``value`` (a status document or a part of one) with every control character in its strings
    written as ``\\xNN``: a status file's text cannot move the cursor or recolour a terminal."""
    if isinstance(value, str):
        return value.translate(_CONTROL)
    if isinstance(value, list):
        return [printable(v) for v in value]
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    return value


def running_status(base: str | None = None) -> list[dict]:
    """The status of every flowmeter run this user can see: their runtime directories under ``base``,
    by default those ``status_files`` finds; files not ``trusted`` are passed over. Strings come
    back ``printable``."""
    out = []
    for path in status_files(base):
        if not trusted(path):
            log.debug("status: %s passed over: not the caller's, root's or in a directory only its owner writes",
                      path)
            continue
        try:
            with open(path, "rb") as f:
                doc = json.loads(f.read(STATUS_MAX))
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("pid"), int) and _alive(doc["pid"]):
            out.append(printable(doc))
    return out


def describe_runs(runs: list[dict]) -> str:
    """``flowmeter status`` as text: per run its sources' lines and each process's counts."""
    lines = []
    for doc in runs:
        lines.append(f"pid {doc['pid']}, profile {doc.get('profile')}, up {doc.get('uptime_s', 0):,.0f} s, "
                     f"sources: {', '.join(doc.get('sources', []))}")
        lines.extend(f"  {line}" for line in doc.get("lines", []))
        interval = doc.get("interval_s", 0)
        lines.extend(f"  {source}: {rate:,.0f} packets/s over the last {interval:g} s"
                     for source, rate in sorted(doc.get("rates", {}).items()))
        lines.extend(f"  restart: {line}" for line in doc.get("incidents", []))
        if doc.get("in_flight"):
            lines.append(f"  held: {doc['in_flight']:,} packets metered are in flows not ended yet or on their "
                         "way to the exporter")
        lines.extend(f"  lost: {line}" for line in doc.get("lost", []))
        usage = doc.get("processes", {})
        if "supervisor" in usage:
            u = usage["supervisor"]
            lines.append(f"  supervisor: pid {doc['pid']}, CPU {u['cpu_s']:,.2f} s, RSS {u['rss'] / 2**20:,.1f} MiB")
        for name, child in sorted(doc.get("children", {}).items()):
            c = child.get("counters", {})
            u = usage.get(name)
            lines.append(f"  {name}: pid {child.get('pid')}, {'running' if child.get('alive') else 'ended'}"
                         + (f", {c.get('packets', 0):,} packets" if 'packets' in c else "")
                         + (f", {c.get('records_out', 0):,} records" if 'records_out' in c else "")
                         + (f", CPU {u['cpu_s']:,.2f} s, RSS {u['rss'] / 2**20:,.1f} MiB" if u else ""))
    return "\n".join(lines)


def process_usage(children: list[ChildInfo]) -> list[tuple[str, str, float, int]]:
    """``(name, role, CPU seconds, resident octets)`` of this process (the supervisor) and of every
    child of ``children`` still running, read from the kernel now (psutil): a child's own
    ``cpu_s`` is as old as its last report, and it does not report its memory."""
    import psutil  # at the first status write, not at every command's start

    out = []
    for name, role, pid in [("supervisor", "supervisor", os.getpid())] + \
            [(c.name, c.role, c.process.pid) for c in children if c.process.exitcode is None]:
        try:
            p = psutil.Process(pid)
            with p.oneshot():
                t, rss = p.cpu_times(), p.memory_info().rss
        except psutil.Error:  # it ended meanwhile
            continue
        out.append((name, role, t.user + t.system, rss))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
