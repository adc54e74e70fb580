"""Capture files: pcap and pcapng records as columnar batches.

``open_capture(path)`` opens a capture file, recognises its format by the
magic number and returns a ``CaptureFile``; ``CaptureFile.batches()``
yields ``RecordBatch`` objects: one numpy array per record attribute (where
the frame starts in the read buffer, captured and original length, time in
ns, link type, interface, direction), never one Python object per packet.
The file is read in blocks of 8 MiB into one buffer (``batch.buf``) and
``flowmeter.capture.decode`` reads the headers there in place; a record cut
by a block's end is read again with the next block. The file is not
memory-mapped: a mapped file cut short while it is read kills its reader
with SIGBUS (see ``CaptureFile``).

Walking the records is sequential (each record's length says where the next
one starts), so numpy cannot vectorise it; it is a numba kernel
(``walk_pcap_records``, ``walk_pcapng_blocks``), about 100 times faster
than the same loop in Python (DESIGN.md "Data plane"). Kernels are
resumable: they take a start offset and a packet budget and return how many
records they wrote, the offset reached and why they stopped.

pcap (libpcap ``pcap-savefile(5)``), every field in the writer's byte order::

    file header, 24 octets
    | magic (4) | major (2) | minor (2) | thiszone (4) | sigfigs (4) | snaplen (4) | link type (4) |
      a1b2c3d4: µs time stamps, a1b23c4d: ns; read as bytes d4 c3 b2 a1 / 4d 3c b2 a1 when
      little-endian. Versions 2.0-2.4 (and 543.0, DG/UX) are read, as libpcap does.
    record: | ts_sec (4) | ts_usec or ts_nsec (4) | caplen (4) | origlen (4) | caplen octets |

pcapng (draft-ietf-opsawg-pcapng): a sequence of blocks, each in the byte
order of its section (set by the Section Header Block's byte-order magic)::

    block:  | type (4) | total length (4) | body ... | total length (4) |   total length % 4 == 0
    SHB  0x0a0d0d0a  | byte-order magic 1a2b3c4d | major 1 | minor | section length (8) | options |
    IDB  1           | link type (2) | reserved (2) | snaplen (4) | options: if_tsresol (9),
                       if_tsoffset (14) |
    EPB  6           | interface id (4) | ts high (4) | ts low (4) | caplen (4) | origlen (4) |
                       data, padded to 4 | options: epb_flags (2): bits 0-1 = 1 inbound, 2 outbound |
    SPB  3           | origlen (4) | data | (no interface id: interface 0; no time stamp)
    PB   2 (obsolete)| interface id (2) | drops (2) | ts high | ts low | caplen | origlen | data |
                       options: pack_flags (2) as epb_flags |

The EPB/SPB/PB walk is the kernel; the rare SHB and IDB stop it, Python
parses them (byte order, interface table: link type, time resolution and
offset) and the kernel resumes. An SPB has no time stamp: it gets the time
of the packet before it, as the next best guess for ordering flows.

Damaged files: opening fails with ``CaptureError`` when the file header is
unusable (empty file, unknown magic, unsupported version). Past the header,
nothing raises: the walk stops at the first record whose header is cut off,
whose data run past the end of the file, whose length is absurd (caplen >
262144, as Wireshark's limit; a pcapng block over 16 MiB) or whose block lengths disagree; everything
before it is yielded, then ``CaptureFile.error`` holds one line naming the
file, the offset, the packet number and the cause, and ``complete`` stays
False. A capture still being written, or copied while it was, is metered up
to its last whole record; one cut short while it is read (another process
truncated it) ends with "file shrank to N octets while being read; stopped
at frame K" after the records read before the cut.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from flowmeter.capture.sources import Columns, RecordBatch, read_only
from flowmeter.ipc.packets import DIR_EGRESS, DIR_INGRESS, DIR_UNKNOWN
from flowmeter.jit import njit

MAX_CAPLEN = 262144  # Wireshark's maximum snapshot length; a bigger caplen is garbage
MAX_BLOCK = 16 << 20  # octets of one pcapng block at most (Wireshark refuses far smaller ones)
DEFAULT_BATCH = 65536
READ_BLOCK = 8 << 20  # octets read from a capture file at a time

PCAP_HEADER_LEN = 16 + 8
PCAP_RECORD_LEN = 16
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BYTE_ORDER_MAGIC = 0x1A2B3C4D
PCAPNG_IDB, PCAPNG_PB, PCAPNG_SPB, PCAPNG_EPB = 1, 2, 3, 6
MIN_SHB_LEN = 28
NS_PER_S = 1_000_000_000

# Why a walk stopped (the kernels' third return value)
STOP_FULL = 0  # the packet budget is used up; call again
STOP_END = 1  # clean end of file
STOP_TRUNCATED = 2  # a record header or record runs past the end of the file
STOP_BAD_LENGTH = 3  # a length field that cannot be right
STOP_BLOCK = 4  # pcapng: an SHB or IDB that Python must parse first
STOP_BAD_INTERFACE = 5  # pcapng: a packet of an interface no IDB defined

_PCAP_MAGICS = {  # first four octets -> (byte order, ns resolution)
    bytes.fromhex("d4c3b2a1"): ("<", False), bytes.fromhex("a1b2c3d4"): (">", False),
    bytes.fromhex("4d3cb2a1"): ("<", True), bytes.fromhex("a1b23c4d"): (">", True),
}
_PCAPNG_MAGIC = bytes.fromhex("0a0d0d0a")



class CaptureError(ValueError):
    """A capture file that cannot be read at all; the message names the file and the cause."""


# --- kernels -------------------------------------------------------------------------
#
# Offsets and lengths are int64 inside the kernels: numba, like numpy, turns
# uint64 mixed with int64 into float64, so the uint64 offsets never meet an int.
# Helpers are inlined (inline="always"): a numba call that passes an array
# costs a reference-count increment and decrement, atomic operations that
# would dominate a per-record loop.


@njit(inline="always")
def octet(buf, p):
    """``buf[p]`` as int64; an unsigned index spares numba's negative-index test on every load."""
    return np.int64(buf[np.uint64(p)])


