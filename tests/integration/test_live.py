"""``flowmeter run`` on live sources, in network namespaces made here (root, iproute2, nftables).

Two namespaces joined by a veth pair; flowmeter meters one end (``afpacket``)
and exports to nfcapd in the other namespace, across the metered link, so
its own datagrams cross the capture and must not be metered. Known traffic
is sent (pings, UDP datagrams of known sizes, a TCP transfer of known
length, IPv4 and IPv6); the truth is what was sent and, per packet, what
tcpdump captured on the other end of the link, read by tshark.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support.collectors import ipfixdump_records
from tests.support.liverun import A4, A6, B4, B6, ROOT, NsNfcapd, Run
from tests.support.netns import Namespaces, available, entered

UDP_SIZES = (10, 100, 500, 1000, 1400)  # payload octets
TCP_LENGTH = 200_000
PINGS, PING_PAYLOAD = 4, 100


class Tcpdump:
    """tcpdump writing every frame of an interface to a pcap file, for the truth."""

    def __init__(self, ns: Namespaces, name: str, iface: str, path: Path) -> None:
        self.path = path
        self.proc = ns.popen(name, "tcpdump", "-i", iface, "-n", "-U", "--immediate-mode", "-w", str(path),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()  # "listening on vb, ..." once it captures
        assert "listening on" in line, line

    def stop(self) -> None:
        time.sleep(0.3)
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)


def truth(pcap: Path) -> tuple[Counter, Counter]:
    """Packets and layer-3 octets per (src, dst, proto, sport, dport or ICMP type) from tshark."""
    fields = ["ip.src", "ip.dst", "ip.proto", "ip.len", "ipv6.src", "ipv6.dst", "ipv6.plen",
              "tcp.srcport", "tcp.dstport", "udp.srcport", "udp.dstport", "icmp.type", "icmpv6.type"]
    out = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-E", "separator=|", "-E", "occurrence=f",
                          *sum((["-e", f] for f in fields), [])], capture_output=True, text=True, check=True).stdout
    packets, octets = Counter(), Counter()
    for line in out.splitlines():
        v = dict(zip(fields, line.split("|")))
        if v["ip.src"]:
            src, dst, length, proto = v["ip.src"], v["ip.dst"], int(v["ip.len"]), int(v["ip.proto"])
        elif v["ipv6.src"]:
            src, dst, length = v["ipv6.src"], v["ipv6.dst"], int(v["ipv6.plen"]) + 40
            proto = 58 if v["icmpv6.type"] else 6 if v["tcp.srcport"] else 17 if v["udp.srcport"] else -1
        else:
            continue  # ARP
        if proto in (1, 58):
            key = (src, dst, proto, 0, int(v["icmp.type"] or v["icmpv6.type"]))
        else:
            key = (src, dst, proto, int(v["tcp.srcport"] or v["udp.srcport"] or 0),
                   int(v["tcp.dstport"] or v["udp.dstport"] or 0))
        packets[key] += 1
        octets[key] += length
    return packets, octets


def exported(rows: list[dict]) -> tuple[Counter, Counter, dict]:
    """nfdump rows summed per the same keys as ``truth``; and each key's flowDirection values."""
    import ipaddress

    packets, octets, direction = Counter(), Counter(), {}
    for r in rows:
        v6 = "src6_addr" in r
        src = str(ipaddress.ip_address(r["src6_addr"] if v6 else r["src4_addr"]))
        dst = str(ipaddress.ip_address(r["dst6_addr"] if v6 else r["dst4_addr"]))
        if r["proto"] in (1, 58):
            key = (src, dst, r["proto"], 0, r["icmp_type"])
        else:
            key = (src, dst, r["proto"], r.get("src_port", 0), r.get("dst_port", 0))
        packets[key] += r["in_packets"]
        octets[key] += r["in_bytes"]
        direction.setdefault(key, set()).add(r["direction"])
    return packets, octets, direction


