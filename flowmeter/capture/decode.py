"""Decoding captured frames into packet rows: link layer, outer IP header, transport ports.

``decode_batch(batch, out, status)`` reads every record of a ``RecordBatch``
in place (``batch.buf``, no copies) and fills one ``PACKET_DTYPE`` row and one
status (``packets.ST_*``) per record. The per-record loop is the numba kernel
``decode_records``; it calls one small kernel per layer, each a pure function
of (buffer, start, end) returning plain numbers. Every read is checked
against the record's captured end first: numba does no bounds checks, and a
hostile record must neither crash the process nor leak bytes of the next one.

What is metered is the OUTERMOST IP header (the rules of
``shared/pcaps/make_truth.sh``, i.e. what Wireshark shows):

* Link layers (by pcap/pcapng link type)::

    1    Ethernet     | dst (6) | src (6) | type (2) |, type 0x8100 / 0x88a8 / 0x9100: a VLAN tag
                      | TCI (2) | type (2) | follows (any number); type <= 1500: 802.3 length,
                      IP only behind LLC/SNAP | aa aa 03 | 00 00 00 | type (2) |
    113  Linux SLL    | packet type (2) | ARPHRD (2) | addr len (2) | addr (8) | protocol (2) |
    276  Linux SLL2   | protocol (2) | reserved (2) | ifindex (4) | ARPHRD (2) | packet type (1) |
                      | addr len (1) | addr (8) |
    0    BSD null     | address family (4, capturing host's order) | 2 IPv4; 24, 28, 30 IPv6;
                      > 1500: an Ethernet type; ff 03 + PPP protocol: PPP
    108  OpenBSD loop | address family (4, network order) |
    101, 12, 14  raw IP (version nibble decides); 228 IPv4 only; 229 IPv6 only
    239  NFLOG        | family (1) | version (1) | resource id (2) | TLVs ...
         TLV:         | length (2) | type (2) | value, padded to 4 |  length and type in the
                      capturing host's order (detected); 1 PACKET_HDR | hw protocol (2) | hook (1) |,
                      4 / 5 in / out ifindex (be32), 9 PAYLOAD (the IP packet), 10 PREFIX (NUL-ended)
         TLV types are masked with 0x7fff (NLA_F_NESTED); the last PAYLOAD / PREFIX wins. The
         payload is IPv4 / IPv6 by PACKET_HDR's hw protocol (0x0800 / 0x86dd), or without one by
         the family (2 / 10), as Wireshark decides; it may run past the captured octets (snap
         length), not past the record.

* IPv4 | ver/IHL | TOS | total length | id | flags/fragment offset | TTL | proto | csum | src | dst |:
  version 4 and IHL >= 5 and total length >= header length, else ST_MALFORMED
  (total length 0 is TCP segmentation offload: the frame's length counts);
  the whole header (IHL * 4) must be captured, else ST_TRUNCATED.
* IPv6 | ver/TC/flow (4) | payload length (2) | next (1) | hops (1) | src (16) | dst (16) |:
  version 6 else ST_MALFORMED; 40 octets captured else ST_TRUNCATED. Extension
  headers hop-by-hop (0), routing (43), destination options (60) | next | len/8-1 |,
  fragment (44) | next | res | offset*8 + flags | id (4) | are walked; the
  protocol is the last next-header read; any other value ends the walk. AH
  (51) and ESP (50) end it too with protocol 51 / 50, but the transport
  header behind AH (not encrypted) still gives the ports, as Wireshark's.
  Payload length 0 with a hop-by-hop Jumbo Payload option (0xC2, > 65535):
  l3_bytes = jumbo + 40.
* Transport, only right behind the IP header (and its extension headers),
  only in a first fragment, only within the captured octets *and* the IP
  length: ports of TCP, UDP, DCCP, UDP-Lite (first 4 octets), SCTP (12-octet
  common header); TCP flags (octet 13); ICMP (v4) / ICMPv6 (v6) type * 256 + code.
  A non-first fragment of an ICMP datagram takes the type/code of its first
  fragment if that was seen, else it is marked ``sport = ICMP_NO_TYPE`` and
  exported without any (see "ICMP fragments" below).
  Tunnels are the outer flow: nothing inside is parsed.

Direction: the record's (pcapng packet flags) if known, else SLL/SLL2 packet
type (0-3 received -> ingress, 4 outgoing -> egress), else NFLOG hook
(PREROUTING/INPUT ingress, OUTPUT/POSTROUTING egress), else DIR_UNKNOWN.
Interfaces (``ingress_if``, ``egress_if``; ``flowmeter.ipc.packets`` has the
rules per source): NFLOG's in- and out-device as they are; else an SLL2
ifindex on the side its packet type says (4 outgoing: egress, else ingress);
else the record's interface (``RecordBatch.ifindex``: pcapng interface,
classic pcap 1, the AF_PACKET interface, the feed's peer) on the side of
the direction above, ingress when that is unknown.

For NFLOG records the log prefix (offset and length in ``batch.buf``) and the
hook are returned next to the rows; ``nflog_prefixes()`` groups the rows by
prefix so the caller can map the few distinct prefixes (iptables
``--nflog-prefix``) to a forwarding status in Python.

Where we differ from Wireshark on purpose (each case is pinned in
``tests/capture/test_decode.py``): a snap length that cuts the IP
addresses is ST_TRUNCATED (Wireshark keys a flow without destination);
ICMP type/code come from the first two octets (Wireshark wants the whole
8-octet header), and a later fragment of an ICMP datagram gets its first
fragment's (Wireshark shows none: without reassembly it sees no ICMP header
there); malformed options inside an extension header do not hide the ports
behind it; big-endian NFLOG TLVs are recognised; an NFLOG payload cut by
the pcap snap length is still decoded.

Why one file of over 600 lines: it is one kernel, ``decode_records``, and
the small per-layer kernels it inlines; the walk from link header to
transport ports reads top to bottom here, with the byte diagrams above,
and the layers share the bounds-checked readers (``u8``, ``be16``, ...).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from flowmeter.capture.sources import RecordBatch
from flowmeter.ipc.packets import (DIR_EGRESS, DIR_INGRESS, DIR_UNKNOWN, ICMP_NO_TYPE, PACKET_DTYPE, ST_MALFORMED,
                                   ST_NOT_IP, ST_OK, ST_TRUNCATED, ST_UNSUPPORTED_LINK)
from flowmeter.jit import njit

# Link types (pcap-linktype(7))
LINKTYPE_NULL, LINKTYPE_ETHERNET, LINKTYPE_RAW_12, LINKTYPE_RAW_14 = 0, 1, 12, 14
LINKTYPE_RAW, LINKTYPE_LOOP, LINKTYPE_LINUX_SLL, LINKTYPE_IPV4 = 101, 108, 113, 228
LINKTYPE_IPV6, LINKTYPE_NFLOG, LINKTYPE_LINUX_SLL2 = 229, 239, 276
SUPPORTED_LINKTYPES = (0, 1, 12, 14, 101, 108, 113, 228, 229, 239, 276)

# What a link layer says follows it (``network kind``)
NET_ANY_IP = 0  # raw IP: the version nibble decides
NET_IPV4 = 4
NET_IPV6 = 6
NET_NOT_IP = -1
NET_TRUNCATED = -2
NET_UNSUPPORTED = -3

ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD
NFLOG_PREFIX_MAX = 128  # NF_LOG_PREFIXLEN: the kernel never logs a longer one
NO_PREFIX = -1
NO_HOOK = 255

KNOWN_STATUSES = (ST_OK, ST_NOT_IP, ST_MALFORMED, ST_TRUNCATED, ST_UNSUPPORTED_LINK)


# --- loads (callers check bounds) --------------------------------------------------


@njit(inline="always")
def u8(buf, p):
    """``buf[p]`` as int64. Indexing with an unsigned number spares numba's
    negative-index wraparound test on every load (offsets here are never negative)."""
    return np.int64(buf[np.uint64(p)])


@njit(inline="always")
def be16(buf, p):
    return (u8(buf, p) << 8) | u8(buf, p + 1)


@njit(inline="always")
def le16(buf, p):
    return (u8(buf, p + 1) << 8) | u8(buf, p)


@njit(inline="always")
def be32(buf, p):
    return (be16(buf, p) << 16) | be16(buf, p + 2)


@njit(inline="always")
def be64(buf, p):
    """Eight octets as a uint64 (half of an IPv6 address)."""
    return (np.uint64(be32(buf, p)) << np.uint64(32)) | np.uint64(be32(buf, p + 4))


# --- link layers: (buf, start, end) -> what follows and where ------------------------


@njit(inline="always")
def ethertype_kind(ethertype):
    if ethertype == ETH_IPV4:
        return NET_IPV4
    if ethertype == ETH_IPV6:
        return NET_IPV6
    return NET_NOT_IP


@njit(inline="always")
def ethertype_payload(buf, p, end, ethertype):
    """Skip VLAN tags and LLC/SNAP from ``p`` (just after an Ethernet type
    field holding ``ethertype``); return (network kind, its start)."""
    while ethertype == 0x8100 or ethertype == 0x88A8 or ethertype == 0x9100:
        if end - p < 4:
            return NET_TRUNCATED, p
        ethertype = be16(buf, p + 2)
        p += 4
    if ethertype <= 1500:  # 802.3 length: IP only behind SNAP with OUI 0
        if end - p < 8:
            return NET_NOT_IP, p
        if (u8(buf, p) != 0xAA or u8(buf, p + 1) != 0xAA or u8(buf, p + 2) != 0x03
                or u8(buf, p + 3) != 0 or u8(buf, p + 4) != 0 or u8(buf, p + 5) != 0):
            return NET_NOT_IP, p
        return ethertype_kind(be16(buf, p + 6)), p + 8
    return ethertype_kind(ethertype), p


@njit(inline="always")
def ethernet_network(buf, p, end):
    if end - p < 14:
        return NET_TRUNCATED, p
    return ethertype_payload(buf, p + 14, end, be16(buf, p + 12))


@njit(inline="always")
def packet_type_direction(pkttype):
    """Linux PACKET_* type: 0 host, 1 broadcast, 2 multicast, 3 other host, 4 outgoing."""
    if pkttype <= 3:
        return DIR_INGRESS
    if pkttype == 4:
        return DIR_EGRESS
    return DIR_UNKNOWN


@njit
def sll_network(buf, p, end):
    """Linux SLL: (kind, start, direction)."""
    if end - p < 16:
        return NET_TRUNCATED, p, DIR_UNKNOWN
    kind, start = ethertype_payload(buf, p + 16, end, be16(buf, p + 14))
    return kind, start, packet_type_direction(be16(buf, p))


@njit
def sll2_network(buf, p, end):
    """Linux SLL2: (kind, start, direction, ifindex)."""
    if end - p < 20:
        return NET_TRUNCATED, p, DIR_UNKNOWN, 0
    kind, start = ethertype_payload(buf, p + 20, end, be16(buf, p))
    return kind, start, packet_type_direction(u8(buf, p + 10)), be32(buf, p + 4)


@njit
def family_kind(family):
    """BSD address family: AF_INET 2; AF_INET6 24 (Net/OpenBSD), 28 (FreeBSD), 30 (Darwin)."""
    if family == 2:
        return NET_IPV4
    if family == 24 or family == 28 or family == 30:
        return NET_IPV6
    return NET_NOT_IP


@njit
def null_network(buf, p, end, network_order):
    """BSD null (host order, detected: a family fits 16 bits) or OpenBSD loop (network order)."""
    if end - p < 4:
        return NET_TRUNCATED, p
    if network_order:
        return family_kind(be32(buf, p)), p + 4
    if u8(buf, p) == 0xFF and u8(buf, p + 1) == 0x03:  # PPP in a null header
        proto = be16(buf, p + 2)
        if proto == 0x21:
            return NET_IPV4, p + 4
        if proto == 0x57:
            return NET_IPV6, p + 4
        return NET_NOT_IP, p + 4
    family = (le16(buf, p + 2) << 16) | le16(buf, p)
    if family > 0xFFFF:  # written big-endian
        family = be32(buf, p)
    if family > 1500:  # some systems put an Ethernet type here
        return ethertype_kind(family), p + 4
    return family_kind(family), p + 4


@njit
def nflog_big_endian(buf, q, end, reported_end):
    """Byte order of NFLOG TLV headers: the capturing host's, not recorded.

    Take the order in which the first TLV's length fits the record; if both
    fit, the one whose type is a known NFULA_* (< 32); else little-endian,
    what Linux hosts nearly always are (and all Wireshark assumes).
    """
    if end - q < 4:
        return False
    len_le, len_be = le16(buf, q), be16(buf, q)
    le_ok = 4 <= len_le <= reported_end - q
    be_ok = 4 <= len_be <= reported_end - q
    if le_ok and be_ok:
        return (le16(buf, q + 2) & 0x7FFF) >= 32 and (be16(buf, q + 2) & 0x7FFF) < 32
    return be_ok and not le_ok


@njit
def nflog_network(buf, p, end, reported_end):
    """NFLOG: walk the TLVs. Returns (kind, payload start, payload end (captured),
    payload length (reported), direction, in-device, out-device, prefix offset,
    prefix length or NO_PREFIX, hook or NO_HOOK). The last PAYLOAD / PREFIX wins."""
    if end - p < 4:
        return NET_TRUNCATED, p, p, 0, DIR_UNKNOWN, 0, 0, 0, NO_PREFIX, NO_HOOK
    family = u8(buf, p)
    q = p + 4
    big = nflog_big_endian(buf, q, end, reported_end)
    payload, payload_len = -1, 0
    hw_protocol, hook, indev, outdev = 0, NO_HOOK, 0, 0
    prefix, prefix_len = 0, NO_PREFIX
    while end - q >= 4:
        tlen = be16(buf, q) if big else le16(buf, q)
        ttype = (be16(buf, q + 2) if big else le16(buf, q + 2)) & 0x7FFF
        if tlen < 4 or tlen > reported_end - q:
            break
        v, vlen = q + 4, tlen - 4
        vcap = min(vlen, end - v)  # captured octets of the value
        if ttype == 9:  # NFULA_PAYLOAD
            payload, payload_len = v, vlen
        elif ttype == 1 and vcap >= 3:  # NFULA_PACKET_HDR
            hw_protocol, hook = be16(buf, v), u8(buf, v + 2)
        elif ttype == 4 and vcap >= 4:
            indev = be32(buf, v)
        elif ttype == 5 and vcap >= 4:
            outdev = be32(buf, v)
        elif ttype == 10:  # NFULA_PREFIX, NUL-terminated
            prefix, prefix_len = v, 0
            while prefix_len < vcap and prefix_len < NFLOG_PREFIX_MAX and u8(buf, v + prefix_len) != 0:
                prefix_len += 1
        q += (tlen + 3) & ~3
    direction = DIR_UNKNOWN
    if hook == 0 or hook == 1:
        direction = DIR_INGRESS
    elif hook == 3 or hook == 4:
        direction = DIR_EGRESS
    if payload < 0:
        kind = NET_TRUNCATED if end - q > 0 else NET_NOT_IP
        return kind, p, p, 0, direction, indev, outdev, prefix, prefix_len, hook
    if hw_protocol != 0:  # Wireshark: the hardware protocol, if given, else the family
        kind = ethertype_kind(hw_protocol)
    elif family == 2:
        kind = NET_IPV4
    elif family == 10:
        kind = NET_IPV6
    else:
        kind = NET_NOT_IP
    return (kind, payload, min(payload + payload_len, end), payload_len, direction, indev, outdev, prefix,
            prefix_len, hook)


# --- IP ----------------------------------------------------------------------------


@njit(inline="always")
def ipv4_header(buf, p, end, reported_len):
    """IPv4 at ``buf[p:end]``: (status, src, dst, l3_bytes, tos, proto,
    transport start, end of IP data (captured), first fragment, fragment id:
    the identification of a fragment (offset or more-fragments set), else -1)."""
    if end - p < 1:
        return ST_TRUNCATED, 0, 0, 0, 0, 0, p, p, False, -1
    hlen = (u8(buf, p) & 0xF) * 4
    if u8(buf, p) >> 4 != 4 or hlen < 20:
        return ST_MALFORMED, 0, 0, 0, 0, 0, p, p, False, -1
    if end - p < hlen:
        return ST_TRUNCATED, 0, 0, 0, 0, 0, p, p, False, -1
    total = be16(buf, p + 2)
    if total == 0:  # TCP segmentation offload: the length is the frame's
        total = reported_len
    if total < hlen:
        return ST_MALFORMED, 0, 0, 0, 0, 0, p, p, False, -1
    flags_offset = be16(buf, p + 6)
    first_fragment = (flags_offset & 0x1FFF) == 0
    frag_id = be16(buf, p + 4) if (flags_offset & 0x3FFF) != 0 else -1
    return (ST_OK, be32(buf, p + 12), be32(buf, p + 16), total, u8(buf, p + 1),
            u8(buf, p + 9), p + hlen, min(end, p + total), first_fragment, frag_id)


@njit
def jumbo_payload_length(buf, q, end):
    """The Jumbo Payload option's value in the hop-by-hop header at ``q``, or 0."""
    if end - q < 2:
        return 0
    stop = min(end, q + (u8(buf, q + 1) + 1) * 8)
    o = q + 2
    while o < stop:
        otype = u8(buf, o)
        if otype == 0:  # Pad1
            o += 1
            continue
        if stop - o < 2:
            return 0
        olen = u8(buf, o + 1)
        if otype == 0xC2 and olen == 4 and stop - o >= 6:
            return be32(buf, o + 2)
        o += 2 + olen
    return 0


