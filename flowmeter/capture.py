"""The capture process: a source in, decoded packet batches out to the shard workers.

Its whole life is ``run()``: connect to every worker and to the supervisor;
read its source -- capture files in turn, or one live source (``sources``)
until told to stop -- in batches, decode them into
``PACKET_DTYPE`` rows, settle direction and policy (``DirectionPolicy``),
split the rows by symmetric flow hash and push each worker its share,
together with the capture clock (packet time), which every worker gets
with every batch so timers fire alike on all shards. It ends with an
end-of-stream to every worker, after the last file or on SIGTERM/SIGINT.

Frames that are not metered are counted by cause (not IP, malformed,
truncated, unsupported link type, other direction, flowmeter's own export
datagrams on a live interface); a capture file that
stops early (truncated, garbage) is reported as an error after what could
be read was metered.
"""
from __future__ import annotations

import os
import signal
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import zmq

from .batchring import BatchRing, RingStalled
from .decode import decode_batch, nflog_prefixes
from .direction import DirectionPolicy
from .packets import PACKET_DTYPE, ST_OK, STATUS_NAMES
from .pcapfile import CaptureError, open_capture
from .schema import EndOfStream, control_message, packets_message
from .shard import Router

BATCH_PACKETS = 65536
PROGRESS_S = 0.5
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


@dataclass
class CaptureCounters:
    frames: int = 0
    packets: int = 0  # metered IP packets
    octets: int = 0  # their layer-3 octets
    file_octets: int = 0  # capture file octets read
    file_size: int = 0
    not_metered: dict[str, int] = field(default_factory=dict)
    source: str = ""
    source_counters: dict[str, int] = field(default_factory=dict)  # the live source's own

    def count(self, cause: str, n: int) -> None:
        if n:
            self.not_metered[cause] = self.not_metered.get(cause, 0) + n

    def as_map(self) -> dict:
        return {"frames": self.frames, "packets": self.packets, "octets": self.octets,
                "file_octets": self.file_octets, "file_size": self.file_size,
                "cpu_s": round(time.process_time(), 3), **({"source": self.source} if self.source else {}),
                **{f"not metered: {k}": v for k, v in self.not_metered.items()},
                **{f"source {k}": v for k, v in self.source_counters.items()}}


class Capture:
    """Decode, classify and shard one capture file's batches (no sockets: testable alone)."""

    def __init__(self, settings: CaptureSettings, workers: int, send, ring: BatchRing | None = None,
                 stop=lambda: False) -> None:
        self.settings = settings
        self.name = f"capture-{settings.index}"
        self.workers = workers
        self.policy = DirectionPolicy(settings.direction, settings.local_networks, settings.drop_prefixes)
        self.router = Router(workers, self.policy)
        self._send = send  # send(worker index, frames)
        self.ring = ring  # the rows go through this batch ring's slots (else as payload frames)
        self._stop = stop
        if ring is not None and ring.workers != workers:
            raise ValueError(f"ring: made for {ring.workers} workers, not {workers}")
        self.batches = 0  # batches sent: every worker gets each one (its part may be empty)
        self.clock_ns = 0
        self.counters = CaptureCounters()
        self._rows = np.empty(BATCH_PACKETS, dtype=PACKET_DTYPE)
        self._status = np.empty(BATCH_PACKETS, dtype=np.uint8)
        self._exclude = np.array(settings.exclude, dtype=np.uint64).reshape(-1, 4)
        self.errors: list[str] = []

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
            self.ring.wait_free(self.batches, self._stop)
            rows = self.ring.slot(self.batches)[0, :n]
        info = decode_batch(batch, rows, status)
        self.counters.frames += n
        for code, name in STATUS_NAMES.items():
            if code != ST_OK:
                self.counters.count(name, int(info.status_counts[code]))
        if info.nflog_prefix_length.max(initial=-1) >= 0:
            for prefix, index in nflog_prefixes(batch, info).items():
                code = self.policy.drop_status(prefix)
                if code:
                    rows["fwd_status"][index] = code
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
                self.counters.count(OWN_EXPORT, int(own.sum()))
        slot = -1
        if self.ring is not None:
            self.ring.wait_free(self.batches, self._stop)
            slot = self.batches % self.ring.nslots
        parts, kept, octets, other, newest = self.router.route(
            rows, status, None if self.ring is None else self.ring.slot(self.batches))
        self.clock_ns = max(self.clock_ns, newest)
        self.counters.count("other direction", other)
        self.counters.packets += kept
        self.counters.octets += octets
        for w, part in enumerate(parts):
            self._send(w, packets_message(self.name, self.batches, self.clock_ns, part, slot))
        self.batches += 1

    def end_of_stream(self) -> None:
        for w in range(self.workers):
            self._send(w, [EndOfStream(self.name, self.batches).pack()])


def run(settings: CaptureSettings, endpoints: CaptureEndpoints, source=None, ring: BatchRing | None = None) -> int:
    """The capture's life: every file in turn, or the live ``source`` (opened already) until
    SIGTERM/SIGINT; then end-of-stream to every worker. With a ``ring`` (shared with the workers)
    the batches' rows go through its slots."""
    stopping = []
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: stopping.append(signum))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    ctx = zmq.Context()
    pushes = []
    for ep in endpoints.workers:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        sock.setsockopt(zmq.LINGER, LINGER_MS)  # every batch reaches a live worker
        sock.connect(ep)
        pushes.append(sock)
    control = ctx.socket(zmq.PUSH)
    control.setsockopt(zmq.LINGER, 2000)
    control.connect(endpoints.control)
    cap = Capture(settings, len(pushes), lambda w, frames: pushes[w].send_multipart(frames, copy=False), ring,
                  stop=lambda: bool(stopping))
    last = [time.monotonic()]

    def progress() -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_S:
            control.send(control_message("progress", cap.name, "capture", counters=cap.counters.as_map()))
            last[0] = now

    try:
        if source is not None:
            try:
                cap.meter_live(source, stop=lambda: bool(stopping), progress=progress)
            except OSError as exc:  # the interface went away, the socket failed: say so, drain
                if os.environ.get("FLOWMETER_DEBUG"):
                    traceback.print_exc()
                message = exc.strerror or str(exc)
                cap.errors.append(message if message.startswith(source.name) else f"{source.name}: {message}")
            except RingStalled as exc:  # a worker is gone: what it had not taken is lost, say so
                cap.errors.append(str(exc))
            finally:
                cap.counters.source_counters = source.counters()
                source.close()
        try:
            for path in settings.files:
                if stopping:
                    break
                cap.meter_file(path, stop=lambda: bool(stopping), progress=progress)
                if cap.errors:
                    break  # stop at the first unreadable file, after metering what it had
        except RingStalled as exc:  # a worker is gone: what it had not taken is lost, say so
            cap.errors.append(str(exc))
        cap.end_of_stream()
        for e in cap.errors:
            control.send(control_message("error", cap.name, "capture", message=e))
        control.send(control_message("stats", cap.name, "capture", counters=cap.counters.as_map(), final=True))
    finally:
        for sock in pushes:
            sock.close()
        control.close()
        ctx.term()
    return 0
