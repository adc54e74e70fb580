"""The pcap writer and frame builders: tshark reads what we write.

tshark is the independent reader: packet count, captured and original
lengths, times (µs and ns files, both byte orders), and the header fields
the frame builders put in (addresses, lengths, ports, flags, VLAN ids).
"""
from __future__ import annotations

import shutil
import struct
import subprocess
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from tests.support.pcapwrite import (ETH_IPV4, ethernet, ethernet_ipv4_icmp, ethernet_ipv4_tcp, ethernet_ipv4_udp,
                                     ethernet_ipv6_icmp, ethernet_ipv6_tcp, ethernet_ipv6_udp, internet_checksum, ipv4,
                                     ipv6, ipv6_ext, ipv6_fragment, jumbo_option, pcap_header, udp, write_pcap,
                                     write_pcap_template)

needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
T0 = 1_700_000_000_123_456_789  # ns


def tshark_fields(path: Path, *fields: str) -> list[list[str]]:
    args = ["tshark", "-n", "-r", str(path), "-T", "fields", "-E", "separator=/t", "-E", "occurrence=a"]
    for f in fields:
        args += ["-e", f]
    run = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return [line.split("\t") for line in run.stdout.splitlines()]


def ns(epoch: str) -> int:
    return int(Decimal(epoch) * 10**9)


def sample_packets() -> list[tuple]:
    return [
        (T0, ethernet_ipv4_tcp("10.0.0.1", "10.0.0.2", 40000, 443, 0x12, b"hello")),
        (T0 + 1_500, ethernet_ipv6_udp("2001:db8::1", "2001:db8::2", 5353, 53, b"q" * 30)),
        (T0 + 2_000_000_001, ethernet_ipv4_icmp("192.0.2.1", "192.0.2.2", 8, 0), 98),  # snap-cut on the wire
        (T0 + 3_000_000_000, ethernet_ipv4_udp("10.1.1.1", "10.2.2.2", 1, 2, b"x" * 2000)),  # cut by snaplen
    ]


@needs_tshark
@pytest.mark.parametrize("byte_order", ["<", ">"])
@pytest.mark.parametrize("nanosecond", [False, True])
def test_tshark_reads_counts_lengths_and_times(tmp_path, byte_order, nanosecond):
    path = tmp_path / "w.pcap"
    packets = sample_packets()
    assert write_pcap(path, packets, nanosecond=nanosecond, byte_order=byte_order, snaplen=1500) == 4
    rows = tshark_fields(path, "frame.time_epoch", "frame.cap_len", "frame.len")
    assert len(rows) == len(packets)
    for row, packet in zip(rows, packets):
        ts, frame = packet[0], packet[1]
        want_ts = ts if nanosecond else ts // 1000 * 1000
        origlen = packet[2] if len(packet) > 2 else len(frame)
        assert (ns(row[0]), int(row[1]), int(row[2])) == (want_ts, min(len(frame), 1500), origlen)


@needs_tshark
def test_tshark_sees_the_header_fields_the_builders_put_in(tmp_path):
    path = tmp_path / "fields.pcap"
    write_pcap(path, [
        (T0, ethernet_ipv4_tcp("10.0.0.1", "10.0.0.2", 40000, 443, 0x18, b"abc", tos=0xB8, vlans=[7])),
        (T0, ethernet_ipv6_tcp("2001:db8::1", "2001:db8::2", 1, 2, 0x02, tclass=0x20,
                               vlans=[(0x88A8, 100), 200])),
        (T0, ethernet_ipv4_udp("10.0.0.1", "10.0.0.2", 7, 9, b"12345678")),
        (T0, ethernet_ipv6_icmp("fe80::1", "ff02::1", 135, 0)),
    ])
    rows = tshark_fields(path, "ip.len", "ip.dsfield", "ipv6.plen", "ipv6.tclass", "tcp.flags",
                         "tcp.srcport", "udp.dstport", "vlan.id", "icmpv6.type", "ieee8021ad.id")
    number = lambda text: int(text, 0)  # noqa: E731  (tshark shows some fields in hex)
    assert [number(rows[0][i]) for i in (0, 1, 4, 5, 7)] == [43, 0xB8, 0x18, 40000, 7]
    assert [number(rows[1][i]) for i in (2, 3)] == [20, 0x20] and rows[1][9:] + [rows[1][7]] == ["100", "200"]
    assert [number(rows[2][i]) for i in (0, 6)] == [36, 9]
    assert [number(rows[3][i]) for i in (2, 8)] == [8, 135]