def send_traffic(ns: Namespaces, a: str, b: str) -> dict:
    """Pings, UDP datagrams and a TCP transfer from a to b, both families; the flows known in advance."""
    known = {}
    for family, src, dst, echo, reply, header in ((4, A4, B4, 8, 0, 28), (6, A6, B6, 128, 129, 48)):
        proto = 1 if family == 4 else 58
        ns.run(a, "ping", f"-{family}", "-c", str(PINGS), "-i", "0.05", "-s", str(PING_PAYLOAD), dst)
        known[(src, dst, proto, 0, echo)] = (PINGS, PINGS * (header + PING_PAYLOAD))
        known[(dst, src, proto, 0, reply)] = (PINGS, PINGS * (header + PING_PAYLOAD))
        af = socket.AF_INET if family == 4 else socket.AF_INET6
        with entered(b):
            rx = socket.socket(af, socket.SOCK_DGRAM)
            rx.bind((dst, 7000))
        with entered(a):
            tx = socket.socket(af, socket.SOCK_DGRAM)
            tx.bind((src, 7100))
        with rx, tx:
            for size in UDP_SIZES:
                tx.sendto(b"u" * size, (dst, 7000))
                rx.settimeout(5)
                assert len(rx.recv(65536)) == size
        udp_header = 28 if family == 4 else 48
        known[(src, dst, 17, 7100, 7000)] = (len(UDP_SIZES), sum(UDP_SIZES) + udp_header * len(UDP_SIZES))
        with entered(b):
            server = socket.socket(af, socket.SOCK_STREAM)
            server.bind((dst, 7001))
            server.listen(1)
        received = []

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                n = 0
                while chunk := conn.recv(65536):
                    n += len(chunk)
                received.append(n)

        t = threading.Thread(target=serve)
        t.start()
        with entered(a):
            client = socket.socket(af, socket.SOCK_STREAM)
            client.bind((src, 7101))
        with client:
            client.connect((dst, 7001))
            client.sendall(b"t" * TCP_LENGTH)
            client.shutdown(socket.SHUT_WR)
            client.settimeout(10)
            assert client.recv(1) == b""
        t.join(10)
        server.close()
        assert received == [TCP_LENGTH]
    return known


