"""Transports: where finished IPFIX messages go (RFC 7011 §10).

* ``UdpTransport``: one connected UDP socket per collector (RFC 7011
  §10.3). Connecting lets the kernel report an ICMP port unreachable as
  ``ECONNREFUSED`` on a later send, and fixes the source port, so the
  transport session (exporter address/port, collector address/port) stays
  the same for the life of the process. Sends are non-blocking: a full
  socket buffer waits a few milliseconds at most, then the message counts
  as not sent, so one slow or dead collector never holds up the others.
  ``IP_PMTUDISC_DO`` / ``IPV6_DONTFRAG`` turn an oversize message into an
  error (``EMSGSIZE``) instead of an IP fragment (RFC 7011 §10.3.3).
  ``path_budget()`` is the largest message the path takes whole: the
  kernel's MTU for the connected socket (``IP_MTU`` / ``IPV6_MTU``: the
  route's, or a smaller one learnt from an ICMP "fragmentation needed" /
  "packet too big") minus the IP and UDP headers (28 octets over IPv4, 48
  over IPv6). The session sizes its messages by it (``exporter/session.py``).
  Equal-size messages (the rows of one array, see ``send_rows``) leave
  with UDP generic segmentation offload (``UDP_SEGMENT``, Linux 4.18+): one
  system call hands the kernel up to 64 messages, which go on the wire as
  that many ordinary datagrams, each with its own UDP header and checksum;
  on loopback that costs about a fifth of one ``send`` per message. Where
  the kernel or the route cannot segment (no checksum offload, IPsec),
  the transport falls back to one ``send`` per message for good. The
  kernel says ``EINVAL`` both for that and for segments larger than the
  path MTU: a refused segmented send whose messages are over the freshly
  read ``path_budget()`` is reported as ``EMSGSIZE`` (the messages must be
  cut smaller, segmentation stays on), only one that fits the path turns
  segmentation off. A packet
  capture on the exporting host sees what the kernel was handed: on
  loopback, or with a NIC that segments in hardware, one large UDP packet
  per segmented send (``ExportSettings.segmented_sends`` turns it off). The send
  buffer is ``send_buffer`` octets (``SO_SNDBUFFORCE`` when allowed, else
  ``SO_SNDBUF`` capped by ``net.core.wmem_max``); ``granted_buffer`` is
  what the kernel reports (Linux doubles the request for its bookkeeping).
* ``FileTransport``: messages appended to a file, the RFC 5655 format that
  ``ipfixDump`` and other IPFIX file tools read. The path is opened with
  ``O_NOFOLLOW``: a symbolic link there is refused (``ELOOP``), so a link
  planted in a shared directory cannot turn the export into a write to
  another file. A file it creates gets mode 0640 whatever the umask
  (flow records tell who talked to whom); an existing file keeps its mode.
* ``DtlsTransport`` (``exporter/dtls.py``, which builds on this module):
  the same UDP socket as ``UdpTransport``, carrying DTLS records (RFC 7011 §11).

Both have ``paced``: the exporting process paces UDP collectors (a
receiver drops what its socket buffer cannot hold), never files.

A transport only moves bytes; sequence numbers, templates and counters
belong to the session (``exporter/session.py``).
"""
from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

# Linux values (socket module lacks some of them)
_IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
_IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
_IPV6_DONTFRAG = getattr(socket, "IPV6_DONTFRAG", 62)
_IP_MTU = getattr(socket, "IP_MTU", 14)
_IPV6_MTU = getattr(socket, "IPV6_MTU", 24)
IP_UDP_OVERHEAD = {socket.AF_INET: 20 + 8, socket.AF_INET6: 40 + 8}  # header octets ahead of a message
UDP_LARGEST = {socket.AF_INET: 65507, socket.AF_INET6: 65527}  # largest UDP payload (IPv6 without jumbograms)

_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_SOL_UDP = getattr(socket, "SOL_UDP", 17)
_UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
_GSO_SIZE = struct.Struct("=H")

