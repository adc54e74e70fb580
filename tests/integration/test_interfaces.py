"""ingressInterface and egressInterface on live sources, read back by a real collector (nfcapd, nfdump).

Each record's interfaces must be the kernel's ifindex (``ip -j link``) of
the interface its packets crossed, on the side they crossed it, 0 on the
side this source does not see:

* ``afpacket``: one end of a veth pair, traffic both ways across it. What
  the metered end sends leaves on it (egress), what it receives came in on
  it (ingress). The pings are fragmented (larger than the link's MTU): every
  fragment counts in its datagram's echo request or reply flow, none shows
  as another ICMP type.
* ``nflog``: a router namespace between two others, an nftables rule in the
  forward hook logging what it routes from one veth to the other: each
  packet has an in- and an out-device. A packet the rule drops never left:
  egress 0.

Only namespaces made here carry the traffic; they are removed at the end.
Capture files replayed (``flowmeter replay``): pcapng interfaces and packet
flags, and ICMP fragments, read back by nfdump and ipfixDump.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections import defaultdict

from tests.capture.test_pcapfile import epb, idb, shb
from tests.support.collectors import Nfcapd, ipfixdump_records
from tests.support.liverun import A4, A6, B4, B6, ROOT, NsNfcapd, Run
from tests.support.netns import Namespaces, available, entered
from tests.support.pcapwrite import ETH_IPV4, ethernet, ethernet_ipv4_udp, icmp, ipv4, write_pcap

PINGS, PING_PAYLOAD = 3, 2000  # over the 1500-octet MTU: two fragments each (IPv4 1500 + 548 octets)


def ifindex(ns: Namespaces, name: str, iface: str) -> int:
    """The kernel's index of ``iface`` in namespace ``name``, as ``ip -j link`` reports it."""
    [link] = json.loads(ns.run(name, "ip", "-j", "link", "show", iface).stdout)
    return int(link["ifindex"])


def by_key(rows: list[dict]) -> dict[tuple, dict]:
    """nfdump's rows per (src, dst, proto, sport, dport, icmp type, icmp code, in, out): packets, octets."""
    out: dict[tuple, dict] = defaultdict(lambda: {"packets": 0, "octets": 0})
    for r in rows:
        icmp = r["proto"] in (1, 58)
        key = (r.get("src4_addr") or r.get("src6_addr"), r.get("dst4_addr") or r.get("dst6_addr"), r["proto"],
               0 if icmp else r.get("src_port", 0), 0 if icmp else r.get("dst_port", 0),
               r.get("icmp_type") if icmp else None, r.get("icmp_code") if icmp else None,
               r["input_snmp"], r["output_snmp"])
        out[key]["packets"] += r["in_packets"]
        out[key]["octets"] += r["in_bytes"]
    return dict(out)


def interface_names(ipfix) -> dict[int, tuple[str, str]]:
    """index -> (interfaceName, interfaceDescription) of the interface options records, as ipfixDump reads
    them; each must be scoped by ingressInterface and appear once."""
    names = [x for x in ipfixdump_records(ipfix) if "interfaceName" in x]
    assert all(x["_scope"] == ["ingressInterface"] for x in names), names
    text = (lambda v: v.split(") ", 1)[1] if ") " in v else "")  # "(len: N) TEXT"
    out = {int(x["ingressInterface"]): (text(x["interfaceName"]), text(x["interfaceDescription"])) for x in names}
    assert len(out) == len(names), names
    return out


def udp_send(namespace: str, src: str, sport: int, dst: str, dport: int, sizes) -> None:
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    with entered(namespace):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        sock.bind((src, sport))
        for size in sizes:
            try:
                sock.sendto(b"i" * size, (dst, dport))
            except PermissionError:  # a firewall drop says EPERM to a local sender
                pass


