"""The shard worker process: packets in, finished flow records out.

Its whole life is ``run()``: bind its input socket, connect to the
exporter and the supervisor, then loop: meter each ``packets`` batch into
its flow table (timers fire by the batch's ``clock_ns``, or by the wall
clock for live sources), turn the records that ended into template
batches and push them to the exporter. It stops after an end-of-stream from
each capture process, or on SIGTERM/SIGINT after draining what was already
sent to it; either way every cached flow is flushed (flowEndReason forced
end), and its own end-of-stream tells the exporter that nothing more comes.
A stop at once ends it without the flush: the flows it holds are lost, and
its last report says how many.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import zmq

from flowmeter.ipc.batchring import BatchRing
from flowmeter.ipc.counters import WorkerCounters
from flowmeter.ipc.lifecycle import StageRuntime
from flowmeter.ipc.packets import PACKET_DTYPE
from flowmeter.ipc.schema import (EndOfStream, PacketsHeader, SchemaError, parse_header, records_from_frame,
                                  records_message)
from workers.flowtable import FlowTable
from workers.records import REASON_NAMES, to_template_batches

log = logging.getLogger("flowmeter.worker")

POLL_MS = 100
DRAIN_QUIET_MS = 100
LINGER_MS = 60_000  # at exit, queued records wait this long for the exporter (one that died never reads)
SEND_HWM = 10_000  # record batches queued for the exporter before sends wait


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    index: int
    max_flows: int
    idle_timeout_ns: int
    interval_ns: int
    domain: int
    producers: int  # capture processes feeding this worker
    live: bool = False  # True: timers also fire by the wall clock


@dataclass(frozen=True, slots=True)
class WorkerEndpoints:
    packets: str  # bind: PULL, packet batches from the capture processes
    records: str  # connect: PUSH, record batches to the exporter
    control: str | None  # connect: PUSH, progress and stats to the supervisor


@dataclass(frozen=True, slots=True)
class WorkerHandover:
    """What the supervisor hands a worker across the fork."""

    rings: dict[str, BatchRing] = field(default_factory=dict)  # each capture process's batch ring, by its name
    reload: Callable[[], WorkerSettings] | None = None  # on a reload: the new settings (the profile's)


class Worker:
    """Flow table plus the record output of one shard (no sockets: testable alone)."""

    def __init__(self, settings: WorkerSettings, send, rings: dict[str, BatchRing] | None = None) -> None:
        self.settings = settings
        self.name = f"worker-{settings.index}"
        # One producer: its packet times are the clock. Several: the clock is their low-water mark.
        self.table = FlowTable(settings.max_flows, settings.idle_timeout_ns, settings.interval_ns,
                               packet_clock=settings.producers == 1, lend_output=True)  # emit() consumes at once
        self._send = send
        self.rings = rings or {}  # producer name -> the batch ring its packets messages name slots of
        self.seq = 0
        self.records_out = 0
        self.packets_out = 0
        self.given_up_packets = 0
        self.dropped: dict[str, int] = {}
        self.producers_done: set[str] = set()
        self.clocks: dict[str, int] = {}  # producer -> the capture clock of its latest batch
        self.clock_ns = 0
        self.active_peak = 0

    def apply(self, settings: WorkerSettings) -> None:
        """New timeouts and observation domain (a reload); the cached flows stay and follow them."""
        self.table.set_interval(settings.interval_ns)
        self.table.set_idle_timeout(settings.idle_timeout_ns)
        self.settings = replace(self.settings, interval_ns=settings.interval_ns,
                                idle_timeout_ns=settings.idle_timeout_ns, domain=settings.domain)

    def emit(self, records: np.ndarray) -> None:
        for name, batch in to_template_batches(records):
            packets = int(batch["packetDeltaCount"].sum(dtype=np.uint64))
            self._send(records_message(self.name, self.seq, name, self.settings.domain, batch))
            self.seq += 1
            self.records_out += len(batch)
            self.packets_out += packets

    def handle(self, frames: list) -> None:
        try:
            header = parse_header(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0])
        except SchemaError:
            self._drop("bad header")
            return
        if isinstance(header, EndOfStream):
            self.producers_done.add(header.sender)
            self.clocks.pop(header.sender, None)
            if len(self.producers_done) < self.settings.producers:
                self.emit(self.table.expire(self._low_water_mark()))
            return
        if not isinstance(header, PacketsHeader):
            self._drop("unexpected message")
            return
        if header.slot < 0:
            if len(frames) != 2:
                self._drop("unexpected message")
                return
            payload = frames[1].buffer if hasattr(frames[1], "buffer") else frames[1]
            try:
                packets = records_from_frame(header, PACKET_DTYPE, payload)
            except SchemaError:
                self._drop("bad payload")
                return
            self._meter(header, packets)
            return
        ring = self.rings.get(header.sender)
        if ring is None:
            self._drop("unexpected message")
            return
        if ring.given_up(self.settings.index, header.seq):  # its slot may be written again already
            self._drop("batches given up")
            self.given_up_packets += header.count
            return
        try:
            if len(frames) != 1:
                self._drop("unexpected message")
                return
            if header.slot != header.seq % ring.nslots:
                self._drop("bad slot")
                return
            try:
                packets = ring.rows_of(header.slot, self.settings.index, header.count)
            except ValueError:
                self._drop("bad slot")
                return
            self._meter(header, packets)
        finally:  # the capture may write the slot again
            ring.release(self.settings.index, header.seq)

    def _meter(self, header: PacketsHeader, packets: np.ndarray) -> None:
        if header.sender not in self.producers_done:
            self.clocks[header.sender] = max(self.clocks.get(header.sender, 0), header.clock_ns)
        self.emit(self.table.update(packets, self._low_water_mark()))
        self.active_peak = max(self.active_peak, self.table.active)

    def _low_water_mark(self) -> int:
        """The meter clock: the capture clock every producer still running has passed.

        Until every producer has been heard from, the clock stays where it is:
        one that has not started may still send packets of any time.
        """
        running = self.settings.producers - len(self.producers_done)
        if running > 0 and len(self.clocks) >= running:
            self.clock_ns = max(self.clock_ns, min(self.clocks.values()))
        elif running <= 0 and self.clocks:
            self.clock_ns = max(self.clock_ns, max(self.clocks.values()))
        return self.clock_ns

    def tick(self, now_ns: int) -> None:
        self.clock_ns = max(self.clock_ns, now_ns)
        self.emit(self.table.expire(self.clock_ns))

    def finish(self) -> None:
        self.emit(self.table.flush())

    def _drop(self, cause: str) -> None:
        self.dropped[cause] = self.dropped.get(cause, 0) + 1

    def counters(self) -> WorkerCounters:
        t = self.table.counters
        return WorkerCounters(packets=t.packets, octets=t.octets, flows=t.flows_created, evictions=t.evictions,
                              records_out=self.records_out, packets_out=self.packets_out,
                              end_reasons={REASON_NAMES[r]: n for r, n in t.records.items() if n},
                              active_flows=self.table.active, active_peak=self.active_peak,
                              table_bytes=self.table.nbytes, dropped=dict(self.dropped),
                              given_up_packets=self.given_up_packets,
                              cpu_s=round(time.process_time(), 3))


def run(settings: WorkerSettings, endpoints: WorkerEndpoints, handover: WorkerHandover) -> int:
    """The worker's life: bind, meter until end-of-stream or a stop, flush, say so."""
    with StageRuntime(f"worker-{settings.index}", "worker", endpoints.control, reload=True) as rt:
        pull = rt.socket(zmq.PULL, bind=endpoints.packets, receive_hwm=1000, close_linger_ms=0)
        push = rt.socket(zmq.PUSH, connect=endpoints.records, send_hwm=SEND_HWM,
                         linger_ms=LINGER_MS)  # every record reaches a live exporter

        def send(frames: list) -> None:
            """To the exporter; while it is behind (or being restarted) this waits, reporting: alive."""
            while True:
                try:
                    push.send_multipart(frames, zmq.NOBLOCK, copy=False)
                    return
                except zmq.Again:
                    if rt.stop.at_once:
                        raise StoppedAtOnce() from None
                    push.poll(POLL_MS, zmq.POLLOUT)
                    rt.progress(worker.counters)

        worker = Worker(settings, send, handover.rings)
        try:
            _meter_until_stopped(rt, worker, pull, handover.reload)
            if rt.stop.at_once:
                raise StoppedAtOnce()
            worker.finish()
            send([EndOfStream(worker.name, worker.seq).pack()])
        except StoppedAtOnce:  # the flows held are lost: the last report counts them (active_flows)
            push.setsockopt(zmq.LINGER, 0)
        rt.final(worker.counters())
    return 0


