"""AF_PACKET ring capture on real interfaces, in network namespaces made by each test.

Every test makes its own namespaces (``tests/netns.py``), sends known
traffic across a veth pair or through a tun device it drives, reads it back
through ``AfPacketSource`` and decodes it with ``decode_batch``: the frames
sent are seen exactly once, with their lengths, direction, link type and
interface. Most tests read in a thread while traffic flows, as a capture
process does; the ring-wrap test reads in rounds from the test itself.
Needs root; a machine without namespaces fails the tests, it does not skip them.
"""
from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import mmap
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from flowmeter.capture.decode import LINKTYPE_ETHERNET, LINKTYPE_RAW, decode_batch
from flowmeter.capture.sources import Columns, afpacket
from flowmeter.capture.sources.afpacket import (BIG_ENDIAN_HOST, BPF_RET_K, AfPacketSource, SourceError, compile_filter,
                                                walk_ring_blocks, warm_up)
from flowmeter.ipc.packets import DIR_EGRESS, DIR_INGRESS, PACKET_DTYPE, ST_OK
from tests.support import netns
from tests.support.netns import Namespaces, entered
from tests.support.pcapwrite import ipv4, udp

A4, B4, A6, B6 = "10.9.0.1", "10.9.0.2", "fd09::1", "fd09::2"
RECORD = np.dtype(PACKET_DTYPE.descr + [("status", "u1"), ("caplen", "<u4"), ("origlen", "<u4"),
                                        ("linktype", "<u2")])
SMALL_RING = {"block_size": 1 << 16, "blocks": 16}
ICMP_ECHO, ICMP_REPLY, ICMP6_ECHO, ICMP6_REPLY = 8 << 8, 0, 128 << 8, 129 << 8

TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000

# --- helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def kernels_loaded():
    """Compiled (the first time on a machine: a minute) before any test's traffic and deadlines."""
    from flowmeter.capture import decode
    from flowmeter.capture.sources import afpacket

    afpacket.warm_up()
    decode.warm_up()


@pytest.fixture
def ns():
    why = netns.available()
    if why:
        pytest.fail(why)
    with Namespaces() as namespaces:
        yield namespaces


@pytest.fixture
def pair(ns):
    """Namespaces a and b joined by veth va (a: 10.9.0.1, fd09::1) -- vb (b: .2, ::2)."""
    a, b = ns.add("a"), ns.add("b")
    ns.veth(a, "va", f"{A4}/24", f"{A6}/64", b, "vb", f"{B4}/24", f"{B6}/64")
    return ns, a, b


def split(address: str) -> tuple[int, int]:
    """An address as the (hi, lo) halves of PACKET_DTYPE."""
    value = int(ipaddress.ip_address(address))
    return value >> 64, value & (1 << 64) - 1


def decoded(batch) -> np.ndarray:
    """The records of ``batch``, decoded, with their capture lengths and link type (a copy)."""
    n = len(batch)
    rows, status = np.empty(n, PACKET_DTYPE), np.empty(n, np.uint8)
    decode_batch(batch, rows, status)
    out = np.empty(n, RECORD)
    for name in PACKET_DTYPE.names:
        out[name] = rows[name]
    out["status"], out["caplen"], out["origlen"], out["linktype"] = status, batch.caplen, batch.origlen, batch.linktype
    return out


def pick(recs: np.ndarray, src: str, dst: str, proto: int, **fields: int) -> np.ndarray:
    """The OK records from ``src`` to ``dst`` with protocol ``proto`` and the given field values."""
    (s_hi, s_lo), (d_hi, d_lo) = split(src), split(dst)
    keep = ((recs["status"] == ST_OK) & (recs["src_hi"] == s_hi) & (recs["src_lo"] == s_lo)
            & (recs["dst_hi"] == d_hi) & (recs["dst_lo"] == d_lo) & (recs["proto"] == proto))
    for name, value in fields.items():
        keep &= recs[name] == value
    return recs[keep]


