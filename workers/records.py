"""Finished flow records: what a flow table emits, and their conversion to template batches.

A flow table emits ``FLOW_RECORD_DTYPE`` rows: the flow key, the counters
of one reporting interval (deltas), its first/last packet times and why it
ended. ``to_template_batches`` sorts them into the exporter's eight flow
templates (IPv4/IPv6 x TCP, UDP, ICMP, other) in one kernel pass; the
result is what a worker sends to the exporter. Both interfaces are filled
(ingressInterface, egressInterface; 0 = not known, ``flowmeter.ipc.packets``).
An ICMP flow whose type is not known (``sport == ICMP_NO_TYPE``) is
exported in the "other" template of its family, which has no
icmpTypeCode: claiming type 0 would make it an echo reply.
"""
from __future__ import annotations

import numpy as np
import numpy.typing as npt
from flowmeter.jit import njit

from exporter.template import FLOW_CLASS, FLOW_CLASSES, FLOW_DTYPES, flow_template_name
from flowmeter.ipc.counters import END_REASONS
from flowmeter.ipc.packets import FORWARDED, FWD_FORWARDED_UNKNOWN, ICMP_NO_TYPE

FLOW_RECORD_DTYPE = np.dtype([
    ("first_ns", "<u8"), ("last_ns", "<u8"),
    ("packets", "<u8"), ("bytes", "<u8"),
    ("src_hi", "<u8"), ("src_lo", "<u8"),
    ("dst_hi", "<u8"), ("dst_lo", "<u8"),
    ("ingress_if", "<u4"), ("egress_if", "<u4"),
    ("sport", "<u2"), ("dport", "<u2"),
    ("icmp", "<u2"),
    ("ip_version", "u1"), ("proto", "u1"),
    ("tcp_flags", "u1"), ("tos", "u1"),
    ("direction", "u1"), ("fwd_status", "u1"),
    ("end_reason", "u1"),
])

# flowEndReason (IANA, RFC 7012 §5.11.2 / IE 136)
END_IDLE = 1
END_ACTIVE = 2
END_OF_FLOW = 3
END_FORCED = 4
END_LACK_OF_RESOURCES = 5
REASON_NAMES = dict(zip((END_IDLE, END_ACTIVE, END_OF_FLOW, END_FORCED, END_LACK_OF_RESOURCES), END_REASONS))


def to_template_batches(records: npt.NDArray) -> list[tuple[str, npt.NDArray]]:
    """``[(template name, host-order template records), ...]`` for ``FLOW_RECORD_DTYPE`` rows.

    One kernel call: it counts the records of each template, then writes
    every record's fields at their offsets in its template's run of one
    output buffer (each template's records in their order here); the runs
    are returned as views of that buffer. A stable sort and a per-template
    copy, or numpy column by column, cost several times as much for the
    few-thousand-record batches a worker emits.
    """
    if len(records) == 0:
        return []
    buf, start = _split(np.ascontiguousarray(records), _CLASS_OF, _ICMP_CLASS, _UNTYPED_CLASS, _ITEMSIZE, _OFFSETS)
    out = []
    for key, name in enumerate(_NAMES):
        a, b = int(start[key]), int(start[key + 1])
        if a != b:
            out.append((name, buf[a:b].view(FLOW_DTYPES[name])))
    return out


# Templates in the order of their runs in the output: IPv4 classes, then IPv6.
_NAMES = tuple(flow_template_name(family, klass) for family in (4, 6) for klass in FLOW_CLASSES)
_CLASS_OF = np.empty((2, 256), np.uint8)  # [IPv6?, protocol] -> index in _NAMES
for _row, _family in enumerate((4, 6)):
    for _proto in range(256):
        _CLASS_OF[_row, _proto] = _NAMES.index(flow_template_name(_family, FLOW_CLASS[_family].get(_proto, "other")))
# An ICMP flow whose type is unknown (sport ICMP_NO_TYPE: later fragments whose first was not
# seen, flowmeter.capture.decode) goes to its family's "other" template: no icmpTypeCode at all.
_ICMP_CLASS = np.array([_NAMES.index(flow_template_name(f, "icmp")) for f in (4, 6)], np.uint8)
_UNTYPED_CLASS = np.array([_NAMES.index(flow_template_name(f, "other")) for f in (4, 6)], np.uint8)
_ITEMSIZE = np.array([FLOW_DTYPES[n].itemsize for n in _NAMES], np.int64)

