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
    """``[(template name, host-order template records), ...]`` for ``FLOW_RECORD_DTYPE`` rows."""
    out = []
    if len(records) == 0:
        return out
    for family in (4, 6):
        fam = records[records["ip_version"] == family]
        if len(fam) == 0:
            continue
        classes = _CLASS_LUT[family][fam["proto"]]
        for ci, klass in enumerate(FLOW_CLASSES):
            r = fam[classes == ci]
            if len(r) == 0:
                continue
            name = flow_template_name(family, klass)
            t = np.zeros(len(r), dtype=FLOW_DTYPES[name])
            t["flowStartMilliseconds"] = r["first_ns"] // 1_000_000
            t["flowEndMilliseconds"] = r["last_ns"] // 1_000_000
            t["octetDeltaCount"] = r["bytes"]
            t["packetDeltaCount"] = r["packets"]
            if family == 4:
                t["sourceIPv4Address"] = r["src_lo"]
                t["destinationIPv4Address"] = r["dst_lo"]
            else:
                t["sourceIPv6Address"] = _v6(r["src_hi"], r["src_lo"])
                t["destinationIPv6Address"] = _v6(r["dst_hi"], r["dst_lo"])
            if klass in ("tcp", "udp"):
                t["sourceTransportPort"] = r["sport"]
                t["destinationTransportPort"] = r["dport"]
            if klass == "tcp":
                t["tcpControlBits"] = r["tcp_flags"]
            if klass == "icmp":
                t["icmpTypeCodeIPv4" if family == 4 else "icmpTypeCodeIPv6"] = r["icmp"]
            t["protocolIdentifier"] = r["proto"]
            t["ipClassOfService"] = r["tos"]
            t["flowDirection"] = r["direction"]
            t["flowEndReason"] = r["end_reason"]
            t["forwardingStatus"] = np.where(r["fwd_status"] == FORWARDED, FWD_FORWARDED_UNKNOWN, r["fwd_status"])
            t["ingressInterface"] = r["ifindex"]
            out.append((name, t))
    return out
