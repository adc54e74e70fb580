"""Finished flow records: what a flow table emits, and their conversion to template batches.

A flow table emits ``FLOW_RECORD_DTYPE`` rows: the flow key, the counters
of one reporting interval (deltas), its first/last packet times and why it
ended. ``to_template_batches`` sorts them into the exporter's eight flow
templates (IPv4/IPv6 x TCP, UDP, ICMP, other) with one vectorised copy per
column; the result is what a worker sends to the exporter.
"""
from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numba import literal_unroll

from flowmeter.jit import njit

from exporter.template import FLOW_CLASS, FLOW_CLASSES, FLOW_DTYPES, flow_template_name
from flowmeter.packets import FORWARDED, FWD_FORWARDED_UNKNOWN

FLOW_RECORD_DTYPE = np.dtype([
    ("first_ns", "<u8"), ("last_ns", "<u8"),
    ("packets", "<u8"), ("bytes", "<u8"),
    ("src_hi", "<u8"), ("src_lo", "<u8"),
    ("dst_hi", "<u8"), ("dst_lo", "<u8"),
    ("ifindex", "<u4"),
    ("sport", "<u2"), ("dport", "<u2"),
    ("icmp", "<u2"),
    ("ip_version", "u1"), ("proto", "u1"),
    ("tcp_flags", "u1"), ("tos", "u1"),
    ("direction", "u1"), ("fwd_status", "u1"),
    ("end_reason", "u1"),
])

_FIELD_RANGE = tuple(range(18))

# flowEndReason (IANA, RFC 7012 §5.11.2 / IE 136)
END_IDLE = 1
END_ACTIVE = 2
END_OF_FLOW = 3
END_FORCED = 4
END_LACK_OF_RESOURCES = 5

# protocol number -> class index in FLOW_CLASSES, per family
_CLASS_LUT = {}
for _family in (4, 6):
    lut = np.full(256, FLOW_CLASSES.index("other"), dtype=np.uint8)
    for _proto, _klass in FLOW_CLASS[_family].items():
        lut[_proto] = FLOW_CLASSES.index(_klass)
    _CLASS_LUT[_family] = lut


def _v6(hi: npt.NDArray, lo: npt.NDArray) -> npt.NDArray:
    """128-bit addresses from two 64-bit halves, as 16 network-order octets (``V16``)."""
    out = np.empty((len(hi), 2), dtype=">u8")
    out[:, 0] = hi
    out[:, 1] = lo
    return out.view("V16").reshape(-1)


def to_template_batches(records: npt.NDArray) -> list[tuple[str, npt.NDArray]]:
    """``[(template name, host-order template records), ...]`` for ``FLOW_RECORD_DTYPE`` rows.

    One stable sort by template (a radix sort of one octet) puts each
    template's records in one run; a kernel then writes every field of a
    run's records at its offset in the template's dtype. Copying column by
    column with numpy cost about 350 ns a record for the few-thousand-record
    batches a worker emits, several times the kernel's.
    """
    out = []
    if len(records) == 0:
        return out
    records = np.ascontiguousarray(records)
    klass = _CLASS_LUT[4][records["proto"]]
    six = records["ip_version"] == 6
    klass[six] = _CLASS_LUT[6][records["proto"][six]] + len(FLOW_CLASSES)
    order = np.argsort(klass, kind="stable")
    bounds = np.searchsorted(klass[order], np.arange(2 * len(FLOW_CLASSES) + 1))
    for key in range(2 * len(FLOW_CLASSES)):
        a, b = int(bounds[key]), int(bounds[key + 1])
        if a == b:
            continue
        name = flow_template_name((4, 6)[key // len(FLOW_CLASSES)], FLOW_CLASSES[key % len(FLOW_CLASSES)])
        t = np.empty(b - a, dtype=FLOW_DTYPES[name])
        _fill_template(records, order[a:b], t.view(np.uint8).reshape(b - a, t.itemsize), _LAYOUT[name])
        out.append((name, t))
    return out


# Where each source value goes in a template's host-order record: octet offset, -1 if absent.
_SOURCES = ("flowStartMilliseconds", "flowEndMilliseconds", "octetDeltaCount", "packetDeltaCount",
            "sourceIPv4Address", "destinationIPv4Address", "sourceIPv6Address", "destinationIPv6Address",
            "sourceTransportPort", "destinationTransportPort", "tcpControlBits", "icmpTypeCode",
            "protocolIdentifier", "ipClassOfService", "flowDirection", "flowEndReason", "forwardingStatus",
            "ingressInterface")


def _layout(dtype: np.dtype) -> npt.NDArray[np.int64]:
    offsets = np.full((len(_SOURCES), 2), -1, np.int64)  # (offset, size)
    for k, field in enumerate(_SOURCES):
        names = ("icmpTypeCodeIPv4", "icmpTypeCodeIPv6") if field == "icmpTypeCode" else (field,)
        for n in names:
            if n in dtype.names:
                offsets[k] = dtype.fields[n][1], dtype.fields[n][0].itemsize
    return offsets


_LAYOUT = {name: _layout(dtype) for name, dtype in FLOW_DTYPES.items()}


@njit(inline="always")
def _put(out, j, at, size, value):
    """``size`` octets of ``value`` at ``out[j, at:]``, least significant first (host order, x86)."""
    for k in range(size):
        out[j, at + k] = (value >> np.uint64(8 * k)) & np.uint64(0xFF)


@njit(inline="always")
def _put_v6(out, j, at, hi, lo):
    """A 128-bit address as 16 octets in network order (the ``V16`` field of the host dtype)."""
    for k in range(8):
        out[j, at + k] = (hi >> np.uint64(56 - 8 * k)) & np.uint64(0xFF)
        out[j, at + 8 + k] = (lo >> np.uint64(56 - 8 * k)) & np.uint64(0xFF)


@njit
def _fill_template(records, index, out, layout):
    for j in range(index.shape[0]):
        r = records[index[j]]
        fwd = np.uint64(r.fwd_status) if r.fwd_status != FORWARDED else np.uint64(FWD_FORWARDED_UNKNOWN)
        values = (r.first_ns // np.uint64(1_000_000), r.last_ns // np.uint64(1_000_000), r.bytes, r.packets,
                  r.src_lo, r.dst_lo, np.uint64(0), np.uint64(0), np.uint64(r.sport), np.uint64(r.dport),
                  np.uint64(r.tcp_flags), np.uint64(r.icmp), np.uint64(r.proto), np.uint64(r.tos),
                  np.uint64(r.direction), np.uint64(r.end_reason), fwd, np.uint64(r.ifindex))
        for k in literal_unroll(_FIELD_RANGE):
            at = layout[k, 0]
            if at >= 0:
                if k == 6:
                    _put_v6(out, j, at, r.src_hi, r.src_lo)
                elif k == 7:
                    _put_v6(out, j, at, r.dst_hi, r.dst_lo)
                else:
                    _put(out, j, at, layout[k, 1], values[k])