class Collector:
    """Reads a source in a thread, as a capture loop does, and keeps every record decoded."""

    def __init__(self, src: AfPacketSource):
        self.src = src
        self.parts: list[np.ndarray] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for batch in self.src.read(0.05):
                    self.parts.append(decoded(batch))
        except BaseException as e:  # re-raised by stop(); a closed source ends the thread too
            self.error = e

    def records(self) -> np.ndarray:
        return np.concatenate(list(self.parts)) if self.parts else np.empty(0, RECORD)

    def wait_for(self, enough, timeout_s: float = 5.0) -> None:
        """Until ``enough(records)`` holds (or the deadline: then the asserts explain)."""
        wait_until(lambda: self.error is not None or enough(self.records()), timeout_s)

    def stop(self) -> np.ndarray:
        self._stop.set()
        self._thread.join(5)
        if self.error is not None:
            raise self.error
        return self.records()


def assert_interface_sides(recs: np.ndarray, ifindex: int) -> None:
    """Received frames: ingressInterface = the interface, egress 0; sent frames (PACKET_OUTGOING): the reverse."""
    received = recs["direction"] == DIR_INGRESS
    assert received.any() and (~received).any()
    assert (recs["direction"][~received] == DIR_EGRESS).all()
    assert (recs["ingress_if"][received] == ifindex).all() and (recs["egress_if"][received] == 0).all()
    assert (recs["ingress_if"][~received] == 0).all() and (recs["egress_if"][~received] == ifindex).all()


def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not condition():
        time.sleep(0.02)


def udp_socket(namespace: str, family: int, address: str, port: int) -> socket.socket:
    """A UDP socket of ``namespace`` bound to (address, port)."""
    with entered(namespace):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((address, port))
    return sock


def send_sizes(namespace: str, src: str, dst: str, dport: int, sizes: list[int], sport: int = 0) -> None:
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with contextlib.closing(udp_socket(namespace, family, src, sport)) as sock:
        for size in sizes:
            sock.sendto(b"u" * size, (dst, dport))


# --- tests -----------------------------------------------------------------------------


def test_veth_frames_seen_once_with_lengths_and_direction(pair):
    ns, a, b = pair
    snaplen = 128
    t0 = time.time_ns()  # before the source opens: the fresh veth's own frames (IPv6 neighbour
    with entered(a):     # discovery) may reach the ring at once
        src = AfPacketSource("va", snaplen=snaplen, **SMALL_RING)
        ifindex = socket.if_nametoindex("va")
    sinks = [udp_socket(b, socket.AF_INET, B4, 5001), udp_socket(b, socket.AF_INET6, B6, 5001),
             udp_socket(a, socket.AF_INET, A4, 5002)]
    with src, contextlib.ExitStack() as stack:
        for sink in sinks:
            stack.enter_context(sink)
        collector = Collector(src)
        ns.run(a, "ping", "-c", "3", "-i", "0.02", "-s", "1000", "-W", "2", B4)
        ns.run(a, "ping", "-6", "-c", "3", "-i", "0.02", "-s", "1000", "-W", "2", B6)
        send_sizes(a, A4, B4, 5001, [0, 1, 100, 1400])
        send_sizes(a, A6, B6, 5001, [0, 1, 100, 1400])
        send_sizes(b, B4, A4, 5002, [10, 200])
        collector.wait_for(lambda r: len(pick(r, B4, A4, 17)) == 2 and len(pick(r, A6, B6, 17)) == 4)
        recs = collector.stop()
        counters = src.counters()
    t1 = time.time_ns()

    def check(rows, count, l3, direction, link_header=14):
        assert len(rows) == count, rows
        assert sorted(rows["l3_bytes"]) == sorted(l3)
        assert (rows["direction"] == direction).all()
        assert (rows["origlen"] == rows["l3_bytes"] + link_header).all()
        assert (rows["caplen"] == np.minimum(rows["origlen"], snaplen)).all()

    # pings: requests leave the metered end (egress), replies arrive (ingress); cut at the snap length
    check(pick(recs, A4, B4, 1, icmp=ICMP_ECHO), 3, [1028] * 3, DIR_EGRESS)
    check(pick(recs, B4, A4, 1, icmp=ICMP_REPLY), 3, [1028] * 3, DIR_INGRESS)
    check(pick(recs, A6, B6, 58, icmp=ICMP6_ECHO), 3, [1048] * 3, DIR_EGRESS)
    check(pick(recs, B6, A6, 58, icmp=ICMP6_REPLY), 3, [1048] * 3, DIR_INGRESS)
    check(pick(recs, A4, B4, 17, dport=5001), 4, [28, 29, 128, 1428], DIR_EGRESS)
    check(pick(recs, A6, B6, 17, dport=5001), 4, [48, 49, 148, 1448], DIR_EGRESS)
    check(pick(recs, B4, A4, 17, dport=5002), 2, [38, 228], DIR_INGRESS)
    # exactly those: nothing else between the two global addresses but neighbour discovery
    ours = 0
    for s, d in ((A4, B4), (B4, A4), (A6, B6), (B6, A6)):
        (s_hi, s_lo), (d_hi, d_lo) = split(s), split(d)
        rows = recs[(recs["status"] == ST_OK) & (recs["src_hi"] == s_hi) & (recs["src_lo"] == s_lo)
                    & (recs["dst_hi"] == d_hi) & (recs["dst_lo"] == d_lo)]
        nd = (rows["proto"] == 58) & ((rows["icmp"] >> 8) >= 133) & ((rows["icmp"] >> 8) <= 137)
        ours += int((~nd).sum())
    assert ours == 12 + 4 + 4 + 2
    assert (recs["linktype"] == LINKTYPE_ETHERNET).all()
    assert_interface_sides(recs, ifindex)
    assert ((recs["ts_ns"] >= t0) & (recs["ts_ns"] <= t1)).all()
    assert counters["kernel drops"] == 0
    assert counters["kernel packets"] >= counters["frames read"] == len(recs)