# Where each source value goes in a template's host-order record: octet offset, -1 if absent.
# Every value has one size wherever it is present, so the kernel writes it with a fixed-size store.
_SOURCES = (("flowStartMilliseconds", 8), ("flowEndMilliseconds", 8), ("octetDeltaCount", 8),
            ("packetDeltaCount", 8), ("sourceIPv4Address", 4), ("destinationIPv4Address", 4),
            ("sourceIPv6Address", 16), ("destinationIPv6Address", 16), ("sourceTransportPort", 2),
            ("destinationTransportPort", 2), ("tcpControlBits", 1), ("icmpTypeCode", 2),
            ("protocolIdentifier", 1), ("ipClassOfService", 1), ("flowDirection", 1), ("flowEndReason", 1),
            ("forwardingStatus", 1), ("ingressInterface", 4), ("egressInterface", 4))
(_START, _END, _OCTETS, _PACKETS, _SRC4, _DST4, _SRC6, _DST6, _SPORT, _DPORT, _FLAGS, _ICMP, _PROTO, _TOS, _DIR,
 _REASON, _FWD, _INGRESS, _EGRESS) = range(len(_SOURCES))


def _offsets() -> npt.NDArray[np.int64]:
    offsets = np.full((len(_NAMES), len(_SOURCES)), -1, np.int64)
    for c, name in enumerate(_NAMES):
        dtype = FLOW_DTYPES[name]
        for k, (field, size) in enumerate(_SOURCES):
            names = ("icmpTypeCodeIPv4", "icmpTypeCodeIPv6") if field == "icmpTypeCode" else (field,)
            for n in names:
                if n in dtype.names:
                    if dtype.fields[n][0].itemsize != size:
                        raise AssertionError(f"{name}.{n}: {dtype.fields[n][0].itemsize} octets, not {size}")
                    offsets[c, k] = dtype.fields[n][1]
    return offsets


_OFFSETS = _offsets()


@njit(inline="always")
def _put(out, at, size, value):
    """``size`` (a constant) octets of ``value`` at ``out[at:]``, least significant first (host order, x86)."""
    for k in range(size):
        out[at + k] = (value >> np.uint64(8 * k)) & np.uint64(0xFF)


@njit(inline="always")
def _put_v6(out, at, hi, lo):
    """A 128-bit address as 16 octets in network order (the ``V16`` field of the host dtype)."""
    for k in range(8):
        out[at + k] = (hi >> np.uint64(56 - 8 * k)) & np.uint64(0xFF)
        out[at + 8 + k] = (lo >> np.uint64(56 - 8 * k)) & np.uint64(0xFF)


@njit
def _split(records, class_of, icmp_class, untyped_class, itemsize, offsets):
    """The template records of ``records`` in one buffer: ``(octets, run start per template + end)``."""
    n = records.shape[0]
    klass = np.empty(n, np.uint8)
    counts = np.zeros(itemsize.shape[0], np.int64)
    for j in range(n):
        v6 = 1 if records[j].ip_version == 6 else 0
        c = class_of[v6, records[j].proto]
        if c == icmp_class[v6] and records[j].sport == ICMP_NO_TYPE:
            c = untyped_class[v6]
        klass[j] = c
        counts[c] += 1
    start = np.zeros(itemsize.shape[0] + 1, np.int64)
    for c in range(itemsize.shape[0]):
        start[c + 1] = start[c] + counts[c] * itemsize[c]
    out = np.empty(start[-1], np.uint8)
    pos = start[:-1].copy()
    for j in range(n):
        c = klass[j]
        at = pos[c]
        pos[c] += itemsize[c]
        o = offsets[c]
        r = records[j]
        _put(out, at + o[_START], 8, r.first_ns // np.uint64(1_000_000))
        _put(out, at + o[_END], 8, r.last_ns // np.uint64(1_000_000))
        _put(out, at + o[_OCTETS], 8, r.bytes)
        _put(out, at + o[_PACKETS], 8, r.packets)
        if o[_SRC4] >= 0:
            _put(out, at + o[_SRC4], 4, r.src_lo)
            _put(out, at + o[_DST4], 4, r.dst_lo)
        else:
            _put_v6(out, at + o[_SRC6], r.src_hi, r.src_lo)
            _put_v6(out, at + o[_DST6], r.dst_hi, r.dst_lo)
        if o[_SPORT] >= 0:
            _put(out, at + o[_SPORT], 2, np.uint64(r.sport))
            _put(out, at + o[_DPORT], 2, np.uint64(r.dport))
        if o[_FLAGS] >= 0:
            out[at + o[_FLAGS]] = r.tcp_flags
        if o[_ICMP] >= 0:
            _put(out, at + o[_ICMP], 2, np.uint64(r.icmp))
        out[at + o[_PROTO]] = r.proto
        out[at + o[_TOS]] = r.tos
        out[at + o[_DIR]] = r.direction
        out[at + o[_REASON]] = r.end_reason
        out[at + o[_FWD]] = r.fwd_status if r.fwd_status != FORWARDED else FWD_FORWARDED_UNKNOWN
        _put(out, at + o[_INGRESS], 4, np.uint64(r.ingress_if))
        _put(out, at + o[_EGRESS], 4, np.uint64(r.egress_if))
    return out, start
