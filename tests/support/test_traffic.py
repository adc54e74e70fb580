"""The traffic generator: deterministic, and its truth is exactly what its capture holds.

The captures are read back here with a plain ``struct`` parser, independent
of the generator's kernel and of flowmeter's decoder: every record's header
fields, the per-flow sums, the IPv4 checksums. The truth CSV (formatted by
a numba kernel) must say what ``truth()`` (formatted by ``ipaddress``) says.
"""
from __future__ import annotations

import ipaddress
import struct
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from tests.support import traffic
from tests.support.pcapwrite import internet_checksum


def parse_pcap(path: Path) -> list[dict]:
    """Every record of a generated pcap file (µs, little-endian, Ethernet) as a dict of header fields."""
    data = path.read_bytes()
    magic, major, minor, _, _, snaplen, link = struct.unpack_from("<IHHiIII", data, 0)
    assert (magic, major, minor, link) == (0xA1B2C3D4, 2, 4, 1)
    out, off = [], 24
    while off < len(data):
        sec, usec, cap, orig = struct.unpack_from("<IIII", data, off)
        frame = data[off + 16:off + 16 + cap]
        assert len(frame) == cap == min(orig, snaplen)
        off += 16 + cap
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        ip = frame[14:]
        if ethertype == 0x0800:
            assert ip[0] == 0x45 and internet_checksum(ip[:20]) == 0
            l3, proto = struct.unpack_from("!H", ip, 2)[0], ip[9]
            src, dst, l4 = ipaddress.ip_address(ip[12:16]), ipaddress.ip_address(ip[16:20]), ip[20:]
        else:
            assert ethertype == 0x86DD and ip[0] == 0x60
            l3, proto = struct.unpack_from("!H", ip, 4)[0] + 40, ip[6]
            src, dst, l4 = ipaddress.ip_address(ip[8:24]), ipaddress.ip_address(ip[24:40]), ip[40:]
        assert orig == 14 + l3
        r = {"ts_us": sec * 1_000_000 + usec, "v": src.version, "src": str(src), "dst": str(dst), "proto": proto,
             "sport": 0, "dport": 0, "icmp": None, "l3": l3, "flags": None}
        if proto in (6, 17):
            r["sport"], r["dport"] = struct.unpack_from("!HH", l4, 0)
        if proto == 6:
            r["flags"] = l4[13]
        elif proto == 17:
            assert struct.unpack_from("!H", l4, 4)[0] == l3 - (20 if src.version == 4 else 40)
        elif proto in (1, 58):
            r["icmp"] = (l4[0], l4[1])
        out.append(r)
    return out


def sums(records: list[dict]) -> dict:
    """Per flow key: [packets, octets, first ns, last ns], as the truth rows have them."""
    got: dict = {}
    for r in records:
        icmp = r["icmp"] or (None, None)
        key = (r["v"], r["src"], r["dst"], r["proto"], r["sport"], r["dport"], icmp[0], icmp[1])
        s = got.setdefault(key, [0, 0, r["ts_us"] * 1000, 0])
        s[0] += 1
        s[1] += r["l3"]
        s[3] = r["ts_us"] * 1000
    return got


def truth_by_key(rows: list[tuple]) -> dict:
    return {tuple(r[:8]): list(r[8:]) for r in rows}


def test_same_seed_same_capture_and_truth(tmp_path):
    a, b, c = tmp_path / "a.pcap", tmp_path / "b.pcap", tmp_path / "c.pcap"
    traffic.main([str(a), "--packets", "3000", "--seed", "7", "--truth", str(tmp_path / "a.csv")])
    traffic.main([str(b), "--packets", "3000", "--seed", "7", "--truth", str(tmp_path / "b.csv")])
    traffic.main([str(c), "--packets", "3000", "--seed", "8"])
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


@pytest.mark.parametrize("n,seed", [(1, 1), (2, 3), (5_000, 2)])
def test_truth_is_exactly_what_the_capture_holds(tmp_path, n, seed):
    t = traffic.generate(n, seed)
    cap = tmp_path / "t.pcap"
    traffic.write(str(cap), t)
    records = parse_pcap(cap)
    assert len(records) == n
    assert [r["ts_us"] for r in records] == sorted(r["ts_us"] for r in records)
    rows = traffic.truth(t)
    assert truth_by_key(rows) == sums(records)
    assert len(rows) == len(truth_by_key(rows))  # one row per key


