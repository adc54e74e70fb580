"""The supervisor: starts the pipeline's processes, watches them, drains them, reports.

::

    capture ──packets──► worker ×N ──records──► exporter ──IPFIX/UDP──► collectors
        └──────────── progress, stats, errors ───────────► supervisor (this process)

Children are forked after the heavy modules (numpy, numba kernels) are
loaded here, so each starts warm; each makes its own ZeroMQ context. The
sockets live in a fresh runtime directory that only this user can enter.

Stopping is in pipeline order, so nothing metered is lost: the capture
stops reading and sends end-of-stream to every worker; each worker, having
it from every capture, flushes its flow table and sends end-of-stream to the
exporter; the exporter, having it from every worker, sends what it holds
and exits. SIGTERM or a first SIGINT starts that drain early (capture
first); a second SIGINT stops everything at once. SIGHUP makes the
exporter re-read the profile's collectors and send its templates again,
without touching cached flows. A child that dies on
its own makes the supervisor stop the rest and exit 1 with the child's
error: it never hangs.
"""
from __future__ import annotations

import gc
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, TextIO

import numpy as np
import zmq

from exporter.exporting import ExportSettings

from .config import Profile
from .schema import SchemaError, parse_control

STOP_DEADLINE_S = 30.0  # per stage, before SIGKILL
CRASH_EXIT = 70  # a child's exit code for an unexpected exception (EX_SOFTWARE)


@dataclass
class ChildInfo:
    name: str
    role: str
    process: multiprocessing.Process
    stats: dict = field(default_factory=dict)
    error: str = ""
    ended_s: float = 0.0  # when it exited, seconds after the pipeline started


def _set_process_name(name: str) -> None:
    """Name the process for ps/top (``fm-worker-1``); Linux keeps 15 characters."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, ctypes.c_char_p(f"fm-{name}"[:15].encode()), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


PR_SET_PDEATHSIG = 1
ORPHAN_GRACE_S = STOP_DEADLINE_S  # a worker or exporter without supervisor waits this long for its producers


class ParentWatch:
    """Whether this child's supervisor is gone, and for how long (its parent changed: reparented).

    A worker or the exporter whose supervisor died keeps going until its
    producers end (the captures drain: they get SIGTERM when it dies), but
    no longer than ``ORPHAN_GRACE_S``: a pipeline never outlives its
    supervisor for good.
    """

    def __init__(self) -> None:
        self.parent = os.getppid()
        self.since = 0.0

    def expired(self, now: float) -> bool:
        if os.getppid() == self.parent:
            return False
        self.since = self.since or now
        return now - self.since >= ORPHAN_GRACE_S


def _end_with_parent(role: str) -> None:
    """A capture gets SIGTERM when the supervisor dies (killed, say): it drains as on a stop, and
    the workers and exporter after it end by themselves (``ParentWatch``)."""
    if role != "capture":
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the supervisor died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def _child_main(name: str, target: Callable, args: tuple, nice: int = 0, foreign: tuple = (),
                role: str = "") -> None:
    """Entry of every child: its name, priority, fresh signal state, one line and a reserved code on a crash.

    ``foreign`` are the live sources other processes read: this child's copies are closed.
    """
    _set_process_name(name)
    _end_with_parent(role)
    for source in foreign:
        source.close()
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)
    try:
        code = target(*args)
    except Exception as exc:  # the top of a process: one line, one exit code
        sys.stderr.write(f"flowmeter: {name}: {type(exc).__name__}: {exc}\n")
        if os.environ.get("FLOWMETER_DEBUG"):
            traceback.print_exc()
        sys.stderr.flush()
        os._exit(CRASH_EXIT)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt(3) parameters
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value
TRIM_THRESHOLD = 512 << 20


def tune_allocator() -> None:
    """Keep freed batch buffers in the process for the next batch (glibc malloc).

    Every batch allocates a few arrays of megabytes (decoded packets, a
    worker's share, records). By default glibc serves those with a fresh
    ``mmap`` and unmaps them when freed, so each batch pays page faults and
    the kernel's zeroing of every page again: measured, that was three
    quarters of the time of walking a 5M-packet capture. Served from the
    heap and kept there, the same pages are reused warm. Children inherit
    the setting through fork. A libc without ``mallopt`` is left as it is.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):
        pass


def warm_up() -> None:
    """Load (or compile once) every numba kernel before forking, so children start warm."""
    from . import decode, pcapfile, shard  # noqa: F401
    from workers import flowtable  # noqa: F401

    from workers import records

    decode.warm_up()
    shard.warm_up()
    flowtable.load_kernels()
    records.to_template_batches(np.zeros(1, records.FLOW_RECORD_DTYPE))