@njit(inline="always")
def load_u16(buf, p, big):
    """The 16-bit unsigned integer at ``buf[p:p+2]`` (caller checked the bounds)."""
    if big:
        return (octet(buf, p) << 8) | octet(buf, p + 1)
    return (octet(buf, p + 1) << 8) | octet(buf, p)


@njit(inline="always")
def load_u32(buf, p, big):
    """The 32-bit unsigned integer at ``buf[p:p+4]`` (caller checked the bounds)."""
    if big:
        return (load_u16(buf, p, True) << 16) | load_u16(buf, p + 2, True)
    return (load_u16(buf, p + 2, False) << 16) | load_u16(buf, p, False)


@njit
def walk_pcap_records(buf, start, end, big, frac_ns, max_caplen, n0, max_n,
                      offset, caplen, origlen, ts_ns):
    """Fill ``offset/caplen/origlen/ts_ns[n0:max_n]`` from pcap records at ``buf[start:end]``.

    ``frac_ns`` is 1000 for µs files, 1 for ns files. Returns (records
    written, offset reached, STOP_*); on a stop other than FULL/END the
    offset is that of the bad record.

    Why a kernel: each record's length says where the next one starts, so
    numpy cannot vectorise the walk, and the obvious Python loop over
    ``struct.unpack_from`` manages about 2 M records/s; this one does 15-30 M.
    """
    p = start
    n = n0
    while n < max_n:
        if p == end:
            return n - n0, p, STOP_END
        if end - p < PCAP_RECORD_LEN:
            return n - n0, p, STOP_TRUNCATED
        incl = load_u32(buf, p + 8, big)
        if incl > max_caplen:
            return n - n0, p, STOP_BAD_LENGTH
        if end - p - PCAP_RECORD_LEN < incl:
            return n - n0, p, STOP_TRUNCATED
        offset[n] = p + PCAP_RECORD_LEN
        caplen[n] = incl
        origlen[n] = load_u32(buf, p + 12, big)
        ts_ns[n] = np.uint64(load_u32(buf, p, big)) * np.uint64(NS_PER_S) \
            + np.uint64(load_u32(buf, p + 4, big) * frac_ns)
        p += PCAP_RECORD_LEN + incl
        n += 1
    return n - n0, p, STOP_FULL