@njit(inline="always")
def ipv6_header(buf, p, end):
    """IPv6 at ``buf[p:end]``: (status, src hi, src lo, dst hi, dst lo,
    l3_bytes, traffic class, next header, end of IP data (captured))."""
    zero = np.uint64(0)  # not 0: int64 and uint64 results would unify to float64
    if end - p < 1:
        return ST_TRUNCATED, zero, zero, zero, zero, 0, 0, 0, p
    if u8(buf, p) >> 4 != 6:
        return ST_MALFORMED, zero, zero, zero, zero, 0, 0, 0, p
    if end - p < 40:
        return ST_TRUNCATED, zero, zero, zero, zero, 0, 0, 0, p
    payload = be16(buf, p + 4)
    nh = u8(buf, p + 6)
    if payload == 0 and nh == 0:
        jumbo = jumbo_payload_length(buf, p + 40, end)
        if jumbo > 65535:  # RFC 2675: smaller values are invalid, Wireshark ignores them
            payload = jumbo
    tclass = ((u8(buf, p) & 0xF) << 4) | (u8(buf, p + 1) >> 4)
    l3_bytes = min(payload + 40, 0xFFFFFFFF)
    return (ST_OK, be64(buf, p + 8), be64(buf, p + 16), be64(buf, p + 24), be64(buf, p + 32),
            l3_bytes, tclass, nh, min(end, p + 40 + payload))


