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
from exporter.options import InterfaceSpec
from exporter.template import INTERFACES_NAME, SAMPLING_NAME, default_registry
from exporter.transport import CollectorAddress
from tests.support.collectors import (Nfacctd, Nfcapd, TsharkCapture, ipfixdump_records, ipfixdump_warnings,
                                      nfdump_flags, tshark_fields)
from tests.support.producer import export_batches
from tests.support.synthetic import FLOW_TEMPLATE_NAMES, synthetic_records

PER_TEMPLATE = 60
DOMAIN = 7
REFRESH_MESSAGES = 6
FLOW_TIDS = {str(t.template_id) for t in default_registry() if t.name in FLOW_TEMPLATE_NAMES}
# the synthetic records' ingress interfaces are 1-4; their egress ones are random, mostly unnamed
INTERFACES = (InterfaceSpec(1, "wan0", "uplink to the ISP"), InterfaceSpec(2, "lan0"),
              InterfaceSpec(3, "wg0", "overlay"), InterfaceSpec(4, "peer-berlin", "ü" * 128))


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
    # the same records into an nfacctd that scales counters by the sampling rate it learns, and prints it
    pm_renormalized = Nfacctd(d / "pmacct-renormalized", renormalize=True,
                              primitives=Nfacctd.PRIMITIVES + ", sampling_rate")
    ipfix_file = d / "export.ipfix"
    cap = TsharkCapture(d, v4.port)
    batches = [(name, DOMAIN, synthetic_records(name, PER_TEMPLATE, seed=i))
               for i, name in enumerate(FLOW_TEMPLATE_NAMES)]
    settings = ExportSettings(
        collectors=(CollectorAddress("udp", "127.0.0.1", v4.port), CollectorAddress("udp", "::1", v6.port),
                    CollectorAddress("udp", "127.0.0.1", pm.port),
                    CollectorAddress("udp", "127.0.0.1", pm_renormalized.port),
                    CollectorAddress("file", path=str(ipfix_file))),
        max_message=1452, stats_interval_s=60, options_records=True, interfaces=INTERFACES,
        refresh_messages=REFRESH_MESSAGES,  # templates and options again and again: each decoder sees refreshes
        segmented_sends=False)  # tshark on lo would see each segmented send as one packet
    try:
        code = export_batches(settings, batches)
        pcap = cap.stop()
        yield {"code": code, "batches": batches, "v4": v4.records(), "v6": v6.records(),
               "pmacct": pm.records(), "pmacct_renormalized": pm_renormalized.records(),
               "v4_log": v4.log_text(), "file": ipfix_file, "pcap": pcap, "port": v4.port}
    finally:
        cap.stop()
        v4.stop()
        v6.stop()
        pm.stop()
        pm_renormalized.stop()


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


def test_nfcapd_counts_a_sequence_error_after_each_options_message_and_nothing_else(exported):
    """RFC 7011 §3.1 counts every data record in the sequence numbers, options records too; nfdump
    advances its expected sequence by flow records only (its own code says all data records should
    count), so every message that carries options records (sampling, interface names) in a flow
    domain is one "sequence error" to it at the next message. Any other gap would be a loss."""
    pcap, port = exported["pcap"], exported["port"]
    rows = tshark_fields(pcap, port, ["cflow.od_id", "cflow.flowset_id"])
    registry = default_registry()
    described = {str(registry[n].template_id) for n in (SAMPLING_NAME, INTERFACES_NAME)}
    in_domain = [set(ids.split(",")) for od, ids in rows if od.split(",")[0] == str(DOMAIN)]
    # nfdump takes the first sequence number after flow records as it comes (no error): options
    # records before any flow record do not count; after, each message with some is one error,
    # seen when the next message arrives
    flows, quirk = False, 0
    for i, here in enumerate(in_domain):
        if flows and here & described and i + 1 < len(in_domain):
            quirk += 1
        flows = flows or bool(here & FLOW_TIDS)
    assert quirk >= 4  # the fixture refreshes the templates every few messages
    log = exported["v4_log"]
    assert f"Sequence Errors: {quirk}," in log and "Bad Packets: 0" in log, log