def test_tun_device_is_raw_ip_both_ways(ns):
    t = ns.add("t")
    with entered(t):
        tun = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH22x", b"fmtun0", IFF_TUN | IFF_NO_PI))
        ns.run(t, "ip", "addr", "add", "10.77.0.1/24", "dev", "fmtun0")
        ns.run(t, "ip", "addr", "add", "fd77::1/64", "dev", "fmtun0", "nodad")
        ns.run(t, "ip", "link", "set", "fmtun0", "up")
        ns.wait_up(t, "fmtun0")
        with entered(t):
            src = AfPacketSource("fmtun0", **SMALL_RING)
            ifindex = socket.if_nametoindex("fmtun0")
        assert src.linktype == LINKTYPE_RAW
        with src, udp_socket(t, socket.AF_INET, "10.77.0.1", 6000) as sink:
            sink.settimeout(2)
            collector = Collector(src)
            for size in (5, 50, 500):  # arrive on the tun: ingress, and delivered to the sink
                os.write(tun, ipv4("10.77.0.2", "10.77.0.1", 17, udp(7000, 6000, b"i" * size)))
                assert len(sink.recv(2000)) == size
            send_sizes(t, "10.77.0.1", "10.77.0.2", 7001, [7, 70])  # routed out of the tun: egress
            send_sizes(t, "fd77::1", "fd77::2", 7001, [9])
            collector.wait_for(lambda r: len(pick(r, "fd77::1", "fd77::2", 17)) == 1)
            recs = collector.stop()
    finally:
        os.close(tun)
    assert (recs["linktype"] == LINKTYPE_RAW).all()
    assert_interface_sides(recs, ifindex)
    for rows, l3, direction in (
            (pick(recs, "10.77.0.2", "10.77.0.1", 17, sport=7000, dport=6000), [33, 78, 528], DIR_INGRESS),
            (pick(recs, "10.77.0.1", "10.77.0.2", 17, dport=7001), [35, 98], DIR_EGRESS),
            (pick(recs, "fd77::1", "fd77::2", 17, dport=7001), [57], DIR_EGRESS)):
        assert sorted(rows["l3_bytes"]) == l3
        assert (rows["direction"] == direction).all()
        assert (rows["origlen"] == rows["l3_bytes"]).all()  # no link header
        assert (rows["caplen"] == np.minimum(rows["origlen"], 256)).all()  # the default snap length


