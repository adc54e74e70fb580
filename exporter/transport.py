"""Transports: where finished IPFIX messages go (RFC 7011 §10).

* ``UdpTransport``: one connected UDP socket per collector (RFC 7011
  §10.3). Connecting lets the kernel report an ICMP port unreachable as
  ``ECONNREFUSED`` on a later send, and fixes the source port, so the
  transport session (exporter address/port, collector address/port) stays
  the same for the life of the process. Sends are non-blocking: a full
  socket buffer waits a few milliseconds at most, then the message counts
  as not sent, so one slow or dead collector never holds up the others.
  ``IP_PMTUDISC_DO`` / ``IPV6_DONTFRAG`` turn an oversize message into an
  error instead of an IP fragment (RFC 7011 §10.3.3).
* ``FileTransport``: messages appended to a file, the RFC 5655 format that
  ``ipfixDump`` and other IPFIX file tools read.

A transport only moves bytes; sequence numbers, templates and counters
belong to the session (``exporter/session.py``).
"""
from __future__ import annotations

import errno
import os
import select
import socket
from dataclasses import dataclass

# Linux values (socket module lacks some of them)
_IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
_IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
_IPV6_DONTFRAG = getattr(socket, "IPV6_DONTFRAG", 62)

SEND_WAIT_S = 0.005  # longest wait for room in a full socket buffer
RECONNECT_S = 5.0  # how often a transport that cannot connect tries again


class TransportError(OSError):
    """A message that could not be handed to the network or the file."""


@dataclass(frozen=True, slots=True)
class CollectorAddress:
    """Where a collector is: ``kind`` "udp" (host, port) or "file" (path)."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "file":
            return f"File/{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"Udp/{host}:{self.port}"


class UdpTransport:
    """A connected, non-blocking UDP socket to one collector."""

    def __init__(self, address: CollectorAddress) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._next_connect = 0.0
        self.last_error = ""
        self._connect(0.0)

    def _connect(self, now: float) -> bool:
        family = socket.AF_INET6 if ":" in self.address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DO)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_DONTFRAG, 1)
            sock.connect((self.address.host, self.address.port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            self.last_error = f"cannot connect: {exc.strerror or exc}"
            self._next_connect = now + RECONNECT_S
            return False
        self._sock = sock
        return True

    @property
    def local_address(self) -> tuple | None:
        return self._sock.getsockname() if self._sock else None

    def send(self, message: memoryview | bytes, now: float) -> None:
        """Send one message; raise ``TransportError`` when it did not leave."""
        if self._sock is None:
            if now < self._next_connect or not self._connect(now):
                raise TransportError(errno.ENETUNREACH, self.last_error or "not connected")
        assert self._sock is not None
        try:
            self._sock.send(message)
            return
        except BlockingIOError:
            pass
        except OSError as exc:
            self.last_error = os.strerror(exc.errno) if exc.errno else str(exc)
            raise TransportError(exc.errno, self.last_error) from None
        # socket buffer full: wait briefly, try once more, then give up
        select.select([], [self._sock], [], SEND_WAIT_S)
        try:
            self._sock.send(message)
        except OSError as exc:
            code = exc.errno or errno.EAGAIN
            self.last_error = os.strerror(code)
            raise TransportError(code, self.last_error) from None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class FileTransport:
    """IPFIX file (RFC 5655 §4): messages appended one after the other."""

    def __init__(self, address: CollectorAddress) -> None:
        self.address = address
        self.last_error = ""
        try:
            self._fh = open(address.path, "ab", buffering=1 << 16)
        except OSError as exc:
            raise TransportError(exc.errno, f"{address}: {exc.strerror}") from None

    def send(self, message: memoryview | bytes, now: float) -> None:
        try:
            self._fh.write(message)
        except OSError as exc:
            self.last_error = exc.strerror or str(exc)
            raise TransportError(exc.errno, self.last_error) from None

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def open_transport(address: CollectorAddress):
    if address.kind == "udp":
        return UdpTransport(address)
    if address.kind == "file":
        return FileTransport(address)
    raise ValueError(f"unknown transport kind {address.kind!r}")
