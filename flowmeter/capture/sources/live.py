"""Opening a live source by its ``Sources`` entry: ``afpacket``, ``nflog`` or ``feed``.

The supervisor opens ``afpacket`` and ``nflog`` sources itself, before it
gives up root and forks (their sockets need privileges, and a fanout group
must be joined by every member); a feed's ZeroMQ socket must not cross a
fork, so its capture process opens it (``CaptureHandover.open_source``).
"""
from __future__ import annotations

from flowmeter.capture.sources import Source, SourceError, SourceSpec
from flowmeter.capture.sources.afpacket import AfPacketSource
from flowmeter.capture.sources.feed import FeedSecurity, FeedSource
from flowmeter.capture.sources.nflog import NflogSource

# Opened by the supervisor before it gives up root (the socket needs privileges); a feed is
# opened by its own capture process instead (a ZeroMQ socket must not cross a fork).
OPENED_BEFORE_FORK = ("afpacket", "nflog")


def open_source(spec: SourceSpec, profile, fanout_group: int | None = None) -> Source:
    """The live source for ``spec`` with the profile's capture settings; ``SourceError`` if it cannot be opened."""
    try:
        if spec.kind == "afpacket":
            return AfPacketSource(spec.target, fanout_group=fanout_group, snaplen=profile.snap_length,
                                  bpf_filter=profile.capture_filter or None)
        if spec.kind == "nflog":
            return NflogSource(int(spec.target), copy_range=profile.snap_length)
        if spec.kind == "feed":
            return FeedSource(spec.target, drop_reasons=profile.drop_prefixes, security=FeedSecurity.of(profile),
                              max_skew_ns=round(profile.feed_clock_skew_s * 1e9))
    except OSError as exc:
        message = exc.strerror if exc.strerror and not str(exc).startswith(str(spec)) else str(exc)
        raise SourceError(message if message.startswith(str(spec)) else f"{spec}: {message}") from None
    raise SourceError(f"{spec}: not a live source")