class StoppedAtOnce(Exception):
    """A stop at once: the flows held are not flushed, and a send waiting for the exporter gives up."""


def _meter_until_stopped(rt: StageRuntime, worker: Worker, pull,
                         reload: Callable[[], WorkerSettings] | None) -> None:
    """Meter what comes until every producer has ended or a stop; on a stop, what was sent already too."""
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)

    def receive_waiting() -> None:
        while True:
            try:
                frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            worker.handle(frames)

    settings = worker.settings
    while not rt.stop and len(worker.producers_done) < settings.producers:
        if rt.stop.take_reloads():
            _reload(worker, reload)
        busy = bool(poller.poll(POLL_MS))
        if busy:
            receive_waiting()
        now = time.monotonic()
        rt.orphaned(now)
        if settings.live:
            worker.tick(time.time_ns())
        rt.progress(worker.counters, now, urgent=busy)
    if rt.stop:  # batches already sent to us are still metered
        while not rt.stop.at_once and poller.poll(DRAIN_QUIET_MS):
            receive_waiting()


def _reload(worker: Worker, reload: Callable[[], WorkerSettings] | None) -> None:
    """The supervisor's reload: the new timeouts and domain, or one line and the running ones."""
    if reload is None:
        return
    try:
        worker.apply(reload())
    except (OSError, ValueError) as exc:
        log.error("reload failed, keeping the running settings: %s", exc)