@njit(inline="always")
def walk_extension_headers(buf, q, end, nh):
    """Walk IPv6 extension headers (and AH) from ``q`` with next header ``nh``.

    Returns (protocol, transport next header, transport start, first
    fragment, fragment id: the identification of the last fragment header
    whose offset or M flag is set, else -1). The protocol is the last
    next-header value read, frozen at AH (51); a header counts once its
    first two octets (the whole 8 for a fragment header) are within
    ``end``, as Wireshark's. Each header is at least 8 octets, so the walk
    ends.
    """
    proto = nh
    frozen = False
    first_fragment = True
    frag_id = -1
    while True:
        if nh == 0 or nh == 43 or nh == 60:
            if end - q < 2:
                break
            length = (u8(buf, q + 1) + 1) * 8
        elif nh == 44:
            if end - q < 8:
                break
            if be16(buf, q + 2) >> 3 != 0:
                first_fragment = False
            if (be16(buf, q + 2) & 0xFFF9) != 0:  # offset or M (not an atomic fragment)
                frag_id = be32(buf, q + 4)
            length = 8
        elif nh == 51:  # AH: the protocol stays 51, the ports are behind it
            if end - q < 2:
                break
            frozen = True
            length = (u8(buf, q + 1) + 2) * 4
        else:
            break
        nh = u8(buf, q)
        if not frozen:
            proto = nh
        q += length
    return proto, nh, q, first_fragment, frag_id


