"""A deterministic traffic generator: a capture file and its ground truth, built columnar.

The traffic is a mix a gateway sees: IPv4 and IPv6; TCP, UDP, ICMP/ICMPv6
and other protocols (GRE, ESP); conversations in both directions between
hosts of a local network (``10.0.0.0/8``, ``2001:db8:1::/48``) and remote
ones; heavy-tailed conversation sizes (a few elephants, many mice); TCP
with SYN, SYN-ACK, data and FINs; idle gaps longer than the default idle
timeout inside some conversations. The same seed gives the same file.

Everything is numpy: the conversation table, then one row per packet, then
the records written by scattering each class's header bytes into one
buffer per chunk. Frames are Ethernet; the captured length is
``min(frame length, snaplen)`` while the IP length fields keep the real
size, as a capture with a small snap length would.

The truth is one row per unidirectional flow key (the keys the tests and
the shared captures' truth use): packets, layer-3 octets, first and last
packet time.

    python -m flowmeter.traffic OUT.pcap --packets 1000000 [--seed 1] [--truth OUT.csv]
"""
from __future__ import annotations

import argparse
import csv
import ipaddress
import struct
import sys

import numpy as np
import numpy.typing as npt

NS = 1_000_000_000
ETH_LEN = 14
_CLASSES = ("tcp", "udp", "icmp", "other")
_L4_LEN = {"tcp": 20, "udp": 8, "icmp": 8, "other": 0}
_CLASS_P = (0.55, 0.30, 0.07, 0.08)
LOCAL4, REMOTE4 = 0x0A000000, 0xC6336400  # 10.0.0.0/8 hosts, 198.51.100.0/24 + 203.0.113.0/24
LOCAL6 = int(ipaddress.IPv6Address("2001:db8:1::"))
REMOTE6 = int(ipaddress.IPv6Address("2001:db8:ff::"))
_MASK64 = (1 << 64) - 1