def test_ipv4_header_checksum_is_valid_and_lengths_are_computed():
    packet = ipv4("10.0.0.1", "10.0.0.2", 17, udp(1, 2, b"abcd"), options=b"\x01")
    assert internet_checksum(packet[:24]) == 0  # options padded to 4: IHL 6
    assert packet[0] == 0x46 and struct.unpack("!H", packet[2:4])[0] == len(packet) == 36
    assert struct.unpack("!H", packet[28:30])[0] == 12  # UDP length


def test_ipv6_extension_headers_are_multiples_of_eight_octets():
    for body in (b"", b"x" * 5, b"x" * 6, b"x" * 7, jumbo_option(70000), b"x" * 13):
        header = ipv6_ext(17, body)
        assert len(header) % 8 == 0 and len(header) == (header[1] + 1) * 8
    assert len(ipv6_fragment(17, offset=3, more=True)) == 8
    packet = ipv6("::1", "::2", 0, ipv6_ext(17) + udp(1, 2))
    assert struct.unpack("!H", packet[4:6])[0] == 16


def test_template_writer_writes_the_same_bytes_as_the_tuple_writer(tmp_path):
    template = ethernet_ipv4_tcp("10.0.0.1", "10.0.0.2", 1000, 443, 0x10, b"p" * 200)
    n = 1000
    rng = np.random.default_rng(7)
    ts = T0 + np.arange(n, dtype=np.uint64) * 1234
    src = (10 << 24) + rng.integers(0, 1 << 16, n)
    sport = rng.integers(1024, 65536, n)
    for byte_order, nanosecond in (("<", False), (">", True)):
        a, b = tmp_path / f"a{byte_order}.pcap", tmp_path / f"b{byte_order}.pcap"
        write_pcap_template(a, template, ts, {26: (">u4", src), 34: (">u2", sport)}, snaplen=96,
                            byte_order=byte_order, nanosecond=nanosecond, chunk=300)
        frames = []
        for i in range(n):
            f = bytearray(template)
            f[26:30] = int(src[i]).to_bytes(4, "big")
            f[34:36] = int(sport[i]).to_bytes(2, "big")
            frames.append((int(ts[i]), bytes(f)))
        write_pcap(b, frames, snaplen=96, byte_order=byte_order, nanosecond=nanosecond)
        assert a.read_bytes() == b.read_bytes()


def test_columns_write_the_same_bytes_as_tuples(tmp_path):
    frames = np.frombuffer(b"".join(ethernet_ipv4_udp("10.0.0.1", "10.0.0.2", i, 53, b"abcd") for i in range(50)),
                           np.uint8).reshape(50, -1)
    ts = T0 + np.arange(50, dtype=np.uint64) * 999
    write_pcap(tmp_path / "a.pcap", (ts, frames, 1000), snaplen=40, byte_order=">")
    write_pcap(tmp_path / "b.pcap", [(int(t), f.tobytes(), 1000) for t, f in zip(ts, frames)], snaplen=40, byte_order=">")
    assert (tmp_path / "a.pcap").read_bytes() == (tmp_path / "b.pcap").read_bytes()


def test_template_writer_leaves_out_fields_beyond_the_snap_length(tmp_path):
    template = ethernet_ipv4_udp("10.0.0.1", "10.0.0.2", 1, 2, b"z" * 100)
    path = tmp_path / "t.pcap"
    write_pcap_template(path, template, [T0, T0 + 1], {40: (">u4", [1, 2]), 2: (">u2", 0xBEEF)},
                        snaplen=42, origlen=[500, 600])
    data = path.read_bytes()
    assert data[:24] == pcap_header(snaplen=42)
    first = data[24 + 16:24 + 16 + 42]
    assert first[2:4] == b"\xbe\xef" and first[40:42] == b"\0\0"  # cut inside the patched field
    assert struct.unpack("<IIII", data[24:40])[2:] == (42, 500)
    with pytest.raises(ValueError, match="outside"):
        write_pcap_template(path, template, [T0], {len(template) - 1: (">u2", 1)})


@needs_tshark
def test_tshark_reads_a_template_capture(tmp_path):
    path = tmp_path / "big.pcap"
    n = 5000
    ts = T0 + np.arange(n, dtype=np.uint64) * 1_000_003
    template = ethernet(ipv4("10.0.0.1", "10.0.0.2", 6, b"\0" * 40), ETH_IPV4)
    write_pcap_template(path, template, ts, {34: (">u2", np.arange(n) % 60000 + 1)}, snaplen=64,
                        origlen=1514, nanosecond=True)
    rows = tshark_fields(path, "frame.time_epoch", "frame.cap_len", "frame.len", "tcp.srcport")
    assert len(rows) == n
    assert [ns(r[0]) for r in rows] == ts.tolist()
    assert {(r[1], r[2]) for r in rows} == {("64", "1514")}
    assert [int(r[3]) for r in rows[:3]] == [1, 2, 3]