def test_afpacket_meters_exactly_what_crossed_the_link(lab, tmp_path):
    ns, a, b = lab
    with NsNfcapd(b, tmp_path, host=B4) as nf:  # across the metered link: our export crosses it too
        dump = Tcpdump(ns, b, "vb", tmp_path / "truth.pcap")
        run = Run(a, tmp_path, 1, Sources=["afpacket:va"], IpFixCollectors=[nf.collector], Workers=2)
        known = send_traffic(ns, a, b)
        dump.stop()
        time.sleep(1.2)  # the status file is rewritten every second
        status = subprocess.run([sys.executable, "-m", "flowmeter.cli", "status"], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        log = run.stop()
        rows = nf.records()
    packets, octets, direction = exported(rows)
    want_packets, want_octets = truth(dump.path)
    # the flows sent: as many packets and octets as sent, as tcpdump saw, and the right direction
    for key, (n, length) in known.items():
        assert (packets[key], octets[key]) == (n, length) == (want_packets[key], want_octets[key]), key
    for key in want_packets:  # every other flow between the two, but our export, as tcpdump saw it
        if key[4] != nf.port and (key[2] == 6 or key[:3] in {(k[0], k[1], k[2]) for k in known}):
            assert (packets[key], octets[key]) == (want_packets[key], want_octets[key]), key
    tcp = [k for k in packets if k[2] == 6]
    assert len(tcp) == 4 and sum(octets[k] for k in tcp if k[3] == 7101) > 2 * TCP_LENGTH
    for key, dirs in direction.items():
        if key[0] in (A4, A6):
            assert dirs == {1}, key  # leaving the metered end: SendingToPeer
        elif key[0] in (B4, B6):
            assert dirs == {0}, key
    # our own export crossed va but was not metered
    assert not [k for k in packets if k[2] == 17 and k[4] == nf.port]
    assert "own export" in log, log
    assert want_packets[(A4, B4, 17, _src_port_of_export(want_packets, nf.port), nf.port)] > 0
    assert "capture-0 afpacket:va:" in log
    # flowmeter status showed the run while it ran: its source, packets and kernel counts
    assert status.returncode == 0, status.stderr
    assert f"pid {run.proc.pid}" in status.stdout and "afpacket:va:" in status.stdout, status.stdout
    assert "kernel drops 0" in status.stdout and "packets metered" in status.stdout
    # the flows not ended yet are held, not lost
    assert "lost:" not in status.stdout and re.search(r"^  held: [1-9][\d,]* packets metered are in flows not ended",
                                                      status.stdout, re.M), status.stdout


def _src_port_of_export(packets: Counter, port: int) -> int:
    ports = {k[3] for k in packets if k[2] == 17 and k[4] == port}
    assert len(ports) == 1, ports
    return ports.pop()


@pytest.mark.parametrize("direction,keep", [("SendingToPeer", {1}), ("ReceivedFromPeer", {0})])
def test_direction_setting_exports_only_its_half(lab, tmp_path, direction, keep):
    ns, a, b = lab
    with NsNfcapd(a, tmp_path) as nf:
        run = Run(a, tmp_path, 1, Sources=["afpacket:va"], IpFixCollectors=[nf.collector], Direction=direction)
        known = send_traffic(ns, a, b)
        log = run.stop()
        rows = nf.records()
    packets, octets, direction_of = exported(rows)
    for key, (n, length) in known.items():
        mine = (key[0] in (A4, A6)) == (keep == {1})
        assert (packets[key], octets[key]) == ((n, length) if mine else (0, 0)), key
    assert set().union(*direction_of.values()) == keep
    assert "other direction" in log


# --- a tun device: raw IP, no link header -----------------------------------------------

TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
T4, P4, T6, P6 = "10.8.0.1", "10.8.0.2", "fd08::1", "fd08::2"


def open_tun(ns: Namespaces, name: str, ifname: str) -> int:
    import fcntl
    import struct

    with entered(name):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TUN | IFF_NO_PI))
    ns.run(name, "sysctl", "-qw", f"net.ipv6.conf.{ifname}.accept_dad=0")
    ns.run(name, "ip", "addr", "add", f"{T4}/24", "dev", ifname)
    ns.run(name, "ip", "addr", "add", f"{T6}/64", "dev", ifname, "nodad")
    ns.run(name, "ip", "link", "set", ifname, "up")
    return fd


def test_tun_interface_raw_ip_both_directions(tmp_path):
    from tests.support.pcapwrite import ipv4, ipv6, udp

    why = available()
    assert not why, why
    with Namespaces() as ns:
        a = ns.add("t")
        fd = open_tun(ns, a, "tun9")
        with contextlib.ExitStack() as cleanup, NsNfcapd(a, tmp_path) as nf:
            cleanup.callback(os.close, fd)
            run = Run(a, tmp_path, 1, Sources=["afpacket:tun9"], IpFixCollectors=[nf.collector],
                      LocalNetworks=["10.8.0.1/32"])
            sizes = (20, 300, 1200)
            with entered(a):
                out4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                out6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            with out4, out6:
                for size in sizes:  # out of the tun: the kernel sends, the test reads
                    out4.sendto(b"o" * size, (P4, 7200))
                    out6.sendto(b"o" * size, (P6, 7200))
            seen_out = []
            deadline = time.monotonic() + 5
            while len(seen_out) < 2 * len(sizes) and time.monotonic() < deadline:
                packet = os.read(fd, 65536)
                if packet[0] >> 4 == 4 and packet[9] == 17 or packet[0] >> 4 == 6 and packet[6] == 17:
                    seen_out.append(packet)
            assert len(seen_out) == 2 * len(sizes)
            for size in sizes:  # into the tun: the test writes, the kernel receives
                os.write(fd, ipv4(P4, T4, 17, udp(7300, 7301, b"i" * size)))
                os.write(fd, ipv6(P6, T6, 17, udp(7300, 7301, b"i" * size)))
            time.sleep(0.3)
            log = run.stop()
            rows = nf.records()
    packets, octets, direction = exported(rows)
    sport4, sport6 = seen_out[0][20:22], seen_out[1][40:42]
    out_keys = [(T4, P4, 17, int.from_bytes(sport4, "big"), 7200), (T6, P6, 17, int.from_bytes(sport6, "big"), 7200)]
    for key, header in zip(out_keys, (28, 48)):
        assert (packets[key], octets[key]) == (3, sum(sizes) + 3 * header), (key, log)
        assert direction[key] == {1}
    for key, header in (((P4, T4, 17, 7300, 7301), 28), ((P6, T6, 17, 7300, 7301), 48)):
        assert (packets[key], octets[key]) == (3, sum(sizes) + 3 * header), (key, log)
        assert direction[key] == {0}