@njit(inline="always")
def transport_fields(buf, q, end, nh, icmp_proto):
    """(sport, dport, icmp type*256+code, TCP flags) of the transport header
    ``nh`` at ``buf[q:end]``; ``icmp_proto`` is 1 (IPv4) or 58 (IPv6), or -1
    when ICMP does not count (behind AH)."""
    if nh == 6 or nh == 17 or nh == 33 or nh == 136:
        if end - q >= 4:
            flags = u8(buf, q + 13) if nh == 6 and end - q >= 14 else 0
            return be16(buf, q), be16(buf, q + 2), 0, flags
    elif nh == 132:
        if end - q >= 12:  # Wireshark wants SCTP's whole common header
            return be16(buf, q), be16(buf, q + 2), 0, 0
    elif nh == icmp_proto:
        if end - q >= 2:
            return 0, 0, be16(buf, q), 0
    return 0, 0, 0, 0


# --- ICMP fragments ----------------------------------------------------------------
#
# A non-first fragment carries no ICMP header, so its type and code are not in it.
# Exporting them as 0 would be a lie a collector cannot see through: type 0 code 0 is
# an echo reply (nfdump shows "0.0"). Instead the decoder remembers the type/code of
# each fragmented ICMP datagram whose first fragment it saw, by (source, destination,
# protocol, identification) as the receiver's reassembly does (RFC 791, RFC 8200),
# and gives them to the datagram's later fragments, which thus count in the same flow
# as the first. A later fragment whose first was not seen (lost, reordered, too old,
# forgotten) gets sport = ICMP_NO_TYPE: its own flow, exported in the "other"
# template, which has no icmpTypeCode element at all (a record that claims no type
# rather than a wrong one). An entry counts for the reassembly timeout of its family
# (Linux: ipfrag_time 30 s, ip6frag_time 60 s): after that the identification may
# be reused by another datagram.

