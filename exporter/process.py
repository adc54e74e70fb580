"""The exporter process: pulls finished-record batches from ZeroMQ and exports them.

Its whole life is ``run()``: bind a PULL socket, then loop: receive every
batch waiting (``flowmeter.ipc.schema``: msgpack header + raw record frame),
hand it to the ``ExportingProcess``, send a message that has waited long
enough, do the periodic duties (template refresh, statistics); until it is
told to stop. Stopping drains: batches already queued on the socket are
received and exported, open messages are sent, a last statistics record
goes out, and only then does the process exit. With ``producers`` set, it
also stops by itself once it holds an end-of-stream from each producer.

Pacing (``ExportSettings.export_rate``) never blocks receiving: messages
wait in the exporting process's queues and the loop polls the socket with
a timeout that ends when the next ones may leave. Only while every
collector's queue is full (``ExportingProcess.backlogged``) does it leave
batches on the socket, which holds the producers back instead of growing
without bound; one full queue gives up its own oldest messages instead. The
drain at a stop is paced too; a second stop request (SIGTERM/SIGINT, or the
supervisor's ``STOP_SIGNAL``) gives up what is still queued (counted as not
sent) and exits.

Bad input from the socket (not our schema, unknown template, wrong dtype or
size) is counted per cause and dropped, never fatal. So are output faults:
a collector that is down, a full or failing disk under a ``File/``
collector, a file that cannot be opened at start or at a reload are that
collector's messages not sent (counted by cause, one log line per
collector every ``REPORT_S``), never an exception out of this process.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import zmq

from flowmeter.ipc.counters import CollectorCounters, ExporterCounters
from flowmeter.ipc.lifecycle import StageRuntime, StopFlag
from flowmeter.ipc.schema import EndOfStream, RecordsHeader, SchemaError, parse_header, records_from_frame

from .exporting import ExportingProcess, ExportSettings

log = logging.getLogger("flowmeter.exporter")

POLL_MS = 100
FLUSH_AFTER_S = 0.2  # longest a partly filled message waits for more records
MAX_BATCHES_PER_TURN = 256
DRAIN_QUIET_MS = 50
SHORT_WAIT_S = 0.002  # waits for tokens shorter than this are slept precisely, not polled
REPORT_S = 10.0  # at most one log line per collector in trouble this often
RECEIVE_HWM = 1000  # batches queued before producers are held back


@dataclass(frozen=True, slots=True)
class ExporterSettings:
    export: ExportSettings  # collectors, message size, pacing, ... (the profile's)
    producers: int | None = None  # stop after an end-of-stream from this many; None: only on a signal


@dataclass(frozen=True, slots=True)
class ExporterEndpoints:
    records: str  # bind: PULL, record batches from the workers
    control: str | None = None  # connect: PUSH, counters to the supervisor (None: no supervisor)


@dataclass(frozen=True, slots=True)
class ExporterHandover:
    """What the exporter gets besides values: callables made by whoever starts it."""

    reload: Callable[[], ExportSettings] | None = None  # SIGHUP: the new settings (raises ValueError if unusable)
    ready: Callable[[], None] | None = None  # called once the socket is bound
    stop: StopFlag | None = None  # stop it from another thread (tests); else signals do
    ignored: Callable[[], int] | None = None  # packets lost inside flowmeter so far (ignoredPacketTotalCount)


class Exporter:
    """The receiving end of the exporter: schema checks in front of an ``ExportingProcess``."""

    def __init__(self, settings: ExportSettings) -> None:
        self.exporting = ExportingProcess(settings)
        self.stats = ExporterCounters()  # what it received and dropped; collectors filled by counters()
        self.producers_done: set[str] = set()
        self._last_seq: dict[str, int] = {}

    def _drop(self, cause: str) -> None:
        self.stats.dropped[cause] = self.stats.dropped.get(cause, 0) + 1

    def counters(self) -> ExporterCounters:
        """The counters so far, with every collector's and this process's CPU time."""
        collectors = self.exporting.totals()["collectors"]
        self.stats.collectors = {name: CollectorCounters(**c) for name, c in collectors.items()}
        self.stats.cpu_s = round(time.process_time(), 3)
        return self.stats

    def handle(self, frames: list, now: float) -> None:
        """Take one multipart message from a producer."""
        try:
            header = parse_header(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0])
        except SchemaError:
            self._drop("bad header")
            return
        last = self._last_seq.get(header.sender)
        if header.seq >= 0:  # -1: an end-of-stream the supervisor sent for a producer that died
            if last is not None and header.seq != last + 1:
                self.stats.gaps += 1
            self._last_seq[header.sender] = header.seq
        if isinstance(header, EndOfStream):
            self.producers_done.add(header.sender)
            return
        if not isinstance(header, RecordsHeader):
            self._drop("unexpected kind")
            return
        template = self.exporting.registry.get(header.template)
        if template is None or template.is_options:
            self._drop("unknown template")
            return
        if len(frames) != 2:
            self._drop("bad frame count")
            return
        payload = frames[1].buffer if hasattr(frames[1], "buffer") else frames[1]
        try:
            records = records_from_frame(header, template.dtype, payload)
        except SchemaError:
            self._drop("bad payload")
            return
        self.stats.batches += 1
        self.stats.records += len(records)
        if "packetDeltaCount" in template.dtype.names:
            self.stats.packets += int(records["packetDeltaCount"].sum(dtype=np.uint64))
        self.exporting.export(template, records, header.domain, now)


def _collector_report(exp, last: dict, final: bool = False) -> list[str]:
    """One line per collector whose not-sent count grew since the last report, by cause."""
    lines = []
    for name, c in exp.totals()["collectors"].items():
        before = last.get(name, {})
        grown = {k: v - before.get(k, 0) for k, v in sorted(c["errors"].items()) if v > before.get(k, 0)}
        if grown:
            causes = ", ".join(f"{k} {v:,}" for k, v in grown.items())
            detail = f"; {c['last_error']}" if c["last_error"] else ""
            lines.append(f"collector {name}: {sum(grown.values()):,} messages not sent ({causes}{detail}; "
                         f"{c['not_sent_records']:,} records not sent in all)" + ("" if final else "; retrying"))
        last[name] = dict(c["errors"])
    return lines


def _log_send_buffers(exp: ExportingProcess, asked: int) -> None:
    """One line per UDP collector: the send buffer the kernel granted (and its pace)."""
    for s in exp.sessions:
        granted = s.transport.granted_buffer
        if not granted:
            continue
        pace = f"{s.rate:,.0f} messages/s" if s.rate else "unpaced"
        # Linux reports twice what it was asked for (the other half is its bookkeeping)
        if granted < 2 * asked:
            log.warning("collector %s: send buffer %d octets granted, %d asked (raise net.core.wmem_max "
                        "or run as root); %s", s.name, granted, asked, pace)
        else:
            log.info("collector %s: send buffer %d octets granted; %s", s.name, granted, pace)


def run(settings: ExporterSettings, endpoints: ExporterEndpoints,
        handover: ExporterHandover = ExporterHandover()) -> int:
    """Run the exporter until SIGTERM/SIGINT, a stop from ``handover.stop``, or end-of-stream from every producer.

    On SIGHUP, ``handover.reload()`` gives new settings (collectors, sizes,
    periods): sessions of collectors that stay keep their sequence numbers
    and every template is sent again at once; a reload that fails (raises
    ``ValueError``) keeps the old ones.
    """
    producers = settings.producers
    with StageRuntime("exporter", "exporter", endpoints.control, reload=True, stop=handover.stop) as rt:
        sock = rt.socket(zmq.PULL, bind=endpoints.records, receive_hwm=RECEIVE_HWM, linger_ms=0)
        exporter = Exporter(settings.export)
        exp = exporter.exporting
        if handover.ignored is not None:
            exp.ignored_packets = handover.ignored
        try:
            _log_send_buffers(exp, settings.export.socket_buffer)
            for line in exp.unopened():
                log.warning(line)
            if handover.ready is not None:
                handover.ready()
            _export_until_stopped(rt, sock, exporter, producers, handover.reload)
            rt.final(exporter.counters())
        finally:
            exp.close()
        st = exporter.stats
        if endpoints.control is None:
            log.info("%d records in %d batches; dropped batches: %d%s", st.records, st.batches,
                     sum(st.dropped.values()), f" {st.dropped}" if st.dropped else "")
    return 0


def _export_until_stopped(rt: StageRuntime, sock, exporter: Exporter, producers: int | None,
                          reload: Callable[[], ExportSettings] | None) -> None:
    """The loop: receive, export, pace, refresh; then the drain (see the module notes)."""
    exp = exporter.exporting
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    last_send = last_report = last_batch = time.monotonic()
    reported: dict[str, int] = {}

    def receive_waiting(now: float, limit: int | None) -> None:
        n = 0
        while limit is None or n < limit:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            exporter.handle(frames, now)
            n += 1

    while True:
        for _ in range(rt.stop.take_reloads()):
            _reload(exp, reload)
        now = time.monotonic()
        rt.orphaned(now)
        if producers is not None and len(exporter.producers_done) >= producers:
            break
        if rt.stop:
            break
        wait = exp.next_send_in()  # queued messages waiting for their collector's pace
        timeout = POLL_MS if wait is None else min(POLL_MS, max(1, math.ceil(wait * 1000)))
        if exp.backlogged():  # every queue is full: leave batches on the socket for now
            time.sleep(min(timeout / 1000, wait if wait is not None else POLL_MS / 1000))
            events = {}
        elif wait is not None and wait < SHORT_WAIT_S:
            # The poll timeout is whole milliseconds: rounding a wait for the next few tokens up
            # to one would cut the rate of a small burst (8 messages per 1.1 ms is not 15000/s).
            events = dict(poller.poll(0))
            if not events and wait > 0:
                time.sleep(wait)
        else:
            events = dict(poller.poll(timeout))
        now = time.monotonic()
        if sock in events:
            receive_waiting(now, MAX_BATCHES_PER_TURN)
            last_batch = now
        # a partly filled message goes when no batch came for a poll period, or after FLUSH_AFTER_S
        if now - last_send >= FLUSH_AFTER_S or now - last_batch >= POLL_MS / 1000:
            exp.flush(now)
            last_send = now
        exp.tick(now)
        rt.progress(exporter.counters, now, urgent=bool(events) or wait is not None)
        if now - last_report >= REPORT_S:
            for line in _collector_report(exp, reported):
                log.warning(line)
            last_report = now
    # drain: everything already queued on the socket is exported (a short quiet period lets
    # batches still in flight arrive, unless every producer has said it sent its last)
    all_done = producers is not None and len(exporter.producers_done) >= producers
    while poller.poll(0 if all_done else DRAIN_QUIET_MS):
        receive_waiting(time.monotonic(), None)
    exp.flush()
    if exp.settings.stats_interval_s:
        exp.send_statistics()
    queued = exp.queued()
    if queued:
        log.info("sending the %d queued message(s) before exit", queued)
    # a stop request while draining, or a stop at once: give up the queue
    stops = rt.stop.stops

    def give_up() -> bool:  # asked between the paced sends of the drain, which reports as it goes
        rt.progress(exporter.counters, urgent=True)
        return rt.stop.at_once or rt.stop.stops > stops

    if not exp.drain(stop=give_up):
        log.warning("stopped again while draining: queued messages given up (counted as not sent)")
    for line in _collector_report(exp, reported, final=True):
        log.warning(line)


def _reload(exp: ExportingProcess, reload: Callable[[], ExportSettings] | None) -> None:
    """SIGHUP: new settings from ``reload()`` (or the same ones), files reopened, every template sent again.

    A collector that cannot be opened is one log line (``ExportingProcess.reload``), never the end of
    the exporter: the others go on.
    """
    if reload is None:
        for line in exp.reload():
            log.warning(line)
        return
    try:
        settings = reload()
    except ValueError as exc:
        log.error("reload refused, keeping the running settings: %s", exc)
        return
    for line in exp.reload(settings):  # a collector that cannot be opened is its own problem
        log.warning(line)
    log.info("reloaded: %d collector(s); files reopened; templates sent again", len(exp.sessions))
