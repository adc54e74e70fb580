"""The exporter process: pulls finished-record batches from ZeroMQ and exports them.

Its whole life is ``run()``: bind a PULL socket, then loop: receive every
batch waiting (``flowmeter.schema``: msgpack header + raw record frame),
hand it to the ``ExportingProcess``, send a message that has waited long
enough, do the periodic duties (template refresh, statistics); until it is
told to stop. Stopping drains: batches already queued on the socket are
received and exported, open messages are sent, a last statistics record
goes out, and only then does the process exit. With ``producers`` set, it
also stops by itself once it holds an end-of-stream from each producer.

Bad input from the socket (not our schema, unknown template, wrong dtype or
size) is counted per cause and dropped, never fatal.
"""
from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field

import zmq

from flowmeter.schema import EndOfStream, SchemaError, parse_header, records_from_frame

from .exporting import ExportingProcess, ExportSettings

log = logging.getLogger("flowmeter.exporter")

POLL_MS = 100
FLUSH_AFTER_S = 0.2  # longest a partly filled message waits for more records
MAX_BATCHES_PER_TURN = 256
DRAIN_QUIET_MS = 50
RECEIVE_HWM = 1000  # batches queued before producers are held back


@dataclass
class ExporterStats:
    batches: int = 0
    records: int = 0
    producers_done: set[str] = field(default_factory=set)
    dropped: dict[str, int] = field(default_factory=dict)
    gaps: int = 0

    def drop(self, cause: str) -> None:
        self.dropped[cause] = self.dropped.get(cause, 0) + 1


class Exporter:
    """The receiving end of the exporter: schema checks in front of an ``ExportingProcess``."""

    def __init__(self, settings: ExportSettings) -> None:
        self.exporting = ExportingProcess(settings)
        self.stats = ExporterStats()
        self._last_seq: dict[str, int] = {}

    def handle(self, frames: list, now: float) -> None:
        """Take one multipart message from a producer."""
        try:
            header = parse_header(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0])
        except SchemaError:
            self.stats.drop("bad header")
            return
        last = self._last_seq.get(header.sender)
        if last is not None and header.seq != last + 1:
            self.stats.gaps += 1
        self._last_seq[header.sender] = header.seq
        if isinstance(header, EndOfStream):
            self.stats.producers_done.add(header.sender)
            return
        template = self.exporting.registry.get(header.template)
        if template is None or template.is_options:
            self.stats.drop("unknown template")
            return
        if len(frames) != 2:
            self.stats.drop("bad frame count")
            return
        payload = frames[1].buffer if hasattr(frames[1], "buffer") else frames[1]
        try:
            records = records_from_frame(header, template.dtype, payload)
        except SchemaError:
            self.stats.drop("bad payload")
            return
        self.stats.batches += 1
        self.stats.records += len(records)
        self.exporting.export(template, records, header.domain, now)


def run(settings: ExportSettings, endpoint: str, producers: int | None = None,
        ready=None, stop_event=None) -> ExporterStats:
    """Run the exporter until SIGTERM/SIGINT, ``stop_event``, or end-of-stream from ``producers``.

    ``ready`` (a callable) is called once the socket is bound.
    """
    stopping = False

    def _on_signal(signum, frame):  # record in the handler, act in the loop
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)} \
        if stop_event is None else {}
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    exporter = Exporter(settings)
    exp = exporter.exporting
    if ready is not None:
        ready()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    last_send = time.monotonic()
    try:
        while True:
            if stop_event is not None and stop_event.is_set():
                stopping = True
            if producers is not None and len(exporter.stats.producers_done) >= producers:
                stopping = True
            if stopping:
                break
            events = dict(poller.poll(POLL_MS))
            now = time.monotonic()
            if sock in events:
                for _ in range(MAX_BATCHES_PER_TURN):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    exporter.handle(frames, now)
            if now - last_send >= FLUSH_AFTER_S or sock not in events:
                exp.flush(now)
                last_send = now
            exp.tick(now)
        # drain: everything already queued on the socket is exported
        # (a short quiet period lets batches still in flight arrive)
        while poller.poll(DRAIN_QUIET_MS):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                exporter.handle(frames, time.monotonic())
        exp.flush()
        if settings.stats_interval_s:
            exp.send_statistics()
    finally:
        exp.close()
        sock.close(0)
        ctx.term()
        for s, h in old.items():
            signal.signal(s, h)
    return exporter.stats