FRAG_SLOTS = 4096  # datagrams remembered: a direct-mapped table, a newer datagram replaces an older
FRAG_LIFETIME_V4_NS = 30 * 1_000_000_000
FRAG_LIFETIME_V6_NS = 60 * 1_000_000_000
_FRAG_KNOWN = np.uint64(1 << 16)  # frag_values[:, 1]: type*256 + code | this bit (0: empty slot)
_FRAG_M = np.uint64(0x9E3779B97F4A7C15)


@njit(inline="always")
def _frag_slot(frag_keys, s_hi, s_lo, d_hi, d_lo, tag):
    h = np.uint64(0)
    for w in (s_hi, s_lo, d_hi, d_lo, tag):
        h = (h ^ w) * _FRAG_M
        h ^= h >> np.uint64(29)
    return np.int64(h & np.uint64(frag_keys.shape[0] - 1))


@njit(inline="always")
def remember_icmp(frag_keys, frag_values, s_hi, s_lo, d_hi, d_lo, tag, icmp, ts):
    """Keep the ICMP type*256+code of the datagram whose first fragment this is."""
    k = _frag_slot(frag_keys, s_hi, s_lo, d_hi, d_lo, tag)
    frag_keys[k, 0] = s_hi
    frag_keys[k, 1] = s_lo
    frag_keys[k, 2] = d_hi
    frag_keys[k, 3] = d_lo
    frag_keys[k, 4] = tag
    frag_values[k, 0] = ts
    frag_values[k, 1] = np.uint64(icmp) | _FRAG_KNOWN


