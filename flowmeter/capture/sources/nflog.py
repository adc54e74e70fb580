"""NFLOG: the frames a firewall logs to a netfilter log group, as a live source.

A rule such as nftables ``log group 7 prefix "acl-deny: " drop`` hands a copy
of each frame it matches to whichever netlink socket is bound to group 7 in
its network namespace. ``NflogSource(7)`` is that socket: it binds the group
when it is made (before the capture process gives up root), and ``read``
yields what arrived as ``RecordBatch`` objects of LINKTYPE_NFLOG records,
which ``flowmeter.capture.decode`` already understands (prefix, hook, interfaces).

Netlink messages are in the host's byte order and 4-octet aligned
(``linux/netlink.h``, ``linux/netfilter/nfnetlink_log.h``)::

    nlmsghdr  16  | length (4) | type (2) | flags (2) | sequence (4) | port id (4) |
    nfgenmsg   4  | family (1) | version (1) | resource id = group (2, big-endian) |
    nlattr     4  | length (2) | type (2, NLA_TYPE_MASK 0x3fff) | value, padded to 4 |

A logged frame is a message of type NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET
(0x0400); several may share one datagram (NLM_F_MULTI, ended by NLMSG_DONE).
From its nfgenmsg to its end, such a message *is* a pcap LINKTYPE_NFLOG record
(family, version, resource id, then the NFULA_* attributes), so a batch
points into the receive buffer and nothing is copied. Attributes read here:
NFULA_TIMESTAMP (3: seconds and microseconds, big-endian 64-bit each) and
NFULA_SEQ (12: big-endian 32-bit, one more per frame the group logged).

The kernel does not stamp every frame: it adds NFULA_TIMESTAMP only at the
PREROUTING, INPUT and FORWARD hooks; a frame logged at OUTPUT or POSTROUTING
gets the time it was received here. The sequence numbers say how many frames
the kernel logged but could not deliver because this socket's buffer was
full ("frames lost"); the overrun itself is reported once by recv (ENOBUFS,
"socket overruns"), and both are counted, never raised.
"""
from __future__ import annotations

import errno
import math
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Iterator

import numpy as np

from flowmeter.capture.sources import Columns, RecordBatch, SourceError, read_only
from flowmeter.capture.sources.pcapfile import load_u16, load_u32
from flowmeter.ipc.packets import DIR_UNKNOWN
from flowmeter.jit import njit

NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33  # SO_RCVBUF beyond net.core.rmem_max, with CAP_NET_ADMIN
NLM_F_REQUEST, NLM_F_ACK = 0x01, 0x04
NLMSG_ERROR = 2
NLMSG_HDRLEN = 16
NFGENMSG_LEN = 4
NFULNL_MSG_PACKET = (4 << 8) | 0  # NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET
NFULNL_MSG_CONFIG = (4 << 8) | 1
NFULA_TIMESTAMP, NFULA_SEQ = 3, 12
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_NLBUFSIZ, NFULA_CFG_TIMEOUT = 1, 2, 3, 4
NFULA_CFG_QTHRESH, NFULA_CFG_FLAGS = 5, 6
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULNL_CFG_F_SEQ = 0x0001
LINKTYPE_NFLOG = 239

KERNEL_BATCH_BYTES = 32768  # NFULA_CFG_NLBUFSIZ: the kernel's datagram size (at most 131072)
MESSAGE_OVERHEAD = 4096  # more than the headers and attributes around one frame's payload
ACK_TIMEOUT_S = 2.0

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("!BBH")
_NLATTR = struct.Struct("=HH")
_NLMSGERR = struct.Struct("=i")


# --- kernel ----------------------------------------------------------------------------


