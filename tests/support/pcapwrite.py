"""Writing pcap files, and building the frames that go in them (tests and benchmarks).

Two ways in:

* ``write_pcap(path, packets)`` takes ``(ts_ns, frame)`` or
  ``(ts_ns, frame, origlen)`` tuples: one Python iteration per packet, for
  the hand-built frames of tests.
* ``write_pcap_template(path, template, ts_ns, fields)`` is the columnar path
  for big captures (millions of packets): every record is a copy of one
  template frame with some fields patched per packet from numpy arrays
  (addresses, ports, IP total length, ...). Records are assembled as a numpy
  structured array per chunk and written with one ``write`` per chunk, so
  memory stays O(chunk) and a 5M-packet file takes seconds.

The classic pcap format (libpcap ``pcap-savefile(5)``), all fields in the
writer's byte order, ``byte_order`` ("<" or ">")::

    global header (24 octets)
    0         4       6       8          12        16        20        24
    | magic   | major | minor | thiszone | sigfigs | snaplen | network |
      a1b2c3d4 = µs timestamps, a1b23c4d = ns timestamps; version 2.4

    record header (16 octets), then caplen octets of frame
    0        4                 8        12        16
    | ts_sec | ts_usec/ts_nsec | caplen | origlen |

A frame longer than ``snaplen`` is cut (caplen = snaplen, origlen = its real
length), as a capturing tool would.

The frame builders return ``bytes``: the plain ones (IP, TCP, UDP, ICMP,
Ethernet) are ``flowmeter.capture.frames``; this module adds IPv6 extension
headers, the other link layers (SLL, SLL2, BSD loopback, NFLOG) and
Ethernet shortcuts.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

# the header builders are the runtime's (the warm-up uses them); tests import them from here too
from flowmeter.capture.frames import (ETH_ARP, ETH_IPV4, ETH_IPV6, ETH_QINQ, ETH_VLAN, IPPROTO_ICMP,  # noqa: F401
                                      IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Address, ethernet, icmp,
                                      internet_checksum, ip_bytes, ipv4, ipv6, tcp, udp)

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAP_VERSION = (2, 4)
NS_PER_S = 1_000_000_000


# --- pcap files --------------------------------------------------------------------


def pcap_header(linktype: int = 1, *, nanosecond: bool = False, byte_order: str = "<",
                snaplen: int = 65535) -> bytes:
    """The 24-octet pcap global header."""
    if byte_order not in ("<", ">"):
        raise ValueError(f"byte_order must be '<' or '>', not {byte_order!r}")
    magic = PCAP_MAGIC_NS if nanosecond else PCAP_MAGIC_US
    return struct.pack(byte_order + "IHHiIII", magic, *PCAP_VERSION, 0, 0, snaplen, linktype)


def _split_ts(ts_ns: npt.ArrayLike, nanosecond: bool) -> tuple[np.ndarray, np.ndarray]:
    ts = np.asarray(ts_ns, dtype=np.uint64)
    sec = ts // np.uint64(NS_PER_S)
    frac = ts % np.uint64(NS_PER_S)
    if not nanosecond:
        frac = frac // np.uint64(1000)
    return sec.astype(np.uint32), frac.astype(np.uint32)


def write_pcap(path: str | os.PathLike, packets: Iterable[tuple] | tuple[np.ndarray, ...], *,
               linktype: int = 1, nanosecond: bool = False, byte_order: str = "<", snaplen: int = 65535) -> int:
    """Write packets as a pcap file; return the record count.

    ``packets`` is an iterable of ``(ts_ns, frame[, origlen])`` tuples, or
    columns ``(ts_ns, frames[, origlen])`` with ``frames`` a 2-D uint8 array
    (one equal-length frame per row, written without a Python loop).
    ``ts_ns`` is ns since the epoch (µs files keep the µs part). A frame
    longer than ``snaplen`` is cut; ``origlen`` defaults to the frame length.
    """
    if isinstance(packets, tuple) and len(packets) in (2, 3) and getattr(packets[1], "ndim", 0) == 2:
        ts, frames = np.asarray(packets[0], dtype=np.uint64), np.asarray(packets[1], dtype=np.uint8)
        origlen = packets[2] if len(packets) == 3 else frames.shape[1]
        return _write_records(path, ts, frames, origlen, linktype, nanosecond, byte_order, snaplen)
    record = struct.Struct(byte_order + "IIII")
    count = 0
    with open(path, "wb") as f:
        f.write(pcap_header(linktype, nanosecond=nanosecond, byte_order=byte_order, snaplen=snaplen))
        for packet in packets:
            ts_ns, frame = int(packet[0]), bytes(packet[1])
            origlen = int(packet[2]) if len(packet) > 2 else len(frame)
            sec, frac = divmod(ts_ns, NS_PER_S)
            if not nanosecond:
                frac //= 1000
            data = frame[:snaplen]
            f.write(record.pack(sec, frac, len(data), origlen))
            f.write(data)
            count += 1
    return count


def _write_records(path: str | os.PathLike, ts_ns: np.ndarray, frames: np.ndarray, origlen: npt.ArrayLike,
                   linktype: int, nanosecond: bool, byte_order: str, snaplen: int) -> int:
    """Equal-length frames (rows of ``frames``) as one structured array of records."""
    n, width = frames.shape
    caplen = min(width, snaplen)
    u4 = byte_order + "u4"
    rec = np.empty(n, dtype=[("sec", u4), ("frac", u4), ("caplen", u4), ("origlen", u4),
                             ("data", np.uint8, (caplen,))])
    rec["sec"], rec["frac"] = _split_ts(ts_ns, nanosecond)
    rec["caplen"] = caplen
    rec["origlen"] = np.broadcast_to(np.asarray(origlen, dtype=np.uint32), (n,))
    rec["data"] = frames[:, :caplen]
    with open(path, "wb") as f:
        f.write(pcap_header(linktype, nanosecond=nanosecond, byte_order=byte_order, snaplen=snaplen))
        f.write(rec.tobytes())
    return n


def write_pcap_template(path: str | os.PathLike, template: bytes, ts_ns: npt.ArrayLike,
                        fields: Mapping[int, tuple[str, npt.ArrayLike]] | None = None, *,
                        origlen: npt.ArrayLike | None = None, linktype: int = 1,
                        nanosecond: bool = False, byte_order: str = "<", snaplen: int = 65535,
                        chunk: int = 65536) -> int:
    """Write ``len(ts_ns)`` copies of ``template`` with per-packet fields patched; return the count.

    ``fields`` maps a frame offset to ``(numpy dtype, values)``, e.g.
    ``{26: (">u4", src_addresses), 34: (">u2", sports)}``: the value of
    packet *i* is written at that offset of record *i* (a scalar is written
    into every record). Records are cut at ``snaplen``; ``origlen`` (scalar or
    per packet, default the template length) is the frame's length on the
    wire. Nothing is per-packet Python: each chunk of records is one numpy
    structured array written at once.
    """
    ts_ns = np.asarray(ts_ns, dtype=np.uint64)
    n = len(ts_ns)
    frame = np.frombuffer(bytes(template), dtype=np.uint8)
    caplen = min(len(frame), snaplen)
    orig = np.broadcast_to(np.asarray(len(frame) if origlen is None else origlen, dtype=np.uint32), (n,))
    patches = []
    for offset, (dtype, values) in sorted((fields or {}).items()):
        dt = np.dtype(dtype)
        if offset < 0 or offset + dt.itemsize > len(frame):
            raise ValueError(f"field at offset {offset} ({dt}) is outside the {len(frame)}-octet template")
        patches.append((offset, dt, np.broadcast_to(np.asarray(values).astype(dt, copy=False), (n,))))
    u4 = byte_order + "u4"
    rec_dtype = np.dtype([("sec", u4), ("frac", u4), ("caplen", u4), ("origlen", u4),
                          ("data", np.uint8, (caplen,))])
    with open(path, "wb") as f:
        f.write(pcap_header(linktype, nanosecond=nanosecond, byte_order=byte_order, snaplen=snaplen))
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            rec = np.empty(stop - start, dtype=rec_dtype)
            rec["sec"], rec["frac"] = _split_ts(ts_ns[start:stop], nanosecond)
            rec["caplen"] = caplen
            rec["origlen"] = orig[start:stop]
            data = rec["data"]
            data[:] = frame[:caplen]
            for offset, dt, values in patches:
                raw = np.ascontiguousarray(values[start:stop]).view(np.uint8).reshape(-1, dt.itemsize)
                end = min(offset + dt.itemsize, caplen)
                if offset < end:  # a field beyond the snap length is not captured
                    data[:, offset:end] = raw[:, :end - offset]
            f.write(rec.tobytes())
    return n


# --- network and transport layers ------------------------------------------------

def ipv6_ext(next_header: int, body: bytes = b"") -> bytes:
    """A hop-by-hop / routing / destination-options style extension header:
    next header, length in 8-octet units beyond the first 8, ``body`` padded
    (PadN) to a multiple of 8 octets."""
    body = body.ljust(6, b"\0") if len(body) <= 6 else body
    pad = -(len(body) + 2) % 8
    body += (b"\x01" + bytes([pad - 2]) + b"\0" * (pad - 2)) if pad >= 2 else b"\0" * pad
    return bytes([next_header, (len(body) + 2) // 8 - 1]) + body


def ipv6_fragment(next_header: int, offset: int = 0, more: bool = False, ident: int = 0) -> bytes:
    """An IPv6 fragment header (``offset`` in 8-octet units)."""
    return struct.pack("!BBHI", next_header, 0, (offset << 3) | int(more), ident)


def jumbo_option(length: int) -> bytes:
    """The Jumbo Payload option (type 0xC2, RFC 2675) for a hop-by-hop header body."""
    return b"\0\0" + struct.pack("!BBI", 0xC2, 4, length)  # two Pad1 to align the value


# --- link layers -------------------------------------------------------------------

def sll(payload: bytes, protocol: int = ETH_IPV4, pkttype: int = 0, *, arphrd: int = 1) -> bytes:
    """Linux cooked capture v1 (link type 113): packet type 0 host, 1 broadcast,
    2 multicast, 3 other host, 4 outgoing."""
    return struct.pack("!HHH8sH", pkttype, arphrd, 6, b"\x02\0\0\0\0\x01\0\0", protocol) + payload


def sll2(payload: bytes, protocol: int = ETH_IPV4, pkttype: int = 0, *, ifindex: int = 0,
         arphrd: int = 1) -> bytes:
    """Linux cooked capture v2 (link type 276)."""
    return struct.pack("!HHIHBB8s", protocol, 0, ifindex, arphrd, pkttype, 6,
                       b"\x02\0\0\0\0\x01\0\0") + payload


def null_header(payload: bytes, family: int, byte_order: str = "<") -> bytes:
    """BSD loopback (link types 0 / 108): a 4-octet address family (2 = IPv4;
    24, 28, 30 = IPv6 on NetBSD/OpenBSD, FreeBSD, macOS)."""
    return struct.pack(byte_order + "I", family) + payload


NFULA_PACKET_HDR, NFULA_IFINDEX_INDEV, NFULA_IFINDEX_OUTDEV = 1, 4, 5
NFULA_PAYLOAD, NFULA_PREFIX = 9, 10


def nflog_tlv(tlv_type: int, value: bytes, byte_order: str = "<") -> bytes:
    """One NFLOG TLV: length (incl. the 4-octet header) and type in host order, padded to 4."""
    tlv = struct.pack(byte_order + "HH", 4 + len(value), tlv_type) + value
    return tlv + b"\0" * (-len(tlv) % 4)


def nflog(payload: bytes, *, family: int = 2, hook: int | None = None, prefix: bytes | None = None,
          indev: int | None = None, outdev: int | None = None, byte_order: str = "<",
          resource_id: int = 0) -> bytes:
    """A Linux NFLOG record (link type 239) carrying ``payload`` (an IP packet).

    ``family`` 2 = IPv4, 10 = IPv6; ``hook`` 0 PREROUTING .. 4 POSTROUTING;
    ``prefix`` the log prefix (NUL added). TLVs are in ``byte_order`` (the
    capturing host's), the 4-octet header's resource id in network order.
    """
    out = struct.pack("!BBH", family, 0, resource_id)
    if hook is not None:
        proto = ETH_IPV6 if family == 10 else ETH_IPV4
        out += nflog_tlv(NFULA_PACKET_HDR, struct.pack("!HBB", proto, hook, 0), byte_order)
    if prefix is not None:
        out += nflog_tlv(NFULA_PREFIX, prefix + b"\0", byte_order)
    if indev is not None:
        out += nflog_tlv(NFULA_IFINDEX_INDEV, struct.pack("!I", indev), byte_order)
    if outdev is not None:
        out += nflog_tlv(NFULA_IFINDEX_OUTDEV, struct.pack("!I", outdev), byte_order)
    return out + nflog_tlv(NFULA_PAYLOAD, payload, byte_order)


# --- whole frames --------------------------------------------------------------------


def ethernet_ipv4_tcp(src: Address, dst: Address, sport: int, dport: int, flags: int = 0x02,
                      payload: bytes = b"", *, vlans: Sequence[Any] = (), **ip: Any) -> bytes:
    """Ethernet / IPv4 / TCP."""
    return ethernet(ipv4(src, dst, IPPROTO_TCP, tcp(sport, dport, flags, payload), **ip), ETH_IPV4,
                    vlans=vlans)


def ethernet_ipv4_udp(src: Address, dst: Address, sport: int, dport: int, payload: bytes = b"",
                      *, vlans: Sequence[Any] = (), **ip: Any) -> bytes:
    """Ethernet / IPv4 / UDP."""
    return ethernet(ipv4(src, dst, IPPROTO_UDP, udp(sport, dport, payload), **ip), ETH_IPV4, vlans=vlans)


def ethernet_ipv4_icmp(src: Address, dst: Address, type_: int = 8, code: int = 0,
                       payload: bytes = b"\0\0\0\0", *, vlans: Sequence[Any] = (), **ip: Any) -> bytes:
    """Ethernet / IPv4 / ICMP."""
    return ethernet(ipv4(src, dst, IPPROTO_ICMP, icmp(type_, code, payload), **ip), ETH_IPV4, vlans=vlans)


def ethernet_ipv6_tcp(src: Address, dst: Address, sport: int, dport: int, flags: int = 0x02,
                      payload: bytes = b"", *, vlans: Sequence[Any] = (), **ip: Any) -> bytes:
    """Ethernet / IPv6 / TCP."""
    return ethernet(ipv6(src, dst, IPPROTO_TCP, tcp(sport, dport, flags, payload), **ip), ETH_IPV6,
                    vlans=vlans)


def ethernet_ipv6_udp(src: Address, dst: Address, sport: int, dport: int, payload: bytes = b"",
                      *, vlans: Sequence[Any] = (), **ip: Any) -> bytes:
    """Ethernet / IPv6 / UDP."""
    return ethernet(ipv6(src, dst, IPPROTO_UDP, udp(sport, dport, payload), **ip), ETH_IPV6, vlans=vlans)


def ethernet_ipv6_icmp(src: Address, dst: Address, type_: int = 128, code: int = 0,
                       payload: bytes = b"\0\0\0\0", *, vlans: Sequence[Any] = (), **ip: Any) -> bytes:
    """Ethernet / IPv6 / ICMPv6."""
    return ethernet(ipv6(src, dst, IPPROTO_ICMPV6, icmp(type_, code, payload), **ip), ETH_IPV6,
                    vlans=vlans)