def test_fanout_gives_each_conversation_to_one_socket(pair):
    ns, a, b = pair
    with entered(a):
        sources = [AfPacketSource("va", fanout_group=77, **SMALL_RING) for _ in range(2)]
    flows = 24
    with contextlib.ExitStack() as stack:
        for src in sources:
            stack.enter_context(src)
        collectors = [Collector(src) for src in sources]
        socks = [(stack.enter_context(udp_socket(b, socket.AF_INET, B4, 20000 + i)),
                  stack.enter_context(udp_socket(a, socket.AF_INET, A4, 30000 + i))) for i in range(flows)]
        for i, (sb, sa) in enumerate(socks):
            for _ in range(3):
                sb.sendto(b"q" * i, (A4, 30000 + i))
            for _ in range(2):
                sa.sendto(b"r" * i, (B4, 20000 + i))

        def udp_of(recs):
            return recs[(recs["status"] == ST_OK) & (recs["proto"] == 17)]

        wait_until(lambda: sum(len(udp_of(c.records())) for c in collectors) >= flows * 5)
        seen = [udp_of(c.stop()) for c in collectors]
        first = [src.counters() for src in sources]
        again = [src.counters() for src in sources]
    assert sum(len(s) for s in seen) == flows * 5
    owner = {}
    for k, rows in enumerate(seen):
        for row in rows:
            ends = (int(row["src_lo"]), int(row["sport"])), (int(row["dst_lo"]), int(row["dport"]))
            conversation = frozenset(ends)  # both directions: the fanout hash is symmetric
            assert owner.setdefault(conversation, k) == k, f"conversation {conversation} seen by both sockets"
    assert len(owner) == flows
    assert all(len(s) > 0 for s in seen)  # 24 hashed conversations: both sockets get some
    for c1, c2, src in zip(first, again, sources):
        assert c1["kernel drops"] == 0
        assert c1["kernel packets"] >= c1["frames read"] == src.frames_read > 0
        assert c2["kernel packets"] >= c1["kernel packets"]  # accumulated, not reset by the kernel's read


def test_bpf_filter_compiled_by_tcpdump_passes_only_udp(pair):
    ns, a, b = pair
    snaplen = 96
    with entered(a):
        src = AfPacketSource("va", snaplen=snaplen, bpf_filter="udp", **SMALL_RING)
    with src, udp_socket(b, socket.AF_INET, B4, 5001), udp_socket(b, socket.AF_INET6, B6, 5001):
        collector = Collector(src)
        ns.run(a, "ping", "-c", "2", "-i", "0.02", "-W", "2", B4)
        ns.run(a, "ping", "-6", "-c", "2", "-i", "0.02", "-W", "2", B6)
        send_sizes(a, A4, B4, 5001, [10, 1200])
        send_sizes(a, A6, B6, 5001, [10, 1200])
        collector.wait_for(lambda r: len(pick(r, A6, B6, 17)) == 2)
        time.sleep(0.1)  # anything the filter wrongly passed would arrive by now
        recs = collector.stop()
        counters = src.counters()
    assert len(recs) == 4
    assert (recs["status"] == ST_OK).all() and (recs["proto"] == 17).all()
    assert sorted(recs["l3_bytes"]) == [38, 58, 1228, 1248]
    assert (recs["caplen"] == np.minimum(recs["origlen"], snaplen)).all()
    assert recs["origlen"].max() == 1248 + 14
    assert counters["kernel packets"] == counters["frames read"] == 4


def test_filter_accepts_at_most_the_snap_length():
    program = compile_filter("udp", LINKTYPE_RAW, 100)
    returns = [k for code, _jt, _jf, k in program if code == BPF_RET_K]
    assert sorted(set(returns)) == [0, 100]


def test_bad_filter_and_missing_tcpdump_are_one_line_errors(pair, monkeypatch, tmp_path):
    _ns, a, _b = pair
    with entered(a), pytest.raises(SourceError) as bad:
        AfPacketSource("va", bpf_filter="udp and and", **SMALL_RING)
    message = str(bad.value)
    assert "\n" not in message and "afpacket:va" in message and "'udp and and'" in message
    monkeypatch.setattr(afpacket, "TCPDUMP_DIRS", (str(tmp_path),))
    with entered(a), pytest.raises(SourceError) as missing:
        AfPacketSource("va", bpf_filter="udp", **SMALL_RING)
    assert "\n" not in str(missing.value) and "tcpdump is not installed" in str(missing.value)
    assert str(tmp_path) in str(missing.value)


def test_tcpdump_is_the_systems_not_the_one_path_names(monkeypatch, tmp_path):
    marker = tmp_path / "ran"
    fake = tmp_path / "tcpdump"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\necho 1\necho 6 0 0 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ.get('PATH', '')}")
    assert afpacket.tcpdump_path() in [f"{d}/tcpdump" for d in afpacket.TCPDUMP_DIRS]
    program = compile_filter("udp", LINKTYPE_RAW, 100)
    assert not marker.exists() and len(program) > 1  # the real tcpdump compiled it
    monkeypatch.setattr(afpacket, "TCPDUMP_DIRS", ("/nonexistent", str(tmp_path)))
    assert afpacket.tcpdump_path() == str(fake)  # looked up in those directories, in order


