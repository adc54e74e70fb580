"""Decoded packets: the columnar batch that capture sends to the shard workers.

One row per metered packet, fixed width, host order. Addresses are 128-bit
numbers split in two 64-bit halves (``*_hi``, ``*_lo``); an IPv4 address is
``hi = 0, lo = address`` and ``ip_version`` tells the families apart, so one
table and one hash serve both.

Field meanings:

============  ==========================================================
ts_ns         packet time, ns since the UNIX epoch (capture clock)
src_*/dst_*   outermost IP header's addresses
l3_bytes      IPv4 total length / IPv6 payload length + 40 (Jumbo + 40),
              the header's value whatever the snap length
ifindex       interface index (pcapng interface, SLL2 / NFLOG ifindex), 0 unknown
sport/dport   TCP, UDP, SCTP, DCCP, UDP-Lite ports right after the outer IP
              header; 0 for non-first fragments and other protocols
icmp          ICMP / ICMPv6 type * 256 + code (outer header); 0 otherwise
ip_version    4 or 6
proto         IPv4 protocol / IPv6 next header after hop-by-hop, routing,
              fragment and destination options (AH 51 and ESP 50 end it)
tcp_flags     TCP flags octet (CWR .. FIN), 0 for other protocols
tos           IPv4 TOS octet / IPv6 traffic class
direction     DIR_INGRESS (0), DIR_EGRESS (1) or DIR_UNKNOWN (255, decided
              later from LocalNetworks)
fwd_status    0 = forwarded; else the forwardingStatus of a frame dropped
              by policy (RFC 7270: 128-191, e.g. 129 ACL deny)
============  ==========================================================
"""
from __future__ import annotations

import numpy as np

PACKET_DTYPE = np.dtype([
    ("ts_ns", "<u8"),
    ("src_hi", "<u8"), ("src_lo", "<u8"),
    ("dst_hi", "<u8"), ("dst_lo", "<u8"),
    ("l3_bytes", "<u4"),
    ("ifindex", "<u4"),
    ("sport", "<u2"), ("dport", "<u2"),
    ("icmp", "<u2"),
    ("ip_version", "u1"), ("proto", "u1"),
    ("tcp_flags", "u1"), ("tos", "u1"),
    ("direction", "u1"), ("fwd_status", "u1"),
])

DIR_INGRESS = 0  # flowDirection 0: ReceivedFromPeer
DIR_EGRESS = 1  # flowDirection 1: SendingToPeer
DIR_UNKNOWN = 255

FORWARDED = 0  # fwd_status of a forwarded packet (exported as forwardingStatus 64)
FWD_FORWARDED_UNKNOWN = 64  # RFC 7270 forwardingStatus: forwarded, reason unknown
FWD_DROPPED_ACL_DENY = 129  # dropped, ACL deny
# forwardingStatus of frames dropped by policy, by the names a profile and a feed use for them
# (IANA, RFC 7270 / RFC 9710: 128-191 are "dropped" with a reason)
DROP_REASONS = {"Unknown": 128, "AclDeny": 129, "AclDrop": 130, "Unroutable": 131, "Policer": 138,
                "BadTtl": 137, "Rpf": 140, "ForUs": 141}

# Per-packet decode status (one uint8 per captured record)
ST_OK = 0  # an IP packet: its row is valid
ST_NOT_IP = 1  # a frame that carries no IP (ARP, STP, LLDP, ...)
ST_MALFORMED = 2  # an IP header that cannot be right (bad version, header length, ...)
ST_TRUNCATED = 3  # the captured bytes end before the IP header does
ST_UNSUPPORTED_LINK = 4  # a link type this decoder does not know

STATUS_NAMES = {ST_OK: "ok", ST_NOT_IP: "not IP", ST_MALFORMED: "malformed IP header",
                ST_TRUNCATED: "truncated before the IP header", ST_UNSUPPORTED_LINK: "unsupported link type"}