# --- NFLOG: frames the firewall dropped -------------------------------------------------

NFT_RULES = """
table inet fmtest {
    chain out {
        type filter hook output priority 0; policy accept;
        udp dport 9999 log group 5 prefix "deny-acl: " drop
    }
}
"""


@pytest.mark.parametrize("direction", ["Both", "ReceivedFromPeer"])
def test_nflog_drops_arrive_as_dropped_flows(lab, tmp_path, direction):
    ns, a, b = lab
    rules = tmp_path / "rules.nft"
    rules.write_text(NFT_RULES)
    ns.run(a, "nft", "-f", str(rules))
    ipfix = tmp_path / "out.ipfix"
    run = Run(a, tmp_path, 2, Sources=["afpacket:va", "nflog:5"], IpFixCollectors=[f"File/{ipfix}"],
              Direction=direction)
    with entered(a):
        for family, dst in ((socket.AF_INET, B4), (socket.AF_INET6, B6)):
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind(("", 7400))
                for size in (50, 60, 70):
                    try:
                        s.sendto(b"d" * size, (dst, 9999))
                    except PermissionError:  # the drop says EPERM to the sender
                        pass
    time.sleep(0.3)
    log = run.stop()
    records = ipfixdump_records(ipfix)
    dropped = [r for r in records if int(r.get("forwardingStatus", 0)) == 129]
    by_family = Counter("sourceIPv6Address" in r for r in dropped)
    assert by_family == {False: 1, True: 1}, (records, log)
    for r in dropped:
        assert int(r["destinationTransportPort"]) == 9999
        assert int(r["packetDeltaCount"]) == 3
        header = 48 if "sourceIPv6Address" in r else 28
        assert int(r["octetDeltaCount"]) == 3 * header + 180
        assert int(r["flowDirection"]) == 1
    # nothing of port 9999 crossed the link: no forwarded record of it
    assert not [r for r in records if int(r.get("destinationTransportPort", 0)) == 9999
                and int(r.get("forwardingStatus", 0)) != 129]


# --- fanout: two capture processes on one interface -----------------------------------

def test_fanout_two_captures_count_every_packet_once(lab, tmp_path):
    ns, a, b = lab
    with NsNfcapd(a, tmp_path) as nf:
        dump = Tcpdump(ns, b, "vb", tmp_path / "truth.pcap")
        run = Run(a, tmp_path, 2, Sources=["afpacket:va"], IpFixCollectors=[nf.collector], Fanout=2, Workers=2)
        with entered(b):
            rx = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(20)]
            for i, s in enumerate(rx):
                s.bind((B4, 8000 + i))
        with entered(a):
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with tx:
            for round_ in range(50):
                for i in range(20):
                    tx.sendto(b"f" * (i + round_), (B4, 8000 + i))
        time.sleep(0.3)
        dump.stop()
        for s in rx:
            s.close()
        log = run.stop()
        rows = nf.records()
    packets, octets, _ = exported(rows)
    want_packets, want_octets = truth(dump.path)
    ours = [k for k in want_packets if k[2] == 17 and 8000 <= k[4] < 8020]
    assert len(ours) == 20
    assert sum(packets[k] for k in ours) == 1000 == sum(want_packets[k] for k in ours)
    for k in ours:
        assert (packets[k], octets[k]) == (want_packets[k], want_octets[k])
    # both capture processes read frames, and each reports the kernel's counts
    lines = [line for line in log.splitlines() if " afpacket:va: " in line]
    assert any("capture-0 " in line for line in lines) and any("capture-1 " in line for line in lines), log
    assert all("kernel drops 0" in line for line in lines), log