@pytest.mark.parametrize("expression", ["-F{filter_file}", "-F {filter_file}", "-w {tmp}/written", "--help", "-d"])
def test_a_filter_starting_with_a_dash_is_an_expression_never_options(tmp_path, expression):
    """Without ``--`` tcpdump would read ``-F FILE`` as "take the filter from FILE" and compile it."""
    filter_file = tmp_path / "filter"
    filter_file.write_text("udp")
    expression = expression.format(filter_file=filter_file, tmp=tmp_path)
    with pytest.raises(SourceError) as bad:
        compile_filter(expression, LINKTYPE_RAW, 100, "eth0")
    message = str(bad.value)
    assert "\n" not in message and message.startswith(f"afpacket:eth0: bad filter {expression!r}: ")
    assert not (tmp_path / "written").exists()


def test_unknown_interface_and_no_permission_are_one_line_errors(pair):
    ns, a, _b = pair
    with entered(a), pytest.raises(SourceError, match="no interface 'nosuch0'"):
        AfPacketSource("nosuch0")
    code = ("import os; os.setgid(65534); os.setuid(65534)\n"
            "from flowmeter.capture.sources.afpacket import AfPacketSource, SourceError\n"
            "try:\n    AfPacketSource('va')\nexcept SourceError as e:\n    print(e)\n")
    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as cache:  # numba's cache must be writable for the user
        os.chmod(cache, 0o777)
        env = {**os.environ, "HOME": "/nonexistent", "NUMBA_CACHE_DIR": cache}
        out = ns.run(a, sys.executable, "-c", code, cwd=root, env=env).stdout
    assert out.startswith("afpacket:va: permission denied") and out.count("\n") == 1


def test_ring_wraps_without_losing_or_repeating_frames(pair):
    ns, a, b = pair
    blocks, rounds, per_round = 4, 6, 40
    with entered(a):
        src = AfPacketSource("va", snaplen=64, block_size=mmap.PAGESIZE, blocks=blocks, block_timeout_ms=20,
                             bpf_filter="udp")
    expected, seen, batches = [], [], 0
    with src, udp_socket(a, socket.AF_INET, A4, 5002), udp_socket(b, socket.AF_INET, B4, 0) as sender:
        for r in range(rounds):
            sizes = [r * per_round + i + 1 for i in range(per_round)]
            for size in sizes:
                sender.sendto(b"w" * size, (A4, 5002))
            expected += [28 + size for size in sizes]
            deadline = time.monotonic() + 5
            while len(seen) < len(expected) and time.monotonic() < deadline:
                reader = src.read(0.5)
                for batch in reader:
                    seen += decoded(batch)["l3_bytes"].tolist()
                    batches += 1
                    if r == 2:  # stop after one batch: the rest is read by the next read()
                        reader.close()
        counters = src.counters()
    assert seen == expected  # in order, none lost, none twice
    assert batches > blocks  # more blocks than the ring has: it wrapped
    assert sum(28 + 14 + size for size in range(1, rounds * per_round + 1)) > blocks * mmap.PAGESIZE
    assert counters["kernel drops"] == 0
    assert counters["kernel packets"] == counters["frames read"] == rounds * per_round


# --- the ring walk against a plain-Python twin ------------------------------------------

HOST = ">" if BIG_ENDIAN_HOST else "<"


def twin_walk(ring: bytes, first_block: int, max_blocks: int, n_blocks: int, block_size: int) -> tuple[int, list]:
    """What ``walk_ring_blocks`` should return, one struct.unpack at a time: (blocks, records)."""
    records = []
    for walked in range(max_blocks):
        base = (first_block + walked) % n_blocks * block_size
        status, count, first = struct.unpack_from(HOST + "3I", ring, base + 8)
        if not status & 1:
            return walked, records
        p = base + first
        for _ in range(count):
            step, sec, nsec, snap, length, _status, mac = struct.unpack_from(HOST + "6IH", ring, p)
            if p + mac + snap > base + block_size:
                break
            direction = DIR_EGRESS if ring[p + 58] == 4 else DIR_INGRESS
            records.append((p + mac, snap, length, sec * 10**9 + nsec, direction))
            p += step
    return max_blocks, records