SEND_WAIT_S = 0.005  # longest wait for room in a full socket buffer
RECONNECT_S = 5.0  # how often a transport that cannot connect tries again
SEND_BUFFER = 4 << 20  # default SO_SNDBUF request, octets
GSO_SEGMENTS = 64  # messages per segmented send (UDP_MAX_SEGMENTS of older kernels; newer allow 128)
GSO_OCTETS = 65507  # and at most this many octets: one IPv4 datagram's payload
FILE_RETRY_S = 1.0  # a file that failed (full disk, I/O error, cannot open) is tried again this often
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # no room: write again on the same file
# errors of a segmented send that mean "cannot segment here", not "collector down"
_NO_GSO = frozenset({errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT})


class TransportError(OSError):
    """A message that could not be handed to the network or the file.

    ``lost`` is how many messages the failed call took with it: 1, or all
    the messages of one segmented send. ``cause`` names why for the
    not-sent counters when no errno does ("" = the errno's name): a DTLS
    certificate refused, a handshake that failed (``exporter/dtls.py``).
    """

    lost = 1
    cause = ""


@dataclass(frozen=True, slots=True)
class CollectorAddress:
    """Where a collector is: ``kind`` "udp" or "dtls" (host, port), or "file" (path).

    ``max_message`` and ``domain`` are this collector's own settings, if it
    has any: the largest message it gets (0: the exporter's) and the
    observation domain written in its messages' headers (None: the
    records' own). They are not part of the collector's identity (equality,
    hash): the same address with other settings is the same collector, so
    a reload that changes them keeps its transport session.

    A "dtls" collector also has its DTLS settings (``exporter/dtls.py``):
    ``ca_file`` (PEM CA certificates that verify it), ``server_name`` (the
    name its certificate must carry; "" = ``host``), and optionally
    ``cert_file``/``key_file`` (a client certificate and its key; the key
    may be in ``cert_file``). Not part of its identity either: a reload
    that changes them makes a new association with the same collector.
    """

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""
    max_message: int = field(default=0, compare=False)
    domain: int | None = field(default=None, compare=False)
    ca_file: str = field(default="", compare=False)
    server_name: str = field(default="", compare=False)
    cert_file: str = field(default="", compare=False)
    key_file: str = field(default="", compare=False)

    def __str__(self) -> str:
        if self.kind == "file":
            return f"File/{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind.capitalize()}/{host}:{self.port}"

    @property
    def dtls_settings(self) -> tuple[str, str, str, str]:
        """What a DTLS association to this collector is made with (a change: a new one)."""
        return (self.ca_file, self.server_name or self.host, self.cert_file, self.key_file)


PEER_POLL_S = 0.001  # how often a local collector's receive queue is read while messages wait
# share of a local collector's receive buffer the exporter may fill: the rest holds what is still on
# its way (loopback hands datagrams to the receiver in a softirq, which a busy machine runs late)
PEER_FILL = 0.5
PEER_PATIENCE_S = 0.5  # a local collector that reads nothing for this long is no longer waited for

# NETLINK_SOCK_DIAG (linux/sock_diag.h, linux/inet_diag.h)
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_INET_DIAG_SKMEMINFO = 7  # attribute: u32 sk_meminfo[]: rmem_alloc, rcvbuf, ...
_INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_NLMSG = struct.Struct("=IHHII")
_DIAG_REQ = struct.Struct("=BBBxI")  # inet_diag_req_v2 up to its socket id
_DIAG_MSG_LEN = 72  # inet_diag_msg
_RQUEUE_AT = 56  # its idiag_rqueue
_RTATTR = struct.Struct("=HH")


def datagram_truesize(size: int) -> int:
    """Receive-buffer octets the kernel charges a socket for one datagram of ``size`` payload octets.

    The datagram's buffer (payload, headers and the kernel's shared info)
    is rounded up to a power of two, plus the socket buffer's own struct:
    measured on loopback, 60 octets cost 832, 1452 cost 2304, 8952 cost
    16640. This errs a little high (1452: 2368), never low.
    """
    return (1 << (size + 511).bit_length()) + 320