def test_the_mix_has_every_family_class_direction_and_long_gaps(tmp_path):
    t = traffic.generate(20_000, 4)
    cap = tmp_path / "t.pcap"
    traffic.write(str(cap), t)
    records = parse_pcap(cap)
    assert {r["v"] for r in records} == {4, 6}
    assert {r["proto"] for r in records} == {1, 6, 17, 47, 50, 58}
    assert {r["icmp"] for r in records if r["icmp"]} == {(8, 0), (0, 0), (128, 0), (129, 0)}
    flags = {r["flags"] for r in records if r["proto"] == 6}
    assert {0x02, 0x12, 0x18, 0x11} <= flags
    local = [r for r in records if r["src"].startswith(("10.", "2001:db8:1:"))]
    assert 0.3 < len(local) / len(records) < 0.7  # both directions
    sizes = sorted(row[8] for row in traffic.truth(t))
    assert sizes[-1] > 50 * sizes[len(sizes) // 2]  # heavy-tailed
    gaps = defaultdict(list)
    for r in records:
        gaps[(r["src"], r["dst"], r["proto"], r["sport"], r["dport"])].append(r["ts_us"])
    assert any(np.max(np.diff(ts)) > 15_000_000 for ts in gaps.values() if len(ts) > 1)  # > default idle timeout


def test_truth_csv_says_what_truth_says(tmp_path):
    t = traffic.generate(20_000, 9)
    path = tmp_path / "t.csv"
    assert traffic.write_truth(str(path), t) == len(traffic.truth(t))
    rows = traffic.read_truth(str(path))
    assert tuple(rows[0]) == traffic.TRUTH_COLUMNS
    assert [tuple(r.values()) for r in rows] == \
        [tuple("" if x is None else str(x) for x in row) for row in traffic.truth(t)]


def test_ipv6_text_is_what_ipaddress_prints():
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 0x10000, (4000, 8)) * (rng.random((4000, 8)) < 0.6)  # many zero groups
    groups[:8] = np.eye(8, dtype=np.int64)[::-1]  # one non-zero group at every place
    groups[8] = 0
    out = np.empty(64, dtype=np.uint8)
    for g in groups:
        value = int.from_bytes(b"".join(int(x).to_bytes(2, "big") for x in g), "big")
        hi, lo = np.int64(np.uint64(value >> 64)), np.int64(np.uint64(value & ((1 << 64) - 1)))
        n = traffic._put_ip(out, 0, True, hi, lo)
        assert out[:n].tobytes().decode() == str(ipaddress.IPv6Address(value))
    n = traffic._put_ip(out, 0, False, np.int64(0), np.int64(0xC0A80001))
    assert out[:n].tobytes().decode() == "192.168.0.1"


def test_split_deals_whole_conversations_in_time_order(tmp_path):
    t = traffic.generate(6_000, 5)
    whole = tmp_path / "all.pcap"
    traffic.write(str(whole), t)
    paths = traffic.write_split(str(tmp_path / "part.pcap"), t, 3)
    assert [Path(p).name for p in paths] == ["part-0.pcap", "part-1.pcap", "part-2.pcap"]
    parts = [parse_pcap(Path(p)) for p in paths]
    assert all(len(p) > 0 for p in parts)
    conversation = lambda r: (r["proto"], frozenset([(r["src"], r["sport"]), (r["dst"], r["dport"])]))  # noqa: E731
    owner: dict = {}
    for i, part in enumerate(parts):
        assert [r["ts_us"] for r in part] == sorted(r["ts_us"] for r in part)
        for r in part:
            assert owner.setdefault(conversation(r), i) == i  # both directions, one file
    key = lambda r: tuple(sorted(r.items()))  # noqa: E731
    assert Counter(map(key, parse_pcap(whole))) == Counter(key(r) for part in parts for r in part)


def test_split_command_line(tmp_path):
    assert traffic.main([str(tmp_path / "s.pcap"), "--packets", "500", "--split", "2",
                         "--truth", str(tmp_path / "s.csv")]) == 0
    got = sums(parse_pcap(tmp_path / "s-0.pcap") + parse_pcap(tmp_path / "s-1.pcap"))
    assert sum(s[0] for s in got.values()) == 500
    assert {k: v[:2] for k, v in got.items()} == {
        (int(r["ipver"]), r["src"], r["dst"], int(r["proto"]), int(r["sport"]), int(r["dport"]),
         int(r["icmp_type"]) if r["icmp_type"] else None, int(r["icmp_code"]) if r["icmp_code"] else None):
        [int(r["packets"]), int(r["l3_bytes"])] for r in traffic.read_truth(str(tmp_path / "s.csv"))}


def test_concurrent_flows_are_distinct_and_all_active_at_the_end(tmp_path):
    t = traffic.concurrent_flows(3_000, seed=2)
    cap = tmp_path / "c.pcap"
    traffic.write(str(cap), t)
    records = parse_pcap(cap)
    got = sums(records)
    assert len(got) == 3_000 == len(traffic.truth(t))
    assert truth_by_key(traffic.truth(t)) == got
    assert {s[0] for s in got.values()} == {1, 2}
    end = records[-1]["ts_us"] * 1000
    assert end - records[0]["ts_us"] * 1000 <= traffic.CONCURRENT_SPAN_S * 1e9
    assert all(end - s[3] < 15e9 for s in got.values())  # none idle for the default 15 s
    assert not any(r["flags"] is not None and r["flags"] & 0x05 for r in records)  # no FIN, no RST


@pytest.mark.parametrize("args,message", [
    (["--packets", "0"], "--packets: 0 is not a positive number of packets"),
    (["--packets", "5", "--concurrent-flows", "5"], "give one of them, not both"),
    (["--snaplen", "60"], "--snaplen: 60 is not between 74"),
    (["--split", "0"], "--split: 0 is not between 1 and 64"),
])
def test_bad_arguments_are_one_clear_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        traffic.main([str(tmp_path / "x.pcap"), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