# --- privileges ----------------------------------------------------------------------

def test_runs_as_the_configured_user_after_opening_the_ring(lab, tmp_path):
    """Started as root with ``User`` and ``Groups``, from a shell whose XDG_RUNTIME_DIR only root can
    reach (as after ``sudo -i``): the run's directory is made in /run/flowmeter, the user's own."""
    import grp
    import pwd

    import psutil

    ns, a, b = lab
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrnam("nogroup")
    roots = tmp_path / "user-0"
    roots.mkdir(mode=0o700)
    with NsNfcapd(a, tmp_path) as nf:
        run = Run(a, tmp_path, 1, Sources=["afpacket:va"], IpFixCollectors=[nf.collector], User="nobody",
                  Groups=["nogroup"], env={"XDG_RUNTIME_DIR": str(roots), "RUNTIME_DIRECTORY": ""})
        parent = psutil.Process(run.proc.pid)
        procs = [parent, *parent.children(recursive=True)]
        assert len(procs) >= 4  # supervisor, exporter, worker, capture
        assert {p.uids().effective for p in procs} == {nobody.pw_uid}
        assert {p.uids().real for p in procs} == {nobody.pw_uid}
        for p in procs:  # no capability left, none to be had again (bounding set), not even through exec
            fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{p.pid}/status").read_text().splitlines()
                          if ":\t" in line)
            assert [int(fields[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")] == [0] * 5, fields
            assert fields["NoNewPrivs"].strip() == "1", fields
            # the user's group, and as supplementary groups only those of the profile
            assert {int(g) for g in fields["Gid"].split()} == {nobody.pw_gid}, fields
            assert fields["Groups"].split() == [str(group.gr_gid)], fields
        with entered(a):  # the pipeline's ipc sockets, as this namespace lists them
            paths = [line.split()[-1] for line in Path("/proc/net/unix").read_text().splitlines()[1:]
                     if "flowmeter-" in line]
        assert paths
        rundir = Path(paths[0]).parent
        assert rundir.parent == Path("/run/flowmeter"), rundir
        st = rundir.stat()
        assert st.st_uid == nobody.pw_uid and st.st_mode & 0o777 == 0o700
        ns.run(a, "ping", "-c", "3", "-i", "0.05", B4)
        time.sleep(0.2)
        log = run.stop()
        rows = nf.records()
    packets, _, _ = exported(rows)
    assert packets[(A4, B4, 1, 0, 8)] == 3 and packets[(B4, A4, 1, 0, 0)] == 3
    # the user empties its directory; root's next start removes it (the user may not, in root's /run/flowmeter)
    assert "running as root" not in log and list(rundir.iterdir()) == [], log


def test_running_as_root_without_user_says_so_once(lab, tmp_path):
    ns, a, b = lab
    with NsNfcapd(a, tmp_path) as nf:
        run = Run(a, tmp_path, 1, Sources=["afpacket:va"], IpFixCollectors=[nf.collector])
        log = run.stop()
    said = [line for line in log.splitlines() if "running as root" in line]
    assert said == ["flowmeter: running as root: every process, the packet parsers included, keeps root's "
                    "privileges; set User to a user of its own to run as it once the sources are open"], log


# --- the datapath feed ------------------------------------------------------------------

def test_feed_frames_with_verdicts_while_hostile_messages_are_dropped(lab, tmp_path):
    import msgpack

    from flowmeter.capture.sources.feedclient import FeedClient, header_frame, metadata_frame
    from tests.support.pcapwrite import ipv4, tcp

    ns, a, b = lab
    endpoint = f"ipc://{tmp_path}/feed.sock"
    ipfix = tmp_path / "out.ipfix"
    run = Run(a, tmp_path, 1, Sources=[f"feed:{endpoint}"], IpFixCollectors=[f"File/{ipfix}"],
              DropPrefixes={"trust": "AclDrop"})
    now = time.time_ns()
    good = [header_frame(ipv4("10.1.0.1", "10.2.0.1", 6, tcp(40000, 443, 0x18, b"x" * 100)), t=now + i,
                         dir="out", peer=7) for i in range(10)]
    good += [metadata_frame("2001:db8::1", "2001:db8::2", 17, 120, sport=5353, dport=53, t=now + i, dir="in",
                            verdict="drop", reason="trust: peer not allowed") for i in range(4)]
    hostile = [b"\xc1not msgpack", msgpack.packb({"v": 1, "frames": [{"t": "soon"}]}),
               msgpack.packb({"v": 99, "frames": []}), msgpack.packb([1, 2, 3]),
               msgpack.packb({"v": 1, "frames": [{}] * 100_000})[:-5], b"\x00" * (2 << 20)]
    with entered(a), FeedClient(endpoint) as client:
        for i, frame in enumerate(good):
            assert client.send([frame])
            client.send_raw(hostile[i % len(hostile)])
    time.sleep(0.5)
    log = run.stop()
    records = [r for r in ipfixdump_records(ipfix) if "packetDeltaCount" in r]
    tcp_rows = [r for r in records if r.get("sourceIPv4Address") == "10.1.0.1"]
    assert len(tcp_rows) == 1, records
    assert int(tcp_rows[0]["packetDeltaCount"]) == 10 and int(tcp_rows[0]["octetDeltaCount"]) == 1400
    assert int(tcp_rows[0]["flowDirection"]) == 1  # "out": sent to peer 7, its interface
    assert (int(tcp_rows[0]["ingressInterface"]), int(tcp_rows[0]["egressInterface"])) == (0, 7)
    assert int(tcp_rows[0].get("forwardingStatus", 64)) == 64
    dropped = [r for r in records if "sourceIPv6Address" in r]
    assert len(dropped) == 1 and int(dropped[0]["packetDeltaCount"]) == 4
    assert int(dropped[0]["octetDeltaCount"]) == 480 and int(dropped[0]["forwardingStatus"]) == 130
    assert "source dropped messages" in log or "dropped messages" in log, log


def test_interface_deleted_while_metering_drains_and_says_so(lab, tmp_path):
    ns, a, b = lab
    ipfix = tmp_path / "out.ipfix"
    run = Run(a, tmp_path, 1, Sources=["afpacket:va"], IpFixCollectors=[f"File/{ipfix}"])
    ns.run(a, "ping", "-c", "2", "-i", "0.05", B4)
    time.sleep(0.2)
    ns.run(a, "ip", "link", "del", "va")
    run.proc.wait(30)
    run._reader.join(5)
    log = "".join(run.lines)
    assert run.proc.returncode == 1, log
    assert "flowmeter: afpacket:va: the interface is gone (deleted)" in log
    echo = [r for r in ipfixdump_records(ipfix) if r.get("sourceIPv4Address") == A4 and "packetDeltaCount" in r]
    assert len(echo) == 1 and int(echo[0]["packetDeltaCount"]) == 2, log  # what was metered is exported


def test_unknown_interface_is_one_clear_line(lab, tmp_path):
    ns, a, b = lab
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"FlowMetadata": {"Sources": ["afpacket:nosuch0"]}}))
    r = ns.run(a, sys.executable, "-m", "flowmeter.cli", "run", "--profile", str(profile), check=False, cwd=ROOT)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["flowmeter: afpacket:nosuch0: no interface 'nosuch0' (in this network namespace)"]


