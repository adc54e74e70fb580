"""The supervisor: starts the pipeline's processes, watches them, drains them.

::

    capture ──packets──► worker ×N ──records──► exporter ──IPFIX/UDP──► collectors
        └──────────── progress, stats, errors ───────────► supervisor (this process)

``Supervisor.run`` is the pipeline's whole life: load the kernels and open
the live sources (``warmup``), give up root and every capability, map the
batch rings, fork the
children (each starts in ``flowmeter.ipc.lifecycle.child_main`` and runs
its stage's ``run(settings, endpoints, handover)``), then watch them until
all have ended. The sockets live in a fresh runtime directory that only
this user can enter. What the children report is read by a
``PipelineReport`` (``flowmeter.status``).

Signals are recorded by the handler and acted on in the loop, each by one
method: SIGTERM or SIGINT drains (``_drain``), a second one stops at once
(``_stop_now``), SIGHUP reloads the collectors (``_reload``). Only this
process acts on them: a stop signalled to the whole process group
(systemd, a terminal's Ctrl-C) reaches the children too, and they ignore
it (``flowmeter.ipc.lifecycle``); they follow this process's
``STOP_SIGNAL`` and ``RELOAD_SIGNAL`` instead. Draining is in pipeline
order, so nothing metered is lost: the capture stops reading and sends
end-of-stream to every worker; each worker, having it from every capture,
flushes its flow table and sends end-of-stream to the exporter; the
exporter, having it from every worker, sends what it holds and exits. The
drain has a deadline (``DrainTimeoutSeconds``): past it, or on a second
stop signal, every child ends without waiting (``STOP_NOW_SIGNAL``:
captures read nothing more, workers do not flush, the exporter gives up its
queue), each counting what it held in its last report, and the summary
says what was lost (``PipelineReport.losses``); the run then exits 1.

A child that dies or hangs is started again from the recipe it was first
started with (``_failures``, ``_restart``; the policy and the record are
``flowmeter.recovery``); what it held is counted as lost. One that cannot
be started again (a crash loop, ``CONFIG_EXIT``) makes the supervisor stop
the rest in pipeline order (``_stop_after_crash``) and exit 1 with the
child's error: it never hangs.
"""
from __future__ import annotations

import dataclasses
import gc
import ipaddress
import json
import logging
import mmap
import multiprocessing
import os
import shutil
import signal
import sys
import time
from functools import partial
from typing import Callable, TextIO

import numpy as np
import zmq

from exporter import process as exporter_process
from exporter.exporting import ExportSettings
from flowmeter.capture import process as capture_process
from flowmeter.capture.sources import SourceSpec
from flowmeter.capture.sources.afpacket import NEW_GROUP
from flowmeter.capture.sources.live import OPENED_BEFORE_FORK, open_source
from flowmeter.config import SECTION, ConfigError, Profile, load_profile, reload_profile
from flowmeter.ipc.batchring import BatchRing
from flowmeter.ipc.lifecycle import (CONFIG_EXIT, RELOAD_SIGNAL, STOP_DEADLINE_S, STOP_NOW_SIGNAL, STOP_SIGNAL,
                                     child_main)
from flowmeter.ipc.schema import EndOfStream, ErrorReport, SchemaError, parse_control
from flowmeter.notify import Notifier
from flowmeter.recovery import CRASH_LOOP, CRASH_WINDOW_S, HANG_S, START_GRACE_S, Incident, Restarts
from flowmeter.status import ChildInfo, PipelineReport, make_runtime_dir, runtime_base
from flowmeter.warmup import (drop_capabilities, drop_privileges, load_kernels, release_compiler_pages,
                              tune_allocator)
from workers import process as worker_process

WATCH_MS = 100  # the loop wakes at least this often (progress, status file), and at once on a child's exit
GIVE_UP_S = 2.0  # after a stop at once, the children's time to count what they give up and report
LAST_WORDS_S = 1.0  # at the end, the longest wait for the final report of a child that exited cleanly

log = logging.getLogger("flowmeter.supervisor")