@njit(inline="always")
def recall_icmp(frag_keys, frag_values, s_hi, s_lo, d_hi, d_lo, tag, ts, lifetime):
    """The type*256+code of this fragment's datagram, or -1 if its first fragment is not remembered
    (never seen, or more than ``lifetime`` ns away in time)."""
    k = _frag_slot(frag_keys, s_hi, s_lo, d_hi, d_lo, tag)
    v = frag_values[k, 1]
    if (v & _FRAG_KNOWN) == 0 or frag_keys[k, 4] != tag or frag_keys[k, 1] != s_lo or frag_keys[k, 3] != d_lo \
            or frag_keys[k, 0] != s_hi or frag_keys[k, 2] != d_hi:
        return -1
    seen = frag_values[k, 0]
    if (ts - seen if ts >= seen else seen - ts) > np.uint64(lifetime):
        return -1
    return np.int64(v & np.uint64(0xFFFF))


class FragmentMemory:
    """The ICMP datagrams whose first fragment a decoder saw (see "ICMP fragments" above).

    One per stream of records decoded in order (a capture process, a feed):
    ``decode_batch`` reads and updates it, so a datagram's fragments are
    matched across batches.
    """

    def __init__(self, slots: int = FRAG_SLOTS) -> None:
        if slots < 1 or slots & (slots - 1):
            raise ValueError(f"slots: {slots} is not a power of two")
        self.keys = np.zeros((slots, 5), np.uint64)
        self.values = np.zeros((slots, 2), np.uint64)


# --- the record loop ---------------------------------------------------------------


@njit(inline="always")
def link_network(buf, p, end, reported_end, linktype):
    """Dispatch on the link type: (kind, network start, captured end, reported
    length from the start, direction, ingress, egress interface the link
    header gives (0, 0: none), prefix offset, prefix length, hook)."""
    direction, ifindex = DIR_UNKNOWN, 0
    if linktype == LINKTYPE_ETHERNET:
        kind, start = ethernet_network(buf, p, end)
    elif linktype == LINKTYPE_RAW or linktype == LINKTYPE_RAW_12 or linktype == LINKTYPE_RAW_14:
        kind, start = NET_ANY_IP, p
    elif linktype == LINKTYPE_IPV4:
        kind, start = NET_IPV4, p
    elif linktype == LINKTYPE_IPV6:
        kind, start = NET_IPV6, p
    elif linktype == LINKTYPE_LINUX_SLL:
        kind, start, direction = sll_network(buf, p, end)
    elif linktype == LINKTYPE_LINUX_SLL2:
        kind, start, direction, ifindex = sll2_network(buf, p, end)
    elif linktype == LINKTYPE_NULL or linktype == LINKTYPE_LOOP:
        kind, start = null_network(buf, p, end, linktype == LINKTYPE_LOOP)
    elif linktype == LINKTYPE_NFLOG:
        return nflog_network(buf, p, end, reported_end)
    else:
        kind, start = NET_UNSUPPORTED, p
    if direction == DIR_EGRESS:  # SLL2: its ifindex on the side its packet type says
        return kind, start, end, reported_end - start, direction, 0, ifindex, 0, NO_PREFIX, NO_HOOK
    return kind, start, end, reported_end - start, direction, ifindex, 0, 0, NO_PREFIX, NO_HOOK