def _conversations(n_packets: int, rng: np.random.Generator, duration_s: float) -> dict:
    """The conversation table: who talks to whom, how, how much, when."""
    n_conv = max(1, n_packets // 22)
    # heavy-tailed sizes (Pareto, alpha 1.2), at least 2 packets, scaled to n_packets
    size = (rng.pareto(1.2, n_conv) + 1.0)
    size = np.maximum(2, np.floor(size / size.sum() * n_packets)).astype(np.int64)
    short = n_packets - int(size.sum())
    if short > 0:
        np.add.at(size, rng.integers(0, n_conv, short), 1)
    elif short < 0:  # trim the largest until the total is exact
        order = np.argsort(size)[::-1]
        i = 0
        while short < 0:
            take = min(-short, int(size[order[i % n_conv]] - 2))
            size[order[i % n_conv]] -= take
            short += take
            i += 1
    c = {"size": size}
    c["v6"] = rng.random(n_conv) < 0.2
    c["klass"] = rng.choice(len(_CLASSES), n_conv, p=_CLASS_P)
    idx = np.arange(n_conv, dtype=np.uint64)
    c["local_lo"] = np.where(c["v6"], idx + np.uint64(1), np.uint64(LOCAL4) + (idx % np.uint64(1 << 20)) + np.uint64(1))
    c["remote_lo"] = np.where(c["v6"], rng.integers(1, 1 << 32, n_conv, dtype=np.uint64),
                              np.uint64(REMOTE4) + rng.integers(1, 511, n_conv, dtype=np.uint64))
    c["local_hi"] = np.where(c["v6"], np.uint64(LOCAL6 >> 64), np.uint64(0))
    c["remote_hi"] = np.where(c["v6"], np.uint64(REMOTE6 >> 64), np.uint64(0))
    c["cport"] = rng.integers(1024, 65536, n_conv)
    c["sport"] = rng.choice([53, 80, 123, 443, 8080, 4500], n_conv)
    other = rng.choice([47, 50], n_conv)
    c["proto"] = np.select([c["klass"] == 0, c["klass"] == 1, (c["klass"] == 2) & c["v6"], c["klass"] == 2],
                           [6, 17, 58, 1], other)
    c["start"] = rng.uniform(0, duration_s, n_conv)
    c["gap"] = rng.random(n_conv) < 0.05  # a 20 s silence in the middle
    c["outbound"] = rng.random(n_conv) < 0.7  # the local host opened it
    return c


def generate(n_packets: int, seed: int = 1, start_ns: int = 1_767_225_600 * NS,
             duration_s: float | None = None) -> dict[str, npt.NDArray]:
    """One row per packet (time-ordered): the columns a frame is built from."""
    rng = np.random.default_rng(seed)
    if duration_s is None:
        duration_s = max(10.0, n_packets / 50_000)
    c = _conversations(n_packets, rng, duration_s)
    conv = np.repeat(np.arange(len(c["size"])), c["size"])
    first = np.concatenate(([0], np.cumsum(c["size"])[:-1]))
    k = np.arange(n_packets) - first[conv]  # packet number within its conversation
    n = c["size"][conv]
    # each conversation lasts 0.2-30 s, whatever its size: elephants are fast, mice slow
    lasts = rng.uniform(0.2, 30.0, len(c["size"]))
    gaps = rng.exponential(1.0, n_packets) * (lasts / c["size"])[conv]
    gaps[k == 0] = 0
    gaps[(k == n // 2) & c["gap"][conv]] += 20.0
    t = np.cumsum(gaps)
    t -= np.repeat(t[first], c["size"])  # restart the clock at each conversation
    ts = start_ns + ((c["start"][conv] + t) * NS).astype(np.int64)
    # direction: even packets from the opener, odd ones back (the reply)
    from_opener = (k % 2 == 0) | (c["klass"][conv] == 3) & (rng.random(n_packets) < 0.5)
    local_sends = from_opener == c["outbound"][conv]
    klass = c["klass"][conv]
    p = {
        "ts_ns": ts.astype(np.uint64),
        "v6": c["v6"][conv],
        "klass": klass,
        "proto": c["proto"][conv].astype(np.uint8),
        "src_hi": np.where(local_sends, c["local_hi"][conv], c["remote_hi"][conv]),
        "src_lo": np.where(local_sends, c["local_lo"][conv], c["remote_lo"][conv]),
        "dst_hi": np.where(local_sends, c["remote_hi"][conv], c["local_hi"][conv]),
        "dst_lo": np.where(local_sends, c["remote_lo"][conv], c["local_lo"][conv]),
        "local_sends": local_sends,
    }
    opener_port = c["cport"][conv]
    server_port = c["sport"][conv]
    p["sport"] = np.where(from_opener, opener_port, server_port).astype(np.uint16)
    p["dport"] = np.where(from_opener, server_port, opener_port).astype(np.uint16)
    flags = np.full(n_packets, 0x18, dtype=np.uint8)  # PSH ACK
    flags[k == 0] = 0x02  # SYN
    flags[k == 1] = 0x12  # SYN ACK
    flags[(k >= n - 2) & (k >= 2)] = 0x11  # FIN ACK from both sides
    p["tcp_flags"] = np.where(klass == 0, flags, 0).astype(np.uint8)
    icmp_type = np.where(c["v6"][conv], np.where(from_opener, 128, 129), np.where(from_opener, 8, 0))
    p["icmp"] = np.where(klass == 2, icmp_type * 256, 0).astype(np.uint16)
    payload = np.minimum(rng.pareto(1.5, n_packets) * 200, 1400).astype(np.int64)
    payload[(klass == 0) & (k < 2)] = 0
    p["payload"] = payload
    order = np.argsort(p["ts_ns"], kind="stable")
    return {name: col[order] for name, col in p.items()}


def _ip_header_len(v6: npt.NDArray) -> npt.NDArray:
    return np.where(v6, 40, 20)


def l3_bytes(p: dict) -> npt.NDArray:
    l4 = np.select([p["klass"] == i for i in range(4)], [_L4_LEN[k] for k in _CLASSES])
    return (_ip_header_len(p["v6"]) + l4 + p["payload"]).astype(np.int64)


def _put(buf: npt.NDArray, at: npt.NDArray, value: npt.NDArray, width: int) -> None:
    """Write ``value`` big-endian, ``width`` octets, at every offset ``at`` of ``buf``."""
    v = value.astype(np.uint64)
    for i in range(width):
        buf[at + i] = ((v >> np.uint64(8 * (width - 1 - i))) & np.uint64(0xFF)).astype(np.uint8)


def _ipv4_checksum(buf: npt.NDArray, at: npt.NDArray) -> None:
    words = np.zeros(len(at), dtype=np.uint64)
    for i in range(0, 20, 2):
        words += buf[at + i].astype(np.uint64) << np.uint64(8)
        words += buf[at + i + 1].astype(np.uint64)
    while np.any(words >> np.uint64(16)):
        words = (words & np.uint64(0xFFFF)) + (words >> np.uint64(16))
    _put(buf, at + 10, ~words & np.uint64(0xFFFF), 2)


def records(p: dict, snaplen: int = 128, lo: int = 0, hi: int | None = None) -> bytes:
    """pcap records (16-octet header + captured frame) of packets ``lo:hi``, one buffer."""
    hi = len(p["ts_ns"]) if hi is None else hi
    q = {k: v[lo:hi] for k, v in p.items()}
    l3 = l3_bytes(q)
    frame_len = ETH_LEN + l3
    caplen = np.minimum(frame_len, snaplen)
    size = 16 + caplen
    at = np.concatenate(([0], np.cumsum(size)[:-1])).astype(np.int64)
    buf = np.zeros(int(size.sum()), dtype=np.uint8)
    sec, frac = q["ts_ns"] // np.uint64(NS), (q["ts_ns"] % np.uint64(NS)) // np.uint64(1000)
    # record header, little-endian (magic a1b2c3d4 written little-endian)
    for off, val in ((0, sec), (4, frac), (8, caplen), (12, frame_len)):
        v = val.astype(np.uint64)
        for i in range(4):
            buf[at + off + i] = ((v >> np.uint64(8 * i)) & np.uint64(0xFF)).astype(np.uint8)
    f = at + 16  # frame start
    buf[f + 0] = 0x02  # locally administered MACs
    buf[f + 6] = 0x02
    v6 = q["v6"]
    _put(buf, f + 12, np.where(v6, 0x86DD, 0x0800), 2)
    ip = f + ETH_LEN
    l4 = ip + _ip_header_len(v6)
    i4, i6 = ~v6, v6
    a4 = ip[i4]
    buf[a4] = 0x45
    _put(buf, a4 + 2, l3[i4], 2)
    buf[a4 + 8] = 64
    buf[a4 + 9] = q["proto"][i4]
    _put(buf, a4 + 12, q["src_lo"][i4], 4)
    _put(buf, a4 + 16, q["dst_lo"][i4], 4)
    _ipv4_checksum(buf, a4)
    a6 = ip[i6]
    buf[a6] = 0x60
    _put(buf, a6 + 4, l3[i6] - 40, 2)
    buf[a6 + 6] = q["proto"][i6]
    buf[a6 + 7] = 64
    _put(buf, a6 + 8, q["src_hi"][i6], 8)
    _put(buf, a6 + 16, q["src_lo"][i6], 8)
    _put(buf, a6 + 24, q["dst_hi"][i6], 8)
    _put(buf, a6 + 32, q["dst_lo"][i6], 8)
    ports = (q["klass"] == 0) | (q["klass"] == 1)
    _put(buf, l4[ports], q["sport"][ports], 2)
    _put(buf, l4[ports] + 2, q["dport"][ports], 2)
    tcp = q["klass"] == 0
    buf[l4[tcp] + 12] = 0x50
    buf[l4[tcp] + 13] = q["tcp_flags"][tcp]
    udp = q["klass"] == 1
    _put(buf, l4[udp] + 4, l3[udp] - _ip_header_len(v6[udp]), 2)
    icmp = q["klass"] == 2
    _put(buf, l4[icmp], q["icmp"][icmp], 2)
    return buf.tobytes()


PCAP_HEADER = struct.Struct("<IHHiIII")


def write(path: str, p: dict, snaplen: int = 128, chunk: int = 1 << 20) -> None:
    """Write the packets as a pcap file (µs timestamps, Ethernet), chunk by chunk."""
    n = len(p["ts_ns"])
    with open(path, "wb") as fh:
        fh.write(PCAP_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, snaplen, 1))
        for lo in range(0, n, chunk):
            fh.write(records(p, snaplen, lo, min(n, lo + chunk)))


def truth(p: dict) -> list[tuple]:
    """Per unidirectional flow key: packets, layer-3 octets, first and last time (ns, µs-truncated)."""
    ts = (p["ts_ns"] // np.uint64(1000)) * np.uint64(1000)
    l3 = l3_bytes(p)
    ports = (p["klass"] == 0) | (p["klass"] == 1)
    icmp = p["klass"] == 2
    keys = np.empty(len(ts), dtype=[("v", "u1"), ("sh", "u8"), ("sl", "u8"), ("dh", "u8"), ("dl", "u8"),
                                    ("proto", "u1"), ("sp", "u2"), ("dp", "u2"), ("icmp", "i4")])
    keys["v"] = np.where(p["v6"], 6, 4)
    keys["sh"], keys["sl"], keys["dh"], keys["dl"] = p["src_hi"], p["src_lo"], p["dst_hi"], p["dst_lo"]
    keys["proto"] = p["proto"]
    keys["sp"] = np.where(ports, p["sport"], 0)
    keys["dp"] = np.where(ports, p["dport"], 0)
    keys["icmp"] = np.where(icmp, p["icmp"].astype(np.int32), -1)
    uniq, inv = np.unique(keys, return_inverse=True)
    packets = np.bincount(inv)
    octets = np.bincount(inv, weights=l3).astype(np.int64)
    first = np.full(len(uniq), np.iinfo(np.uint64).max, dtype=np.uint64)
    last = np.zeros(len(uniq), dtype=np.uint64)
    np.minimum.at(first, inv, ts)
    np.maximum.at(last, inv, ts)
    out = []
    for i, k in enumerate(uniq):
        v = int(k["v"])
        src = ipaddress.ip_address((int(k["sh"]) << 64 | int(k["sl"])) if v == 6 else int(k["sl"]))
        dst = ipaddress.ip_address((int(k["dh"]) << 64 | int(k["dl"])) if v == 6 else int(k["dl"]))
        icmp_tc = int(k["icmp"])
        out.append((v, str(src), str(dst), int(k["proto"]), int(k["sp"]), int(k["dp"]),
                    icmp_tc >> 8 if icmp_tc >= 0 else None, icmp_tc & 0xFF if icmp_tc >= 0 else None,
                    int(packets[i]), int(octets[i]), int(first[i]), int(last[i])))
    return out


def write_truth(path: str, rows: list[tuple]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ipver", "src", "dst", "proto", "sport", "dport", "icmp_type", "icmp_code",
                    "packets", "l3_bytes", "first_ns", "last_ns"])
        for r in rows:
            w.writerow(["" if x is None else x for x in r])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flowmeter.traffic", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="pcap file to write")
    ap.add_argument("--packets", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--snaplen", type=int, default=128)
    ap.add_argument("--truth", help="also write the ground truth as CSV here")
    args = ap.parse_args(argv)
    p = generate(args.packets, args.seed)
    write(args.out, p, args.snaplen)
    if args.truth:
        write_truth(args.truth, truth(p))
    print(f"{args.out}: {args.packets:,} packets", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
