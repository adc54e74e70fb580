"""A deterministic traffic generator: a capture file and its ground truth, built columnar.

The traffic is a mix a gateway sees: IPv4 and IPv6; TCP, UDP, ICMP/ICMPv6
and other protocols (GRE, ESP); conversations in both directions between
hosts of a local network (``10.0.0.0/8``, ``2001:db8:1::/48``) and remote
ones (``198.51.100.0/24``, ``203.0.113.0/24``, ``2001:db8:ff::/48``);
heavy-tailed conversation sizes (a few elephants, many mice); TCP with SYN,
SYN-ACK, data and FINs; idle gaps longer than the default idle timeout
inside some conversations. The same seed gives the same file.

How it is built, so that 20M packets take well under a minute:

- the conversation table (numpy): endpoints, protocol, size, start, pace;
- one row per packet (numpy, sorted by time): time, conversation,
  direction, payload length, TCP flags; 16 octets a packet, the header
  fields are not materialised per packet;
- the pcap records are written by one numba kernel (``_pcap_records``) that
  walks the packets in time order, looks their conversation up and writes
  record header and frame headers straight into the output buffer;
- the truth is per unidirectional flow, and a flow is (conversation,
  direction): every conversation has its own local host, so two
  conversations never share a flow key, and the truth is a ``bincount``-like
  numba pass over the packets (``_flow_totals``), not a sort of keys. The
  CSV is formatted by a numba kernel too (``_csv_rows``; IPv6 text as
  ``ipaddress`` prints it, RFC 5952).

Frames are Ethernet; the captured length is ``min(frame length, snaplen)``
while the IP length fields keep the real size, as a capture with a small
snap length would. Payload octets are zero.

The truth is one row per unidirectional flow key (the keys the tests and
the shared captures' truth use): packets, layer-3 octets, first and last
packet time (ns, truncated to the µs the pcap keeps).

``--split N`` writes N files ``OUT-0.pcap`` .. ``OUT-(N-1).pcap`` instead
of one: each holds whole conversations, chosen by a symmetric hash of the
addresses, protocol and (TCP/UDP) ports, in time order, which is what each
of N capture processes of an AF_PACKET fanout group in hash mode sees. The
truth stays one file for all of them.

``--concurrent-flows N`` makes a different capture: N distinct one-way
flows of 1 or 2 packets each, all within 5 s, so that at the end of the
capture every one of them is still active (idle timeout 15 s) and a flow
table holds N flows at once (the memory benchmark).

    python -m tests.support.traffic OUT.pcap --packets 1000000 [--seed 1] [--truth OUT.csv] [--split N]
    python -m tests.support.traffic OUT.pcap --concurrent-flows 1000000 [--truth OUT.csv]
"""
from __future__ import annotations

import argparse
import csv
import ipaddress
import os
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from flowmeter.jit import njit

NS = 1_000_000_000
ETH_LEN = 14
_CLASSES = ("tcp", "udp", "icmp", "other")
_L4_LEN = np.array([20, 8, 8, 0], dtype=np.int64)  # transport header octets per class
_CLASS_P = (0.55, 0.30, 0.07, 0.08)
LOCAL4 = 0x0A000000  # 10.0.0.0/8: one host per conversation
REMOTE4_A, REMOTE4_B = 0xC6336400, 0xCB007100  # 198.51.100.0/24, 203.0.113.0/24
LOCAL6 = int(ipaddress.IPv6Address("2001:db8:1::"))
REMOTE6 = int(ipaddress.IPv6Address("2001:db8:ff::"))
MAX_PAYLOAD = 1400
MAX_FRAME = ETH_LEN + 40 + 20 + MAX_PAYLOAD
MAX_CONVERSATIONS = (1 << 24) - 2  # local IPv4 hosts in 10.0.0.0/8: conversations never share a key
START_NS = 1_767_225_600 * NS  # 2026-01-01 00:00 UTC
CONCURRENT_SPAN_S = 5.0
TRUTH_COLUMNS = ("ipver", "src", "dst", "proto", "sport", "dport", "icmp_type", "icmp_code",
                 "packets", "l3_bytes", "first_ns", "last_ns")