def synthetic_ring(rng: np.random.Generator, n_blocks: int, block_size: int, retired: set[int]) -> bytearray:
    """Blocks of frames laid out as the kernel does; ``retired`` blocks handed to user space."""
    ring = bytearray(n_blocks * block_size)
    for block in range(n_blocks):
        base, p, count = block * block_size, block * block_size + 48, 0
        while True:
            mac = int(rng.choice([82, 96]))
            snap = int(rng.integers(1, 300))
            step = (mac + snap + 7) & ~7
            if p + step + 8 > base + block_size:
                break
            sec, nsec = int(rng.integers(1.6e9, 1.8e9)), int(rng.integers(0, 10**9))
            struct.pack_into(HOST + "6IH", ring, p, step, sec, nsec, snap, snap + int(rng.integers(0, 2000)), 1, mac)
            ring[p + 58] = int(rng.choice([0, 1, 2, 3, 4]))
            ring[p + mac:p + mac + snap] = rng.integers(0, 256, snap, np.uint8).tobytes()
            p, count = p + step, count + 1
        struct.pack_into(HOST + "3I", ring, base + 8, 1 if block in retired else 0, count, 48)
    return ring


def kernel_walk(ring: bytearray, first_block: int, max_blocks: int, n_blocks: int, block_size: int,
                capacity: int = 4096) -> tuple[int, list]:
    cols = Columns(capacity)
    walked, n = walk_ring_blocks(np.frombuffer(ring, np.uint8), first_block, max_blocks, n_blocks, block_size,
                                 BIG_ENDIAN_HOST, LINKTYPE_RAW, 7, cols.offset, cols.caplen, cols.origlen,
                                 cols.ts_ns, cols.linktype, cols.ifindex, cols.direction)
    assert (cols.linktype[:n] == LINKTYPE_RAW).all() and (cols.ifindex[:n] == 7).all()
    return walked, list(zip(cols.offset[:n].tolist(), cols.caplen[:n].tolist(), cols.origlen[:n].tolist(),
                            cols.ts_ns[:n].tolist(), cols.direction[:n].tolist()))


def test_ring_walk_matches_its_python_twin_across_the_wrap():
    warm_up()  # a ring the kernel still owns: nothing walked, nothing written
    rng = np.random.default_rng(7)
    n_blocks, block_size = 4, 4096
    ring = synthetic_ring(rng, n_blocks, block_size, retired={2, 3, 0})
    walked, records = kernel_walk(ring, 2, n_blocks, n_blocks, block_size)
    assert (walked, records) == twin_walk(bytes(ring), 2, n_blocks, n_blocks, block_size)
    assert walked == 3 and len(records) > 30  # blocks 2, 3 and (wrapped) 0; block 1 is the kernel's
    assert kernel_walk(ring, 3, 1, n_blocks, block_size) == twin_walk(bytes(ring), 3, 1, n_blocks, block_size)
    assert kernel_walk(ring, 2, n_blocks, n_blocks, block_size, capacity=3) == (0, [])  # never half a block


def test_ring_walk_ends_a_block_at_a_frame_running_past_it():
    rng = np.random.default_rng(8)
    ring = synthetic_ring(rng, 2, 4096, retired={0, 1})
    struct.pack_into(HOST + "I", ring, 48 + struct.unpack_from(HOST + "I", ring, 48)[0] + 12, 5000)  # 2nd frame
    walked, records = kernel_walk(ring, 0, 2, 2, 4096)
    assert (walked, records) == twin_walk(bytes(ring), 0, 2, 2, 4096)
    assert walked == 2 and records[1][0] >= 4096  # one frame of block 0, then block 1 whole


def test_check_refuses_a_capture_filter_that_would_be_tcpdump_options(tmp_path):
    """``-F FILE`` would have tcpdump compile the filter in FILE: the profile check says it is no filter."""
    (tmp_path / "filter").write_text("udp")
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"FlowMetadata": {"CaptureFilter": f"-F{tmp_path / 'filter'}"}}))
    run = subprocess.run([sys.executable, "-m", "flowmeter.cli", "check", str(profile)], capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        f"flowmeter: {profile}: CaptureFilter: bad filter '-F{tmp_path / 'filter'}': "
        "tcpdump: can't parse filter expression: syntax error"]