@njit
def decode_records(buf, offset, caplen, origlen, linktype, rec_ifindex, rec_direction, rec_ts, frag_keys, frag_values,
                   ts_ns, src_hi, src_lo, dst_hi, dst_lo, l3_bytes, ingress_if, egress_if, sport, dport, icmp,
                   ip_version, proto, tcp_flags, tos, direction, fwd_status,
                   status, prefix_offset, prefix_length, hook):
    """Fill one packet row (the column arrays) and one status per record.

    Rows whose status is not ST_OK carry only time, interfaces and direction.
    ``frag_keys``/``frag_values`` are a ``FragmentMemory``'s arrays.
    Per-record Python (even with numpy per field) costs a microsecond or
    more per packet; this loop takes 30-90 ns (hot / cold cache). The layer
    functions are inlined (``inline="always"``) because a numba call that
    passes ``buf`` pays an atomic reference-count increment and decrement:
    without inlining the same loop took twice as long. The rare link types
    (SLL, null, NFLOG) stay real calls, which keeps the first compile
    shorter.
    """
    size = len(buf)
    for i in range(len(offset)):
        p = min(np.int64(offset[i]), size)
        end = min(p + np.int64(caplen[i]), size)
        reported_end = p + max(np.int64(origlen[i]), np.int64(caplen[i]))
        kind, net, net_end, net_reported, link_dir, link_in, link_out, pfx, pfx_len, nf_hook = link_network(
            buf, p, end, reported_end, np.int64(linktype[i]))
        st = ST_OK
        s_hi = s_lo = d_hi = d_lo = np.uint64(0)
        length = t_os = prot = version = sp = dp = ic = flags = 0
        frag_id = -1  # identification of a fragment, else -1
        icmp_read = False  # the ICMP type/code octets were captured (a first fragment)
        if kind == NET_UNSUPPORTED:
            st = ST_UNSUPPORTED_LINK
        elif kind == NET_TRUNCATED:
            st = ST_TRUNCATED
        elif kind == NET_NOT_IP:
            st = ST_NOT_IP
        elif net >= net_end:
            st = ST_TRUNCATED
        else:
            if kind == NET_ANY_IP:
                kind = u8(buf, net) >> 4
                if kind != 4 and kind != 6:
                    st = ST_MALFORMED
            if kind == NET_IPV4:
                st, src4, dst4, length, t_os, prot, q, ip_end, first, frag_id = ipv4_header(
                    buf, net, net_end, net_reported)
                s_lo, d_lo = np.uint64(src4), np.uint64(dst4)
                version = 4
                nh = prot
                if st == ST_OK and prot == 51:
                    prot, nh, q, first, _ = walk_extension_headers(buf, q, ip_end, prot)
                if st == ST_OK and first:
                    sp, dp, ic, flags = transport_fields(buf, q, ip_end, nh, 1 if prot == 1 else -1)
                    icmp_read = ip_end - q >= 2
            elif kind == NET_IPV6:
                st, s_hi, s_lo, d_hi, d_lo, length, t_os, nh, ip_end = ipv6_header(buf, net, net_end)
                version = 6
                if st == ST_OK:
                    prot, nh, q, first, frag_id = walk_extension_headers(buf, net + 40, ip_end, nh)
                    if first:
                        sp, dp, ic, flags = transport_fields(buf, q, ip_end, nh, 58 if prot == 58 else -1)
                        icmp_read = ip_end - q >= 2
        if st != ST_OK:
            s_hi = s_lo = d_hi = d_lo = np.uint64(0)
            length = t_os = prot = version = sp = dp = ic = flags = 0
        elif frag_id >= 0 and prot == (1 if version == 4 else 58):  # a fragment of an ICMP datagram
            tag = (np.uint64(version) << np.uint64(40)) | (np.uint64(prot) << np.uint64(32)) | np.uint64(frag_id)
            if icmp_read:
                remember_icmp(frag_keys, frag_values, s_hi, s_lo, d_hi, d_lo, tag, ic, rec_ts[i])
            else:  # a non-first fragment (or a first one cut before the type)
                ic = recall_icmp(frag_keys, frag_values, s_hi, s_lo, d_hi, d_lo, tag, rec_ts[i],
                                 FRAG_LIFETIME_V4_NS if version == 4 else FRAG_LIFETIME_V6_NS)
                if ic < 0:
                    sp, ic = ICMP_NO_TYPE, 0
        ts_ns[i] = rec_ts[i]
        src_hi[i] = s_hi
        src_lo[i] = s_lo
        dst_hi[i] = d_hi
        dst_lo[i] = d_lo
        l3_bytes[i] = length
        d = rec_direction[i] if rec_direction[i] != DIR_UNKNOWN else link_dir
        if link_in != 0 or link_out != 0:  # SLL2, NFLOG
            ingress_if[i] = link_in
            egress_if[i] = link_out
        elif d == DIR_EGRESS:  # the record's interface, on the side its direction says
            ingress_if[i] = 0
            egress_if[i] = rec_ifindex[i]
        else:
            ingress_if[i] = rec_ifindex[i]
            egress_if[i] = 0
        sport[i] = sp
        dport[i] = dp
        icmp[i] = ic
        ip_version[i] = version
        proto[i] = prot
        tcp_flags[i] = flags
        tos[i] = t_os
        direction[i] = d
        fwd_status[i] = 0
        status[i] = st
        prefix_offset[i] = pfx
        prefix_length[i] = pfx_len
        hook[i] = nf_hook


# --- Python API ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class DecodeInfo:
    """What ``decode_batch`` found besides the rows.

    ``status_counts[st]`` counts records per ``ST_*``. For NFLOG records
    ``nflog_prefix_offset/length`` locate the log prefix in ``batch.buf``
    (length NO_PREFIX = -1: none) and ``nflog_hook`` is the netfilter hook
    (NO_HOOK = 255: none); other records have NO_PREFIX / NO_HOOK.
    """
    count: int
    status_counts: npt.NDArray[np.int64]
    nflog_prefix_offset: npt.NDArray[np.uint64]
    nflog_prefix_length: npt.NDArray[np.int16]
    nflog_hook: npt.NDArray[np.uint8]

    @property
    def ok(self) -> int:
        return int(self.status_counts[ST_OK])