class Supervisor:
    """Runs one pipeline for a profile: capture files and/or live sources, until they end or a signal."""

    def __init__(self, profile: Profile, files: tuple[str, ...], workers: int | None = None,
                 err: TextIO = sys.stderr, progress: bool | None = None, captures: int = 1,
                 data_plane_nice: int = 0, live: tuple[SourceSpec, ...] = ()) -> None:
        if files and not 1 <= captures <= len(files):
            raise ValueError(f"captures: {captures} capture processes for {len(files)} file(s); "
                             "each capture process needs at least one file")
        self.profile = profile
        self.files = files
        self.live = live  # one capture process each (Fanout of them for afpacket)
        self.captures = captures if files else 0
        # Added to the capture and worker processes' nice value (the exporter keeps its own): a
        # replay is batch work and should not starve the machine's other programs, a collector
        # reading our datagrams on the same host first of all.
        self.data_plane_nice = data_plane_nice
        self.workers = workers or profile.worker_count
        self.children: list[ChildInfo] = []
        self.errors: list[str] = []
        what = ", ".join(filter(None, [f"{len(files)} capture file(s)" if files else "",
                                       f"{len(live)} live source(s)" if live else ""]))
        self.report = PipelineReport(self.children, profile=profile.source, what=what, workers=self.workers,
                                     captures=self.captures, err=err,
                                     sources=[str(s) for s in live] + [f"pcap:{f}" for f in files],
                                     progress=bool(files) and not live and err.isatty() if progress is None
                                     else progress)
        self._signals: list[int] = []
        self._draining: float | None = None  # time.monotonic() of the first stop signal
        self._stopped_now = ""  # why the drain was cut short ("" while it was not)
        self._profile_copy = ""  # in the run's directory: the profile a reload applies, as checked here
        self._give_up_by = 0.0  # then the exporter is killed if it has not ended by this time
        self.restarts = Restarts()
        self.report.incidents = self.restarts.incidents
        self._recipes: dict[str, tuple] = {}  # name -> (role, entry, args, own source): how to start it again
        self._sources: list = []  # live sources opened here, kept for a capture process started again
        self._endpoints: dict[str, str] = {}  # consumer name -> its input endpoint
        self._pending: dict[str, tuple[float, Incident]] = {}  # name -> when its restart is due, and why
        self._eos_pushes: dict[str, zmq.Socket] = {}  # end-of-stream on behalf of a dead producer
        self._rings: dict[str, BatchRing] = {}
        self._poller: zmq.Poller | None = None
        self._ctx: zmq.Context | None = None
        self._why_stopped = ""
        self.notifier = Notifier()  # the service manager (systemd's Type=notify), if it started this run
        self._metrics = None  # flowmeter.metrics.MetricsServer, with MetricsAddress
        self._handlers: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self._drain, signal.SIGINT: self._drain, signal.SIGHUP: self._reload}

    # --- signals: record in the handler, act in the loop ---------------------
    def _on_signal(self, signum, frame) -> None:
        self._signals.append(signum)

    def _role(self, role: str) -> list[ChildInfo]:
        return [c for c in self.children if c.role == role and c.process.is_alive()]

    def _tell(self, role: str, signum: int) -> None:
        for c in self._role(role):
            try:
                os.kill(c.process.pid, signum)
            except ProcessLookupError:
                pass  # it ended meanwhile; its sentinel wakes the loop

    def _drain(self) -> None:
        """SIGTERM or SIGINT: the captures stop reading, the rest drains in order; a second one stops at once."""
        if self._draining is not None:
            self._stop_now("stopped again while draining")
            return
        self._draining = time.monotonic()
        self.notifier.stopping(f"stopping: exporting every cached flow (at most {self.profile.drain_timeout_s:g} s)")
        if any(c.process.is_alive() for c in self.children):
            log.info("stopping: exporting every cached flow (at most %g s; stop again to stop at once)",
                     self.profile.drain_timeout_s)
        self._tell("capture", STOP_SIGNAL)

    def _stop_now(self, why: str) -> None:
        """A second stop signal, or the drain deadline: every child ends without waiting, its last report
        counting what it held (lost); one still there after ``GIVE_UP_S`` is killed."""
        if self._stopped_now:
            return
        self._stopped_now = why
        for role in ("capture", "worker", "exporter"):
            self._tell(role, STOP_NOW_SIGNAL)
        self._give_up_by = time.monotonic() + GIVE_UP_S

    def _reload(self) -> None:
        """SIGHUP: the profile file is read and checked again; what can change in place is applied by
        every child (``RELOAD_SIGNAL``), without losing a cached flow. One line says what changed, what
        waits for a restart, or why the file was refused (the running profile then stays whole)."""
        if not os.path.isfile(self.profile.source):
            log.warning("reload: no profile file to read again (%s); nothing changed", self.profile.source)
            return
        try:
            new, changed, waiting = reload_profile(self.profile, self.profile.source)
        except ConfigError as exc:
            log.error("reload refused, the running profile stays: %s", exc)
            return
        text = json.dumps({SECTION: new.to_dict()})
        tmp = self._profile_copy + ".new"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self._profile_copy)
        except OSError as exc:
            log.error("reload failed, the running profile stays: %s: %s", self._profile_copy, exc.strerror or exc)
            return
        self.profile = new
        for role in ("exporter", "worker", "capture"):
            self._tell(role, RELOAD_SIGNAL)
        log.info("reloaded %s: %s%s", self.profile.source,
                 ", ".join(changed) + " changed" if changed else "no in-place setting changed",
                 f"; {', '.join(waiting)} changed in the file but apply only at a restart" if waiting else "")

    # --- life ----------------------------------------------------------------
    def run(self) -> int:
        """The whole pipeline; 0 when it ended cleanly, 1 with ``errors`` saying why not."""
        tune_allocator()
        load_kernels({spec.kind for spec in self.live})
        try:
            opened = self._open_live()
        except OSError as exc:
            self.errors.append(str(exc))
            return 1
        rundir, old = None, {}
        try:  # from here on, whatever happens, the sources, the metrics socket and the run's directory go
            try:
                self._metrics = self._bind_metrics()
            except OSError as exc:
                self.errors.append(f"MetricsAddress: cannot listen on {self.profile.metrics_address}: "
                                   f"{exc.strerror or exc}")
                return 1
            if os.geteuid() == 0 and not self.profile.user and self.live:  # a service, meeting strangers' packets
                log.warning("running as root: every process, the packet parsers included, keeps root's "
                            "privileges; set User to a user of its own to run as it once the sources are open")
            try:
                rundir = make_runtime_dir()
            except OSError as exc:
                self.errors.append(f"cannot make the run's directory in {runtime_base()}: {exc.strerror or exc}")
                return 1
            self._profile_copy = os.path.join(rundir, "profile.json")  # what a reload applies (checked first)
            old = {s: signal.signal(s, self._on_signal) for s in self._handlers}
            if self.profile.user and os.geteuid() == 0:
                try:
                    drop_privileges(self.profile.user, rundir, self.profile.groups)
                except OSError as exc:
                    self.errors.append(f"User: cannot become {self.profile.user}: {exc.strerror or exc}")
                    return 1
            if os.geteuid() != 0:  # a user, perhaps with ambient capabilities (systemd): keep none
                try:
                    drop_capabilities()
                except OSError as exc:
                    self.errors.append(f"cannot give up the capabilities: {exc.strerror or exc}")
                    return 1
            return self._run(rundir, opened)
        finally:
            for _spec, source in opened:
                if source is not None:
                    source.close()
            for s, h in old.items():
                signal.signal(s, h)
            if self._metrics is not None:
                self._metrics.close()
            if rundir is not None:
                shutil.rmtree(rundir, ignore_errors=True)

    def _bind_metrics(self):
        """``/metrics`` bound now (root may still bind a low port; a port in use stops the start), served
        once the children are started (``flowmeter.metrics``); None when MetricsAddress is empty."""
        if not self.profile.metrics_address:
            return None
        from flowmeter.config import metrics_endpoint
        from flowmeter.metrics import MetricsServer

        return MetricsServer(self.report, *metrics_endpoint(self.profile.metrics_address))

    def _open_live(self) -> list[tuple]:
        """(spec, source) per live capture process; sources that need root are opened now, before
        any child is forked and before root is given up; a feed is opened by its own process."""
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

    def _run(self, rundir: str, opened: list) -> int:
        producers = self.captures + len(opened)
        # Each capture process's packet batches reach the workers through shared memory (ipc/batchring.py).
        try:
            rings = {f"capture-{i}": BatchRing(self.workers, capture_process.BATCH_PACKETS)
                     for i in range(producers)}
        except OSError as exc:  # e.g. strict overcommit: say so before anything starts
            self.errors.append(f"cannot map the batch rings ({producers} x "
                               f"{BatchRing.size(self.workers, capture_process.BATCH_PACKETS) >> 20}"
                               f" MiB of shared memory): {exc.strerror or exc}")
            return 1
        # Everything made so far (modules, numba's types, the kernels) lives as long as the process:
        # frozen, no collection here or in a child walks it again, nor writes to its pages (copy on write).
        gc.freeze()
        gc.enable()
        control_endpoint = f"ipc://{rundir}/control"
        ctx = zmq.Context()
        control = ctx.socket(zmq.PULL)
        control.bind(control_endpoint)
        # packets lost inside the pipeline so far, for the exporter's statistics records (shared memory)
        self._ignored = np.frombuffer(mmap.mmap(-1, mmap.PAGESIZE), np.int64, count=1)
        self.report.started = time.monotonic()
        self._ctx = ctx
        self._rings = rings
        self._start_children(rundir, control_endpoint, opened, rings)
        if self._metrics is not None:
            self._metrics.start()
        release_compiler_pages()  # LLVM's code, mapped in this process only: not held at rest
        crashed: ChildInfo | None = None
        try:
            crashed = self._watch(control, rundir)
            self._last_words(control)
        finally:
            self.report.elapsed = time.monotonic() - self.report.started
            for c in self.children:
                c.process.join(1)
            for push in self._eos_pushes.values():
                push.close(1000)
            control.close(0)
            ctx.term()
            self.report.end_progress()
        if self._stopped_now:
            self.errors.insert(0, f"{self._stopped_now}: stopped at once; "
                               + "; ".join(self.report.losses() or ["nothing was lost"]))
            return 1
        if self.restarts.incidents and not self.live and crashed is None:  # a replay must be complete
            self.errors.insert(0, f"{self.restarts.count()} process(es) died during the replay: see the "
                               "restarts and lost lines")
        if crashed is not None:
            self.errors.insert(0, f"{crashed.name} (pid {crashed.process.pid}) {_how(crashed)}; "
                               f"pipeline stopped{self._why_stopped}")
            return 1
        return 1 if self.errors else 0

    def _start_children(self, rundir: str, control: str, opened: list, rings: dict[str, BatchRing]) -> None:
        """Fork the exporter, the workers and the capture processes (consumers before their producers).

        What each is started with is kept (``_recipes``): a child that dies
        is started again from it. The live sources opened here stay open in
        this process too, for a capture process started again.
        """
        p = self.profile
        ep_export = f"ipc://{rundir}/export"
        ep_workers = tuple(f"ipc://{rundir}/worker-{i}" for i in range(self.workers))
        self._endpoints = {"exporter": ep_export, **{f"worker-{i}": ep for i, ep in enumerate(ep_workers)}}
        self._sources = [source for _spec, source in opened if source is not None]
        copy = self._profile_copy
        ignored = self._ignored

        def reloaded() -> Profile:  # in a child, on the supervisor's reload: the profile it checked
            return load_profile(copy)

        self._recipe("exporter", "exporter", exporter_process.run,
                     (exporter_process.ExporterSettings(export_settings(p, bool(opened)), producers=self.workers),
                      exporter_process.ExporterEndpoints(ep_export, control),
                      exporter_process.ExporterHandover(lambda: export_settings(reloaded(), bool(opened)),
                                                        ignored=lambda: int(ignored[0]))))
        producers = self.captures + len(opened)
        for i in range(self.workers):
            def worker_reload(i=i) -> worker_process.WorkerSettings:
                return worker_settings(reloaded(), i, self.workers, producers, bool(opened))
            self._recipe(f"worker-{i}", "worker", worker_process.run,
                         (worker_settings(p, i, self.workers, producers, bool(opened)),
                          worker_process.WorkerEndpoints(ep_workers[i], ep_export, control),
                          worker_process.WorkerHandover(rings, worker_reload)))
        endpoints = capture_process.CaptureEndpoints(ep_workers, control)
        for i in range(self.captures):
            self.report.files_of[f"capture-{i}"] = ",".join(f"pcap:{f}" for f in self.files[i::self.captures])
            # One capture process: the files in order (e.g. a rotated capture). Several: the files
            # are dealt out and read at the same time (e.g. one file per member of a fanout group).
            self._recipe(f"capture-{i}", "capture", capture_process.run,
                         (capture_settings(p, i, files=self.files[i::self.captures]), endpoints,
                          capture_process.CaptureHandover(rings[f"capture-{i}"],
                                                          reload=lambda: capture_settings(reloaded(), 0))))
        for n, (spec, source) in enumerate(opened):
            i = self.captures + n
            handover = capture_process.CaptureHandover(
                rings[f"capture-{i}"], source, partial(open_source, spec, p) if source is None else None,
                reload=lambda: capture_settings(reloaded(), 0, live=True))
            self._recipe(f"capture-{i}", "capture", capture_process.run,
                         (capture_settings(p, i, live=True), endpoints, handover), own=source)
        for name in self._recipes:
            self._spawn(name)

    def _recipe(self, name: str, role: str, target: Callable, args: tuple, own=None) -> None:
        self._recipes[name] = (role, target, args, own)

    def _spawn(self, name: str) -> ChildInfo:
        """Start (or start again) the child ``name`` from its recipe."""
        role, target, args, own = self._recipes[name]
        nice = self.data_plane_nice if role in ("capture", "worker") else 0
        foreign = tuple(s for s in self._sources if s is not own)
        proc = multiprocessing.get_context("fork").Process(
            target=child_main, args=(name, target, args, nice, foreign, role == "capture"), name=f"flowmeter-{name}")
        proc.start()
        child = ChildInfo(name, role, proc, started=time.monotonic())
        self.children.append(child)
        if self._poller is not None:
            self._poller.register(proc.sentinel, zmq.POLLIN)
        return child

    def _current(self) -> list[ChildInfo]:
        """The latest process of every name (a dead one that was replaced is not)."""
        return [c for c in self.children if not c.replaced]

    def _watch(self, control: zmq.Socket, rundir: str) -> ChildInfo | None:
        """Act on signals, reports, deaths and hangs until every child has ended; the child whose
        failure stopped the run (the others then stopped), if one did."""
        poller = self._poller = zmq.Poller()
        poller.register(control, zmq.POLLIN)
        for c in self.children:  # a child's exit wakes the loop at once
            poller.register(c.process.sentinel, zmq.POLLIN)
        while True:
            while self._signals:
                self._handlers[self._signals.pop(0)]()
            events = dict(poller.poll(WATCH_MS))
            if control in events:
                self._read_control(control)
            now = time.monotonic()
            for c in self.children:
                if c.process.sentinel in events and c.process.exitcode is not None:
                    poller.unregister(c.process.sentinel)
                    c.ended_s = round(now - self.report.started, 3)
            self.report.show_progress()
            if self.live:
                self.report.log_sources(now)
            self.report.write_status(rundir, now)
            self._notify(now)
            self._ignored[0] = self.report.ignored_packets()
            if self._draining is not None and not self._stopped_now \
                    and now - self._draining >= self.profile.drain_timeout_s:
                self._stop_now(f"the drain deadline ({self.profile.drain_timeout_s:g} s, "
                               "DrainTimeoutSeconds) passed")
            if self._stopped_now:
                if now >= self._give_up_by:
                    for c in self.children:
                        if c.process.is_alive():
                            c.process.kill()
                if all(c.process.exitcode is not None for c in self.children):
                    return None
                continue
            failed = self._failures(now)
            if failed is not None:
                self._stop_after_crash(failed)
                return failed
            for name, (due, incident) in list(self._pending.items()):
                if now >= due:
                    del self._pending[name]
                    self._restart(name, incident, now)
            if not self._pending and all(c.process.exitcode is not None for c in self._current()):
                return None

    def _notify(self, now: float) -> None:
        """The service manager's view: ready once every child has reported (the sources are open and
        read), the current rates, and the watchdog's ping from this loop."""
        n = self.notifier
        if not n.active:
            return
        n.watchdog(now)
        if self._draining is not None:
            return
        if not n.ready_sent:
            current = self._current()
            if current and all(c.heard for c in current):
                n.ready(self._status_line(now))
        elif n.status_due(now):
            n.status(self._status_line(now), now)

    def _status_line(self, now: float) -> str:
        """One line for ``systemctl status``: the current packet rate (the status file's, over its last
        interval), and the totals."""
        t = self.report.totals()
        packets, records = t["capture"].packets, t["exporter"].records
        rate = sum(self.report.rates.values())
        return (f"metering {len(self.live) or len(self.files)} source(s): {rate:,.0f} packets/s now, "
                f"{packets:,} packets metered, {records:,} flow records exported")

    def _failures(self, now: float) -> ChildInfo | None:
        """Deal with every child that died or hung since the last look; the one that stops the run, if any."""
        for c in self._current():
            code = c.process.exitcode
            if code is None:
                if (now - c.heard >= HANG_S) if c.heard else (now - c.started >= START_GRACE_S):
                    # stopped or stuck: treated as a crash
                    c.hung = True
                    c.process.kill()
                continue
            if code == 0:
                continue
            at = now - self.report.started
            how = f"hung: no report for {HANG_S if c.heard else START_GRACE_S:g} s, killed" if c.hung else _how(c)
            incident = self.restarts.died(c.name, how, at)
            log.error("%s (pid %d) %s", c.name, c.process.pid, how)
            if code == CONFIG_EXIT:
                self._why_stopped = " (an error a restart cannot fix)"
                return c
            if self._draining is not None:  # no restart while stopping: its consumers are told it ended
                c.replaced = True
                self._end_of_stream_for(c)
                continue
            if c.role == "capture" and int(c.name.split("-")[1]) < self.captures:
                # a capture file is not read twice: what it had not read is not metered
                c.replaced = True
                self.errors.append(f"{c.name} {how}: the rest of its capture files was not read")
                self._end_of_stream_for(c)
                continue
            delay = self.restarts.delay(c.name, at)
            if delay is None:
                self._why_stopped = f" ({c.name} died {CRASH_LOOP + 1} times within {CRASH_WINDOW_S:g} s)"
                return c
            c.replaced = True
            if c.role == "worker":  # the batches on their way to it died with it (BatchRing.give_up)
                index = int(c.name.split("-")[1])
                for ring in self._rings.values():
                    ring.give_up(index)
            self._pending[c.name] = (now + delay, incident)
        return None

    def _restart(self, name: str, incident: Incident, now: float) -> None:
        child = self._spawn(name)
        incident.restart_s = now - self.report.started
        log.warning("%s restarted (pid %d)", name, child.process.pid)
        # producers that ended before it started told its predecessor: it is told again
        producers = {"worker": "capture", "exporter": "worker"}.get(child.role)
        for c in self.children:
            if c.role == producers and not c.replaced and c.process.exitcode == 0:
                self._send_end_of_stream(name, c.name)

    def _end_of_stream_for(self, dead: ChildInfo) -> None:
        """A producer that died and will not be restarted: its consumers are told it has ended."""
        if dead.role == "capture":
            for i in range(self.workers):
                self._send_end_of_stream(f"worker-{i}", dead.name)
        elif dead.role == "worker":
            self._send_end_of_stream("exporter", dead.name)

    def _send_end_of_stream(self, consumer: str, producer: str) -> None:
        push = self._eos_pushes.get(consumer)
        if push is None:
            push = self._eos_pushes[consumer] = self._ctx.socket(zmq.PUSH)
            push.connect(self._endpoints[consumer])
        push.send(EndOfStream(producer, -1).pack())

    def _stop_after_crash(self, crashed: ChildInfo) -> None:
        """Stop the others in pipeline order, each stage with a deadline, then SIGKILL."""
        for role in ("capture", "worker", "exporter"):
            stage = [c for c in self._role(role) if c is not crashed]
            for c in stage:
                os.kill(c.process.pid, STOP_SIGNAL)
            deadline = time.monotonic() + STOP_DEADLINE_S
            for c in stage:
                c.process.join(max(0.0, deadline - time.monotonic()))
                if c.process.is_alive():
                    c.process.kill()
                    c.process.join(5)

    def _last_words(self, control: zmq.Socket) -> None:
        """The children's last reports, already on their way once they have exited: read until every
        child that ended cleanly has its final report in (``LAST_WORDS_S`` at most), then what else
        is queued."""
        deadline = time.monotonic() + LAST_WORDS_S
        while any(c.process.exitcode == 0 and not c.final for c in self.children):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if control.poll(min(10, max(1, int(left * 1000)))):
                self._read_control(control)
        while control.poll(0):
            self._read_control(control)

    def _read_control(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = parse_control(frame)
            except SchemaError:
                continue
            child = next((c for c in self.children if c.name == msg.sender and c.process.pid == msg.pid), None)
            if child is None or child.role != msg.role:
                continue
            child.heard = time.monotonic()
            if isinstance(msg, ErrorReport):
                child.error = msg.message
                self.errors.append(msg.message)
            else:
                child.counters = msg.counters
                child.final = child.final or msg.final


def _how(c: ChildInfo) -> str:
    code = c.process.exitcode
    return f"killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"


# --- what each stage gets from the profile (at start, and again on a reload) ---

def export_settings(p: Profile, live: bool = True) -> ExportSettings:
    """The exporter's settings: the profile's, or no collector at all when ``Enabled`` is false.

    ``live``: the run meters live sources (the kernel names their interfaces); a replay of capture
    files does not, whatever the profile's Sources say.
    """
    if not p.enabled:
        return ExportSettings(collectors=())
    settings = p.export_settings()
    return settings if live else dataclasses.replace(settings, kernel_interface_names=False)


def exclusions(p: Profile) -> tuple:
    """(ip_version, hi, lo, port) of every UDP or DTLS collector exported to, unless MeterExport is on."""
    if p.meter_export or not p.enabled:
        return ()
    out = []
    for c in p.collectors:
        if c.kind not in ("udp", "dtls"):
            continue
        try:
            addr = ipaddress.ip_address(c.host)
        except ValueError:
            continue
        value = int(addr)
        out.append((addr.version, value >> 64, value & ((1 << 64) - 1), c.port))
    return tuple(out)


def capture_settings(p: Profile, index: int, files: tuple[str, ...] = (), live: bool = False,
                     ) -> capture_process.CaptureSettings:
    """A capture process's settings; a live one leaves the collectors' datagrams out (own export)."""
    return capture_process.CaptureSettings(index=index, files=files, direction=p.direction,
                                           local_networks=p.local_networks, drop_prefixes=p.drop_prefixes,
                                           exclude=exclusions(p) if live else ())


def worker_settings(p: Profile, index: int, workers: int, producers: int, live: bool,
                    ) -> worker_process.WorkerSettings:
    """A worker's settings: its share of MaxFlows, the timeouts, the observation domain."""
    return worker_process.WorkerSettings(index=index, max_flows=max(64, -(-p.max_flows // workers)),
                                         idle_timeout_ns=p.idle_timeout_ms * 1_000_000,
                                         interval_ns=p.interval_ms * 1_000_000, domain=p.observation_domain_id,
                                         producers=producers, live=live)