class _UdpSocketDiag:
    """The kernel's figures for the UDP socket that receives at (host, port) on this host.

    One ``SOCK_DIAG_BY_FAMILY`` request over netlink finds the very socket a
    datagram to that address would reach (the kernel's own lookup) and
    returns its receive queue and its receive buffer: about 10 us, where reading ``/proc/net/udp`` formats every UDP socket of
    the host as text.
    """

    def __init__(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        address = ip.packed.ljust(16, b"\0")
        # inet_diag_sockid: ports (the sender's: any), the sender's and the collector's address,
        # any interface, no cookie. The kernel looks up who receives sender -> collector.
        sockid = (struct.pack("!HH", 0, port) + address + address
                  + struct.pack("=III", 0, _INET_DIAG_NOCOOKIE, _INET_DIAG_NOCOOKIE))
        body = _DIAG_REQ.pack(family, socket.IPPROTO_UDP, 1 << (_INET_DIAG_SKMEMINFO - 1), 0xFFFFFFFF) + sockid
        self.request = _NLMSG.pack(_NLMSG.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + body
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG)
        self.sock.setblocking(False)
        self.absent = False  # the last answer was the kernel's: no socket receives there

    def read(self) -> tuple[int, int | None] | None:
        """``(queued octets, receive buffer)``; None if no socket receives there (``absent``) or no answer."""
        self.absent = False
        try:
            self.sock.send(self.request)
            reply = self.sock.recv(4096)  # the kernel answers within the send
        except OSError:
            return None
        if len(reply) >= _NLMSG.size and _NLMSG.unpack_from(reply)[1] == _NLMSG_ERROR:
            self.absent = True  # ENOENT: nobody listens there
            return None
        if len(reply) < _NLMSG.size + _DIAG_MSG_LEN:
            return None
        length, kind = _NLMSG.unpack_from(reply)[:2]
        if kind != _SOCK_DIAG_BY_FAMILY:
            return None
        length = min(length, len(reply))
        queued = int.from_bytes(reply[_NLMSG.size + _RQUEUE_AT:_NLMSG.size + _RQUEUE_AT + 4], "little")
        buffer = None
        at = _NLMSG.size + _DIAG_MSG_LEN
        while at + _RTATTR.size <= length:
            size, kind = _RTATTR.unpack_from(reply, at)
            if size < _RTATTR.size:
                break
            if kind == _INET_DIAG_SKMEMINFO and size >= _RTATTR.size + 2 * 4:
                queued, buffer = struct.unpack_from("=2I", reply, at + _RTATTR.size)
            at += (size + 3) & ~3
        return queued, buffer

    def close(self) -> None:
        self.sock.close()

    @classmethod
    def finds_own(cls, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether the kernel's lookup finds a UDP socket bound at ``ip`` just now (UDP diagnostics work)."""
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as own:
                own.bind((str(ip), 0))
                diag = cls(ip, own.getsockname()[1])
                try:
                    return diag.read() is not None
                finally:
                    diag.close()
        except OSError:
            return False


class LocalPeerQueue:
    """The receive queue of a collector's socket on this host (loopback), as the kernel reports it.

    A collector on the same machine reads with whatever receive buffer it
    has (nfcapd: the kernel's default, 208 KiB), and a moment without CPU
    (another process's time slice, its own disk writes) overflows it at any
    useful export rate: the datagrams are lost and UDP tells nobody. On this
    host the kernel does tell. The exporter asks it for the collector
    socket's receive queue and buffer (``_UdpSocketDiag``; where netlink is
    not available, ``/proc/net/udp`` and ``net.core.rmem_default``) at most
    every ``PEER_POLL_S`` while messages wait, and sends only while the
    queue stays under ``PEER_FILL`` of that buffer, counting what it sent
    since the last look at ``datagram_truesize``. A collector started with
    a larger buffer (``nfcapd -B``) is given more at once. Anything else --
    a remote collector, the socket not found -- leaves the pacing alone.
    """

    def __init__(self, host: str, port: int) -> None:
        ip = ipaddress.ip_address(host)
        self.path = "/proc/net/udp6" if ip.version == 6 else "/proc/net/udp"
        word = (lambda b: "".join(f"{int.from_bytes(b[i:i + 4], 'little'):08X}" for i in range(0, len(b), 4)))
        self.keys = {f"{word(ip.packed)}:{port:04X}", f"{word(bytes(len(ip.packed)))}:{port:04X}"}
        try:
            self._diag: _UdpSocketDiag | None = _UdpSocketDiag(ip, port)
        except OSError:
            self._diag = None
        # whether "no socket there" from netlink can be believed: it finds a socket this process binds
        # (a kernel without UDP socket diagnostics answers "none" for every one)
        self._diag_sure = self._diag is not None and _UdpSocketDiag.finds_own(ip)
        try:
            with open("/proc/sys/net/core/rmem_default") as fh:
                buffer = int(fh.read())
        except (OSError, ValueError):
            buffer = 212992
        self.limit = int(buffer * PEER_FILL)
        self._room = 0  # octets the queue can still take, as of the last read minus what went since
        self._read_at = -1.0
        self._last_queued = 0
        self._sent_since_read = 0  # octets sent since the last look, at their truesize
        self._progress_at = 0.0  # when the collector last took something or had room

    @classmethod
    def for_address(cls, host: str, port: int) -> LocalPeerQueue | None:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        if not ip.is_loopback:
            return None
        peer = cls(host, port)
        return peer if peer.queued() is not None or os.path.exists(peer.path) else None

    def queued(self) -> int | None:
        """Octets waiting in the collector socket's receive queue; None if it is not found."""
        if self._diag is not None:
            got = self._diag.read()
            if got is not None:
                queued, buffer = got
                if buffer:
                    self.limit = int(buffer * PEER_FILL)
                return queued
            if self._diag.absent and self._diag_sure:  # the kernel looked and found no socket: neither
                return None                                # would /proc/net/udp (read as text: costly)
        try:
            with open(self.path) as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            return None
        for line in lines:
            f = line.split()
            if len(f) > 4 and f[1] in self.keys:
                return int(f[4].split(":")[1], 16)
        return None

    def close(self) -> None:
        if self._diag is not None:
            self._diag.close()
            self._diag = None

    def room(self, size: int, now: float) -> int | None:
        """Messages of ``size`` octets the collector's queue can take now; None = no limit known.

        A collector that does not read for ``PEER_PATIENCE_S`` (stopped,
        hung) is not waited for: the limit is lifted until its queue has
        room again, and what overflows is lost as with any UDP collector.
        """
        if now - self._read_at >= PEER_POLL_S:
            q = self.queued()
            self._read_at = now
            if q is None:
                return None
            self._room = self.limit - q
            # progress: the collector took something since the last look (its queue grew by less
            # than what went to it), or has room now
            if q < self._last_queued + self._sent_since_read or self._room >= datagram_truesize(size):
                self._progress_at = now
            self._last_queued = q
            self._sent_since_read = 0
        if now - self._progress_at > PEER_PATIENCE_S:
            return None
        return max(0, self._room // datagram_truesize(size))

    def sent(self, n: int, size: int) -> None:
        self._room -= n * datagram_truesize(size)
        self._sent_since_read += n * datagram_truesize(size)


def apply_send_buffer(sock: socket.socket, octets: int) -> int:
    """Ask for an ``octets`` send buffer on ``sock``; what the kernel granted."""
    try:  # root (CAP_NET_ADMIN) may go past net.core.wmem_max
        sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, octets)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, octets)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


def connected_udp_socket(host: str, port: int, family: int, send_buffer: int) -> tuple[socket.socket, int]:
    """A non-blocking UDP socket connected to (host, port) that never fragments, and its granted send
    buffer; raises ``OSError``."""
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        granted = apply_send_buffer(sock, send_buffer)
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DO)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_DONTFRAG, 1)
        sock.connect((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock, granted


def socket_path_mtu(sock: socket.socket | None, family: int) -> int | None:
    """The kernel's MTU for a connected socket's path now; None without a socket (or a route)."""
    if sock is None:
        return None
    try:
        if family == socket.AF_INET:
            return sock.getsockopt(socket.IPPROTO_IP, _IP_MTU)
        return sock.getsockopt(socket.IPPROTO_IPV6, _IPV6_MTU)
    except OSError:  # ENOTCONN: no route for the moment
        return None


class UdpTransport:
    """A connected, non-blocking UDP socket to one collector."""

    paced = True

    def __init__(self, address: CollectorAddress, send_buffer: int = SEND_BUFFER) -> None:
        self.address = address
        self.send_buffer = send_buffer
        self.granted_buffer = 0  # SO_SNDBUF as the kernel reports it, 0 = no socket yet
        self.gso = True  # segmented sends; off for good once the kernel refuses one
        self.family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        self._sock: socket.socket | None = None
        self._next_connect = 0.0
        self.last_error = ""
        self.peer = LocalPeerQueue.for_address(address.host, address.port)  # None: not on this host
        self._connect(0.0)

    def set_send_buffer(self, octets: int) -> int:
        """Ask for an ``octets`` send buffer; what the kernel granted (0 without a socket)."""
        self.send_buffer = octets
        if self._sock is not None:
            self._apply_send_buffer(self._sock)
        return self.granted_buffer

    def _apply_send_buffer(self, sock: socket.socket) -> None:
        self.granted_buffer = apply_send_buffer(sock, self.send_buffer)

    def path_mtu(self) -> int | None:
        """The kernel's MTU for this socket's path now; None without a socket (or a route)."""
        return socket_path_mtu(self._sock, self.family)

    def path_budget(self) -> int | None:
        """Octets of the largest IPFIX message the path takes unfragmented; None when unknown."""
        mtu = self.path_mtu()
        if mtu is None or mtu <= 0:
            return None
        return min(mtu - IP_UDP_OVERHEAD[self.family], UDP_LARGEST[self.family])

    def _connect(self, now: float) -> bool:
        try:
            sock, self.granted_buffer = connected_udp_socket(self.address.host, self.address.port, self.family,
                                                             self.send_buffer)
        except OSError as exc:
            self.last_error = f"cannot connect: {exc.strerror or exc}"
            self._next_connect = now + RECONNECT_S
            return False
        self._sock = sock
        return True

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

    def send_rows(self, rows: npt.NDArray[np.uint8], now: float) -> tuple[int, TransportError | None]:
        """Send equal-size messages (the rows of a C-contiguous uint8 array) in order.

        Returns how many left and the error that stopped the rest (None when
        all left); ``error.lost`` messages went down with it, the ones after
        them were not tried.
        """
        n, size = rows.shape
        per = min(GSO_SEGMENTS, GSO_OCTETS // size) if self.gso else 1
        sent = 0
        while sent < n:
            k = min(per, n - sent)
            try:
                if k == 1:
                    self.send(rows[sent], now)
                else:
                    self._send_segmented(rows[sent:sent + k], size, now)
            except TransportError as exc:
                if k > 1 and exc.errno in (errno.EINVAL, errno.EMSGSIZE):
                    budget = self.path_budget()
                    if budget is not None and size > budget:  # too big for the path, not "cannot segment"
                        self.last_error = os.strerror(errno.EMSGSIZE)
                        error = TransportError(errno.EMSGSIZE, self.last_error)
                        error.lost = k
                        return sent, error
                if k > 1 and exc.errno in _NO_GSO:
                    self.gso = False
                    per = 1
                    continue  # the same messages again, one send each
                exc.lost = k
                return sent, exc
            sent += k
        return sent, None

    def _send_segmented(self, chunk: npt.NDArray[np.uint8], size: int, now: float) -> None:
        """One ``sendmsg`` that the kernel cuts into ``len(chunk)`` datagrams of ``size`` octets."""
        if self._sock is None:
            if now < self._next_connect or not self._connect(now):
                raise TransportError(errno.ENETUNREACH, self.last_error or "not connected")
        assert self._sock is not None
        cmsg = [(_SOL_UDP, _UDP_SEGMENT, _GSO_SIZE.pack(size))]
        for attempt in (0, 1):
            try:
                self._sock.sendmsg([chunk], cmsg)
                return
            except BlockingIOError:
                if attempt == 0:  # socket buffer full: wait briefly, try once more
                    select.select([], [self._sock], [], SEND_WAIT_S)
                    continue
                code = errno.EAGAIN
            except OSError as exc:
                code = exc.errno or errno.EIO
            self.last_error = os.strerror(code)
            raise TransportError(code, self.last_error) from None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.peer is not None:
            self.peer.close()


FILE_MODE = 0o640  # a new File/ output's mode, whatever the umask
_OUTPUT_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW


def open_output(path: str) -> int:
    """A file descriptor appending to ``path``: a new file (mode ``FILE_MODE``) or the one there.

    Never through a symbolic link: ``O_NOFOLLOW`` makes one at ``path``
    ``ELOOP`` (and ``O_EXCL`` never follows one either). A file made here
    is set to ``FILE_MODE`` with ``fchmod`` (the umask only takes bits away
    at ``open``); an existing file keeps its mode.
    """
    for _ in range(3):  # made or removed by someone else between the two opens: look again
        try:
            fd = os.open(path, _OUTPUT_FLAGS | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            try:
                return os.open(path, _OUTPUT_FLAGS)
            except FileNotFoundError:
                continue
        try:
            os.fchmod(fd, FILE_MODE)
        except OSError:
            os.close(fd)
            raise
        return fd
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))


class FileTransport:
    """IPFIX file (RFC 5655 §4): messages appended one after the other, never a torn one.

    Writes go straight to the file descriptor (``os.write``, no user-space
    buffer), one call for all the messages of a ``send_rows``. A full disk
    or a failing one (ENOSPC, EDQUOT, EIO, ...) may take part of a write:
    the file is then cut back (``ftruncate``) to the end of the last whole
    message, so a reader never meets half a message; the messages that
    made it count as sent, the rest as not sent with the error's cause.
    After a failure the transport tries again no sooner than ``FILE_RETRY_S``
    (the messages in between are not sent, with the same cause, without a
    system call: a failing disk may take long to say no), so writing goes
    on by itself once there is room again. An error other than a full disk
    (EIO, ESTALE, ...) also reopens the file at that retry. A file that
    cannot be opened (a directory not writable, gone) is tried again the
    same way; it never stops the exporter.

    ``reopen()`` closes the file and opens its path anew: after logrotate
    moved it away, new messages go to a new file at the same path (the
    session sends it the templates first, so it decodes alone).
    """

    paced = False
    granted_buffer = 0

    def __init__(self, address: CollectorAddress) -> None:
        self.address = address
        self.last_error = ""
        self._fd = -1
        self._errno = 0  # the cause of the last failure, 0 when the last write went
        self._retry_at = 0.0  # monotonic time of the next try after a failure
        self._reopen = False  # the next try opens the path anew (after an error other than a full disk)
        self._cut_to = -1  # a torn message could not be cut off yet: truncate to this many octets first
        self.size = 0  # octets in the file, as far as this transport knows (whole messages only)
        self._open(time.monotonic())

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    def _fail(self, code: int, what: str, now: float) -> None:
        self._errno = code or errno.EIO
        self.last_error = f"{what}: {os.strerror(self._errno)}"
        self._retry_at = now + FILE_RETRY_S

    def _open(self, now: float) -> bool:
        if self._cut_to >= 0:  # a last try to leave the old file whole
            self._cut_torn_now(now)
        self._close_fd()
        self._cut_to = -1
        try:
            self._fd = open_output(self.address.path)
            self.size = os.fstat(self._fd).st_size
        except OSError as exc:
            self._close_fd()
            self._fail(exc.errno, "cannot open", now)
            if exc.errno == errno.ELOOP:
                self.last_error = "cannot open: the path is a symbolic link, refused (O_NOFOLLOW)"
            return False
        self._reopen = False
        return True

    def reopen(self, now: float | None = None) -> bool:
        """Close the file and open its path again (a rotated file: a new one); False if it cannot be opened."""
        if now is None:
            now = time.monotonic()
        self._errno = 0
        self.last_error = ""
        return self._open(now)

    def _ready(self, now: float) -> bool:
        """Whether a write may be tried now: open, nothing torn left at the end, not waiting to retry."""
        if self._errno and now < self._retry_at:
            return False
        if self._fd < 0 or self._reopen:
            if not self._open(now):
                return False
        return self._cut_to < 0 or self._cut_torn_now(now)

    def _cut_torn_now(self, now: float) -> bool:
        """Truncate the file to ``_cut_to`` octets (the end of its last whole message)."""
        try:
            os.ftruncate(self._fd, self._cut_to)
        except OSError as exc:
            self._fail(exc.errno, "cannot cut off a torn message", now)
            return False
        self.size = self._cut_to
        self._cut_to = -1
        return True

    def send(self, message: memoryview | bytes, now: float) -> None:
        """Append one message; raise ``TransportError`` when it was not written (nothing of it stays)."""
        _, error = self.send_rows(np.frombuffer(message, dtype=np.uint8).reshape(1, -1), now)
        if error is not None:
            raise error

    def send_rows(self, rows: npt.NDArray[np.uint8], now: float) -> tuple[int, TransportError | None]:
        """Append equal-size messages (the rows of a C-contiguous uint8 array) in order.

        Returns how many were written whole and the error that stopped the
        rest (None when all were): ``error.lost`` is every message after the
        written ones, none of which is in the file.
        """
        n, size = rows.shape
        if self._ready(now):
            flat = rows.reshape(-1)
            done = 0
            try:
                while done < len(flat):
                    wrote = os.write(self._fd, flat[done:])
                    if wrote <= 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    done += wrote
                self._errno = 0
                self.size += done
                return n, None
            except OSError as exc:
                sent = done // size
                self._fail(exc.errno, "cannot write", now)
                self._reopen = self._errno not in _FULL
                if done % size:
                    self._cut_torn(done, size, now)
                else:
                    self.size += done
        else:
            sent = 0
        error = TransportError(self._errno or errno.EIO, self.last_error)
        error.lost = n - sent
        return sent, error

    def _cut_torn(self, done: int, size: int, now: float) -> None:
        """Truncate what a write of ``done`` octets left of a message of ``size`` off the end of the file."""
        whole = done - done % size
        try:
            # O_APPEND: the file ends where the partial write ended (one writer), even if it was
            # truncated under us (logrotate's copytruncate) since we last wrote
            self._cut_to = os.lseek(self._fd, 0, os.SEEK_END) - (done - whole)
        except OSError:
            self._cut_to = self.size + whole  # the end as this transport knows it
        code = self._errno
        if self._cut_torn_now(now):
            return
        self._errno = code  # the write's cause stays the cause
        # tried again before the next write (``_ready``); until then nothing is appended, and the
        # file is not reopened: only this descriptor can still cut it
        self.last_error = f"cannot write: {os.strerror(self._errno)}; cannot cut off a torn message"
        self._reopen = False

    def flush(self) -> None:
        """Nothing to do: every write went to the file at once."""

    def _close_fd(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError as exc:  # a write-back error reported at close: nothing left to retry
                self.last_error = f"close: {os.strerror(exc.errno or errno.EIO)}"

    def close(self) -> None:
        self._close_fd()


def open_transport(address: CollectorAddress, send_buffer: int = SEND_BUFFER):
    if address.kind == "udp":
        return UdpTransport(address, send_buffer)
    if address.kind == "file":
        return FileTransport(address)
    raise ValueError(f"unknown transport kind {address.kind!r}")