@njit
def walk_netlink_messages(buf, start, end, big, now_ns, n0, offset, caplen, origlen, ts_ns, next_seq):
    """Records for the NFULNL_MSG_PACKET messages of one datagram ``buf[start:end]``.

    Fills ``offset/caplen/origlen/ts_ns[n0:]`` (offset of the nfgenmsg, the
    message's length after its header, NFULA_TIMESTAMP or else ``now_ns``).
    ``next_seq[0]`` carries the NFULA_SEQ expected next (-1: none yet) from
    one call to the next. Returns (records written, malformed messages,
    NLMSG_ERROR messages with an error, frames lost by sequence gaps). A
    message shorter than its header or running past ``end`` is malformed and
    ends the walk; a packet message without an nfgenmsg is malformed and skipped.

    Why a kernel: each message's length says where the next one starts, and
    a Python loop over ``struct.unpack_from`` per message and attribute would
    cost more than everything else the capture process does per frame.
    """
    p = start
    n = n0
    capacity = len(offset)
    malformed = errors = lost = 0
    while p < end and n < capacity:
        if end - p < NLMSG_HDRLEN:
            malformed += 1
            break
        length = load_u32(buf, p, big)
        if length < NLMSG_HDRLEN or length > end - p:
            malformed += 1
            break
        mtype = load_u16(buf, p + 4, big)
        if mtype == NFULNL_MSG_PACKET:
            if length < NLMSG_HDRLEN + NFGENMSG_LEN:
                malformed += 1
            else:
                stamp = np.uint64(now_ns)
                q, mend = p + NLMSG_HDRLEN + NFGENMSG_LEN, p + length
                while mend - q >= 4:
                    alen = load_u16(buf, q, big)
                    atype = load_u16(buf, q + 2, big) & 0x3FFF
                    if alen < 4 or alen > mend - q:
                        break
                    if atype == NFULA_TIMESTAMP and alen >= 20:
                        sec = (load_u32(buf, q + 4, True) << 32) | load_u32(buf, q + 8, True)
                        usec = (load_u32(buf, q + 12, True) << 32) | load_u32(buf, q + 16, True)
                        stamp = np.uint64(sec) * np.uint64(1_000_000_000) + np.uint64(usec) * np.uint64(1000)
                    elif atype == NFULA_SEQ and alen >= 8:
                        seq = load_u32(buf, q + 4, True)
                        if next_seq[0] >= 0:
                            lost += (seq - next_seq[0]) & 0xFFFFFFFF
                        next_seq[0] = (seq + 1) & 0xFFFFFFFF
                    q += (alen + 3) & ~3
                offset[n] = p + NLMSG_HDRLEN
                caplen[n] = length - NLMSG_HDRLEN
                origlen[n] = length - NLMSG_HDRLEN
                ts_ns[n] = stamp
                n += 1
        elif mtype == NLMSG_ERROR and length >= NLMSG_HDRLEN + 4:
            if load_u32(buf, p + NLMSG_HDRLEN, big) != 0:  # 0 is an acknowledgement
                errors += 1
        p += (length + 3) & ~3
    return n - n0, malformed, errors, lost


# --- the source ------------------------------------------------------------------------


def _attr(atype: int, value: bytes) -> bytes:
    return _NLATTR.pack(4 + len(value), atype) + value + b"\0" * (-len(value) % 4)


def _group_owner(group: int) -> int | None:
    """Netlink port id bound to ``group`` in this thread's namespace, if the kernel lists one."""
    try:
        with open("/proc/thread-self/net/netfilter/nfnetlink_log") as table:
            for line in table:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == str(group):
                    return int(fields[1])
    except (OSError, ValueError):
        pass
    return None


