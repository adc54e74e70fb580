"""The capture process: a source in, decoded packet batches out to the shard workers.

Its whole life is ``run()``: connect to every worker and to the supervisor;
read its source -- capture files in turn, or one live source (``sources``)
until told to stop -- in batches, decode them into
``PACKET_DTYPE`` rows, settle direction and policy (``DirectionPolicy``),
split the rows by symmetric flow hash and push each worker its share,
together with the capture clock (packet time), which every worker gets
with every batch so timers fire alike on all shards. It ends with an
end-of-stream to every worker, after the last file or on a stop (on a stop
at once it sends nothing more and ends).

Frames that are not metered are counted by cause (not IP, malformed,
truncated, unsupported link type, other direction, flowmeter's own export
datagrams on a live interface); a capture file that
stops early (truncated, garbage) is reported as an error after what could
be read was metered.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import zmq

from flowmeter.capture.decode import FragmentMemory, decode_batch, nflog_prefixes
from flowmeter.capture.direction import DirectionPolicy
from flowmeter.capture.shard import Router
from flowmeter.capture.sources import Source
from flowmeter.capture.sources.pcapfile import CaptureError, open_capture
from flowmeter.ipc.batchring import BatchRing, RingStalled
from flowmeter.ipc.counters import CaptureCounters
from flowmeter.ipc.lifecycle import StageRuntime
from flowmeter.ipc.packets import PACKET_DTYPE, ST_OK, STATUS_NAMES
from flowmeter.ipc.schema import EndOfStream, packets_message

log = logging.getLogger("flowmeter.capture")

BATCH_PACKETS = 65536
SEND_HWM = 64  # batches queued per worker before the capture waits for it
LINGER_MS = 60_000  # at exit, queued batches wait this long for their worker (one that died never reads)
LIVE_WAIT_S = 0.1  # a live source is polled this long at most between checks for a stop
LIVE_LAST_S = 0.25  # after a stop, what reaches the source this soon is still read (a ring's last block)
OWN_EXPORT = "own export"  # not-metered cause: UDP to a collector (see ``CaptureSettings.exclude``)
LEFT_OUT = 255  # decode status given to a row left out after decoding (the routing sends only status 0)


@dataclass(frozen=True, slots=True)
class CaptureSettings:
    index: int
    files: tuple[str, ...] = ()  # capture files, read in turn (no live source)
    direction: str = "Both"
    local_networks: tuple = ()
    drop_prefixes: tuple = ()
    # (ip_version, address hi, address lo, port) of each UDP collector: datagrams to one are
    # flowmeter's own export, not metered from a live source
    exclude: tuple[tuple[int, int, int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class CaptureEndpoints:
    workers: tuple[str, ...]  # connect: PUSH, one per worker, in worker order
    control: str  # connect: PUSH to the supervisor


@dataclass(frozen=True, slots=True)
class CaptureHandover:
    """What the supervisor hands a capture process across the fork."""

    ring: BatchRing | None = None  # this process's batch ring, shared with the workers
    source: Source | None = None  # a live source opened before the fork (it needs root)
    open_source: Callable[[], Source] | None = None  # else a live source this process opens (a feed)
    reload: Callable[[], CaptureSettings] | None = None  # on a reload: the new settings (the profile's)


def _not_metered(counters: CaptureCounters, cause: str, n: int) -> None:
    if n:
        counters.not_metered[cause] = counters.not_metered.get(cause, 0) + n


class Capture:
    """Decode, classify and shard one capture file's batches (no sockets: testable alone)."""

    def __init__(self, settings: CaptureSettings, workers: int, send, ring: BatchRing | None = None,
                 stop=lambda: False, at_once=lambda: False, beat=lambda: None) -> None:
        self.settings = settings
        self.name = f"capture-{settings.index}"
        self.workers = workers
        self.policy = DirectionPolicy(settings.direction, settings.local_networks, settings.drop_prefixes)
        self.router = Router(workers, self.policy)
        self._send = send  # send(worker index, frames)
        self.ring = ring  # the rows go through this batch ring's slots (else as payload frames)
        self._stop = stop  # a stop was asked (a full ring then waits at most STALL_S for the workers)
        self._at_once = at_once  # a stop at once was asked: wait for nothing, read nothing more
        self._beat = beat  # called while waiting for the workers: alive, not hung
        if ring is not None and ring.workers != workers:
            raise ValueError(f"ring: made for {ring.workers} workers, not {workers}")
        # batches sent: every worker gets each one (its part may be empty); a capture process started
        # again goes on from its predecessor's count, so the ring's slots and the workers' view stay in step
        self.batches = ring.written if ring is not None else 0
        self.clock_ns = 0
        self.counters = CaptureCounters()
        self._rows = np.empty(BATCH_PACKETS, dtype=PACKET_DTYPE)
        self._status = np.empty(BATCH_PACKETS, dtype=np.uint8)
        self._fragments = FragmentMemory()  # ICMP first fragments seen, for their later fragments
        self._exclude = np.array(settings.exclude, dtype=np.uint64).reshape(-1, 4)
        self.errors: list[str] = []

    def apply(self, settings: CaptureSettings) -> None:
        """New Direction, LocalNetworks, DropPrefixes and collectors left out (a reload), from the next batch on."""
        self.settings = settings
        self.policy = DirectionPolicy(settings.direction, settings.local_networks, settings.drop_prefixes)
        counts = self.router.counts
        self.router = Router(self.workers, self.policy)
        self.router.counts = counts
        self._exclude = np.array(settings.exclude, dtype=np.uint64).reshape(-1, 4)

    def meter_file(self, path: str, stop=lambda: False, progress=lambda: None) -> None:
        try:
            capture = open_capture(path)
        except CaptureError as exc:
            self.errors.append(str(exc))
            return
        self.counters.file_size += capture.size
        done_before = self.counters.file_octets
        for batch in capture.batches(BATCH_PACKETS, reuse=True):  # decoded before the next is read
            self.meter_batch(batch)
            self.counters.file_octets = done_before + capture.bytes_read
            progress()
            if stop():
                break
        if not capture.complete and capture.error:
            self.errors.append(capture.error)

    def meter_live(self, source, stop=lambda: False, progress=lambda: None) -> None:
        """Read a live source until ``stop()``; its counters go with the capture's."""
        self.counters.source = source.name
        while not stop():
            for item in source.read(LIVE_WAIT_S):
                self._meter_item(item)
                if stop():
                    break
            self.counters.source_counters = source.counters()
            progress()
        if self._at_once():
            return
        for item in source.read(LIVE_LAST_S):  # frames in flight at the stop are metered too
            self._meter_item(item)

    def _meter_item(self, item) -> None:
        if isinstance(item, np.ndarray):  # rows the source decoded itself
            self.meter_rows(item, np.zeros(len(item), np.uint8))
        else:
            self.meter_batch(item)

    def meter_batch(self, batch) -> None:
        n = len(batch.offset)
        if n > len(self._rows):
            self._rows = np.empty(n, dtype=PACKET_DTYPE)
            self._status = np.empty(n, dtype=np.uint8)
        rows, status = self._rows[:n], self._status[:n]
        if self.ring is not None and self.workers == 1 and n <= self.ring.rows:
            # One worker: decode straight into its slot; routing then only compacts the rows in place.
            self.ring.wait_free(self.batches, self._stop, self._at_once, self._beat)
            rows = self.ring.slot(self.batches)[0, :n]
        info = decode_batch(batch, rows, status, self._fragments)
        self.counters.frames += n
        for code, name in STATUS_NAMES.items():
            if code != ST_OK:
                _not_metered(self.counters, name, int(info.status_counts[code]))
        if info.nflog_prefix_length.max(initial=-1) >= 0:
            for prefix, index in nflog_prefixes(batch, info).items():
                code = self.policy.drop_status(prefix)
                if code:
                    rows["fwd_status"][index] = code
                    rows["egress_if"][index] = 0  # dropped: it never left (NFLOG still names the out-device)
        self.meter_rows(rows, status)

    def meter_rows(self, rows, status) -> None:
        """Decoded rows (those with ``status`` 0) to the workers: own export left out, direction, shard."""
        if self.ring is not None and len(rows) > self.ring.rows:  # a slot holds one batch: cut bigger ones
            for at in range(0, len(rows), self.ring.rows):
                self.meter_rows(rows[at:at + self.ring.rows], status[at:at + self.ring.rows])
            return
        if len(self._exclude) and len(rows):
            own = np.zeros(len(rows), bool)
            for version, hi, lo, port in self._exclude:
                own |= ((rows["proto"] == 17) & (rows["dport"] == port) & (rows["dst_lo"] == lo)
                        & (rows["dst_hi"] == hi) & (rows["ip_version"] == version))
            own &= status == ST_OK
            if own.any():
                status[own] = LEFT_OUT
                _not_metered(self.counters, OWN_EXPORT, int(own.sum()))
        slot = -1
        if self.ring is not None:
            self.ring.wait_free(self.batches, self._stop, self._at_once, self._beat)
            slot = self.batches % self.ring.nslots
        parts, kept, octets, other, newest = self.router.route(
            rows, status, None if self.ring is None else self.ring.slot(self.batches))
        if self.ring is not None:
            self.ring.wrote(self.batches)
        self.clock_ns = max(self.clock_ns, newest)
        self.counters.other_direction += other
        self.counters.packets += kept
        self.counters.octets += octets
        for w, part in enumerate(parts):
            self._send(w, packets_message(self.name, self.batches, self.clock_ns, part, slot))
        self.batches += 1

    def report(self) -> CaptureCounters:
        """The counters so far, with this process's CPU time."""
        self.counters.cpu_s = round(time.process_time(), 3)
        return self.counters

    def end_of_stream(self) -> None:
        for w in range(self.workers):
            self._send(w, [EndOfStream(self.name, self.batches).pack()])


