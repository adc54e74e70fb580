"""Building frames: IP, TCP, UDP, ICMP and Ethernet headers as ``bytes``.

The builders are deliberately plain: they put the given values in the
right places (IP total length and payload length are computed unless
given, the IPv4 header checksum is correct) and nothing else: TCP/UDP
checksums are zero. Any length or version field can be given explicitly to
build malformed packets. The warm-up builds the frames it decodes with
them, and so does the example feed agent (``sources.feedclient``); the
tests build their captures with them too.
"""
from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence

Address = str | int | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address


# --- addresses and checksums ---------------------------------------------------------


def ip_bytes(address: Address, version: int) -> bytes:
    """An address as 4 (IPv4) or 16 (IPv6) network-order octets."""
    if isinstance(address, bytes):
        if len(address) != (4 if version == 4 else 16):
            raise ValueError(f"{len(address)}-octet address for IPv{version}")
        return address
    cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    return cls(address).packed


def internet_checksum(data: bytes) -> int:
    """RFC 1071 ones' complement sum of 16-bit words."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# --- network and transport layers ------------------------------------------------------

IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58


def ipv4(src: Address, dst: Address, proto: int, payload: bytes = b"", *, tos: int = 0,
         ttl: int = 64, ident: int = 0, flags: int = 0, frag_offset: int = 0,
         total_length: int | None = None, options: bytes = b"", ihl: int | None = None,
         version: int = 4) -> bytes:
    """An IPv4 packet. ``flags``: 2 = don't fragment, 1 = more fragments;
    ``frag_offset`` in 8-octet units; ``ihl`` in 32-bit words (default from
    ``options``, which are padded to 4 octets)."""
    options += b"\0" * (-len(options) % 4)
    hlen = 20 + len(options)
    ihl = hlen // 4 if ihl is None else ihl
    total = hlen + len(payload) if total_length is None else total_length
    header = struct.pack("!BBHHHBBH4s4s", (version << 4) | (ihl & 0xF), tos, total, ident,
                         (flags << 13) | frag_offset, ttl, proto, 0,
                         ip_bytes(src, 4), ip_bytes(dst, 4)) + options
    checksum = internet_checksum(header)
    return header[:10] + struct.pack("!H", checksum) + header[12:] + payload


def ipv6(src: Address, dst: Address, next_header: int, payload: bytes = b"", *, tclass: int = 0,
         flow_label: int = 0, hop_limit: int = 64, payload_length: int | None = None,
         version: int = 6) -> bytes:
    """An IPv6 packet; ``payload`` includes any extension headers."""
    plen = len(payload) if payload_length is None else payload_length
    first = (version << 28) | (tclass << 20) | flow_label
    return struct.pack("!IHBB16s16s", first, plen, next_header, hop_limit,
                       ip_bytes(src, 6), ip_bytes(dst, 6)) + payload


def tcp(sport: int, dport: int, flags: int = 0x02, payload: bytes = b"", *, seq: int = 0,
        ack: int = 0, window: int = 65535) -> bytes:
    """A TCP segment with a 20-octet header (flags octet: CWR .. FIN)."""
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, window, 0, 0) + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    """A UDP datagram (checksum 0)."""
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp(type_: int, code: int, payload: bytes = b"\0\0\0\0") -> bytes:
    """An ICMP or ICMPv6 message (checksum 0)."""
    return struct.pack("!BBH", type_, code, 0) + payload


# --- link layer -------------------------------------------------------------------------

ETH_IPV4, ETH_IPV6, ETH_ARP, ETH_VLAN, ETH_QINQ = 0x0800, 0x86DD, 0x0806, 0x8100, 0x88A8


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def ethernet(payload: bytes, ethertype: int, *, vlans: Sequence[int | tuple[int, int]] = (),
             dst: str = "02:00:00:00:00:02", src: str = "02:00:00:00:00:01") -> bytes:
    """An Ethernet II frame; ``vlans`` outermost first, each a VLAN id (802.1Q
    tag) or a ``(tpid, vid)`` pair, e.g. ``[(0x88A8, 100), 200]`` for QinQ."""
    tags = b""
    for tag in vlans:
        tpid, vid = tag if isinstance(tag, tuple) else (ETH_VLAN, tag)
        tags += struct.pack("!HH", tpid, vid & 0x0FFF)
    return _mac(dst) + _mac(src) + tags + struct.pack("!H", ethertype) + payload
