"""What a capture process reads: a source named in the profile's ``Sources`` list.

==================  =========================================================
``pcap:PATH``       a pcap or pcapng file, read once (``flowmeter.pcapfile``)
``afpacket:IFACE``  live frames of an interface through a memory-mapped
                    AF_PACKET ring (``flowmeter.afpacket``)
``nflog:GROUP``     frames the firewall logs to netfilter log group GROUP
                    (``flowmeter.nflog``)
``feed:ENDPOINT``   frames an overlay agent hands over ZeroMQ + msgpack
                    (``flowmeter.feed``)
==================  =========================================================

A live source is an object with this shape; each capture process holds one,
opened before the process gives up root, read after::

    name: str                       # "afpacket:eth0", for logs and stats
    fileno() -> int                 # readable when something arrived
    read(timeout_s) -> Iterator     # what arrived, waiting at most timeout_s for the first
    counters() -> dict[str, int]    # the source's own counts: kernel packets and drops, ...
    close() -> None

``read`` yields ``RecordBatch`` objects (frames still to decode, valid only
until the next one is asked for: a ring's frames go back to the kernel) or
``PACKET_DTYPE`` arrays (rows already decoded, all valid), and returns when
nothing more is waiting.
"""
from __future__ import annotations

from dataclasses import dataclass

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


class SourceError(OSError):
    """A source that cannot be opened; the message is one line naming it and the cause."""


# Opened by the supervisor before it gives up root (the socket needs privileges); a feed is
# opened by its own capture process instead (a ZeroMQ socket must not cross a fork).
OPENED_BEFORE_FORK = ("afpacket", "nflog")


def open_source(spec: SourceSpec, profile, fanout_group: int | None = None, log=None):
    """The live source for ``spec`` with the profile's capture settings; ``SourceError`` if it cannot be opened."""
    try:
        if spec.kind == "afpacket":
            from .afpacket import AfPacketSource

            return AfPacketSource(spec.target, fanout_group=fanout_group, snaplen=profile.snap_length,
                                  bpf_filter=profile.capture_filter or None)
        if spec.kind == "nflog":
            from .nflog import NflogSource

            return NflogSource(int(spec.target), copy_range=profile.snap_length)
        if spec.kind == "feed":
            from .feed import FeedSource

            return FeedSource(spec.target, drop_reasons=profile.drop_prefixes, log=log)
    except OSError as exc:
        message = exc.strerror if exc.strerror and not str(exc).startswith(str(spec)) else str(exc)
        raise SourceError(message if message.startswith(str(spec)) else f"{spec}: {message}") from None
    raise SourceError(f"{spec}: not a live source")