def test_a_source_a_restart_cannot_fix_stops_the_run_with_its_line(lab, tmp_path):
    """A feed opened by its capture process: the error is the process's (exit 78), not restarted in a loop."""
    ns, a, b = lab
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"FlowMetadata": {"Sources": [f"feed:ipc://{tmp_path}/missing/feed.sock"]}}))
    start = time.monotonic()
    r = ns.run(a, sys.executable, "-m", "flowmeter.cli", "run", "--profile", str(profile), check=False, cwd=ROOT)
    assert r.returncode == 1 and time.monotonic() - start < 30, r.stderr
    lines = r.stderr.splitlines()
    assert any(re.match(rf"flowmeter: capture-0: feed:ipc://{tmp_path}/missing/feed.sock: cannot bind: ", x)
               for x in lines), lines
    assert re.search(r"^flowmeter: capture-0 \(pid \d+\) exited with code 78; pipeline stopped \(an error a "
                     r"restart cannot fix\)$", r.stderr, re.M), r.stderr
    assert re.search(r"^restarts: capture-0 exited with code 78 at [\d.]+ s; not restarted$", r.stderr, re.M), r.stderr


def test_no_pipeline_outlives_a_killed_supervisor(lab, tmp_path):
    import psutil

    ns, a, b = lab
    run = Run(a, tmp_path, 1, Sources=["afpacket:va"])
    children = psutil.Process(run.proc.pid).children(recursive=True)
    assert len(children) == 3
    run.proc.kill()  # SIGKILL: no drain from the supervisor
    gone, alive = psutil.wait_procs(children, timeout=20)  # the capture drains, the rest follow it
    assert not alive, [p.cmdline() for p in alive]


