"""Export across a link with a small MTU, and one whose MTU changes while flowmeter exports.

``flowmeter replay`` runs in namespace a and exports over the veth pair
va -- vb to two nfcapd in namespace b, one on IPv4 and one on IPv6 (with an
observation domain of its own). tcpdump on vb sees every datagram that
crossed: none may be an IP fragment, the template messages must be the
few the refresh rules ask for (a message refused as too big must not make
templates due again), and nfdump must hold every record the replay made.
"""
from __future__ import annotations

import json
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import traffic
from tests.support.collectors import Nfcapd
from tests.support.liverun import B4, B6, ROOT

PACKETS = 60_000  # about 6,000 flow records: a few hundred messages per collector
V6_DOMAIN = 42
REFRESH_MESSAGES = 256  # the profile default: templates again every this many messages


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mtu") / "traffic.pcap"
    traffic.write(str(path), traffic.generate(PACKETS, 3))
    return path


def set_mtu(ns, a: str, b: str, mtu: int) -> None:
    ns.run(a, "ip", "link", "set", "va", "mtu", str(mtu))
    ns.run(b, "ip", "link", "set", "vb", "mtu", str(mtu))


class Wire:
    """tcpdump on vb (namespace b): every frame that crossed the link, read back from its pcap.

    va's UDP segmentation offload is turned off first, as on a NIC without
    it: each datagram of a segmented send then crosses as a frame of its
    own, as on a wire (with it on, the veth carries the whole send as one
    large packet and tcpdump on vb sees that).
    """

    def __init__(self, ns, a: str, b: str, path: Path) -> None:
        ns.run(a, "ethtool", "-K", "va", "tx-udp-segmentation", "off")
        self.path = path
        self.proc = ns.popen(b, "tcpdump", "-i", "vb", "-n", "-U", "--immediate-mode", "-s", "0", "-B", "32768",
                             "-w", str(path),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()  # "listening on vb, ..." once it captures
        assert "listening on" in line, line

    def stop(self) -> list[bytes]:
        time.sleep(0.2)
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        report = self.proc.stderr.read()
        captured = re.search(r"(\d+) packets captured\n(\d+) packets received by filter\n0 packets dropped", report)
        assert captured and captured[1] == captured[2], report  # the capture itself is whole
        data = self.path.read_bytes()
        frames, off = [], 24
        while off + 16 <= len(data):
            incl = struct.unpack_from("<I", data, off + 8)[0]
            frames.append(data[off + 16:off + 16 + incl])
            off += 16 + incl
        return frames


def datagrams(frames: list[bytes]) -> tuple[int, dict[int, list[bytes]]]:
    """(IP fragments seen, UDP payloads by destination port) of Ethernet frames."""
    fragments, by_port = 0, {}
    for f in frames:
        kind = struct.unpack_from("!H", f, 12)[0]
        ip = f[14:]
        if kind == 0x0800:
            if struct.unpack_from("!H", ip, 6)[0] & 0x3FFF:  # more fragments, or an offset
                fragments += 1
                continue
            if ip[9] != 17:
                continue
            udp = ip[(ip[0] & 15) * 4:]
        elif kind == 0x86DD:
            if ip[6] == 44:  # a fragment header
                fragments += 1
                continue
            if ip[6] != 17:
                continue
            udp = ip[40:]
        else:
            continue
        by_port.setdefault(struct.unpack_from("!H", udp, 2)[0], []).append(udp[8:])
    return fragments, by_port


def ipfix_summary(messages: list[bytes]) -> dict:
    """Template messages, data messages, largest message and the header domains of IPFIX messages."""
    out = {"template": 0, "data": 0, "largest": 0, "domains": set()}
    for m in messages:
        length = struct.unpack_from("!H", m, 2)[0]
        assert length == len(m)
        out["largest"] = max(out["largest"], length)
        out["domains"].add(struct.unpack_from("!I", m, 12)[0])
        set_id = struct.unpack_from("!H", m, 16)[0]
        out["template" if set_id in (2, 3) else "data"] += 1
    return out


def replay(ns, a: str, capture: Path, tmp: Path, v4: Nfcapd, v6: Nfcapd, **settings) -> subprocess.Popen:
    profile = tmp / "profile.json"
    profile.write_text(json.dumps({"FlowMetadata": {
        "IpFixCollectors": [v4.collector, {"Address": v6.collector, "ObservationDomainId": V6_DOMAIN}],
        "StatisticsIntervalSeconds": 0, "DrainTimeoutSeconds": 30, **settings}}))
    return ns.popen(a, sys.executable, "-m", "flowmeter.cli", "replay", str(capture), "--profile", str(profile),
                    "--stats", str(tmp / "stats.json"), cwd=ROOT, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, text=True)


def check(tmp: Path, out: str, wire: list[bytes], v4: Nfcapd, v6: Nfcapd, mtus: set[int]) -> dict:
    """Every record at both collectors, no fragment, few template messages; the replay's counters."""
    stats = json.loads((tmp / "stats.json").read_text())["exporter"]
    fragments, by_port = datagrams(wire)
    assert fragments == 0
    for nf, overhead, domain in ((v4, 28, 1), (v6, 48, V6_DOMAIN)):
        c = stats["collectors"][nf.collector]
        assert c["not_sent_messages"] == 0 and c["errors"] == {}, out
        assert c["flow_records"] == stats["records"] and c["packets"] == PACKETS == stats["packets"]
        rows = nf.records()
        assert len(rows) == stats["records"]
        assert sum(r["in_packets"] for r in rows) == PACKETS
        seen = ipfix_summary(by_port[nf.port])
        assert seen["domains"] == {domain}
        assert seen["largest"] <= min(1452, min(mtus) - overhead if len(mtus) == 1 else 1452)
        assert seen["template"] + seen["data"] == c["messages"]
        # the first templates, then one more every REFRESH_MESSAGES messages: no storm
        assert seen["template"] == c["template_messages"] <= 1 + seen["data"] // REFRESH_MESSAGES + 1
    return stats


@pytest.mark.parametrize("mtu", [1280, 1420])
def test_every_record_crosses_a_small_mtu_whole(lab, capture, tmp_path, mtu):
    ns, a, b = lab
    set_mtu(ns, a, b, mtu)
    v4, v6 = Nfcapd(tmp_path / "v4", B4, netns=b), Nfcapd(tmp_path / "v6", B6, netns=b)
    try:
        wire = Wire(ns, a, b, tmp_path / "wire.pcap")
        proc = replay(ns, a, capture, tmp_path, v4, v6)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        stats = check(tmp_path, out, wire.stop(), v4, v6, {mtu})
        for nf, overhead in ((v4, 28), (v6, 48)):
            assert stats["collectors"][nf.collector]["message_size"] == min(1452, mtu - overhead)
    finally:
        v4.stop()
        v6.stop()


def test_mtu_changes_during_a_run(lab, capture, tmp_path):
    """Paced to last a few seconds; the MTU drops from 1420 to 1280 mid-run, then rises to 1500."""
    ns, a, b = lab
    set_mtu(ns, a, b, 1420)
    v4, v6 = Nfcapd(tmp_path / "v4", B4, netns=b), Nfcapd(tmp_path / "v6", B6, netns=b)
    try:
        wire = Wire(ns, a, b, tmp_path / "wire.pcap")
        proc = replay(ns, a, capture, tmp_path, v4, v6, ExportRate=100)  # ~250 messages: ~3 s each
        time.sleep(1.0)
        assert proc.poll() is None, "the replay ended before the MTU changed"
        set_mtu(ns, a, b, 1280)
        time.sleep(1.0)
        set_mtu(ns, a, b, 1500)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        stats = check(tmp_path, out, wire.stop(), v4, v6, {1420, 1280, 1500})
        for nf in (v4, v6):
            c = stats["collectors"][nf.collector]
            assert c["refused"] >= 1 and c["recuts"] >= 1, c  # queued messages were cut at 1280
            assert c["message_size"] == 1452  # and it grew back
    finally:
        v4.stop()
        v6.stop()