@njit(inline="always")
def pcapng_time_ns(high, low, units, binary_exponent, offset_ns):
    """pcapng time stamp to ns since the epoch, rounded down like Wireshark.

    The interface counts ``units`` per second (if_tsresol 10**-e), or
    2**``binary_exponent`` per second when that is >= 0 (if_tsresol
    2**-e). Split in seconds and remainder so that no product overflows 64
    bits: ``rem * 1e9`` is done in two 32-bit halves when ``rem`` may reach
    2**63. ``offset_ns`` is if_tsoffset in ns as a two's-complement uint64,
    so adding it wraps to the right value.
    """
    ts = (np.uint64(high) << np.uint64(32)) | np.uint64(low)
    g = np.uint64(NS_PER_S)
    if binary_exponent >= 0:
        k = np.uint64(binary_exponent)
        sec = ts >> k
        rem = ts & ((np.uint64(1) << k) - np.uint64(1))
        if binary_exponent < 32:
            frac = (rem * g) >> k
        else:  # floor((hi * 2**32 + lo) * g / 2**k), exactly
            hi = rem >> np.uint64(32)
            lo = rem & np.uint64(0xFFFFFFFF)
            frac = (hi * g + ((lo * g) >> np.uint64(32))) >> (k - np.uint64(32))
    else:
        u = np.uint64(units)
        sec = ts // u
        rem = ts % u
        if u <= g:
            frac = rem * g // u
        else:  # a power of ten above 1e9
            frac = rem // (u // g)
    return sec * g + frac + np.uint64(offset_ns)


@njit(inline="always")
def packet_flags_direction(buf, p, end, big):
    """Direction from an epb_flags / pack_flags option among the options at ``buf[p:end]``."""
    while end - p >= 4:
        code = load_u16(buf, p, big)
        length = load_u16(buf, p + 2, big)
        if code == 0:  # opt_endofopt
            break
        if code == 2 and length == 4 and end - p >= 8:
            inout = load_u32(buf, p + 4, big) & 3
            if inout == 1:
                return DIR_INGRESS
            if inout == 2:
                return DIR_EGRESS
            return DIR_UNKNOWN
        p += 4 + ((length + 3) & ~3)
    return DIR_UNKNOWN