def test_afpacket_egress_for_what_left_ingress_for_what_came_in(lab, tmp_path):
    ns, a, b = lab
    va = ifindex(ns, a, "va")
    ipfix = tmp_path / "out.ipfix"  # ipfixDump reads the interface names from it
    with NsNfcapd(b, tmp_path, host=B4) as nf:
        # the kernel names va; the profile adds a description
        run = Run(a, tmp_path, 1, Sources=["afpacket:va"], IpFixCollectors=[nf.collector, f"File/{ipfix}"],
                  Interfaces={str(va): {"Description": "the lab's link to b"}})
        ns.run(a, "ping", "-4", "-c", str(PINGS), "-i", "0.05", "-s", str(PING_PAYLOAD), B4)
        ns.run(a, "ping", "-6", "-c", str(PINGS), "-i", "0.05", "-s", str(PING_PAYLOAD), B6)
        udp_send(a, A4, 7600, B4, 7601, (10, 20))
        udp_send(b, B4, 7602, A4, 7603, (30, 40, 50))
        udp_send(b, B6, 7602, A6, 7603, (60,))
        time.sleep(0.3)
        log = run.stop()
        rows = nf.records()
    got = by_key(rows)
    ipv4_ping = PINGS * (1500 + 20 + PING_PAYLOAD + 8 - 1480)  # two fragments: 1500 and 548 octets
    want = {
        (A4, B4, 1, 0, 0, 8, 0, 0, va): (2 * PINGS, ipv4_ping),  # left on va: egress
        (B4, A4, 1, 0, 0, 0, 0, va, 0): (2 * PINGS, ipv4_ping),  # came in on va: ingress
        (A4, B4, 17, 7600, 7601, None, None, 0, va): (2, 2 * 28 + 30),
        (B4, A4, 17, 7602, 7603, None, None, va, 0): (3, 3 * 28 + 120),
        (B6, A6, 17, 7602, 7603, None, None, va, 0): (1, 48 + 60),
    }
    for key, (packets, octets) in want.items():
        assert key in got, (key, sorted(got), log)
        assert (got[key]["packets"], got[key]["octets"]) == (packets, octets), key
    # IPv6 pings: every fragment in its echo request (128) or reply (129) flow, on the side it crossed
    v6 = {k: v["packets"] for k, v in got.items() if k[2] == 58 and k[5] in (128, 129)}
    assert v6 == {(A6, B6, 58, 0, 0, 128, 0, 0, va): 2 * PINGS, (B6, A6, 58, 0, 0, 129, 0, va, 0): 2 * PINGS}, got
    # no fragment of a ping shows as another ICMP type (a later fragment read as type 0: an echo reply
    # from a to b); besides the pings only "port unreachable" (UDP to a closed port, both ways) and
    # neighbour discovery (133-137) cross
    types = defaultdict(set)
    for k in got:
        if k[2] in (1, 58) and k[0] in (A4, A6, B4, B6):
            types[k[0]].add(k[5])
    nd = set(range(133, 138))
    assert types[A4] == {8, 3} and types[B4] == {0, 3}, types
    assert types[A6] - nd == {128, 1} and types[B6] - nd == {129}, types
    # every record has one side only, the one it crossed va on: a's packets left, b's came in
    for key in got:
        assert (key[7], key[8]) in ((va, 0), (0, va)), key
        if key[0] in (A4, A6):
            assert (key[7], key[8]) == (0, va), key
        elif key[0] in (B4, B6):
            assert (key[7], key[8]) == (va, 0), key
    # the options records name the index: one record, scoped by it
    assert interface_names(ipfix) == {va: ("va", "the lab's link to b")}


NFT_FORWARD = """
table inet fmif {
    chain forwarded {
        type filter hook forward priority 0; policy accept;
        udp dport 9999 log group 6 prefix "drop: not here" drop
        log group 6
    }
}
"""


