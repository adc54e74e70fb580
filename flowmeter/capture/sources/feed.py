"""The datapath feed: frames an overlay agent hands over ZeroMQ + msgpack.

An overlay agent (a VPN daemon that decrypts frames itself) knows more than
a capture can see: which way a frame went, whether its policy forwarded or
dropped it and why, and which peer it belongs to. ``FeedSource`` binds a
ZeroMQ PULL socket; the agent connects a PUSH socket and sends single-part
messages, each one msgpack map (schema version 1; docs/feed.md is the full
contract, with a worked example)::

    {"v": 1, "agent": "wgd/2.1", "frames": [frame, ...]}

    frame, header form:    {"t": ns, "dir": "in"|"out", "verdict": "forward"|"drop",
                            "reason": str, "peer": u32, "ip": bin, "len": u32}
    frame, metadata form:  {"t": ns, "dir": ..., "verdict": ..., "reason": ..., "peer": ...,
                            "src": bin 4|16, "dst": bin 4|16, "proto": u8, "len": u32,
                            "sport": u16, "dport": u16, "tos": u8, "tcp_flags": u8,
                            "icmp_type": u8, "icmp_code": u8}

``read`` yields ``PACKET_DTYPE`` rows (all valid): header frames are decoded
by ``decode.decode_batch`` as raw IP records (LINKTYPE_RAW), one call per
message; direction, forwardingStatus (verdict, reason through the
``DropPrefixes`` prefixes) and the interfaces come from the frame: each peer
is an interface of its own, ``ingress_if`` of what came from it ("in"),
``egress_if`` of what is sent to it ("out"; 0 when the frame was dropped).

Nothing a sender does raises out of ``read``: a message of the wrong shape
is dropped whole, a bad frame alone; each is counted by cause
(``counters()``) and logged at most once per cause per ``log_interval_s``
with the number of others suppressed. The transport refuses messages far
over ``max_message`` (ZMQ_MAXMSGSIZE: the sender is disconnected and its
socket reconnects) and holds a bounded queue (ZMQ_RCVHWM).
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import zmq

from flowmeter.capture.sources import SourceError
from flowmeter.capture.sources.feedmessage import (  # noqa: F401  (the message rules, importable from here too)
    VERSION, MAX_MESSAGE, MAX_FRAMES, TRANSPORT_SLACK, QUEUE_OCTETS, MAX_AGENT, MAX_REASON, LOG_INTERVAL_S,
    AHEAD_NS, MAX_SKEW_S, MAX_KEYS, MAX_STR_OCTETS, MAX_BIN_OCTETS, CONTAINER_SLACK, OVER_LIMITS, CLOCK_SKEW,
    MAX_AGENTS_REMEMBERED, DIRECTIONS, PORT_PROTOCOLS, ICMP_PROTOCOL, FRAME_KEYS, MULTIPART,
    TOO_BIG, TRUNCATED, NOT_MSGPACK, NOT_MAP, WRONG_VERSION, NO_FRAMES, TOO_MANY_FRAMES, BAD_AGENT,
    UNEXPECTED, FRAME_NOT_MAP, BAD_T, FUTURE_T, BAD_DIR, BAD_VERDICT, BAD_REASON, BAD_PEER, BAD_IP, TWO_FORMS,
    BAD_ADDRESS, BAD_PROTO, BAD_LEN, BAD_PORT, BAD_OCTET, OTHER_PROTOCOL, NOT_IP, CUT_SHORT, UNKNOWN_KEYS,
    EXPLAIN, RateLimitedLog, FeedDecoder)
from flowmeter.capture.sources.feedmessage import _TCP_ENDPOINT


def _check_endpoint(endpoint: str) -> str | None:
    """Why ``endpoint`` cannot be bound, found before ZeroMQ tries; None if it looks usable.

    libzmq replaces whatever is at an ipc path (it unlinks it, even a regular
    file) and so silently takes over a socket another process listens on;
    both are refused here.
    """
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if not path:
            return "no path after ipc://"
        if path.startswith("@"):  # Linux abstract name: the kernel refuses a taken one
            return None
        if len(path.encode()) > zmq.IPC_PATH_MAX_LEN:
            return f"the path is longer than {zmq.IPC_PATH_MAX_LEN} octets"
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return None
        except OSError as exc:
            return exc.strerror or str(exc)
        if not stat.S_ISSOCK(mode):
            return "the path exists and is not a socket"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                return None  # left behind by an earlier run: ZeroMQ replaces it
        return "address already in use (another process listens there)"
    if endpoint.startswith("tcp://"):
        m = _TCP_ENDPOINT.fullmatch(endpoint)
        if not m or not 1 <= int(m.group(1)) <= 65535:
            return "not tcp://HOST:PORT (an address or interface, a port from 1 to 65535)"
        return None
    return "not ipc://PATH or tcp://HOST:PORT"


class FeedSource:
    """The live source of a ``feed:ENDPOINT`` entry: a bound ZeroMQ PULL socket (see the module
    docstring and docs/feed.md). ``SourceError`` (one line) if the endpoint cannot be bound."""

    def __init__(self, endpoint: str, *, drop_reasons=(), max_message: int = MAX_MESSAGE,
                 max_frames: int = MAX_FRAMES, log: Callable[[str], Any] | None = None,
                 log_interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 max_skew_ns: int | None = None) -> None:
        self.name = f"feed:{endpoint}"
        self.endpoint = endpoint
        self._decoder = FeedDecoder(drop_reasons=drop_reasons, max_message=max_message, max_frames=max_frames,
                                    log=log, log_interval_s=log_interval_s, clock=clock, name=self.name,
                                    max_skew_ns=max_skew_ns)
        self.max_frames = max_frames
        why = _check_endpoint(endpoint)
        if why:
            raise self._error(why)
        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message + TRANSPORT_SLACK)
        self._sock.setsockopt(zmq.RCVHWM, max(8, min(1000, QUEUE_OCTETS // max_message)))
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close()
            self._ctx.term()
            raise self._error(exc.strerror.split(" (addr=")[0]) from None
        self._ipc_inode = self._bound_inode()
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._closed = False

    def _error(self, why: str) -> SourceError:
        exc = SourceError(f"{self.name}: cannot bind: {why}")
        exc.strerror = f"cannot bind: {why}"  # what sources.live.open_source puts after the source's name
        return exc

    def _bound_inode(self) -> tuple[int, int] | None:
        """(device, inode) of the ipc socket file we made, to remove it on close if still ours."""
        if not self.endpoint.startswith("ipc://") or self.endpoint.startswith("ipc://@"):
            return None
        try:
            st = os.lstat(self.endpoint[len("ipc://"):])
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def fileno(self) -> int:
        """The socket's ZMQ_FD. Edge-triggered: it signals once when messages arrive after a
        drain, not while they wait; after a wake-up, iterate ``read(0)`` to its end."""
        return self._sock.getsockopt(zmq.FD)

    def read(self, timeout_s: float) -> Iterator[npt.NDArray]:
        """``PACKET_DTYPE`` rows of the messages waiting, at most about ``max_frames`` rows per
        array; waits up to ``timeout_s`` for the first message, returns when none is left."""
        if self._closed or not self._poller.poll(max(0, int(timeout_s * 1000 + 0.999))):
            return
        parts: list[npt.NDArray] = []
        rows = 0
        while True:
            try:
                msg = self._sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            got = self._take(msg)
            if got is not None and len(got):
                parts.append(got)
                rows += len(got)
                if rows >= self.max_frames:
                    yield parts[0] if len(parts) == 1 else np.concatenate(parts)
                    parts, rows = [], 0
        if parts:
            yield parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _take(self, msg: zmq.Frame) -> npt.NDArray | None:
        if msg.more:
            while msg.more:  # the other parts are here already: ZeroMQ delivers a message whole
                try:
                    msg = self._sock.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
            self._decoder.refuse(MULTIPART)
            return None
        return self._decoder.decode(msg.buffer)

    def counters(self) -> dict[str, int]:
        """The decoder's counts (``FeedDecoder.counters``)."""
        return self._decoder.counters()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close(linger=0)
        self._ctx.term()
        if self._ipc_inode is not None:
            path = self.endpoint[len("ipc://"):]
            try:
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == self._ipc_inode:
                    os.unlink(path)
            except OSError:
                pass

    def __enter__(self) -> FeedSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
