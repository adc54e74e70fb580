"""Our exporter process judged by real collectors: nfcapd/nfdump, nfacctd, tshark, ipfixDump.

One export run (the real exporter process fed over ZeroMQ, as workers feed
it) goes at once to nfcapd on 127.0.0.1, nfcapd on [::1], pmacct's nfacctd
on 127.0.0.1 and an IPFIX file;
tshark captures the IPv4 collector's traffic. Every record of every flow
template must come back from each independent decoder with the values sent.
"""
from __future__ import annotations

import ipaddress
from collections import Counter
from datetime import datetime, timezone

import pytest

from exporter.exporting import ExportSettings
from exporter.transport import CollectorAddress
from tests.support.collectors import Nfacctd, Nfcapd, TsharkCapture, ipfixdump_records, nfdump_flags, tshark_fields
from tests.support.producer import export_batches
from tests.support.synthetic import FLOW_TEMPLATE_NAMES, synthetic_records

PER_TEMPLATE = 60
DOMAIN = 7


def _iso_ms(ms: int) -> str:
    """nfdump's JSON time format, in UTC."""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


def _addr(v) -> str:
    if isinstance(v, (bytes, memoryview)) or getattr(v, "dtype", None) is not None and v.dtype.kind == "V":
        return str(ipaddress.IPv6Address(bytes(v)))
    return str(ipaddress.IPv4Address(int(v)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("collectors")
    v4 = Nfcapd(d / "v4", "127.0.0.1")
    v6 = Nfcapd(d / "v6", "::1")
    pm = Nfacctd(d / "pmacct")
    ipfix_file = d / "export.ipfix"
    cap = TsharkCapture(d, v4.port)
    batches = [(name, DOMAIN, synthetic_records(name, PER_TEMPLATE, seed=i))
               for i, name in enumerate(FLOW_TEMPLATE_NAMES)]
    settings = ExportSettings(
        collectors=(CollectorAddress("udp", "127.0.0.1", v4.port), CollectorAddress("udp", "::1", v6.port),
                    CollectorAddress("udp", "127.0.0.1", pm.port),
                    CollectorAddress("file", path=str(ipfix_file))),
        max_message=1452, stats_interval_s=60,
        segmented_sends=False)  # tshark on lo would see each segmented send as one packet
    try:
        code = export_batches(settings, batches)
        pcap = cap.stop()
        yield {"code": code, "batches": batches, "v4": v4.records(), "v6": v6.records(),
               "pmacct": pm.records(),
               "v4_log": v4.log_text(), "file": ipfix_file, "pcap": pcap, "port": v4.port}
    finally:
        cap.stop()
        v4.stop()
        v6.stop()
        pm.stop()


def expected_nfdump(batches) -> Counter:
    out = Counter()
    for name, _, recs in batches:
        v6 = name.startswith("ipv6")
        for r in recs:
            key = {
                "src": _addr(r["sourceIPv6Address" if v6 else "sourceIPv4Address"]),
                "dst": _addr(r["destinationIPv6Address" if v6 else "destinationIPv4Address"]),
                "proto": int(r["protocolIdentifier"]),
                "packets": int(r["packetDeltaCount"]),
                "bytes": int(r["octetDeltaCount"]),
                "first": _iso_ms(int(r["flowStartMilliseconds"])),
                "last": _iso_ms(int(r["flowEndMilliseconds"])),
                "direction": int(r["flowDirection"]),
                "tos": int(r["ipClassOfService"]),
                "ingress": int(r["ingressInterface"]),
                "egress": int(r["egressInterface"]),
            }
            names = recs.dtype.names
            if "sourceTransportPort" in names:
                key["sport"], key["dport"] = int(r["sourceTransportPort"]), int(r["destinationTransportPort"])
            if "tcpControlBits" in names:
                key["flags"] = int(r["tcpControlBits"]) & 0xFF
            for f in ("icmpTypeCodeIPv4", "icmpTypeCodeIPv6"):
                if f in names:
                    key["icmp"] = (int(r[f]) >> 8, int(r[f]) & 0xFF)
            out[tuple(sorted(key.items()))] += 1
    return out


def from_nfdump(rows) -> Counter:
    out = Counter()
    for r in rows:
        key = {
            "src": r.get("src4_addr") or r.get("src6_addr"),
            "dst": r.get("dst4_addr") or r.get("dst6_addr"),
            "proto": r["proto"],
            "packets": r["in_packets"],
            "bytes": r["in_bytes"],
            "first": r["first"],
            "last": r["last"],
            "direction": r["direction"],
            "tos": r["src_tos"],
            "ingress": r["input_snmp"],
            "egress": r["output_snmp"],
        }
        if r["proto"] in (6, 17, 132):
            key["sport"], key["dport"] = r["src_port"], r["dst_port"]
        if r["proto"] == 6:
            key["flags"] = nfdump_flags(r["tcp_flags"])
        if r["proto"] in (1, 58):
            key["icmp"] = (r["icmp_type"], r["icmp_code"])
        out[tuple(sorted(key.items()))] += 1
    return out


def test_exporter_process_exits_cleanly(exported):
    assert exported["code"] == 0


@pytest.mark.parametrize("collector", ["v4", "v6"])
def test_nfdump_reads_back_every_record_of_every_template(exported, collector):
    got = from_nfdump(exported[collector])
    want = expected_nfdump(exported["batches"])
    assert sum(want.values()) == PER_TEMPLATE * len(FLOW_TEMPLATE_NAMES)
    assert got == want


def test_nfcapd_sees_no_sequence_errors(exported):
    log = exported["v4_log"]
    assert "Sequence Errors: 0" in log and "Bad Packets: 0" in log, log


def test_ipfixdump_reads_the_same_records_from_the_file(exported):
    rows = [r for r in ipfixdump_records(exported["file"]) if "packetDeltaCount" in r]
    got = Counter()
    for r in rows:
        src = str(ipaddress.ip_address(r.get("sourceIPv4Address") or r.get("sourceIPv6Address")))
        got[(src, int(r["protocolIdentifier"]), int(r["packetDeltaCount"]), int(r["octetDeltaCount"]),
             int(r.get("sourceTransportPort", 0)), int(r.get("destinationTransportPort", 0)),
             int(r.get("tcpControlBits", 0)), int(r.get("icmpTypeCodeIPv4", r.get("icmpTypeCodeIPv6", 0))),
             int(r["flowDirection"]), int(r["flowEndReason"]), int(r["forwardingStatus"]),
             int(r["ingressInterface"]), int(r["egressInterface"]), r["flowStartMilliseconds"])] += 1
    want = Counter()
    for name, _, recs in exported["batches"]:
        names = recs.dtype.names
        for rec in recs:
            src = _addr(rec["sourceIPv6Address" if name.startswith("ipv6") else "sourceIPv4Address"])
            icmp = next((int(rec[f]) for f in ("icmpTypeCodeIPv4", "icmpTypeCodeIPv6") if f in names), 0)
            start = datetime.fromtimestamp(int(rec["flowStartMilliseconds"]) / 1000, tz=timezone.utc)
            want[(src, int(rec["protocolIdentifier"]), int(rec["packetDeltaCount"]), int(rec["octetDeltaCount"]),
                  int(rec["sourceTransportPort"]) if "sourceTransportPort" in names else 0,
                  int(rec["destinationTransportPort"]) if "destinationTransportPort" in names else 0,
                  int(rec["tcpControlBits"]) if "tcpControlBits" in names else 0, icmp,
                  int(rec["flowDirection"]), int(rec["flowEndReason"]), int(rec["forwardingStatus"]),
                  int(rec["ingressInterface"]), int(rec["egressInterface"]),
                  start.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3])] += 1
    assert got == want
    stats = [r for r in ipfixdump_records(exported["file"]) if "exportedMessageTotalCount" in r]
    assert len(stats) == 1 and int(stats[0]["exportedFlowRecordTotalCount"]) == PER_TEMPLATE * 8


def test_tshark_decodes_without_malformed_or_expert_errors(exported):
    pcap, port = exported["pcap"], exported["port"]
    rows = tshark_fields(pcap, port, ["frame.number", "_ws.malformed", "_ws.expert.severity", "_ws.expert.message"],
                         display_filter="cflow")
    assert len(rows) > 10
    # severity is a number; error = 8388608 (0x00800000), warning = 6291456 (0x00600000)
    problems = [r for r in rows if r[1] or any(s and int(s) >= 0x00600000 for s in r[2].split(","))]
    assert problems == []
    bad = tshark_fields(pcap, port, ["frame.number"], display_filter="_ws.malformed || _ws.expert.severity >= warning")
    assert bad == []


def test_tshark_shows_templates_before_data(exported):
    rows = tshark_fields(exported["pcap"], exported["port"],
                         ["frame.number", "cflow.od_id", "cflow.flowset_id", "cflow.template_id", "cflow.packets"])
    defined: set[tuple[int, int]] = set()
    data_seen = 0
    for frame, od_id, set_ids, template_ids, packets in rows:
        od = int(od_id)
        for t in filter(None, template_ids.split(",")):
            defined.add((od, int(t)))
        for s in filter(None, set_ids.split(",")):
            if int(s) >= 256:
                assert (od, int(s)) in defined, f"frame {frame}: data set {s} before its template"
                data_seen += 1
        # tshark decoded the records' packet counts: it knew the template
        if any(int(s) >= 256 for s in filter(None, set_ids.split(","))) and od == DOMAIN:
            assert packets, f"frame {frame}: data not decoded"
    assert data_seen > 0


def test_nfacctd_reads_the_same_records(exported):
    """pmacct's nfacctd, a second independent decoder of the UDP export."""
    got = Counter()
    for r in exported["pmacct"]:
        got[(str(ipaddress.ip_address(r["ip_src"])), str(ipaddress.ip_address(r["ip_dst"])),
             r.get("port_src", 0), r.get("port_dst", 0), int(r["tcp_flags"]), int(r["tos"]),
             r["timestamp_start"], r["timestamp_end"], r["packets"], r["bytes"])] += 1
    want = Counter()
    for name, _, recs in exported["batches"]:
        v6 = name.startswith("ipv6")
        names = recs.dtype.names
        for rec in recs:
            ts = [datetime.fromtimestamp(int(rec[f]) / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
                  for f in ("flowStartMilliseconds", "flowEndMilliseconds")]
            want[(_addr(rec["sourceIPv6Address" if v6 else "sourceIPv4Address"]),
                  _addr(rec["destinationIPv6Address" if v6 else "destinationIPv4Address"]),
                  int(rec["sourceTransportPort"]) if "sourceTransportPort" in names else 0,
                  int(rec["destinationTransportPort"]) if "destinationTransportPort" in names else 0,
                  int(rec["tcpControlBits"]) if "tcpControlBits" in names else 0, int(rec["ipClassOfService"]),
                  ts[0], ts[1], int(rec["packetDeltaCount"]), int(rec["octetDeltaCount"]))] += 1
    assert sum(want.values()) == PER_TEMPLATE * len(FLOW_TEMPLATE_NAMES)
    assert got == want