def run(settings: CaptureSettings, endpoints: CaptureEndpoints, handover: CaptureHandover) -> int:
    """The capture's life: every file in turn, or the live source until SIGTERM/SIGINT; then
    end-of-stream to every worker. With a batch ring the batches' rows go through its slots."""
    with StageRuntime(f"capture-{settings.index}", "capture", endpoints.control, reload=True) as rt:
        pushes = [rt.socket(zmq.PUSH, connect=ep, send_hwm=SEND_HWM, linger_ms=LINGER_MS)  # every batch
                  for ep in endpoints.workers]                                          # reaches a live worker
        source = handover.source
        if source is None and handover.open_source is not None:
            source = handover.open_source()  # a SourceError ends this process with its one line
        if source is not None:
            log.info("%s open", source.name)
        cap = Capture(settings, len(pushes), lambda w, frames: pushes[w].send_multipart(frames, copy=False),
                      handover.ring, stop=lambda: bool(rt.stop), at_once=lambda: rt.stop.at_once,
                      beat=lambda: rt.progress(cap.report))

        def progress() -> None:  # after every batch
            if rt.stop.take_reloads() and handover.reload is not None:
                try:
                    cap.apply(replace(handover.reload(), index=settings.index, files=settings.files))
                except (OSError, ValueError) as exc:
                    log.error("reload failed, keeping the running settings: %s", exc)
            rt.progress(cap.report, urgent=True)  # what it handed on: a crash's cost is counted from it

        try:
            if source is not None:
                _meter_source(cap, source, lambda: bool(rt.stop), progress)
            for path in settings.files:
                if rt.stop:
                    break
                cap.meter_file(path, stop=lambda: bool(rt.stop), progress=progress)
                if cap.errors:
                    break  # stop at the first unreadable file, after metering what it had
        except RingStalled as exc:  # a worker is gone: what it had not taken is lost, say so
            if not rt.stop.at_once:
                cap.errors.append(str(exc))
        if rt.stop.at_once:  # the workers end now too: what is on its way to them is lost, counted by them
            for push in pushes:
                push.setsockopt(zmq.LINGER, 0)
        else:
            cap.end_of_stream()
        for e in cap.errors:
            rt.error(e)
        rt.final(cap.report())
    return 0


def _meter_source(cap: Capture, source: Source, stop: Callable[[], bool], progress: Callable[[], None]) -> None:
    """A live source until ``stop()``; a failing source (the interface went away) is an error, then the drain."""
    try:
        cap.meter_live(source, stop=stop, progress=progress)
    except OSError as exc:
        if os.environ.get("FLOWMETER_DEBUG"):
            traceback.print_exc()
        message = exc.strerror or str(exc)
        cap.errors.append(message if message.startswith(source.name) else f"{source.name}: {message}")
    finally:
        cap.counters.source_counters = source.counters()
        source.close()