def test_nflog_forward_hook_in_device_ingress_out_device_egress(tmp_path):
    why = available()
    assert not why, why
    with Namespaces() as ns:
        c, r, d = ns.add("c"), ns.add("r"), ns.add("d")
        ns.veth(c, "vc", "10.41.0.2/24", "fd41::2/64", r, "vr0", "10.41.0.1/24", "fd41::1/64")
        ns.veth(r, "vr1", "10.42.0.1/24", "fd42::1/64", d, "vd", "10.42.0.2/24", "fd42::2/64")
        ns.run(c, "ip", "route", "add", "default", "via", "10.41.0.1")
        ns.run(d, "ip", "route", "add", "default", "via", "10.42.0.1")
        ns.run(r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        rules = tmp_path / "forward.nft"
        rules.write_text(NFT_FORWARD)
        ns.run(r, "nft", "-f", str(rules))
        vr0, vr1 = ifindex(ns, r, "vr0"), ifindex(ns, r, "vr1")
        assert vr0 != vr1
        with NsNfcapd(r, tmp_path) as nf:  # on the router's loopback: the export is not forwarded
            ipfix = tmp_path / "out.ipfix"  # and a file for ipfixDump, which shows forwardingStatus
            run = Run(r, tmp_path, 1, Sources=["nflog:6"], IpFixCollectors=[nf.collector, f"File/{ipfix}"])
            ns.run(c, "ping", "-4", "-c", str(PINGS), "-i", "0.05", "10.42.0.2")
            with entered(d):
                rx_d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with entered(c):
                rx_c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with rx_d, rx_c:
                rx_d.bind(("10.42.0.2", 7701))
                rx_c.bind(("10.41.0.2", 7703))
                udp_send(c, "10.41.0.2", 7700, "10.42.0.2", 7701, (10, 20, 30))
                udp_send(d, "10.42.0.2", 7702, "10.41.0.2", 7703, (40, 50))
                for rx, n in ((rx_d, 3), (rx_c, 2)):
                    rx.settimeout(5)
                    for _ in range(n):
                        rx.recv(100)  # routed: it arrived
            udp_send(c, "10.41.0.2", 7704, "10.42.0.2", 9999, (60, 70))  # dropped in forward
            time.sleep(0.3)
            log = run.stop()
            rows = nf.records()
    got = by_key(rows)
    c4, d4 = "10.41.0.2", "10.42.0.2"
    want = {
        (c4, d4, 1, 0, 0, 8, 0, vr0, vr1): (PINGS, PINGS * 84),  # in on vr0, out on vr1
        (d4, c4, 1, 0, 0, 0, 0, vr1, vr0): (PINGS, PINGS * 84),  # the replies: the other way
        (c4, d4, 17, 7700, 7701, None, None, vr0, vr1): (3, 3 * 28 + 60),
        (d4, c4, 17, 7702, 7703, None, None, vr1, vr0): (2, 2 * 28 + 90),
        (c4, d4, 17, 7704, 9999, None, None, vr0, 0): (2, 2 * 28 + 130),  # dropped: never left
    }
    for key, (packets, octets) in want.items():
        assert key in got, (key, sorted(got), log)
        assert (got[key]["packets"], got[key]["octets"]) == (packets, octets), key
    assert not [k for k in got if k[:2] in ((c4, d4), (d4, c4)) and k not in want], got
    dumped = [(int(x["destinationTransportPort"]), int(x["forwardingStatus"]), int(x["ingressInterface"]),
               int(x["egressInterface"])) for x in ipfixdump_records(ipfix) if "destinationTransportPort" in x]
    assert sorted(dumped) == [(7701, 64, vr0, vr1), (7703, 64, vr1, vr0), (9999, 129, vr0, 0)]  # "drop": AclDeny
    # both devices named by the kernel in the options records (no description: no alias set)
    assert interface_names(ipfix) == {vr0: ("vr0", ""), vr1: ("vr1", "")}


# --- capture files, replayed ---------------------------------------------------------------


def replay(capture, tmp_path) -> tuple[list[dict], list[dict]]:
    """``flowmeter replay`` of ``capture`` into nfcapd and an IPFIX file: (nfdump rows, ipfixDump records)."""
    ipfix = tmp_path / "out.ipfix"
    nf = Nfcapd(tmp_path / "nfcapd")
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"FlowMetadata": {"IpFixCollectors": [nf.collector, f"File/{ipfix}"],
                                                    "StatisticsIntervalSeconds": 0}}))
    try:
        r = subprocess.run([sys.executable, "-m", "flowmeter.cli", "replay", str(capture), "--profile", str(profile)],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        rows = nf.records()
    finally:
        nf.stop()
    return rows, [x for x in ipfixdump_records(ipfix) if "packetDeltaCount" in x]


def test_pcapng_interfaces_numbered_across_sections_on_the_side_of_the_packet_flags(tmp_path):
    def udp_frame(src: str, dst: str) -> bytes:
        return ethernet_ipv4_udp(src, dst, 5000, 6000, b"x" * 10)

    t = 1_700_000_000 * 10**6  # µs, the interfaces' default resolution
    le, be = "<", ">"
    data = (shb(le) + idb(le, 1, 0) + idb(le, 1, 0)
            + epb(le, 0, t, udp_frame("10.0.0.1", "10.0.0.2"), flags=2)  # sent on interface 0: egress 1
            + epb(le, 0, t + 1, udp_frame("10.0.0.2", "10.0.0.1"), flags=1)  # received on it: ingress 1
            + epb(le, 1, t + 2, udp_frame("10.0.1.1", "10.0.1.2"))  # interface 1, no flags: ingress 2
            + shb(be) + idb(be, 1, 0)
            + epb(be, 0, t + 3, udp_frame("10.0.2.1", "10.0.2.2"), flags=2))  # section 2's interface 0: the 3rd
    path = tmp_path / "ifaces.pcapng"
    path.write_bytes(data)
    rows, dumped = replay(path, tmp_path)
    got = sorted((r["src4_addr"], r["input_snmp"], r["output_snmp"]) for r in rows)
    assert got == [("10.0.0.1", 0, 1), ("10.0.0.2", 1, 0), ("10.0.1.1", 2, 0), ("10.0.2.1", 0, 3)]
    assert sorted((x["sourceIPv4Address"], int(x["ingressInterface"]), int(x["egressInterface"])) for x in dumped) == got


def test_icmp_later_fragments_are_never_exported_as_echo_replies(tmp_path):
    """A later fragment whose first was seen counts in its datagram's flow (type 8); one whose first
    was not carries no ICMP type at all (ipfixDump: no icmpTypeCodeIPv4 element), not type 0."""
    a, b = "192.0.2.1", "192.0.2.2"
    echo = icmp(8, 0, bytes(1472))
    t = 1_700_000_000 * 10**9
    packets = [(t, ethernet(ipv4(a, b, 1, echo[:1480], ident=77, flags=1), ETH_IPV4)),
               (t + 10**6, ethernet(ipv4(a, b, 1, echo[1480:] + bytes(100), ident=77, frag_offset=185), ETH_IPV4)),
               (t + 2 * 10**6, ethernet(ipv4(a, b, 1, bytes(100), ident=78, frag_offset=185), ETH_IPV4)),
               (t + 3 * 10**6, ethernet(ipv4(b, a, 1, icmp(0, 0, bytes(56))), ETH_IPV4))]
    path = tmp_path / "icmp-fragments.pcap"
    write_pcap(path, packets)
    _, dumped = replay(path, tmp_path)
    got = sorted((x["sourceIPv4Address"], int(x["protocolIdentifier"]), x.get("icmpTypeCodeIPv4", "none"),
                  int(x["packetDeltaCount"]), int(x["octetDeltaCount"])) for x in dumped)
    assert got == [(a, 1, "2048", 2, len(packets[0][1]) + len(packets[1][1]) - 28),  # the echo request: both
                   (a, 1, "none", 1, 120),  # the orphan later fragment: protocol 1, no type at all
                   (b, 1, "0", 1, len(packets[3][1]) - 14)]  # the only echo reply