def test_every_sequence_number_is_right_by_rfc_7011(exported):
    """ipfixDump (libfixbuf) counts every data record, options records included: no gap at all."""
    assert ipfixdump_warnings(exported["file"]) == []


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
        od = int(od_id.split(",")[0])  # the header's (a sampling record's scope is a cflow.od_id too)
        for t in filter(None, template_ids.split(",")):
            defined.add((od, int(t)))
        for s in filter(None, set_ids.split(",")):
            if int(s) >= 256:
                assert (od, int(s)) in defined, f"frame {frame}: data set {s} before its template"
                data_seen += 1
        # tshark decoded the flow records' packet counts: it knew the template
        if any(s in FLOW_TIDS for s in filter(None, set_ids.split(","))) and od == DOMAIN:
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


def _ipfixdump_string(value: str) -> str:
    return value.split(") ", 1)[1] if ") " in value else ""


def test_ipfixdump_shows_the_sampling_and_interface_options_records_with_their_scope(exported):
    registry = default_registry()
    records = ipfixdump_records(exported["file"])
    sampling = [r for r in records if r["_tid"] == registry[SAMPLING_NAME].template_id]
    assert len(sampling) >= 4  # at the start and at each refresh
    assert all(r == sampling[0] for r in sampling)
    assert sampling[0]["_scope"] == ["observationDomainId"]
    assert (sampling[0]["observationDomainId"], sampling[0]["selectorAlgorithm"],
            sampling[0]["samplingPacketInterval"], sampling[0]["samplingPacketSpace"]) == (str(DOMAIN), "1", "1", "0")
    names = [r for r in records if r["_tid"] == registry[INTERFACES_NAME].template_id]
    assert all(r["_scope"] == ["ingressInterface"] for r in names)
    named = {(int(r["ingressInterface"]), _ipfixdump_string(r["interfaceName"]),
              _ipfixdump_string(r["interfaceDescription"])) for r in names}
    assert named == {(s.index, s.name, s.description) for s in INTERFACES}  # the same each time
    assert len(names) == len(INTERFACES) * len(sampling)  # every name with every sampling record


def test_tshark_shows_the_sampling_and_interface_names(exported):
    pcap, port = exported["pcap"], exported["port"]
    sampling = tshark_fields(pcap, port, ["cflow.od_id", "cflow.selector_algorithm", "cflow.sampling_packet_interval",
                                          "cflow.sampling_packet_space"], display_filter="cflow.sampling_packet_interval")
    assert len(sampling) >= 4
    assert all(row == [f"{DOMAIN},{DOMAIN}", "1", "1", "0"] for row in sampling)  # the header's domain, the scope's
    rows = tshark_fields(pcap, port, ["cflow.if_name", "cflow.if_descr"], display_filter="cflow.if_name")
    names = [n for row in rows for n in row[0].split(",")]
    assert sorted(set(names)) == sorted(s.name for s in INTERFACES)
    assert len(names) == len(INTERFACES) * len(sampling)
    assert "uplink to the ISP" in rows[0][1]


def test_nfacctd_renormalizing_by_the_announced_rate_counts_the_same_packets_and_bytes(exported):
    plain, renormalized = exported["pmacct"], exported["pmacct_renormalized"]
    assert len(plain) == len(renormalized) == PER_TEMPLATE * len(FLOW_TEMPLATE_NAMES)
    totals = [(sum(r["packets"] for r in rows), sum(r["bytes"] for r in rows)) for rows in (plain, renormalized)]
    assert totals[0] == totals[1]
    want = sum(int(x) for _, _, recs in exported["batches"] for x in recs["packetDeltaCount"])
    assert totals[0][0] == want
    assert {r["sampling_rate"] for r in renormalized} == {1}  # the rate was learnt from the options record