def test_vlan_tagged_frames(lab, tmp_path):
    """802.1Q and 802.1ad tagged frames sent from the other end (this kernel has no VLAN devices)."""
    from tests.support.pcapwrite import ethernet, ipv4, ipv6, udp

    ns, a, b = lab
    mac = bytes.fromhex(ns.run(a, "cat", "/sys/class/net/va/address").stdout.strip().replace(":", ""))
    with NsNfcapd(a, tmp_path) as nf:
        run = Run(a, tmp_path, 1, Sources=["afpacket:va"], IpFixCollectors=[nf.collector])
        with entered(b):
            raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            raw.bind(("vb", 0))
        with raw:
            for size in (100, 200, 300):
                for vlans, ethertype, packet in (
                        ([100], 0x0800, ipv4("10.20.0.2", "10.20.0.1", 17, udp(5000, 6000, b"v" * size))),
                        ([(0x88A8, 200), 300], 0x86DD, ipv6("fd20::2", "fd20::1", 17, udp(5000, 6000, b"v" * size)))):
                    frame = ethernet(packet, ethertype, vlans=vlans)
                    raw.send(mac + frame[6:])  # to va's address
        time.sleep(0.3)
        run.stop()
        rows = nf.records()
    packets, octets, direction = exported(rows)
    assert (packets[("10.20.0.2", "10.20.0.1", 17, 5000, 6000)], octets[("10.20.0.2", "10.20.0.1", 17, 5000, 6000)]) \
        == (3, 600 + 3 * 28)
    assert (packets[("fd20::2", "fd20::1", 17, 5000, 6000)], octets[("fd20::2", "fd20::1", 17, 5000, 6000)]) \
        == (3, 600 + 3 * 48)
    assert direction[("10.20.0.2", "10.20.0.1", 17, 5000, 6000)] == {0}


def test_capture_filter_meters_only_what_it_matches(lab, tmp_path):
    ns, a, b = lab
    with NsNfcapd(a, tmp_path) as nf:
        run = Run(a, tmp_path, 1, Sources=["afpacket:va"], IpFixCollectors=[nf.collector],
                  CaptureFilter="udp and dst port 7000")
        known = send_traffic(ns, a, b)
        run.stop()
        rows = nf.records()
    packets, octets, _ = exported(rows)
    udp = {k: v for k, v in known.items() if k[2] == 17}
    assert set(packets) == set(udp)
    assert {k: (packets[k], octets[k]) for k in packets} == udp
