"""Flow records become the exporter's template batches, one column copy each."""
from __future__ import annotations

import ipaddress

import numpy as np

from exporter.template import FLOW_DTYPES, FLOW_LAYOUTS
from flowmeter.ipc.packets import ICMP_NO_TYPE
from workers.records import FLOW_RECORD_DTYPE, to_template_batches


def test_records_are_sorted_into_the_eight_templates_with_their_values():
    r = np.zeros(6, FLOW_RECORD_DTYPE)
    r["ip_version"] = [4, 4, 4, 6, 6, 4]
    r["proto"] = [6, 17, 1, 58, 47, 132]
    r["first_ns"], r["last_ns"] = 1_700_000_000_123_456_789, 1_700_000_001_999_999_999
    r["packets"], r["bytes"] = [1, 2, 3, 4, 5, 6], [100, 200, 300, 400, 500, 600]
    v6 = int(ipaddress.IPv6Address("2001:db8::1"))
    r["src_hi"] = [0, 0, 0, v6 >> 64, v6 >> 64, 0]
    r["src_lo"] = [0x0A000001, 0x0A000002, 0x0A000003, v6 & (2**64 - 1), v6 & (2**64 - 1), 0x0A000004]
    r["sport"], r["dport"] = 1234, 80
    r["icmp"] = [0, 0, 0x0800, 0x8000, 0, 0]
    r["tcp_flags"] = [0x1B, 0, 0, 0, 0, 0]
    r["fwd_status"] = [0, 129, 0, 0, 0, 0]
    r["direction"] = [0, 1, 0, 1, 0, 1]
    r["end_reason"] = [3, 1, 1, 2, 4, 5]
    out = dict(to_template_batches(r))
    assert sorted(out) == ["ipv4_icmp", "ipv4_tcp", "ipv4_udp", "ipv6_icmp", "ipv6_other"]
    assert len(out["ipv4_udp"]) == 2  # UDP and SCTP share the ports template
    tcp = out["ipv4_tcp"][0]
    assert out["ipv4_tcp"].dtype == FLOW_DTYPES["ipv4_tcp"]
    assert tcp["flowStartMilliseconds"] == 1_700_000_000_123 and tcp["flowEndMilliseconds"] == 1_700_000_001_999
    assert tcp["sourceIPv4Address"] == 0x0A000001 and tcp["tcpControlBits"] == 0x1B
    assert tcp["forwardingStatus"] == 64 and tcp["flowEndReason"] == 3
    assert list(out["ipv4_udp"]["forwardingStatus"]) == [129, 64]
    icmp6 = out["ipv6_icmp"][0]
    assert bytes(icmp6["sourceIPv6Address"]) == ipaddress.IPv6Address("2001:db8::1").packed
    assert icmp6["icmpTypeCodeIPv6"] == 0x8000 and icmp6["flowDirection"] == 1
    assert out["ipv4_icmp"][0]["icmpTypeCodeIPv4"] == 0x0800


def _reference(r: np.ndarray, family: int, klass: str) -> np.ndarray:
    """The same conversion written column by column with numpy (the kernel's twin)."""
    t = np.zeros(len(r), dtype=FLOW_DTYPES[f"ipv{family}_{klass}"])
    t["flowStartMilliseconds"], t["flowEndMilliseconds"] = r["first_ns"] // 10**6, r["last_ns"] // 10**6
    t["octetDeltaCount"], t["packetDeltaCount"] = r["bytes"], r["packets"]
    if family == 4:
        t["sourceIPv4Address"], t["destinationIPv4Address"] = r["src_lo"], r["dst_lo"]
    else:
        for name, hi, lo in (("sourceIPv6Address", "src_hi", "src_lo"), ("destinationIPv6Address", "dst_hi", "dst_lo")):
            t[name] = [(int(a) << 64 | int(b)).to_bytes(16, "big") for a, b in zip(r[hi], r[lo])]
    if klass in ("tcp", "udp"):
        t["sourceTransportPort"], t["destinationTransportPort"] = r["sport"], r["dport"]
    if klass == "tcp":
        t["tcpControlBits"] = r["tcp_flags"]
    if klass == "icmp":
        t[f"icmpTypeCodeIPv{family}"] = r["icmp"]
    t["protocolIdentifier"], t["ipClassOfService"], t["flowDirection"] = r["proto"], r["tos"], r["direction"]
    t["flowEndReason"], t["ingressInterface"] = r["end_reason"], r["ingress_if"]
    t["egressInterface"] = r["egress_if"]
    t["forwardingStatus"] = np.where(r["fwd_status"] == 0, 64, r["fwd_status"])
    return t