def decode_batch(batch: RecordBatch, out: npt.NDArray, status: npt.NDArray[np.uint8],
                 fragments: FragmentMemory | None = None) -> DecodeInfo:
    """Decode every record of ``batch`` into ``out[:n]`` (PACKET_DTYPE) and ``status[:n]`` (uint8).

    ``fragments``: the memory of ICMP first fragments of the stream this batch
    belongs to; without one, a datagram's fragments are matched within this
    batch only.
    """
    n = len(batch)
    if out.dtype != PACKET_DTYPE:
        raise TypeError(f"out must have PACKET_DTYPE, not {out.dtype}")
    if len(out) < n or len(status) < n:
        raise ValueError(f"{n} records but out holds {len(out)} rows and status {len(status)}")
    rows = out[:n]
    prefix_offset = np.empty(n, np.uint64)
    prefix_length = np.empty(n, np.int16)
    hook = np.empty(n, np.uint8)
    if fragments is None:
        fragments = FragmentMemory(64)
    decode_records(batch.buf, batch.offset, batch.caplen, batch.origlen, batch.linktype, batch.ifindex,
                   batch.direction, batch.ts_ns, fragments.keys, fragments.values,
                   rows["ts_ns"], rows["src_hi"], rows["src_lo"], rows["dst_hi"], rows["dst_lo"],
                   rows["l3_bytes"], rows["ingress_if"], rows["egress_if"], rows["sport"], rows["dport"], rows["icmp"],
                   rows["ip_version"], rows["proto"], rows["tcp_flags"], rows["tos"], rows["direction"],
                   rows["fwd_status"], status[:n],
                   prefix_offset, prefix_length, hook)
    counts = np.bincount(status[:n], minlength=len(KNOWN_STATUSES)).astype(np.int64)
    return DecodeInfo(n, counts, prefix_offset, prefix_length, hook)


def nflog_prefixes(batch: RecordBatch, info: DecodeInfo) -> dict[bytes, npt.NDArray[np.intp]]:
    """Rows of ``batch`` grouped by NFLOG log prefix: ``{prefix: row indices}``.

    Vectorised: the prefixes (at most NFLOG_PREFIX_MAX octets, no NUL) are
    gathered into a zero-padded matrix and grouped with ``np.unique``; no
    per-row Python.
    """
    rows = np.flatnonzero(info.nflog_prefix_length >= 0)
    if not rows.size:
        return {}
    lengths = info.nflog_prefix_length[rows].astype(np.int64)
    width = int(lengths.max())
    if width == 0:
        return {b"": rows}
    columns = np.arange(width)
    index = info.nflog_prefix_offset[rows].astype(np.int64)[:, None] + columns
    inside = columns < lengths[:, None]
    matrix = np.where(inside, batch.buf[np.where(inside, index, 0)], 0).astype(np.uint8)
    keys = np.ascontiguousarray(matrix).view(f"V{width}").ravel()
    unique, inverse = np.unique(keys, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    groups = np.split(rows[order], np.cumsum(np.bincount(inverse.ravel()))[:-1])
    return {bytes(u).rstrip(b"\0"): g for u, g in zip(unique, groups)}


def warm_up() -> None:
    """Load every kernel of the capture path (compile them, the first time on a machine).

    The first call of a numba kernel in a process costs about 0.1 s
    even from the cache (numba starts its runtime and LLVM, see jit.py); call this once in the
    supervisor before forking the capture processes, so that they start
    metering at full speed (DESIGN.md "Data plane").
    """
    import struct

    from flowmeter.capture.frames import ETH_IPV4, ethernet, ipv4, udp
    from flowmeter.capture.sources.pcapfile import CaptureFile

    # two records: the row columns of one row would look contiguous to numba, and a batch's are
    # strided (a child would then load another compiled version, or compile it, on its first batch)
    frame = ethernet(ipv4("192.0.2.1", "192.0.2.2", 17, udp(1, 2)), ETH_IPV4)
    pcap = (struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_ETHERNET)
            + (struct.pack("<IIII", 0, 0, len(frame), len(frame)) + frame) * 2)

    def block(btype: int, body: bytes) -> bytes:
        return struct.pack("<II", btype, 12 + len(body)) + body + struct.pack("<I", 12 + len(body))

    pcapng = (block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
              + block(1, struct.pack("<HHI", 1, 0, 0))
              + block(6, struct.pack("<IIIII", 0, 0, 0, len(frame), len(frame)) + frame + b"\0" * (-len(frame) % 4)) * 2)
    for data in (pcap, pcapng):
        for size in (1, 2):  # the row columns of a one-row batch are another type again (contiguous)
            for batch in CaptureFile.from_bytes(data, "<warm-up>").batches(size):
                decode_batch(batch, np.empty(len(batch), PACKET_DTYPE), np.empty(len(batch), np.uint8))