def _exporter_child(settings: ExportSettings, endpoint: str, producers: int, control: str,
                    profile_path: str | None) -> int:
    from exporter.process import run

    from .config import load_profile

    reload = (lambda: load_profile(profile_path).export_settings()) if profile_path else None
    run(settings, endpoint, producers, control=control, reload=reload)
    return 0


def _worker_child(settings, endpoints, rings) -> int:
    from workers.worker import run

    return run(settings, endpoints, rings)


def _capture_child(settings, endpoints, ring, source=None, spec=None, profile=None) -> int:
    from .capture import run

    if spec is not None:  # opened here: a feed's ZeroMQ socket
        from .sources import open_source

        def log(line: str) -> None:
            sys.stderr.write(f"flowmeter: capture-{settings.index}: {spec} {line}\n")
            sys.stderr.flush()

        source = open_source(spec, profile, log=log)
        log("open")
    return run(settings, endpoints, source, ring)


def drop_privileges(user: str, rundir: str) -> None:
    """Started as root with ``User`` set: become that user (its groups only); the runtime
    directory becomes its own, still closed to everyone else."""
    import pwd

    entry = pwd.getpwnam(user)
    os.chown(rundir, entry.pw_uid, entry.pw_gid)
    os.chmod(rundir, 0o700)
    os.initgroups(user, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ["HOME"] = entry.pw_dir


class Supervisor:
    """Runs one pipeline for a profile and a list of capture files."""

    def __init__(self, profile: Profile, files: tuple[str, ...], workers: int | None = None,
                 err: TextIO = sys.stderr, progress: bool | None = None, captures: int = 1,
                 data_plane_nice: int = 0, live: tuple = ()) -> None:
        if files and not 1 <= captures <= len(files):
            raise ValueError(f"captures: {captures} capture processes for {len(files)} file(s); "
                             "each capture process needs at least one file")
        self.profile = profile
        self.files = files
        self.live = live  # SourceSpecs of live sources: one capture process each (Fanout for afpacket)
        self.captures = captures if files else 0
        # Added to the capture and worker processes' nice value (the exporter keeps its own): a
        # replay is batch work and should not starve the machine's other programs, a collector
        # reading our datagrams on the same host first of all.
        self.data_plane_nice = data_plane_nice
        self.workers = workers or profile.worker_count
        self.err = err
        self.progress = err.isatty() if progress is None else progress
        self.children: list[ChildInfo] = []
        self._signals: list[int] = []
        self.errors: list[str] = []
        self.started = 0.0
        self.elapsed = 0.0
        self._status_at = 0.0
        self._status_written = 0.0

    # --- signals: record in the handler, act in the loop ---------------------
    def _on_signal(self, signum, frame) -> None:
        self._signals.append(signum)

    def _children(self, role: str) -> list[ChildInfo]:
        return [c for c in self.children if c.role == role]

    def _drain(self) -> None:
        """SIGTERM / first SIGINT: the capture stops; the rest drains in order."""
        for c in self._children("capture"):
            if c.process.is_alive():
                os.kill(c.process.pid, signal.SIGTERM)

    def _reload(self) -> None:
        """SIGHUP: the exporter re-reads the profile's collectors and sends every template again."""
        for c in self._children("exporter"):
            if c.process.is_alive():
                os.kill(c.process.pid, signal.SIGHUP)

    def _stop_now(self) -> None:
        """Second SIGINT: stop every child at once (cached flows are lost)."""
        for c in self.children:
            if c.process.is_alive():
                c.process.kill()

    # --- life ----------------------------------------------------------------
    def run(self) -> int:
        from exporter.process import run as _  # noqa: F401  (imported before forking)

        tune_allocator()
        warm_up()
        kinds = {spec.kind for spec in self.live}
        if "afpacket" in kinds:
            from . import afpacket

            afpacket.warm_up()
        if "nflog" in kinds:
            from . import nflog

            nflog.warm_up()
        try:
            opened = self._open_live()
        except OSError as exc:
            self.errors.append(str(exc))
            return 1
        rundir = tempfile.mkdtemp(prefix="flowmeter-", dir=os.environ.get("XDG_RUNTIME_DIR"))
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            if self.profile.user and os.geteuid() == 0:
                try:
                    drop_privileges(self.profile.user, rundir)
                except OSError as exc:
                    self.errors.append(f"User: cannot become {self.profile.user}: {exc.strerror or exc}")
                    return 1
            return self._run(rundir, opened)
        finally:
            for _spec, source in opened:
                if source is not None:
                    source.close()
            for s, h in old.items():
                signal.signal(s, h)
            shutil.rmtree(rundir, ignore_errors=True)

    def _open_live(self) -> list[tuple]:
        """(spec, source) per live capture process; sources that need root are opened now, before
        any child is forked and before root is given up; a feed is opened by its own process."""
        from .afpacket import NEW_GROUP
        from .sources import OPENED_BEFORE_FORK, open_source

        opened: list[tuple] = []
        try:
            for spec in self.live:
                if spec.kind == "afpacket":
                    # Fanout: a group of this run's processes only; the kernel picks an id no other
                    # program uses, the next members join it
                    group = NEW_GROUP if self.profile.fanout > 1 else None
                    for _ in range(self.profile.fanout):
                        source = open_source(spec, self.profile, fanout_group=group)
                        opened.append((spec, source))
                        group = source.fanout_group
                elif spec.kind in OPENED_BEFORE_FORK:
                    opened.append((spec, open_source(spec, self.profile)))
                else:
                    opened.append((spec, None))
        except OSError:
            for _spec, source in opened:
                if source is not None:
                    source.close()
            raise
        return opened

    def _exclusions(self) -> tuple:
        """(ip_version, hi, lo, port) of every UDP collector, unless MeterExport is on."""
        import ipaddress

        if self.profile.meter_export:
            return ()
        out = []
        for c in self.profile.collectors:
            if c.kind != "udp":
                continue
            try:
                addr = ipaddress.ip_address(c.host)
            except ValueError:
                continue
            value = int(addr)
            out.append((addr.version, value >> 64, value & ((1 << 64) - 1), c.port))
        return tuple(out)

    STATUS_FILE = "status.json"
    STATUS_WRITE_S = 1.0

    def _write_status(self, rundir: str) -> None:
        """The live counters in the runtime directory, for ``flowmeter status`` (rewritten whole, atomically)."""
        now = time.monotonic()
        if now - self._status_written < self.STATUS_WRITE_S:
            return
        self._status_written = now
        doc = {"pid": os.getpid(), "profile": self.profile.source, "uptime_s": round(now - self.started, 1),
               "sources": [str(s) for s in self.live] + [f"pcap:{f}" for f in self.files],
               "lines": self.source_lines(),
               "children": {c.name: {"role": c.role, "pid": c.process.pid, "alive": c.process.exitcode is None,
                                     "counters": c.stats} for c in self.children}}
        tmp = os.path.join(rundir, self.STATUS_FILE + ".new")
        try:
            with open(tmp, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, os.path.join(rundir, self.STATUS_FILE))
        except OSError:
            pass  # the status file is a convenience; metering goes on

    def _run(self, rundir: str, opened: list | None = None) -> int:
        from workers.worker import WorkerEndpoints, WorkerSettings

        from .batchring import BatchRing
        from .capture import BATCH_PACKETS, CaptureEndpoints, CaptureSettings

        p = self.profile
        ep_export = f"ipc://{rundir}/export"
        ep_control = f"ipc://{rundir}/control"
        ep_workers = tuple(f"ipc://{rundir}/worker-{i}" for i in range(self.workers))
        export = p.export_settings() if p.enabled else ExportSettings(collectors=())
        per_worker = max(64, -(-p.max_flows // self.workers))
        mp = multiprocessing.get_context("fork")

        opened = opened or []
        sources = [source for _spec, source in opened if source is not None]
        producers = self.captures + len(opened)

        def start(name: str, role: str, target: Callable, args: tuple, own=None) -> None:
            nice = self.data_plane_nice if role in ("capture", "worker") else 0
            foreign = tuple(s for s in sources if s is not own)
            proc = mp.Process(target=_child_main, args=(name, target, args, nice, foreign, role),
                              name=f"flowmeter-{name}")
            proc.start()
            self.children.append(ChildInfo(name, role, proc))

        # Each capture process's packet batches reach the workers through shared memory (batchring.py).
        try:
            rings = {f"capture-{i}": BatchRing(self.workers, BATCH_PACKETS) for i in range(producers)}
        except OSError as exc:  # e.g. strict overcommit: say so before anything starts
            self.errors.append(f"cannot map the batch rings ({producers} x {BatchRing.size(self.workers, BATCH_PACKETS) >> 20}"
                               f" MiB of shared memory): {exc.strerror or exc}")
            return 1
        # Everything made so far (modules, numba's types, the kernels) lives as long as the process:
        # frozen, no collection here or in a child walks it again, nor writes to its pages (copy on write).
        gc.freeze()
        gc.enable()
        self.started = time.monotonic()
        profile_path = p.source if os.path.isfile(p.source) else None
        start("exporter", "exporter", _exporter_child, (export, ep_export, self.workers, ep_control, profile_path))
        for i in range(self.workers):
            ws = WorkerSettings(index=i, max_flows=per_worker, idle_timeout_ns=p.idle_timeout_ms * 1_000_000,
                                interval_ns=p.interval_ms * 1_000_000, domain=p.observation_domain_id,
                                producers=producers, live=bool(opened))
            start(f"worker-{i}", "worker", _worker_child,
                  (ws, WorkerEndpoints(ep_workers[i], ep_export, ep_control), rings))
        for i in range(self.captures):
            # One capture process: the files in order (e.g. a rotated capture). Several: the files
            # are dealt out and read at the same time (e.g. one file per member of a fanout group).
            cs = CaptureSettings(index=i, files=self.files[i::self.captures], direction=p.direction,
                                 local_networks=p.local_networks, drop_prefixes=p.drop_prefixes)
            start(f"capture-{i}", "capture", _capture_child,
                  (cs, CaptureEndpoints(ep_workers, ep_control), rings[f"capture-{i}"]))
        exclude = self._exclusions()
        for n, (spec, source) in enumerate(opened):
            i = self.captures + n
            cs = CaptureSettings(index=i, direction=p.direction, local_networks=p.local_networks,
                                 drop_prefixes=p.drop_prefixes, exclude=exclude)
            args = ((cs, CaptureEndpoints(ep_workers, ep_control), rings[f"capture-{i}"], source)
                    + ((spec, p) if source is None else ()))
            start(f"capture-{i}", "capture", _capture_child, args, own=source)
            if source is not None:  # a feed says so itself once bound
                self.err.write(f"flowmeter: capture-{i}: {spec} open\n")
        self.err.flush()
        for source in sources:  # each is its capture process's now
            source.close()
        opened.clear()

        ctx = zmq.Context()
        control = ctx.socket(zmq.PULL)
        control.bind(ep_control)
        poller = zmq.Poller()
        poller.register(control, zmq.POLLIN)
        for c in self.children:  # a child's exit wakes the loop at once
            poller.register(c.process.sentinel, zmq.POLLIN)
        interrupts = 0
        crashed: ChildInfo | None = None
        try:
            while True:
                while self._signals:
                    signum = self._signals.pop(0)
                    if signum == signal.SIGHUP:
                        self._reload()
                        continue
                    interrupts += signum == signal.SIGINT
                    if interrupts >= 2:
                        self._stop_now()
                    else:
                        self._drain()
                events = dict(poller.poll(100))
                if control in events:
                    self._read_control(control)
                for c in self.children:
                    if c.process.sentinel in events and c.process.exitcode is not None:
                        poller.unregister(c.process.sentinel)
                        c.ended_s = round(time.monotonic() - self.started, 3)
                self._show_progress()
                self._log_sources()
                self._write_status(rundir)
                if crashed is None:
                    crashed = next((c for c in self.children
                                    if c.process.exitcode not in (None, 0)), None)
                    if crashed is not None:
                        self._stop_after_crash(crashed)
                        break
                if all(c.process.exitcode is not None for c in self.children):
                    break
            while control.poll(10):  # the children's last words, already on their way
                self._read_control(control)
        finally:
            self.elapsed = time.monotonic() - self.started
            for c in self.children:
                c.process.join(1)
            control.close(0)
            ctx.term()
            if self.progress:
                self.err.write("\r\033[K")
        if crashed is not None:
            how = (f"killed by signal {-crashed.process.exitcode}" if crashed.process.exitcode < 0
                   else f"exited with code {crashed.process.exitcode}")
            self.errors.insert(0, f"{crashed.name} (pid {crashed.process.pid}) {how}; pipeline stopped")
            return 1
        return 1 if self.errors else 0

    def _stop_after_crash(self, crashed: ChildInfo) -> None:
        """Stop the others in pipeline order, each stage with a deadline, then SIGKILL."""
        for role in ("capture", "worker", "exporter"):
            stage = [c for c in self._children(role) if c is not crashed and c.process.is_alive()]
            for c in stage:
                os.kill(c.process.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_DEADLINE_S
            for c in stage:
                c.process.join(max(0.0, deadline - time.monotonic()))
                if c.process.is_alive():
                    c.process.kill()
                    c.process.join(5)

    def _read_control(self, sock) -> None:
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = parse_control(frame)
            except SchemaError:
                continue
            child = next((c for c in self.children if c.name == msg["sender"]), None)
            if child is None:
                continue
            if msg["kind"] in ("progress", "stats") and isinstance(msg.get("counters"), dict):
                child.stats = msg["counters"]
            elif msg["kind"] == "error":
                child.error = str(msg.get("message", ""))
                self.errors.append(child.error)

    def _show_progress(self) -> None:
        if not self.progress:
            return
        cap = [c.stats for c in self._children("capture")]
        done = sum(s.get("file_octets", 0) for s in cap)
        size = sum(s.get("file_size", 0) for s in cap) or 1
        packets = sum(s.get("packets", 0) for s in cap)
        dt = max(time.monotonic() - self.started, 1e-6)
        self.err.write(f"\r\033[Kreplay: {100 * done / size:5.1f}%  {packets:,} packets  "
                       f"{packets / dt:,.0f} packets/s")
        self.err.flush()

    STATUS_S = 10.0  # a line per live source this often in the run's log

    def _log_sources(self, final: bool = False) -> None:
        """Per live source: packets, rate, kernel and our drops (the run's log, stderr)."""
        if not self.live:
            return
        now = time.monotonic()
        if not final and now - self._status_at < self.STATUS_S:
            return
        self._status_at = now
        for line in self.source_lines():
            self.err.write(f"flowmeter: {line}\n")
        self.err.flush()

    def source_lines(self) -> list[str]:
        lines = []
        dt = max(time.monotonic() - self.started, 1e-6) if not self.elapsed else self.elapsed
        for c in self._children("capture"):
            s = c.stats
            if not s.get("source"):
                continue
            ours = sum(v for k, v in s.items() if k.startswith("not metered: ") and k != "not metered: other direction")
            kernel = {k[len("source "):]: v for k, v in s.items() if k.startswith("source ") and isinstance(v, int)}
            extra = "".join(f", {k} {v:,}" for k, v in kernel.items())
            lines.append(f"{c.name} {s['source']}: {s.get('packets', 0):,} packets metered "
                         f"({s.get('packets', 0) / dt:,.0f}/s), not metered {ours:,}{extra}")
        return lines

    # --- report ----------------------------------------------------------------
    def totals(self) -> dict:
        """Summed counters of every role, for the summary and for tests."""
        out: dict[str, dict] = {"capture": {}, "worker": {}, "exporter": {}}
        for c in self.children:
            acc = out[c.role]
            for k, v in c.stats.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    acc[k] = acc.get(k, 0) + v
                else:
                    acc[k] = v
        return out

    def summary(self) -> str:
        t = self.totals()
        cap, wrk, exp = t["capture"], t["worker"], t["exporter"]
        dt = max(self.elapsed, 1e-9)
        packets = cap.get("packets", 0)
        what = ", ".join(filter(None, [f"{len(self.files)} capture file(s)" if self.files else "",
                                       f"{len(self.live)} live source(s)" if self.live else ""]))
        lines = [
            f"{what}, {cap.get('frames', 0):,} frames, {packets:,} packets metered "
            f"({cap.get('octets', 0):,} layer-3 octets) in {dt:.2f} s = {packets / dt:,.0f} packets/s "
            f"with {self.workers} worker(s)" + (f" and {self.captures} capture processes" if self.captures > 1 else ""),
            f"flows: {wrk.get('flows', 0):,}; records: {wrk.get('records_out', 0):,} "
            f"({', '.join(f'{k} {wrk[k]:,}' for k in ('idle', 'active', 'end_of_flow', 'forced', 'lack_of_resources') if wrk.get(k))})",
        ]
        drops = {k.split(": ", 1)[1]: v for k, v in cap.items() if k.startswith("not metered: ") and v}
        drops.update({k.split(" ", 1)[1]: v for k, v in {**wrk, **exp}.items() if k.startswith("dropped ") and v})
        lines.append("not metered: " + (", ".join(f"{k} {v:,}" for k, v in sorted(drops.items())) or "none"))
        for name, c in (exp.get("collectors") or {}).items():
            lines.append(f"collector {name}: {c.get('messages', 0):,} messages, {c.get('flow_records', 0):,} "
                         f"records sent, {c.get('not_sent_records', 0):,} not sent")
        if not exp.get("collectors"):
            lines.append("exporting is off: no records were sent")
        return "\n".join(lines + self.source_lines())


def running_status(base: str | None = None) -> list[dict]:
    """The status of every flowmeter run this user can see (their runtime directories under ``base``)."""
    import glob

    base = base or os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    out = []
    for path in sorted(glob.glob(os.path.join(base, "flowmeter-*", Supervisor.STATUS_FILE))):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("pid"), int) and _alive(doc["pid"]):
            out.append(doc)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