@dataclass
class Traffic:
    """Generated traffic: the conversation table and one row per packet, in time order.

    A packet's flow is (``conv[i]``, ``reply[i]``): its conversation and
    whether the side that did not open it sent it. Header fields are looked
    up in the conversation table when the records are written.
    """

    conv: dict[str, npt.NDArray]  # per conversation: v6, klass, proto, local_hi/lo, remote_hi/lo, cport, sport, outbound
    ts_ns: npt.NDArray[np.int64]
    conv_of: npt.NDArray[np.int32]
    reply: npt.NDArray[np.bool_]
    payload: npt.NDArray[np.uint16]
    tcp_flags: npt.NDArray[np.uint8]

    def __len__(self) -> int:
        return len(self.ts_ns)


def _endpoints(n_conv: int, rng: np.random.Generator) -> dict[str, npt.NDArray]:
    """Who talks to whom and how: one row per conversation."""
    if n_conv > MAX_CONVERSATIONS:
        raise ValueError(f"{n_conv:,} conversations: at most {MAX_CONVERSATIONS:,} (one local host each)")
    c: dict[str, npt.NDArray] = {}
    c["v6"] = rng.random(n_conv) < 0.2
    c["klass"] = rng.choice(len(_CLASSES), n_conv, p=_CLASS_P).astype(np.uint8)
    idx = np.arange(n_conv, dtype=np.int64)
    remote4 = rng.integers(0, 508, n_conv)  # .1-.254 of either /24
    remote4 = np.where(remote4 < 254, REMOTE4_A + 1 + remote4, REMOTE4_B + 1 + remote4 - 254)
    c["local_lo"] = np.where(c["v6"], idx + 1, LOCAL4 + 1 + idx).astype(np.int64)
    c["remote_lo"] = np.where(c["v6"], rng.integers(1, 1 << 32, n_conv), remote4).astype(np.int64)
    c["local_hi"] = np.where(c["v6"], LOCAL6 >> 64, 0).astype(np.int64)
    c["remote_hi"] = np.where(c["v6"], REMOTE6 >> 64, 0).astype(np.int64)
    c["cport"] = rng.integers(1024, 65536, n_conv).astype(np.uint16)
    c["sport"] = rng.choice([53, 80, 123, 443, 8080, 4500], n_conv).astype(np.uint16)
    other = rng.choice([47, 50], n_conv)
    k = c["klass"]
    c["proto"] = np.select([k == 0, k == 1, (k == 2) & c["v6"], k == 2], [6, 17, 58, 1], other).astype(np.uint8)
    c["outbound"] = rng.random(n_conv) < 0.7  # the local host opened it
    return c