def test_every_field_of_random_records_lands_where_the_template_says():
    rng = np.random.default_rng(7)
    r = np.zeros(5000, FLOW_RECORD_DTYPE)
    for name in r.dtype.names:
        info = np.iinfo(r.dtype[name])
        r[name] = rng.integers(0, int(info.max), len(r), dtype=np.uint64, endpoint=True).astype(r.dtype[name])
    r["ip_version"] = rng.choice([4, 6], len(r))
    r["proto"] = rng.choice([1, 6, 17, 33, 47, 50, 58, 132, 136], len(r))
    r["fwd_status"] = rng.choice([0, 129, 130], len(r))
    r["sport"][rng.random(len(r)) < 0.1] = ICMP_NO_TYPE
    out = to_template_batches(r)
    assert sum(len(t) for _, t in out) == len(r)
    classes = {"tcp": {6}, "udp": {17, 33, 132, 136}}
    for name, t in out:
        family, klass = int(name[3]), name.split("_")[1]
        icmp = {1} if family == 4 else {58}
        protos = classes.get(klass, icmp if klass == "icmp" else None)
        untyped = np.isin(r["proto"], list(icmp)) & (r["sport"] == ICMP_NO_TYPE)
        if klass == "icmp":
            chosen = np.isin(r["proto"], list(icmp)) & ~untyped
        elif protos:
            chosen = np.isin(r["proto"], list(protos))
        else:
            chosen = ~np.isin(r["proto"], [6, 17, 33, 132, 136, 1 if family == 4 else 58]) | untyped
        mine = r[(r["ip_version"] == family) & chosen]
        assert t.tobytes() == _reference(mine, family, klass).tobytes(), name


def test_every_flow_template_carries_ingress_and_egress_interface_filled_from_the_record():
    for name, layout in FLOW_LAYOUTS.items():
        names = [e.name for e in layout]
        assert names.index("egressInterface") == names.index("ingressInterface") + 1, name
    r = np.zeros(4, FLOW_RECORD_DTYPE)
    r["ip_version"], r["proto"] = [4, 4, 6, 6], [6, 1, 17, 47]
    r["ingress_if"], r["egress_if"] = [3, 0, 2**32 - 1, 7], [0, 4, 1, 9]
    got = {name: (int(t["ingressInterface"][0]), int(t["egressInterface"][0])) for name, t in to_template_batches(r)}
    assert got == {"ipv4_tcp": (3, 0), "ipv4_icmp": (0, 4), "ipv6_udp": (2**32 - 1, 1), "ipv6_other": (7, 9)}


def test_icmp_flows_of_unknown_type_are_exported_without_any_type():
    """Later fragments whose first fragment was not seen (sport ICMP_NO_TYPE): the "other"
    template, so that no collector reads type 0 code 0, an echo reply."""
    r = np.zeros(4, FLOW_RECORD_DTYPE)
    r["ip_version"], r["proto"] = [4, 4, 6, 6], [1, 1, 58, 58]
    r["sport"] = [ICMP_NO_TYPE, 0, ICMP_NO_TYPE, 0]
    r["icmp"] = [0, 0x0800, 0, 0x8000]
    r["packets"] = [1, 2, 3, 4]
    out = dict(to_template_batches(r))
    assert sorted(out) == ["ipv4_icmp", "ipv4_other", "ipv6_icmp", "ipv6_other"]
    assert "icmpTypeCodeIPv4" not in out["ipv4_other"].dtype.names
    assert (out["ipv4_other"]["protocolIdentifier"][0], out["ipv4_other"]["packetDeltaCount"][0]) == (1, 1)
    assert (out["ipv6_other"]["protocolIdentifier"][0], out["ipv6_other"]["packetDeltaCount"][0]) == (58, 3)
    assert out["ipv4_icmp"]["icmpTypeCodeIPv4"][0] == 0x0800 and out["ipv6_icmp"]["icmpTypeCodeIPv6"][0] == 0x8000