class NflogSource:
    """Frames logged to netfilter log group ``group`` (``nflog:GROUP``), read in batches.

    ``copy_range``: octets of each frame the kernel copies (headers are all
    flows need). ``receive_buffer``: the socket's buffer (SO_RCVBUFFORCE, else
    SO_RCVBUF). ``buffer_size``: the receive buffer one batch lives in.
    ``flush_timeout_ms`` and ``queue_threshold``: the kernel sends what it
    logged when that many frames wait or the oldest has waited that long
    (rounded up to 10 ms), whichever comes first.
    """

    def __init__(self, group: int, *, copy_range: int = 256, receive_buffer: int = 8 << 20,
                 buffer_size: int = 1 << 20, flush_timeout_ms: int = 10, queue_threshold: int = 64):
        if not 0 <= group <= 0xFFFF:
            raise ValueError(f"nflog group {group} is not 0-65535")
        if not 1 <= copy_range <= 0xFFFF:
            raise ValueError(f"nflog copy range {copy_range} is not 1-65535")
        self._max_datagram = max(KERNEL_BATCH_BYTES, copy_range + MESSAGE_OVERHEAD)
        if buffer_size < self._max_datagram:
            raise ValueError(f"nflog buffer size {buffer_size} is below one datagram ({self._max_datagram})")
        self.name = f"nflog:{group}"
        self.group = group
        self._big = sys.byteorder == "big"
        self._buf = np.zeros(buffer_size, np.uint8)
        self._view = memoryview(self._buf)
        self._cols = Columns(buffer_size // (NLMSG_HDRLEN + NFGENMSG_LEN) + 1)
        self._cols.linktype[:] = LINKTYPE_NFLOG
        self._cols.ifindex[:] = 0  # the decoder takes the interfaces from the attributes
        self._cols.direction[:] = DIR_UNKNOWN  # and the direction from the hook
        self._next_seq = np.full(1, -1, np.int64)
        self._early: list[bytes] = []  # frames that arrived before the kernel's answer
        self._seq = 0
        self._counts = dict.fromkeys(("frames", "socket overruns", "frames lost", "malformed",
                                      "netlink errors", "truncated datagrams"), 0)
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
            except PermissionError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            self._sock.bind((0, 0))
            mode = struct.pack("!IBB", copy_range, NFULNL_COPY_PACKET, 0)
            self._request(_attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))
                          + _attr(NFULA_CFG_MODE, mode)
                          + _attr(NFULA_CFG_NLBUFSIZ, struct.pack("!I", KERNEL_BATCH_BYTES))
                          + _attr(NFULA_CFG_TIMEOUT, struct.pack("!I", math.ceil(flush_timeout_ms / 10)))
                          + _attr(NFULA_CFG_QTHRESH, struct.pack("!I", queue_threshold))
                          + _attr(NFULA_CFG_FLAGS, struct.pack("!H", NFULNL_CFG_F_SEQ)), ack=True)
        except SourceError:
            self._sock.close()
            raise
        except OSError as exc:
            self._sock.close()
            raise self._error(exc.errno or 0, f"netlink socket: {exc.strerror or exc}") from None
        self._sock.setblocking(False)
        self._poll = select.poll()
        self._poll.register(self._sock.fileno(), select.POLLIN)

    def _error(self, code: int, cause: str) -> SourceError:
        err = SourceError(f"{self.name}: {cause}")
        err.errno = code
        return err

    def _request(self, attributes: bytes, *, ack: bool) -> None:
        """Send one NFULNL_MSG_CONFIG for our group; with ``ack``, wait for the kernel's answer."""
        self._seq += 1
        body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, self.group) + attributes
        flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
        self._sock.send(_NLMSGHDR.pack(NLMSG_HDRLEN + len(body), NFULNL_MSG_CONFIG, flags, self._seq, 0) + body)
        if ack:
            self._await_ack(self._seq)

    def _await_ack(self, seq: int) -> None:
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(self._max_datagram)
            except TimeoutError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self._counts["socket overruns"] += 1
                continue
            p = 0
            while len(data) - p >= NLMSG_HDRLEN + 4:
                length, mtype, _, mseq, _ = _NLMSGHDR.unpack_from(data, p)
                if mtype == NLMSG_ERROR and mseq == seq:
                    code = -_NLMSGERR.unpack_from(data, p + NLMSG_HDRLEN)[0]
                    if code:
                        raise self._refusal(code)
                    return
                if length < NLMSG_HDRLEN:
                    break
                p += (length + 3) & ~3
            self._early.append(data)  # logged frames, kept for the first read
        raise self._error(errno.ETIMEDOUT, f"no answer from the kernel to the bind within {ACK_TIMEOUT_S} s")

    def _refusal(self, code: int) -> SourceError:
        owner = _group_owner(self.group) if code in (errno.EPERM, errno.EBUSY) else None
        if owner is not None:
            return self._error(code, f"log group {self.group} is already bound by another socket (netlink "
                                     f"port id {owner}, usually the pid of the process holding it)")
        if code == errno.EPERM:
            return self._error(code, "binding a log group needs CAP_NET_ADMIN in this network namespace")
        return self._error(code, f"the kernel refused to bind log group {self.group}: {os.strerror(code)}")

    # --- the source interface

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self, timeout_s: float) -> Iterator[RecordBatch]:
        """Batches of what arrived, waiting at most ``timeout_s`` for the first frame.

        Each batch is valid until the next one is asked for: the buffer is
        reused. Returns once the socket has nothing more waiting.
        """
        if not self._early and not self._poll.poll(max(0, math.ceil(timeout_s * 1000))):
            return
        drained = False
        while not drained:
            used = n = 0
            while len(self._buf) - used >= self._max_datagram:
                got = self._receive(used)
                if got < 0:
                    drained = True
                    break
                written, malformed, errors, lost = walk_netlink_messages(
                    self._buf, used, used + got, self._big, time.time_ns(), n,
                    self._cols.offset, self._cols.caplen, self._cols.origlen, self._cols.ts_ns, self._next_seq)
                n += written
                used += got
                self._counts["malformed"] += malformed
                self._counts["netlink errors"] += errors
                self._counts["frames lost"] += lost
            if n:
                first = self._counts["frames"]
                self._counts["frames"] += n
                yield self._cols.batch(read_only(self._buf), n, first)

    def _receive(self, used: int) -> int:
        """One datagram into ``buf[used:]``; its length, or -1 when nothing is waiting."""
        space = len(self._buf) - used
        while True:
            if self._early:
                data = self._early.pop(0)
                self._view[used:used + len(data)] = data
                return len(data)
            try:
                got = self._sock.recv_into(self._view[used:], space, socket.MSG_TRUNC)
            except BlockingIOError:
                return -1
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self._counts["socket overruns"] += 1  # the kernel dropped datagrams; go on
                continue
            if got <= space:
                return got
            self._counts["truncated datagrams"] += 1  # cannot happen with the sizes above

    def counters(self) -> dict[str, int]:
        return dict(self._counts)

    def close(self) -> None:
        """Close this process's descriptor. The kernel unbinds the group when the socket's last
        descriptor closes; an explicit unbind here would also unbind it for a process that
        inherited the socket across a fork and still reads it."""
        if self._sock.fileno() < 0:
            return
        self._poll.unregister(self._sock.fileno())
        self._sock.close()

    def __enter__(self) -> NflogSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def warm_up() -> None:
    """Load (the first time on a machine: compile) the netlink walk, before capture processes fork."""
    n = 1
    walk_netlink_messages(np.zeros(64, np.uint8), 0, 0, sys.byteorder == "big", 0, 0, np.zeros(n, np.uint64),
                          np.zeros(n, np.uint32), np.zeros(n, np.uint32), np.zeros(n, np.uint64),
                          np.full(1, -1, np.int64))