def _sizes(n_packets: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Packets per conversation: heavy-tailed (Pareto, alpha 1.2), at least 2, summing to ``n_packets``."""
    n_conv = max(1, n_packets // 22)
    size = rng.pareto(1.2, n_conv) + 1.0
    least = min(2, n_packets)  # a 1-packet capture has one 1-packet conversation
    size = np.maximum(least, np.floor(size / size.sum() * n_packets)).astype(np.int64)
    short = n_packets - int(size.sum())
    if short > 0:
        np.add.at(size, rng.integers(0, n_conv, short), 1)
    elif short < 0:  # trim the largest until the total is exact
        order = np.argsort(size)[::-1]
        i = 0
        while short < 0:
            take = min(-short, int(size[order[i % n_conv]] - least))
            size[order[i % n_conv]] -= take
            short += take
            i += 1
    return size


def _packets(c: dict, size: npt.NDArray[np.int64], start_s: npt.NDArray, lasts_s: npt.NDArray,
             gap: npt.NDArray[np.bool_], one_way: bool, rng: np.random.Generator, start_ns: int) -> Traffic:
    """One row per packet of conversations of ``size`` packets, sorted by time.

    A conversation starts at ``start_s`` and its packets are spread over
    about ``lasts_s`` (exponential gaps); where ``gap`` is set, a 20 s
    silence sits in its middle. Packets alternate opener/reply (other IP
    protocols: at random), unless ``one_way``.
    """
    n_conv, n = len(size), int(size.sum())
    conv = np.repeat(np.arange(n_conv, dtype=np.int32), size)
    first = np.zeros(n_conv, dtype=np.int64)
    np.cumsum(size[:-1], out=first[1:])
    k = np.arange(n, dtype=np.int64)
    k -= first[conv]  # packet number within its conversation
    t = rng.exponential(1.0, n)
    t *= (lasts_s / size)[conv]
    t[first] = 0.0
    t[(first + size // 2)[gap]] += 20.0
    np.cumsum(t, out=t)
    t -= t[first][conv]  # restart the clock at each conversation
    t += start_s[conv]
    ts = (t * NS).astype(np.int64)
    del t
    ts += start_ns
    klass = c["klass"][conv]
    if one_way:
        reply = np.zeros(n, dtype=bool)
    else:
        reply = (k % 2 == 1) & ~((klass == 3) & (rng.random(n) < 0.5))
    nc = size[conv]
    flags = np.full(n, 0x18, dtype=np.uint8)  # PSH ACK
    flags[k == 0] = 0x02  # SYN
    flags[k == 1] = 0x10 if one_way else 0x12  # ACK / SYN ACK
    if not one_way:
        flags[(k >= nc - 2) & (k >= 2)] = 0x11  # FIN ACK from both sides
    del nc
    flags[klass != 0] = 0
    payload = np.minimum(rng.pareto(1.5, n) * 200, MAX_PAYLOAD).astype(np.uint16)
    payload[(klass == 0) & (k < 2)] = 0
    del k, klass
    order = np.argsort(ts, kind="stable")
    return Traffic(conv=c, ts_ns=ts[order], conv_of=conv[order], reply=reply[order], payload=payload[order],
                   tcp_flags=flags[order])


def generate(n_packets: int, seed: int = 1, start_ns: int = START_NS, duration_s: float | None = None) -> Traffic:
    """The traffic mix: ``n_packets`` packets of about ``n_packets / 22`` conversations over ``duration_s``."""
    if n_packets < 1:
        raise ValueError(f"{n_packets} is not a positive number of packets")
    rng = np.random.default_rng(seed)
    if duration_s is None:
        duration_s = max(10.0, n_packets / 50_000)
    size = _sizes(n_packets, rng)
    c = _endpoints(len(size), rng)
    start = rng.uniform(0, duration_s, len(size))
    gap = rng.random(len(size)) < 0.05  # a 20 s silence in the middle
    # each conversation lasts 0.2-30 s, whatever its size: elephants are fast, mice slow
    lasts = rng.uniform(0.2, 30.0, len(size))
    return _packets(c, size, start, lasts, gap, False, rng, start_ns)


def concurrent_flows(n_flows: int, seed: int = 1, start_ns: int = START_NS,
                     span_s: float = CONCURRENT_SPAN_S) -> Traffic:
    """``n_flows`` distinct one-way flows of 1 or 2 packets, all within ``span_s``: all active at the end."""
    if n_flows < 1:
        raise ValueError(f"{n_flows} is not a positive number of flows")
    rng = np.random.default_rng(seed)
    size = rng.integers(1, 3, n_flows).astype(np.int64)
    c = _endpoints(n_flows, rng)
    start = rng.uniform(0, span_s * 0.8, n_flows)
    lasts = np.full(n_flows, span_s * 0.2 / 2)  # the second packet (mean gap) well within the span
    t = _packets(c, size, start, lasts, np.zeros(n_flows, dtype=bool), True, rng, start_ns)
    np.minimum(t.ts_ns, start_ns + int(span_s * NS), out=t.ts_ns)  # the exponential tail stays in the span
    return t


def l3_bytes(t: Traffic) -> npt.NDArray[np.int64]:
    """Layer-3 length of every packet (IP header + transport header + payload)."""
    v6 = t.conv["v6"][t.conv_of]
    l4 = _L4_LEN[t.conv["klass"][t.conv_of]]
    return np.where(v6, 40, 20) + l4 + t.payload


# ---------------------------------------------------------------- pcap records

@njit
def _be(buf, at, value, width):
    for i in range(width):
        buf[at + i] = (value >> (8 * (width - 1 - i))) & 0xFF


@njit
def _le32(buf, at, value):
    for i in range(4):
        buf[at + i] = (value >> (8 * i)) & 0xFF


@njit
def _pcap_records(out, sel, snaplen, ts_ns, conv_of, reply, payload, tcp_flags,
                  v6, klass, proto, local_hi, local_lo, remote_hi, remote_lo, cport, sport, outbound):
    """Write the pcap records (µs, little-endian) of packets ``sel`` into ``out``; return octets written."""
    hdr = np.zeros(ETH_LEN + 40 + 20, dtype=np.uint8)  # the longest header stack: Ethernet, IPv6, TCP
    pos = 0
    for j in range(sel.shape[0]):
        i = sel[j]
        c = conv_of[i]
        opener = not reply[i]
        six = v6[c]
        kl = klass[c]
        iph = 40 if six else 20
        l4h = 20 if kl == 0 else (8 if kl <= 2 else 0)
        l3 = iph + l4h + np.int64(payload[i])
        frame = ETH_LEN + l3
        cap = min(frame, snaplen)
        t = ts_ns[i]
        _le32(out, pos, t // 1_000_000_000)
        _le32(out, pos + 4, (t % 1_000_000_000) // 1000)
        _le32(out, pos + 8, cap)
        _le32(out, pos + 12, frame)
        hlen = ETH_LEN + iph + l4h
        hdr[:] = 0
        hdr[0] = 0x02  # locally administered MACs
        hdr[6] = 0x02
        if opener == outbound[c]:  # the local host sends
            shi, slo, dhi, dlo = local_hi[c], local_lo[c], remote_hi[c], remote_lo[c]
        else:
            shi, slo, dhi, dlo = remote_hi[c], remote_lo[c], local_hi[c], local_lo[c]
        ip = ETH_LEN
        if six:
            hdr[12], hdr[13] = 0x86, 0xDD
            hdr[ip] = 0x60
            _be(hdr, ip + 4, l3 - 40, 2)
            hdr[ip + 6] = proto[c]
            hdr[ip + 7] = 64
            _be(hdr, ip + 8, shi, 8)
            _be(hdr, ip + 16, slo, 8)
            _be(hdr, ip + 24, dhi, 8)
            _be(hdr, ip + 32, dlo, 8)
        else:
            hdr[12], hdr[13] = 0x08, 0x00
            hdr[ip] = 0x45
            _be(hdr, ip + 2, l3, 2)
            hdr[ip + 8] = 64
            hdr[ip + 9] = proto[c]
            _be(hdr, ip + 12, slo, 4)
            _be(hdr, ip + 16, dlo, 4)
            s = 0
            for w in range(0, 20, 2):
                s += (np.int64(hdr[ip + w]) << 8) | np.int64(hdr[ip + w + 1])
            while s >> 16:
                s = (s & 0xFFFF) + (s >> 16)
            _be(hdr, ip + 10, ~s & 0xFFFF, 2)
        l4 = ip + iph
        if kl <= 1:
            _be(hdr, l4, cport[c] if opener else sport[c], 2)
            _be(hdr, l4 + 2, sport[c] if opener else cport[c], 2)
        if kl == 0:
            hdr[l4 + 12] = 0x50
            hdr[l4 + 13] = tcp_flags[i]
        elif kl == 1:
            _be(hdr, l4 + 4, l3 - iph, 2)
        elif kl == 2:
            hdr[l4] = (128 if opener else 129) if six else (8 if opener else 0)
        f = pos + 16
        n = min(cap, hlen)
        out[f:f + n] = hdr[:n]
        out[f + n:f + cap] = 0
        pos = f + cap
    return pos


def _kernel_args(t: Traffic) -> tuple:
    c = t.conv
    return (t.ts_ns, t.conv_of, t.reply, t.payload, t.tcp_flags, c["v6"], c["klass"], c["proto"],
            c["local_hi"], c["local_lo"], c["remote_hi"], c["remote_lo"], c["cport"], c["sport"], c["outbound"])


def records(t: Traffic, snaplen: int = 128, sel: npt.NDArray | None = None) -> bytes:
    """pcap records (16-octet header + captured frame) of packets ``sel`` (default all), one buffer."""
    sel = np.arange(len(t), dtype=np.int64) if sel is None else np.asarray(sel, dtype=np.int64)
    out = np.empty(len(sel) * (16 + min(snaplen, MAX_FRAME)), dtype=np.uint8)
    used = _pcap_records(out, sel, snaplen, *_kernel_args(t))
    return out[:used].tobytes()


PCAP_HEADER = struct.Struct("<IHHiIII")


def _write_pcap(path: str, t: Traffic, sel: npt.NDArray[np.int64], snaplen: int) -> None:
    chunk = max(1024, (8 << 20) // (16 + min(snaplen, MAX_FRAME)))  # about 8 MB of records at a time, reused warm
    out = np.empty(chunk * (16 + min(snaplen, MAX_FRAME)), dtype=np.uint8)
    args = _kernel_args(t)
    with open(path, "wb") as fh:
        fh.write(PCAP_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, snaplen, 1))
        for lo in range(0, len(sel), chunk):
            used = _pcap_records(out, sel[lo:lo + chunk], snaplen, *args)
            fh.write(memoryview(out)[:used])


def write(path: str, t: Traffic, snaplen: int = 128) -> None:
    """Write the packets as one pcap file (µs timestamps, Ethernet)."""
    _write_pcap(path, t, np.arange(len(t), dtype=np.int64), snaplen)


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finaliser: every input bit moves every output bit."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def conversation_hash(t: Traffic) -> npt.NDArray[np.uint64]:
    """A symmetric hash of each conversation's packets: addresses, protocol, ports (TCP and UDP only).

    Both directions of a conversation hash alike, as the kernel's flow hash
    for AF_PACKET fanout does (``__skb_get_hash_symmetric``).
    """
    c = t.conv
    ports = c["klass"] <= 1
    u = lambda a: a.astype(np.uint64)  # noqa: E731
    local = _mix(u(c["local_hi"]) ^ _mix(u(c["local_lo"]) ^ np.where(ports, u(c["cport"]), 0) << np.uint64(32)))
    remote = _mix(u(c["remote_hi"]) ^ _mix(u(c["remote_lo"]) ^ np.where(ports, u(c["sport"]), 0) << np.uint64(32)))
    with np.errstate(over="ignore"):
        return _mix(local + remote + u(c["proto"]))  # + is symmetric: either side first


def split_paths(out: str, n: int) -> list[str]:
    """``OUT-0.pcap`` .. ``OUT-(n-1).pcap`` (a ``.pcap`` suffix of ``out`` is taken off first)."""
    base = out[:-5] if out.endswith(".pcap") else out
    return [f"{base}-{i}.pcap" for i in range(n)]


def write_split(out: str, t: Traffic, n: int, snaplen: int = 128) -> list[str]:
    """Write ``n`` pcap files, each with whole conversations (by ``conversation_hash``), in time order."""
    part = (conversation_hash(t) % np.uint64(n)).astype(np.int32)[t.conv_of]
    paths = split_paths(out, n)
    for i, path in enumerate(paths):
        _write_pcap(path, t, np.flatnonzero(part == i), snaplen)
    return paths


# ---------------------------------------------------------------- truth

@njit
def _flow_totals(fid, l3, ts_us, n_flows):
    packets = np.zeros(n_flows, dtype=np.int64)
    octets = np.zeros(n_flows, dtype=np.int64)
    first = np.zeros(n_flows, dtype=np.int64)
    last = np.zeros(n_flows, dtype=np.int64)
    for i in range(fid.shape[0]):  # in time order: the first packet seen is the first
        f = fid[i]
        if packets[f] == 0:
            first[f] = ts_us[i]
        packets[f] += 1
        octets[f] += l3[i]
        last[f] = ts_us[i]
    return packets, octets, first, last


def flows(t: Traffic) -> dict[str, npt.NDArray]:
    """The truth as columns, one row per unidirectional flow, ordered by (conversation, direction).

    ``icmp`` is type * 256 + code for ICMP flows and -1 for the others;
    ports are 0 for protocols without them.
    """
    c = t.conv
    fid = t.conv_of.astype(np.int64) * 2 + t.reply
    ts_us = t.ts_ns // 1000 * 1000
    packets, octets, first, last = _flow_totals(fid, l3_bytes(t), ts_us, 2 * len(c["v6"]))
    seen = np.flatnonzero(packets)
    conv, opener = seen // 2, seen % 2 == 0
    local_sends = opener == c["outbound"][conv]
    pick = lambda a, b: np.where(local_sends, c[a][conv], c[b][conv])  # noqa: E731
    klass = c["klass"][conv]
    v6 = c["v6"][conv]
    ports = klass <= 1
    icmp_type = np.where(v6, np.where(opener, 128, 129), np.where(opener, 8, 0))
    return {
        "v6": v6,
        "src_hi": pick("local_hi", "remote_hi"), "src_lo": pick("local_lo", "remote_lo"),
        "dst_hi": pick("remote_hi", "local_hi"), "dst_lo": pick("remote_lo", "local_lo"),
        "proto": c["proto"][conv].astype(np.int64),
        "sport": np.where(ports, np.where(opener, c["cport"][conv], c["sport"][conv]), 0).astype(np.int64),
        "dport": np.where(ports, np.where(opener, c["sport"][conv], c["cport"][conv]), 0).astype(np.int64),
        "icmp": np.where(klass == 2, icmp_type * 256, -1).astype(np.int64),
        "packets": packets[seen], "octets": octets[seen], "first": first[seen], "last": last[seen],
    }


def truth(t: Traffic) -> list[tuple]:
    """Per unidirectional flow key: (ipver, src, dst, proto, sport, dport, icmp type, icmp code,
    packets, layer-3 octets, first ns, last ns); times truncated to µs as the pcap keeps them."""
    f = flows(t)
    out = []
    for i in range(len(f["v6"])):
        v6 = bool(f["v6"][i])
        addr = (lambda hi, lo: ipaddress.ip_address(int(hi) << 64 | int(lo))) if v6 else \
            (lambda hi, lo: ipaddress.ip_address(int(lo)))
        icmp_tc = int(f["icmp"][i])
        out.append((6 if v6 else 4, str(addr(f["src_hi"][i], f["src_lo"][i])), str(addr(f["dst_hi"][i], f["dst_lo"][i])),
                    int(f["proto"][i]), int(f["sport"][i]), int(f["dport"][i]),
                    icmp_tc >> 8 if icmp_tc >= 0 else None, icmp_tc & 0xFF if icmp_tc >= 0 else None,
                    int(f["packets"][i]), int(f["octets"][i]), int(f["first"][i]), int(f["last"][i])))
    return out


@njit
def _put_uint(out, pos, v):
    """Decimal digits of ``v`` >= 0 at ``pos``; return the position after them."""
    n = 1
    x = v
    while x >= 10:
        x //= 10
        n += 1
    for i in range(n - 1, -1, -1):
        out[pos + i] = 48 + v % 10
        v //= 10
    return pos + n


@njit
def _put_hex(out, pos, v):
    """Lowercase hex digits of ``v`` (0..0xFFFF) without leading zeros."""
    n = 1
    x = v
    while x >= 16:
        x >>= 4
        n += 1
    for i in range(n - 1, -1, -1):
        d = v & 15
        out[pos + i] = 48 + d if d < 10 else 87 + d
        v >>= 4
    return pos + n


@njit
def _put_ip(out, pos, v6, hi, lo):
    """An address as text: dotted quad, or IPv6 as RFC 5952 (and ``ipaddress``) print it."""
    if not v6:
        for k in range(3, -1, -1):
            pos = _put_uint(out, pos, (lo >> (8 * k)) & 0xFF)
            if k:
                out[pos] = 46  # .
                pos += 1
        return pos
    g = np.empty(8, dtype=np.int64)
    for k in range(4):
        g[k] = (hi >> (16 * (3 - k))) & 0xFFFF
        g[4 + k] = (lo >> (16 * (3 - k))) & 0xFFFF
    best, best_len, run, run_len = -1, 0, -1, 0  # the first longest run of zero groups
    for k in range(8):
        if g[k] == 0:
            if run < 0:
                run = k
            run_len += 1
            if run_len > best_len:
                best, best_len = run, run_len
        else:
            run, run_len = -1, 0
    if best_len < 2:
        best = -1
    k = 0
    while k < 8:
        if k == best:
            out[pos] = 58  # ::
            out[pos + 1] = 58
            pos += 2
            k += best_len
            continue
        if k > 0 and k != best + best_len:
            out[pos] = 58
            pos += 1
        pos = _put_hex(out, pos, g[k])
        k += 1
    return pos


@njit
def _csv_rows(out, lo, hi, v6, src_hi, src_lo, dst_hi, dst_lo, proto, sport, dport, icmp,
              packets, octets, first, last):
    pos = 0
    for i in range(lo, hi):
        out[pos] = 54 if v6[i] else 52  # 6 / 4
        out[pos + 1] = 44
        pos = _put_ip(out, pos + 2, v6[i], src_hi[i], src_lo[i])
        out[pos] = 44
        pos = _put_ip(out, pos + 1, v6[i], dst_hi[i], dst_lo[i])
        for v in (proto[i], sport[i], dport[i]):
            out[pos] = 44
            pos = _put_uint(out, pos + 1, v)
        out[pos] = 44
        pos += 1
        if icmp[i] >= 0:
            pos = _put_uint(out, pos, icmp[i] >> 8)
        out[pos] = 44
        pos += 1
        if icmp[i] >= 0:
            pos = _put_uint(out, pos, icmp[i] & 0xFF)
        for v in (packets[i], octets[i], first[i], last[i]):
            out[pos] = 44
            pos = _put_uint(out, pos + 1, v)
        out[pos] = 10
        pos += 1
    return pos


def write_truth(path: str, t: Traffic) -> int:
    """Write the truth as CSV (``TRUTH_COLUMNS``, one row per flow, as ``truth()``); return the rows."""
    f = flows(t)
    cols = [f[k] for k in ("v6", "src_hi", "src_lo", "dst_hi", "dst_lo", "proto", "sport", "dport", "icmp",
                           "packets", "octets", "first", "last")]
    n = len(f["v6"])
    chunk = 1 << 16
    out = np.empty(chunk * 200, dtype=np.uint8)  # a row is at most 2 + 2 * 40 + 3 * 6 + 2 * 4 + 4 * 21 octets
    with open(path, "wb") as fh:
        fh.write((",".join(TRUTH_COLUMNS) + "\n").encode())
        for lo in range(0, n, chunk):
            used = _csv_rows(out, lo, min(n, lo + chunk), *cols)
            fh.write(memoryview(out)[:used])
    return n


def read_truth(path: str) -> list[dict]:
    """The truth CSV back as dicts (strings, as ``csv.DictReader`` gives them)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.support.traffic", description=__doc__.splitlines()[0])
    ap.add_argument("out", help="pcap file to write (with --split N: OUT-0.pcap .. OUT-(N-1).pcap)")
    ap.add_argument("--packets", type=int, help="packets of the traffic mix (default 100000)")
    ap.add_argument("--concurrent-flows", type=int, metavar="N",
                    help="instead of the mix: N one-way flows of 1-2 packets, all active at the end")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--snaplen", type=int, default=128)
    ap.add_argument("--split", type=int, default=1, metavar="N",
                    help="write N files of whole conversations, by a symmetric hash (AF_PACKET fanout)")
    ap.add_argument("--truth", help="also write the ground truth as CSV here")
    args = ap.parse_args(argv)
    if args.packets is not None and args.concurrent_flows is not None:
        ap.error("--packets and --concurrent-flows: give one of them, not both")
    if args.packets is not None and args.packets < 1:
        ap.error(f"--packets: {args.packets} is not a positive number of packets")
    if args.concurrent_flows is not None and not 1 <= args.concurrent_flows <= MAX_CONVERSATIONS:
        ap.error(f"--concurrent-flows: {args.concurrent_flows} is not between 1 and {MAX_CONVERSATIONS:,}")
    if not 74 <= args.snaplen <= 65535:
        ap.error(f"--snaplen: {args.snaplen} is not between 74 (Ethernet + IPv6 + TCP headers fit) and 65535")
    if not 1 <= args.split <= 64:
        ap.error(f"--split: {args.split} is not between 1 and 64 files")
    t0 = time.perf_counter()
    try:
        if args.concurrent_flows is not None:
            t = concurrent_flows(args.concurrent_flows, args.seed)
        else:
            t = generate(100_000 if args.packets is None else args.packets, args.seed)
    except ValueError as e:
        ap.error(str(e))
    paths = [args.out] if args.split == 1 else split_paths(args.out, args.split)
    if args.split == 1:
        write(args.out, t, args.snaplen)
    else:
        write_split(args.out, t, args.split, args.snaplen)
    rows = write_truth(args.truth, t) if args.truth else None
    what = f"{len(t):,} packets" + (f", {rows:,} flows in {args.truth}" if rows is not None else "")
    print(f"{', '.join(Path(p).name for p in paths)}: {what} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # every file is closed: skip numba's and LLVM's teardown (about 0.4 s)
