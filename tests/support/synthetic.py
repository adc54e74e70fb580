"""Synthetic flow records: plausible values for every flow template.

Used by ``flowmeter demo``, the tests and the benchmarks, so that each
template is exercised with addresses, ports, ICMP type/code, TCP flags,
counters and times that a collector can show and compare.
"""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

from exporter.template import FLOW_CLASSES, FLOW_DTYPES, flow_template_name

FLOW_TEMPLATE_NAMES = tuple(flow_template_name(f, c) for f in (4, 6) for c in FLOW_CLASSES)

_PROTOCOLS = {"tcp": [6], "udp": [17, 132], "other": [47, 50, 89, 103]}
_ICMP4 = [(8, 0), (0, 0), (3, 3), (11, 0)]
_ICMP6 = [(128, 0), (129, 0), (1, 4), (135, 0)]


def v6(prefix: bytes, host: int) -> np.void:
    """A 16-octet IPv6 address value (``V16``) of a /64 prefix and a host number."""
    return np.frombuffer(prefix[:8].ljust(8, b"\0") + int(host).to_bytes(8, "big"), dtype="V16")[0]


def synthetic_records(name: str, n: int, seed: int = 1, base_ms: int = 1_764_000_000_000) -> npt.NDArray:
    """``n`` records of flow template ``name`` (host-order dtype), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    family = 4 if name.startswith("ipv4") else 6
    klass = name.split("_", 1)[1]
    r = np.zeros(n, dtype=FLOW_DTYPES[name])
    start = base_ms + rng.integers(0, 60_000, n, dtype=np.uint64)
    r["flowStartMilliseconds"] = start
    r["flowEndMilliseconds"] = start + rng.integers(0, 30_000, n, dtype=np.uint64)
    packets = rng.integers(1, 5000, n, dtype=np.uint64)
    r["packetDeltaCount"] = packets
    r["octetDeltaCount"] = packets * rng.integers(40, 1500, n, dtype=np.uint64)
    idx = np.arange(n, dtype=np.uint64)
    if family == 4:
        r["sourceIPv4Address"] = (10 << 24) + (idx % 65_000) + 1  # 10.0.x.y
        r["destinationIPv4Address"] = (198 << 24) + (51 << 16) + (100 << 8) + (idx % 250) + 1
    else:
        r["sourceIPv6Address"] = [v6(bytes.fromhex("20010db800000001"), int(i) + 1) for i in idx]
        r["destinationIPv6Address"] = [v6(bytes.fromhex("20010db8000000ff"), int(i) % 250 + 1) for i in idx]
    if klass in ("tcp", "udp"):
        r["sourceTransportPort"] = rng.integers(1024, 65536, n)
        r["destinationTransportPort"] = rng.choice([53, 80, 123, 443, 4739, 8080], n)
    if klass == "tcp":
        r["tcpControlBits"] = rng.choice([0x02, 0x12, 0x18, 0x19, 0x1B, 0x14, 0x10, 0xC2], n)
    if klass == "icmp":
        table = _ICMP4 if family == 4 else _ICMP6
        pick = rng.integers(0, len(table), n)
        codes = np.array([t * 256 + c for t, c in table], dtype=np.uint16)[pick]
        r["icmpTypeCodeIPv4" if family == 4 else "icmpTypeCodeIPv6"] = codes
        r["protocolIdentifier"] = 1 if family == 4 else 58
    else:
        r["protocolIdentifier"] = rng.choice(_PROTOCOLS[klass], n)
    r["ipClassOfService"] = rng.choice([0, 0x10, 0xB8], n)
    r["flowDirection"] = idx % 2
    r["flowEndReason"] = rng.choice([1, 2, 3, 4, 5], n)
    r["forwardingStatus"] = np.where(idx % 7 == 3, 129, 64)
    r["ingressInterface"] = rng.integers(1, 5, n)
    r["egressInterface"] = np.where(r["forwardingStatus"] == 129, 0, rng.integers(1, 2**32, n))  # dropped: none
    return r
