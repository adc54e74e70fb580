"""Live capture from an interface through a memory-mapped AF_PACKET receive ring (TPACKET_V3).

``AfPacketSource(iface)`` opens a packet socket on one interface and maps a
ring of ``blocks`` blocks of ``block_size`` octets shared with the kernel.
The kernel fills a block with frames and hands it over ("retires" it) when
it is full or ``block_timeout_ms`` after its first frame; ``read()`` walks
the retired blocks in a numba kernel into ``RecordBatch`` columns that
point into the ring itself (no copy), and hands each block back once the
caller is done with its batch. Everything privileged (socket, filter,
ring, fanout) happens in the constructor, before the process drops root.

Ring layout (``linux/if_packet.h``; host byte order; offsets checked
against the installed headers with ``offsetof``)::

    block (tpacket_block_desc, 48 octets, then the frames):
    | version (4) | offset_to_priv (4) | block_status (4) @8 | num_pkts (4) @12 |
    | offset_to_first_pkt (4) @16 | blk_len (4) | seq_num (8) | ts first/last (16) |
    frame (tpacket3_hdr, 48 octets), at block + offset_to_first_pkt, then + tp_next_offset:
    | tp_next_offset (4) @0 | tp_sec (4) @4 | tp_nsec (4) @8 | tp_snaplen (4) @12 | tp_len (4) @16 |
    | tp_status (4) | tp_mac (2) @24 | tp_net (2) | rxhash, vlan tci/tpid (12) | padding (8) |
    then sockaddr_ll at TPACKET_ALIGN(48) = 48:
    | family (2) | protocol (2) | ifindex (4) | hatype (2) | pkttype (1) @58 | halen (1) | addr (8) |
    the link-layer frame at frame + tp_mac, tp_snaplen octets of a tp_len-octet frame.

A block belongs to us while ``block_status & TP_STATUS_USER``; writing
TP_STATUS_KERNEL (0) gives it back. The kernel fills the blocks in ring
order and stops (counting drops) at one we still hold, so walking them in
the same order, wrapping at the end, never skips or repeats one.

The snap length is enforced by the kernel: a classic BPF program returns
how many octets to keep, so the ring never carries whole frames. Without
``bpf_filter`` it is the single instruction ``ret #snaplen``; with one, the
expression is compiled by tcpdump for the interface's link type and its
accepting returns are lowered to the snap length.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np

from flowmeter.capture.decode import LINKTYPE_ETHERNET, LINKTYPE_RAW
from flowmeter.capture.sources import Columns, RecordBatch, SourceError, read_only
from flowmeter.capture.sources.pcapfile import load_u16, load_u32
from flowmeter.ipc.packets import DIR_EGRESS, DIR_INGRESS
from flowmeter.jit import njit

# linux/if_ether.h, linux/if_packet.h, asm-generic/socket.h
ETH_P_ALL = 0x0003
SOL_PACKET = 263
SO_ATTACH_FILTER = 26
PACKET_RX_RING, PACKET_STATISTICS, PACKET_VERSION, PACKET_FANOUT = 5, 6, 10, 18
TPACKET_V3 = 2
PACKET_FANOUT_HASH = 0
# A block goes to the reader when full or this long after its first frame. Flow records do not
# need the frames sooner, and at a low rate every block holds a few frames only: with 64 blocks,
# 100 ms lets the reader stall (a busy CPU, a compile) 6 s before the kernel drops anything.
BLOCK_TIMEOUT_MS = 100
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000  # the kernel picks a group id no one else uses
NEW_GROUP = -1  # ``fanout_group``: start a group of our own (``self.fanout_group`` is then its id)
TP_STATUS_KERNEL, TP_STATUS_USER = 0, 1
PACKET_OUTGOING = 4
TPACKET3_HDRLEN = 48 + 20  # TPACKET_ALIGN(sizeof(tpacket3_hdr)) + sizeof(sockaddr_ll)
BLOCK_STATUS, BLOCK_NUM_PKTS, BLOCK_FIRST_PKT = 8, 12, 16
SLL_PKTTYPE = 48 + 10
MIN_FRAME_SLOT = 64  # a frame takes more than its 68-octet header: a bound for column sizes
BIG_ENDIAN_HOST = sys.byteorder == "big"

# ARPHRD_* (linux/if_arp.h) whose packet sockets see an Ethernet header, or none at all
ETHERNET_HATYPES = {1: "ether", 772: "loopback"}
RAW_IP_HATYPES = {65534: "none (tun, WireGuard)", 519: "rawip", 512: "ppp", 768: "ipip",
                  769: "ip6ip6", 776: "sit"}
TCPDUMP_LINKTYPES = {LINKTYPE_ETHERNET: "EN10MB", LINKTYPE_RAW: "RAW"}

_REQ3 = struct.Struct("7I")  # tpacket_req3
_STATS3 = struct.Struct("3I")  # tpacket_stats_v3: tp_packets, tp_drops, tp_freeze_q_cnt
_SHARED_FIELDS = 6  # next block, blocks held, frames read, kernel packets, drops, freezes
_FPROG = struct.Struct("HP")  # sock_fprog: instruction count, pointer to them


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


BPF_RET_K = 0x06  # BPF_RET | BPF_K: accept k octets (0: drop)


# --- kernel ----------------------------------------------------------------------------


@njit
def walk_ring_blocks(ring, first_block, max_blocks, n_blocks, block_size, big, linktype, ifindex,
                     offset, caplen, origlen, ts_ns, link, ifidx, direction):
    """Fill the record columns from the retired blocks at ``first_block``, ``first_block + 1``, ...

    Walks at most ``max_blocks`` blocks, wrapping after ``n_blocks``, and
    stops at the first block the kernel still owns or whose frames would not
    fit the columns. Returns (blocks walked, records written). A frame whose
    header claims more than its block holds ends that block's walk.

    Why a kernel: each frame's header says where the next starts, so numpy
    cannot vectorise the walk; a Python loop would cost microseconds a frame.
    """
    n = 0
    walked = 0
    capacity = len(offset)
    while walked < max_blocks:
        base = ((first_block + walked) % n_blocks) * block_size
        end = base + block_size
        if (load_u32(ring, base + BLOCK_STATUS, big) & TP_STATUS_USER) == 0:
            break
        count = load_u32(ring, base + BLOCK_NUM_PKTS, big)
        if n + count > capacity:
            break
        p = base + load_u32(ring, base + BLOCK_FIRST_PKT, big)
        for _ in range(count):
            if p < base or p + TPACKET3_HDRLEN > end:
                break
            snap = load_u32(ring, p + 12, big)
            mac = p + load_u16(ring, p + 24, big)
            if mac + snap > end:
                break
            offset[n] = mac
            caplen[n] = snap
            origlen[n] = load_u32(ring, p + 16, big)
            ts_ns[n] = np.uint64(load_u32(ring, p + 4, big)) * np.uint64(1_000_000_000) \
                + np.uint64(load_u32(ring, p + 8, big))
            link[n] = linktype
            ifidx[n] = ifindex
            direction[n] = DIR_EGRESS if ring[np.uint64(p + SLL_PKTTYPE)] == PACKET_OUTGOING else DIR_INGRESS
            n += 1
            p += load_u32(ring, p, big)
        walked += 1
    return walked, n


def warm_up() -> None:
    """Load (the first time on a machine: compile) the ring walk, before capture processes fork."""
    cols = Columns(1)
    walk_ring_blocks(np.zeros(4096, np.uint8), 0, 1, 1, 4096, BIG_ENDIAN_HOST, LINKTYPE_ETHERNET, 0,
                     cols.offset, cols.caplen, cols.origlen, cols.ts_ns, cols.linktype, cols.ifindex,
                     cols.direction)


# --- filter ----------------------------------------------------------------------------


# Where tcpdump is looked for, in order: the system's directories, never PATH (a profile's filter is
# compiled by the process that starts as root; a PATH entry writable by someone else must not choose
# the program it runs).
TCPDUMP_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


def tcpdump_path() -> str | None:
    """The tcpdump of the first of TCPDUMP_DIRS that has one, or None."""
    for directory in TCPDUMP_DIRS:
        path = os.path.join(directory, "tcpdump")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def compile_filter(expression: str, linktype: int, snaplen: int, iface: str = "") -> list[tuple[int, int, int, int]]:
    """``expression`` as classic BPF (code, jt, jf, k) compiled by tcpdump, accepting ``snaplen`` octets.

    The expression follows ``--``: one that starts with ``-`` is a filter expression (which tcpdump
    refuses), never options of tcpdump (``-F FILE`` would read the filter from a file).
    """
    where = f"afpacket:{iface}: " if iface else ""
    tcpdump = tcpdump_path()
    if tcpdump is None:
        raise SourceError(f"{where}filter {expression!r} needs tcpdump to compile it, and tcpdump is not installed "
                          f"(looked in {', '.join(TCPDUMP_DIRS)})")
    r = subprocess.run([tcpdump, "-y", TCPDUMP_LINKTYPES[linktype], "-ddd", "--", expression],
                       capture_output=True, text=True, timeout=30)
    if r.returncode:
        cause = " ".join(r.stderr.split()) or f"exit {r.returncode}"
        raise SourceError(f"{where}bad filter {expression!r}: {cause}")
    lines = r.stdout.split("\n")
    program = [tuple(int(v) for v in line.split()) for line in lines[1:int(lines[0]) + 1]]
    return [(c, jt, jf, min(k, snaplen) if c == BPF_RET_K and k else k) for c, jt, jf, k in program]


def _attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    insns = (_SockFilter * len(program))(*(_SockFilter(*insn) for insn in program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, _FPROG.pack(len(program), ctypes.addressof(insns)))


# --- source ----------------------------------------------------------------------------


class AfPacketSource:
    """Frames of one interface, read from a TPACKET_V3 ring (see the module docstring).

    ``fanout_group``: join this PACKET_FANOUT group (symmetric hash of the
    flow), so that several processes share the interface's frames and each
    conversation, both directions, stays with one of them. Fragments are
    left as they are (no PACKET_FANOUT_FLAG_DEFRAG: it would hand over one
    reassembled datagram where the wire carried several packets); a later
    fragment may reach another process than the first, which does not
    matter: the shard workers group packets by flowmeter's own hash.
    ``bpf_filter``: a tcpdump expression; only matching frames are read.
    """

    def __init__(self, iface: str, *, fanout_group: int | None = None, snaplen: int = 256,
                 block_size: int = 1 << 20, blocks: int = 64, block_timeout_ms: int = BLOCK_TIMEOUT_MS,
                 bpf_filter: str | None = None):
        self.name = f"afpacket:{iface}"
        self.iface = iface
        self.snaplen = snaplen
        if not 1 <= snaplen <= 65535:
            raise SourceError(f"{self.name}: snap length {snaplen} is not 1 to 65535")
        if not 0 < block_size < 1 << 31 or block_size % mmap.PAGESIZE or not 0 < blocks < 1 << 31:
            raise SourceError(f"{self.name}: ring of {blocks} blocks of {block_size} octets: "
                              f"blocks must be a multiple of the page size ({mmap.PAGESIZE}), both below 2**31")
        if fanout_group is not None and fanout_group != NEW_GROUP and not 0 <= fanout_group <= 0xFFFF:
            raise SourceError(f"{self.name}: fanout group {fanout_group} is not 0 to 65535")
        self.block_size, self.blocks = block_size, blocks
        self.block_timeout_ms = block_timeout_ms  # a frame is readable at most this long after it came
        # The reader's place in the ring and its counts live in a page shared by every process
        # forked after this (MAP_SHARED): a capture process started again after a crash goes on
        # where the dead one stopped, gives back the blocks it held, and counts on from its counts.
        self._shared = np.frombuffer(mmap.mmap(-1, mmap.PAGESIZE), np.int64, count=_SHARED_FIELDS)
        self.interface_errors = 0
        self._reader = None  # the read() generator that owns _held
        self._sock: socket.socket | None = None
        self._mmap: mmap.mmap | None = None
        try:
            self.ifindex = socket.if_nametoindex(iface)
        except OSError:
            raise SourceError(f"{self.name}: no interface {iface!r} (in this network namespace)") from None
        try:
            self._open(fanout_group, block_timeout_ms, bpf_filter)
        except PermissionError:
            self.close()
            raise SourceError(f"{self.name}: permission denied: reading an interface needs root "
                              "or CAP_NET_RAW") from None
        except OSError as e:
            self.close()
            if isinstance(e, SourceError):
                raise
            raise SourceError(f"{self.name}: {self._stage}: {e.strerror or e}") from None
        self.blocks_per_batch = max(1, min(8, blocks // 4))
        self._cols = Columns(self.blocks_per_batch * (block_size // MIN_FRAME_SLOT))

    # the shared fields (see __init__)
    _next = property(lambda self: int(self._shared[0]), lambda self, v: self._shared.__setitem__(0, v),
                     doc="next block to look at")
    _held = property(lambda self: int(self._shared[1]), lambda self, v: self._shared.__setitem__(1, v),
                     doc="blocks before _next still the reader's (the last batch reads them)")
    frames_read = property(lambda self: int(self._shared[2]), lambda self, v: self._shared.__setitem__(2, v),
                           doc="frames walked so far, by every reader of this ring")
    _stats = property(lambda self: [int(x) for x in self._shared[3:6]],
                      lambda self, v: self._shared.__setitem__(slice(3, 6), v),
                      doc="the kernel's packets, drops and freezes so far (each query resets the kernel's)")

    def _open(self, fanout_group: int | None, block_timeout_ms: int, bpf_filter: str | None) -> None:
        # Protocol 0: nothing is queued until bind, after the filter and the ring are in place.
        self._stage = "opening a packet socket"
        self._sock = sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self._stage = "binding to the interface"
        sock.bind((self.iface, 0))
        hatype = sock.getsockname()[3]  # the kernel's word for the device bound (not /sys)
        if hatype in ETHERNET_HATYPES:
            self.linktype = LINKTYPE_ETHERNET
        elif hatype in RAW_IP_HATYPES:
            self.linktype = LINKTYPE_RAW
        else:
            raise SourceError(f"{self.name}: unsupported device type ARPHRD {hatype} "
                              "(Ethernet, loopback, tun and raw-IP devices are)")
        if bpf_filter is not None:
            program = compile_filter(bpf_filter, self.linktype, self.snaplen, self.iface)
        else:
            program = [(BPF_RET_K, 0, 0, self.snaplen)]
        self._stage = f"attaching a filter of {len(program)} instructions"
        _attach_filter(sock, program)
        self._stage = f"setting up a ring of {self.blocks} blocks of {self.block_size} octets"
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        frame_size = (TPACKET3_HDRLEN + 16 + self.snaplen + 15) & ~15
        frame_size = min(frame_size, self.block_size)
        frames = self.block_size // frame_size * self.blocks
        sock.setsockopt(SOL_PACKET, PACKET_RX_RING, _REQ3.pack(
            self.block_size, self.blocks, frame_size, frames, block_timeout_ms, 0, 0))
        self._stage = "mapping the ring"
        self._mmap = mmap.mmap(sock.fileno(), self.block_size * self.blocks, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        self._ring = np.frombuffer(self._mmap, np.uint8)
        self._words = np.frombuffer(self._mmap, np.uint32)  # block_status is written whole
        self._stage = "binding to the interface"
        sock.bind((self.iface, ETH_P_ALL))
        if fanout_group is not None:
            self._stage = f"joining fanout group {fanout_group}"
            if fanout_group == NEW_GROUP:
                mode = PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_UNIQUEID
                sock.setsockopt(SOL_PACKET, PACKET_FANOUT, struct.pack("I", mode << 16))
                fanout_group = struct.unpack("I", sock.getsockopt(SOL_PACKET, PACKET_FANOUT, 4))[0] & 0xFFFF
            else:
                sock.setsockopt(SOL_PACKET, PACKET_FANOUT, struct.pack("I", fanout_group | (PACKET_FANOUT_HASH << 16)))
        self.fanout_group = fanout_group
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN | select.POLLERR)

    def fileno(self) -> int:
        """The packet socket: readable when a block is retired."""
        if self._sock is None:
            raise ValueError(f"{self.name} is closed")
        return self._sock.fileno()

    def _retired(self, block: int) -> bool:
        status = self._words[(block * self.block_size + BLOCK_STATUS) >> 2]
        return bool(status & TP_STATUS_USER)

    def _wait(self, timeout_s: float) -> bool:
        """True once the next block is retired; False after ``timeout_s`` without one."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while not self._retired(self._next):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            for _fd, events in self._poll.poll(max(1, int(left * 1000 + 0.999))):
                if events & select.POLLNVAL:
                    return False
                if events & select.POLLERR:  # ENETDOWN: the interface went down; it may come back
                    self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    self.interface_errors += 1
                    self._check_exists()
                    time.sleep(min(left, 0.05))
        return True

    def _check_exists(self) -> None:
        """A deleted interface never comes back under this index: say so rather than wait forever."""
        try:
            socket.if_indextoname(self.ifindex)
        except OSError:
            raise SourceError(f"{self.name}: the interface is gone (deleted)") from None

    def _release(self) -> None:
        """Give the blocks of the last batch back to the kernel.

        Each status word is stored whole (uint32), after the batch's reads
        are done: the kernel must never see a half-written status.
        """
        if self._mmap is None or self._mmap.closed:
            self._held = 0
            return
        for k in range(self._held, 0, -1):
            block = (self._next - k) % self.blocks
            self._words[(block * self.block_size + BLOCK_STATUS) >> 2] = TP_STATUS_KERNEL
        self._held = 0

    def read(self, timeout_s: float) -> Iterator[RecordBatch]:
        """Yield the frames of the retired blocks, waiting at most ``timeout_s`` for the first.

        Each batch points into the ring and is valid until the next one is
        asked for (or the generator is closed): only then are its blocks
        given back. Returns when no retired block is left, or after one
        ring's worth of blocks so that a busy interface still lets the
        caller's loop run. A new ``read()`` ends the batch of an older one.
        """
        if self._sock is None:
            raise ValueError(f"{self.name} is closed")
        self._release()
        if not self._wait(timeout_s):
            return
        token = self._reader = object()
        walked_total = 0
        cols = self._cols
        try:
            while walked_total < self.blocks and self._mmap is not None:
                walked, n = walk_ring_blocks(
                    self._ring, self._next, min(self.blocks_per_batch, self.blocks - walked_total),
                    self.blocks, self.block_size, BIG_ENDIAN_HOST, self.linktype, self.ifindex,
                    cols.offset, cols.caplen, cols.origlen, cols.ts_ns, cols.linktype, cols.ifindex,
                    cols.direction)
                if walked == 0:
                    return
                self._next = (self._next + walked) % self.blocks
                self._held = walked
                walked_total += walked
                first = self.frames_read
                self.frames_read += n
                if n:
                    yield cols.batch(read_only(self._ring), n, first)
                    if self._reader is not token:  # a newer read() took over (and released)
                        return
                self._release()
        finally:
            if self._reader is token:
                self._release()
                self._reader = None

    def counters(self) -> dict[str, int]:
        """The kernel's counts for this socket (accumulated: each query resets them) and ours."""
        if self._sock is not None:
            packets, drops, freezes = _STATS3.unpack(
                self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS3.size))
            self._stats = [self._stats[0] + packets, self._stats[1] + drops, self._stats[2] + freezes]
        return {"kernel packets": self._stats[0], "kernel drops": self._stats[1],
                "kernel freezes": self._stats[2], "frames read": self.frames_read,
                "interface errors": self.interface_errors}

    def close(self) -> None:
        """Unmap the ring and close the socket (batches still in use keep the mapping alive).

        The shared reader state is left as it is: a process closing its copy
        of a source another process reads must not touch that reader's place.
        """
        self._reader = None
        self._ring = self._words = np.empty(0, np.uint8)
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a batch still points into it; it goes with the last of them
                pass
            self._mmap = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> AfPacketSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<AfPacketSource {self.name} ifindex {self.ifindex} linktype {getattr(self, 'linktype', '?')}>"