@njit
def walk_pcapng_blocks(buf, start, end, big, max_caplen, n0, max_n, last_ts,
                       if_linktype, if_snaplen, if_units, if_binexp, if_offset_ns, if_first,
                       offset, caplen, origlen, ts_ns, linktype, ifindex, direction):
    """Fill the record arrays from ``n0`` with the packets of pcapng blocks at ``buf[start:end]``.

    Handles EPB, SPB and PB; skips other known and unknown block types;
    stops with STOP_BLOCK at an SHB or IDB (the caller parses it and calls
    again). ``if_*`` are the current section's interfaces, ``if_first`` the
    number its interface 0 gets (see ``CaptureFile``). ``last_ts`` is the
    previous packet's time (SPBs have none). Returns (records written, offset
    reached, STOP_*, last_ts).
    """
    p = start
    n = n0
    n_if = len(if_linktype)
    last_ts = np.uint64(last_ts)  # stays uint64: mixed with int64 numba would make it a float
    while n < max_n:
        if p == end:
            return n - n0, p, STOP_END, last_ts
        if end - p < 12:
            return n - n0, p, STOP_TRUNCATED, last_ts
        btype = load_u32(buf, p, big)
        if btype == PCAPNG_SHB:  # its lengths may be in another byte order: all Python's
            return n - n0, p, STOP_BLOCK, last_ts
        blen = load_u32(buf, p + 4, big)
        if blen < 12 or blen % 4 != 0 or blen > MAX_BLOCK:
            return n - n0, p, STOP_BAD_LENGTH, last_ts
        if blen > end - p:
            return n - n0, p, STOP_TRUNCATED, last_ts
        if load_u32(buf, p + blen - 4, big) != blen:
            return n - n0, p, STOP_BAD_LENGTH, last_ts
        if btype == PCAPNG_IDB:
            return n - n0, p, STOP_BLOCK, last_ts
        body_end = p + blen - 4
        if btype == PCAPNG_EPB or btype == PCAPNG_PB:
            if blen < 32:
                return n - n0, p, STOP_BAD_LENGTH, last_ts
            if btype == PCAPNG_EPB:
                iface = load_u32(buf, p + 8, big)
            else:
                iface = load_u16(buf, p + 8, big)
            incl = load_u32(buf, p + 20, big)
            data = p + 28
            if incl > max_caplen or incl > body_end - data:
                return n - n0, p, STOP_BAD_LENGTH, last_ts
            if iface >= n_if:
                return n - n0, p, STOP_BAD_INTERFACE, last_ts
            last_ts = pcapng_time_ns(load_u32(buf, p + 12, big), load_u32(buf, p + 16, big),
                                     if_units[iface], if_binexp[iface], if_offset_ns[iface])
            offset[n] = data
            caplen[n] = incl
            origlen[n] = load_u32(buf, p + 24, big)
            ts_ns[n] = last_ts
            linktype[n] = if_linktype[iface]
            ifindex[n] = if_first + iface
            direction[n] = packet_flags_direction(buf, data + ((incl + 3) & ~3), body_end, big)
            n += 1
        elif btype == PCAPNG_SPB:
            if blen < 16:
                return n - n0, p, STOP_BAD_LENGTH, last_ts
            if n_if == 0:
                return n - n0, p, STOP_BAD_INTERFACE, last_ts
            orig = load_u32(buf, p + 8, big)
            incl = min(orig, body_end - (p + 12))
            if if_snaplen[0] > 0:
                incl = min(incl, if_snaplen[0])
            if incl > max_caplen:
                return n - n0, p, STOP_BAD_LENGTH, last_ts
            offset[n] = p + 12
            caplen[n] = incl
            origlen[n] = orig
            ts_ns[n] = last_ts
            linktype[n] = if_linktype[0]
            ifindex[n] = if_first
            direction[n] = DIR_UNKNOWN
            n += 1
        p += blen
    return n - n0, p, STOP_FULL, last_ts


# --- readers -------------------------------------------------------------------------


@dataclass(slots=True)
class _Interface:
    linktype: int
    snaplen: int
    units: int = 1_000_000  # if_tsresol default: µs
    binary_exponent: int = -1  # >= 0: 2**binary_exponent units per second
    offset_ns: int = 0  # if_tsoffset (seconds) in ns


def _tsresol(value: int) -> tuple[int, int] | None:
    """(units per second, binary exponent or -1) for an if_tsresol octet; None if unusable.

    Bit 7 clear: units of 10**-value s; set: 2**-(value & 0x7f) s.
    """
    exponent = value & 0x7F
    if value & 0x80:
        return (1, exponent) if exponent < 64 else None
    if exponent > 18:  # 10**19 does not fit the kernel's int64
        return None
    return 10 ** exponent, -1


