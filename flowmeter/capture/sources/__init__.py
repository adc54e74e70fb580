"""What a capture process reads: a source named in the profile's ``Sources`` list, and the base types.

==================  =========================================================
``pcap:PATH``       a pcap or pcapng file, read once (``pcapfile``)
``afpacket:IFACE``  live frames of an interface through a memory-mapped
                    AF_PACKET ring (``afpacket``)
``nflog:GROUP``     frames the firewall logs to netfilter log group GROUP
                    (``nflog``)
``feed:ENDPOINT``   frames an overlay agent hands over ZeroMQ + msgpack
                    (``feed``; its message rules ``feedmessage``, an example
                    agent ``feedclient``)
==================  =========================================================

This module holds what every source shares and nothing that compiles: the
parsed ``Sources`` entry (``SourceSpec``, which the profile checks),
``RecordBatch`` (frames still to decode, one array per record attribute),
the ``Columns`` a reader's kernel fills, ``SourceError``, and the ``Source``
protocol of a live source: each capture process holds one, opened before
the process gives up root (a feed: by the process itself), read after.
``Source.read`` yields ``RecordBatch`` objects (valid only until the next
one is asked for: a ring's frames go back to the kernel) or
``PACKET_DTYPE`` arrays (rows already decoded, all valid), and returns when
nothing more is waiting.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from flowmeter.ipc.lifecycle import FatalStageError

KINDS = ("pcap", "afpacket", "nflog", "feed")
FORMS = "pcap:PATH, afpacket:IFACE, nflog:GROUP or feed:ENDPOINT"


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """One entry of ``Sources``, parsed: its kind and what follows the colon."""

    kind: str
    target: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}"

    @property
    def live(self) -> bool:
        return self.kind != "pcap"


@dataclass(frozen=True, slots=True, eq=False)
class RecordBatch:
    """Consecutive records of one source (a capture file, a ring), one array per attribute.

    Record *i* is ``buf[offset[i] : offset[i] + caplen[i]]``, captured at
    ``ts_ns[i]`` (ns since the UNIX epoch) from a frame of ``origlen[i]``
    octets on link type ``linktype[i]``; ``ifindex`` is the interface it
    was captured on (the AF_PACKET interface's kernel index, the pcapng
    interface's number, 1 for classic pcap, the feed's peer; 0 unknown) and
    ``direction`` the side it crossed that interface: DIR_INGRESS received,
    DIR_EGRESS sent (AF_PACKET packet type, pcapng packet flags), else
    DIR_UNKNOWN. The decoder exports ``ifindex`` as ingressInterface or
    egressInterface by that side (ingress when unknown), unless the link
    header names the interfaces itself (SLL2, NFLOG). ``first_packet`` is
    the file-wide index of record 0.
    """
    buf: npt.NDArray[np.uint8]
    offset: npt.NDArray[np.uint64]
    caplen: npt.NDArray[np.uint32]
    origlen: npt.NDArray[np.uint32]
    ts_ns: npt.NDArray[np.uint64]
    linktype: npt.NDArray[np.uint16]
    ifindex: npt.NDArray[np.uint32]
    direction: npt.NDArray[np.uint8]
    first_packet: int = 0

    def __len__(self) -> int:
        return len(self.offset)

    def frame(self, i: int) -> bytes:
        """The captured octets of record ``i`` (a copy; for tests and debugging)."""
        start = int(self.offset[i])
        return self.buf[start:start + int(self.caplen[i])].tobytes()


def read_only(buf: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """A read-only view of a live source's buffer for its batches.

    The batches of every source then have the type of a capture file's
    (read-only memory), so the decode kernel version loaded before the fork
    serves them all: a process that gave up root cannot write numba's cache
    to compile another.
    """
    view = buf.view()
    view.flags.writeable = False
    return view


class Columns:
    """Preallocated record arrays of a source's batches (its readers' kernels fill them)."""

    def __init__(self, capacity: int):
        self.offset = np.empty(capacity, np.uint64)
        self.caplen = np.empty(capacity, np.uint32)
        self.origlen = np.empty(capacity, np.uint32)
        self.ts_ns = np.empty(capacity, np.uint64)
        self.linktype = np.empty(capacity, np.uint16)
        self.ifindex = np.empty(capacity, np.uint32)
        self.direction = np.empty(capacity, np.uint8)

    def batch(self, buf: np.ndarray, n: int, first_packet: int) -> RecordBatch:
        return RecordBatch(buf, self.offset[:n], self.caplen[:n], self.origlen[:n], self.ts_ns[:n],
                           self.linktype[:n], self.ifindex[:n], self.direction[:n], first_packet)


class Source(Protocol):
    """A live source (see the module notes)."""

    name: str  # "afpacket:eth0", for logs and stats

    def fileno(self) -> int:
        """Readable when something arrived."""

    def read(self, timeout_s: float) -> Iterator[RecordBatch | npt.NDArray]:
        """What arrived, waiting at most ``timeout_s`` for the first."""

    def counters(self) -> dict[str, int]:
        """The source's own counts: kernel packets and drops, frames lost, messages dropped by cause."""

    def close(self) -> None:
        """Give the socket back; safe to call twice."""


class SourceError(OSError, FatalStageError):
    """A source that cannot be opened or read on; the message is one line naming it and the cause."""