class CaptureFile:
    """An open capture file; iterate ``batches()`` to read its records.

    Attributes: ``path``, ``format`` ("pcap" or "pcapng"), ``size`` (octets
    when it was opened), ``buf`` (the octets read and not yet walked past,
    from file offset ``base``), ``packets_read``, ``bytes_read`` (file
    offset reached), ``error`` (one line, or None) and ``complete`` (True
    once the walk reached the end of the file without error).

    Interfaces (``RecordBatch.ifindex``, exported as ingressInterface or
    egressInterface by the record's direction): a classic pcap file has one,
    numbered 1. In a pcapng file the interface description blocks are
    numbered from 1 in file order, section after section: interface ID i of
    a section is i + 1 plus the interfaces of the sections before it, so one
    number always means one interface block of the file (sections of
    concatenated captures do not share numbers); it is Wireshark's
    ``frame.interface_id`` + 1.

    Reading: the file is read with ``readinto`` in blocks of ``block_octets``
    into a buffer the kernels walk (a record or block longer than that
    grows the buffer; MAX_BLOCK bounds it), never memory-mapped: a mapped
    file cut short by another process while it is read kills the reader
    with SIGBUS at the first page past the new end, which no Python handler
    can resume. A read that comes back short is that cut: what was read is
    metered, then ``error`` says "file shrank to N octets while being read".
    The copy from the page cache costs about what the page faults of a
    mapping did (README "Benchmarks"), and the resident size stays one
    buffer whatever the file's size.
    """

    def __init__(self, path: str | os.PathLike, data: bytes | None = None, *, block_octets: int = READ_BLOCK):
        """Open the file at ``path`` (or use ``data``, then ``path`` only names it)."""
        self.path = os.fspath(path)
        self.error: str | None = None
        self.complete = False
        self.packets_read = 0
        self.bytes_read = 0
        self.base = 0  # file offset of buf[0]
        self._done = False
        self._file = None
        self._block = max(64, int(block_octets))
        self._lent = False  # batches given out may still use buf: the next read goes to a new one
        self._shrunk: int | None = None  # the file's size when a read came back short
        self._read_error: str | None = None  # a read that failed (the walk ends there)
        if data is None:
            try:
                self._file = open(self.path, "rb", buffering=0)
                self.size = os.fstat(self._file.fileno()).st_size
            except OSError as e:
                self.close()
                raise CaptureError(f"{self.path}: cannot read: {e.strerror or e}") from e
            if self.size == 0:
                self.close()
                raise CaptureError(f"{self.path}: empty file")
            self.buf = np.empty(0, np.uint8)
            self._have = 0  # octets of buf read from the file
            try:
                self._load(0, PCAP_HEADER_LEN)
            except CaptureError:
                self.close()
                raise
        else:
            self.buf = np.frombuffer(bytes(data), dtype=np.uint8)  # read-only, like a file's batches
            self.size = self._have = len(self.buf)
            if self.size == 0:
                raise CaptureError(f"{self.path}: empty file")
        head = self.buf[:4].tobytes()
        try:
            if head in _PCAP_MAGICS:
                self.format = "pcap"
                self._open_pcap(*_PCAP_MAGICS[head])
            elif head == _PCAPNG_MAGIC:
                self.format = "pcapng"
                self._open_pcapng()
            else:
                raise CaptureError(f"{self.path}: not a pcap or pcapng file (magic {head.hex()})")
        except CaptureError:
            self.close()
            raise

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<memory>") -> CaptureFile:
        """A capture held in memory (tests, fuzzing, warm-up); ``name`` appears in messages."""
        return cls(name, data)

    # -- the buffer --

    def _loaded(self, p: int, n: int) -> bool:
        """Whether file octets ``[p, p + n)`` are in the buffer."""
        return self.base <= p and p + n <= self.base + self._have

    def _more(self) -> bool:
        """Whether the file holds octets past the buffer's (as far as it is known)."""
        return self._shrunk is None and self._read_error is None and self.base + self._have < self.size

    def _load(self, p: int, n: int) -> None:
        """Read the file from offset ``p`` into the buffer: at least ``n`` octets (fewer at the end of
        the file), as many as a block holds. What the buffer holds from ``p`` on is kept, not read
        again. A read that comes back short sets ``_shrunk``: the file was cut."""
        if self._file is None or not self._more():
            return
        want = min(max(n, self._block), self.size - p)
        keep = max(0, self.base + self._have - p) if p >= self.base else 0
        if self._lent or len(self.buf) < want or not self.buf.flags.writeable:
            fresh = np.empty(want, np.uint8)
            fresh[:keep] = self.buf[p - self.base:p - self.base + keep]
            self.buf = fresh
            self._lent = False
        elif keep:
            self.buf[:keep] = self.buf[p - self.base:p - self.base + keep].copy()
        self.base, self._have = p, keep
        view = memoryview(self.buf)
        while self._have < want:
            try:
                got = os.preadv(self._file.fileno(), [view[self._have:want]], p + self._have)
            except OSError as e:  # EIO, a file on a network share gone: what was read is metered
                self._read_error = f"{self.path}: cannot read at offset {p + self._have}: {e.strerror or e}"
                if p == 0:
                    raise CaptureError(self._read_error) from e
                break
            if not got:
                self._shrunk = os.fstat(self._file.fileno()).st_size
                break
            self._have += got

    def _unpack(self, fmt: str, p: int) -> tuple:
        """``struct.unpack_from`` at file offset ``p`` (in the buffer: the caller made sure)."""
        return struct.unpack_from(fmt, self.buf, p - self.base)

    def _octets(self, p: int, n: int) -> bytes:
        return self.buf[p - self.base:p - self.base + n].tobytes()

    # -- pcap --

    def _open_pcap(self, byte_order: str, nanosecond: bool) -> None:
        if self._have < PCAP_HEADER_LEN:
            raise CaptureError(f"{self.path}: pcap file header cut off: {self._have} octets, needs 24")
        major, minor, _zone, _sigfigs, snaplen, network = self._unpack(byte_order + "HHiIII", 4)
        if not ((major == 2 and minor <= 4) or (major, minor) == (543, 0)):
            raise CaptureError(f"{self.path}: unsupported pcap version {major}.{minor} "
                               "(libpcap reads 2.0 to 2.4)")
        self._order = byte_order
        self._big = byte_order == ">"
        self._frac_ns = 1 if nanosecond else 1000
        self.nanosecond = nanosecond
        self.snaplen = snaplen
        self.linktype = network & 0xFFFF  # upper bits: FCS length flags (pcap-linktype(7))
        self.bytes_read = PCAP_HEADER_LEN

    def _pcap_need(self, p: int) -> int:
        """Octets the record at ``p`` takes, as far as the buffer tells."""
        if not self._loaded(p, PCAP_RECORD_LEN):
            return PCAP_RECORD_LEN
        return PCAP_RECORD_LEN + self._unpack(self._order + "I", p + 8)[0]

    def _fill_pcap(self, cols: Columns, capacity: int) -> int:
        while True:
            n, at, stop = walk_pcap_records(  # read-only, as the warm-up compiled it (decode.warm_up)
                read_only(self.buf), self.bytes_read - self.base, self._have, self._big, self._frac_ns, MAX_CAPLEN, 0,
                capacity, cols.offset, cols.caplen, cols.origlen, cols.ts_ns)
            self.bytes_read = self.base + int(at)
            cols.linktype[:n] = self.linktype
            cols.ifindex[:n] = 1  # the file's one interface
            cols.direction[:n] = DIR_UNKNOWN
            if stop in (STOP_END, STOP_TRUNCATED) and self._more():  # the file goes on past the buffer
                if n:
                    return n  # the batch uses the buffer: it goes out before the next read
                self._load(self.bytes_read, self._pcap_need(self.bytes_read))
                continue
            if stop != STOP_FULL:
                self._finish(stop, self.packets_read + n)
            return n

    # -- pcapng --

    def _open_pcapng(self) -> None:
        self.linktype = None
        self.snaplen = None
        self._interfaces: list[_Interface] = []
        self._if_first = 1  # the interface number of the current section's interface 0
        self._last_ts = np.uint64(0)
        cause = self._read_shb(0)
        if cause:
            raise CaptureError(f"{self.path}: {cause}")
        self._tables = self._interface_tables()

    def _block_need(self, p: int) -> int:
        """Octets the pcapng block at ``p`` takes, as far as the buffer tells (an SHB's length
        is in the byte order its own byte-order magic says)."""
        if not self._loaded(p, 12):
            return 12
        order = self._order
        if self._octets(p, 4) == _PCAPNG_MAGIC:
            order = {bytes.fromhex("4d3c2b1a"): "<", bytes.fromhex("1a2b3c4d"): ">"}.get(self._octets(p + 8, 4))
            if order is None:
                return MIN_SHB_LEN
        return max(12, min(self._unpack(order + "I", p + 4)[0], MAX_BLOCK))

    def _read_shb(self, p: int) -> str | None:
        """Parse the Section Header Block at ``p``; return an error cause or None."""
        if not self._loaded(p, MIN_SHB_LEN):
            self._load(p, MIN_SHB_LEN)
        left = self.size - p if self._shrunk is None else self.base + self._have - p
        if left < MIN_SHB_LEN:
            return f"pcapng section header at offset {p} cut off: {left} octets, needs {MIN_SHB_LEN}"
        bom = self._octets(p + 8, 4)
        if bom == bytes.fromhex("4d3c2b1a"):
            order = "<"
        elif bom == bytes.fromhex("1a2b3c4d"):
            order = ">"
        else:
            return f"pcapng section header at offset {p}: bad byte-order magic {bom.hex()}"
        length = self._unpack(order + "I", p + 4)[0]
        major, minor = self._unpack(order + "HH", p + 12)
        if major != 1:
            return f"pcapng section header at offset {p}: unsupported version {major}.{minor}"
        if length < MIN_SHB_LEN or length % 4 or length > MAX_BLOCK:
            return f"pcapng section header at offset {p}: bad block length {length}"
        if not self._loaded(p, length) and length <= left:
            self._load(p, length)
            left = min(left, self.base + self._have - p)
        if length > left:
            return (f"pcapng section header at offset {p} cut off: {left} octets left, "
                    f"block needs {length}")
        if self._unpack(order + "I", p + length - 4)[0] != length:
            return f"pcapng section header at offset {p}: trailing block length differs from {length}"
        self._order = order
        self._big = order == ">"
        self._if_first += len(self._interfaces)  # a new section numbers its interfaces after the last's
        self._interfaces = []
        self.bytes_read = p + length
        return None

    def _read_idb(self, p: int) -> str | None:
        """Parse the Interface Description Block at ``p`` (in the buffer: the kernel checked its
        lengths there); return an error cause or None."""
        o = self._order
        length = self._unpack(o + "I", p + 4)[0]
        if length < 20:
            return f"bad interface description block at offset {p}: block length {length}"
        linktype, _reserved, snaplen = self._unpack(o + "HHI", p + 8)
        iface = _Interface(linktype, snaplen)
        q, end = p + 16, p + length - 4
        while end - q >= 4:
            code, olen = self._unpack(o + "HH", q)
            if code == 0 or olen > end - q - 4:
                break
            if code == 9 and olen >= 1:  # if_tsresol
                value = int(self.buf[q + 4 - self.base])
                resolution = _tsresol(value)
                if resolution is None:
                    return f"interface {len(self._interfaces)} (offset {p}): unusable if_tsresol {value:#x}"
                iface.units, iface.binary_exponent = resolution
            elif code == 14 and olen == 8:  # if_tsoffset, seconds
                iface.offset_ns = self._unpack(o + "q", q + 4)[0] * NS_PER_S
            q += 4 + ((olen + 3) & ~3)
        self._interfaces.append(iface)
        if self.linktype is None:
            self.linktype, self.snaplen = linktype, snaplen
        self.bytes_read = p + length
        return None

    def _interface_tables(self) -> tuple:
        ifs = self._interfaces
        return (np.array([i.linktype for i in ifs], np.uint16), np.array([i.snaplen for i in ifs], np.int64),
                np.array([i.units for i in ifs], np.int64), np.array([i.binary_exponent for i in ifs], np.int64),
                np.array([i.offset_ns % (1 << 64) for i in ifs], np.uint64), self._if_first)

    def _fill_pcapng(self, cols: Columns, capacity: int) -> int:
        n = 0
        while True:
            k, at, stop, self._last_ts = walk_pcapng_blocks(
                read_only(self.buf), self.bytes_read - self.base, self._have, self._big, MAX_CAPLEN, n, capacity,
                np.uint64(self._last_ts), *self._tables, cols.offset, cols.caplen, cols.origlen, cols.ts_ns,
                cols.linktype, cols.ifindex, cols.direction)
            self.bytes_read = self.base + int(at)
            n += k
            p = self.bytes_read
            if stop in (STOP_END, STOP_TRUNCATED) and self._more():  # the file goes on past the buffer
                if n:
                    return n  # the batch uses the buffer: it goes out before the next read
                self._load(p, self._block_need(p))
                continue
            if stop != STOP_BLOCK:
                break
            is_shb = self._octets(p, 4) == _PCAPNG_MAGIC
            if is_shb and n and not self._loaded(p, self._block_need(p)) and self._more():
                return n  # reading the section header would reuse the buffer the batch uses
            cause = self._read_shb(p) if is_shb else self._read_idb(p)
            if cause:
                if not self._more() and not self._loaded(p, self._block_need(p)) and (
                        self._shrunk is not None or self._read_error is not None):
                    self._finish(STOP_TRUNCATED, self.packets_read + n)
                else:
                    self._fail(f"{self.path}: {cause} (packet {self.packets_read + n + 1})")
                return n
            self._tables = self._interface_tables()
        if stop != STOP_FULL:
            self._finish(stop, self.packets_read + n)
        return n

    # -- common --

    def _finish(self, stop: int, packets_before: int) -> None:
        """Record why the walk ended at ``self.bytes_read``."""
        self._done = True
        p = self.bytes_read
        if self._read_error is not None and stop != STOP_BAD_LENGTH and stop != STOP_BAD_INTERFACE:
            self._fail(self._read_error)
            return
        if self._shrunk is not None and stop != STOP_BAD_LENGTH and stop != STOP_BAD_INTERFACE:
            self._fail(f"{self.path}: file shrank to {self._shrunk} octets while being read; "
                       f"stopped at frame {packets_before + 1} (offset {p})")
            return
        if stop == STOP_END:
            self.complete = True
            return
        left = self.size - p
        where = f"at offset {p} (packet {packets_before + 1})"
        unit = "record" if self.format == "pcap" else "block"
        header_len = PCAP_RECORD_LEN if self.format == "pcap" else 12
        o = self._order
        if left < header_len:
            cause = f"truncated {unit} header {where}: {left} octets left, {unit} header needs {header_len}"
        elif self.format == "pcap":
            incl = self._unpack(o + "I", p + 8)[0]
            if stop == STOP_TRUNCATED:
                cause = f"truncated record {where}: {left} octets left, record needs {PCAP_RECORD_LEN + incl}"
            else:
                cause = f"bad record {where}: caplen {incl} exceeds {MAX_CAPLEN}"
        else:
            btype, blen = self._unpack(o + "II", p)
            if stop == STOP_TRUNCATED:
                cause = f"truncated block {where}: {left} octets left, block needs {blen}"
            elif stop == STOP_BAD_INTERFACE:
                cause = (f"bad block {where}: packet of an undefined interface "
                         f"({len(self._interfaces)} defined in this section)")
            elif blen > MAX_BLOCK:
                cause = f"bad block {where}: type {btype:#x}, block length {blen} exceeds {MAX_BLOCK}"
            else:
                cause = f"bad block {where}: type {btype:#x}, inconsistent lengths (block length {blen})"
        self._fail(f"{self.path}: {cause}")

    def _fail(self, message: str) -> None:
        self._done = True
        self.complete = False
        self.error = message

    def batches(self, max_packets: int = DEFAULT_BATCH, *, reuse: bool = False) -> Iterator[RecordBatch]:
        """Yield the records as ``RecordBatch``es of at most ``max_packets``.

        Continues where a previous call stopped; ends at the end of the file
        or at the first damaged record (then ``error`` is set). With
        ``reuse=True`` every batch is a view of the same arrays (record
        columns and read buffer), valid until the next one is yielded: no
        allocation, hence no page faults, per batch (about a third of the
        walk's time with 64k-record batches), for a caller that is done with
        a batch before it asks for the next.
        """
        if max_packets < 1:
            raise ValueError(f"max_packets must be at least 1, not {max_packets}")
        fill = self._fill_pcap if self.format == "pcap" else self._fill_pcapng
        cols: Columns | None = None
        while not self._done:
            # every record takes at least 16 octets: no bigger arrays than the file can fill
            capacity = int(min(max_packets, (self.size - self.bytes_read) // 16 + 1))
            if cols is None or not reuse or len(cols.offset) < capacity:
                cols = Columns(capacity)
            n = fill(cols, capacity)
            first = self.packets_read
            self.packets_read += n
            if n:
                self._lent = not reuse
                yield cols.batch(read_only(self.buf), n, first)

    def close(self) -> None:
        """Stop reading and close the file (batches still in use keep their buffer)."""
        self._done = True
        self.buf = np.empty(0, np.uint8)
        self._have = 0
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> CaptureFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_capture(path: str | os.PathLike, block_octets: int = READ_BLOCK) -> CaptureFile:
    """Open a pcap (µs or ns, either byte order) or pcapng file; raise ``CaptureError`` if unusable."""
    return CaptureFile(path, block_octets=block_octets)
