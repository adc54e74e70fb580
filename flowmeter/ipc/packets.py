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
ingress_if    ingressInterface: index of the interface the packet was received
              on, 0 if unknown or not seen by the source (see below)
egress_if     egressInterface: index of the interface the packet left on, 0 if
              unknown, not seen, or the packet was dropped
sport/dport   TCP, UDP, SCTP, DCCP, UDP-Lite ports right after the outer IP
              header; 0 for non-first fragments and other protocols. An ICMP /
              ICMPv6 row has no ports: its sport is ICMP_NO_TYPE (1) when its
              type and code are not known (a non-first fragment whose first
              fragment was not seen), else 0
icmp          ICMP / ICMPv6 type * 256 + code (outer header; for a non-first
              fragment, its first fragment's); 0 otherwise
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

Interfaces, by source (RFC 7012: ingressInterface 10, egressInterface 14;
both are part of the flow key, so a flow that changes interface is
another flow):

* ``afpacket:IFACE``: the kernel ifindex of IFACE, as ingress for frames
  it received (PACKET_HOST, BROADCAST, MULTICAST, OTHERHOST), as egress for
  frames it sent (PACKET_OUTGOING); the other side 0 (not seen).
* ``nflog:GROUP``: NFULA_IFINDEX_INDEV and NFULA_IFINDEX_OUTDEV as they
  are (both in FORWARD; at INPUT only the in-device, at OUTPUT only the
  out-device).
* capture files: a Linux SLL2 header's ifindex on the side its packet type
  says; else the record's interface (pcapng: the number the file reader
  gives its interface description block; classic pcap: 1, the file's one
  interface) on the side of the record's direction (pcapng packet flags,
  Linux SLL packet type), ingress when no direction is known.
* ``feed:ENDPOINT``: the frame's peer, as ingress ("in") or egress ("out").

A frame dropped by policy never left: its egress is 0 (IPFIX-NOTES §10).

Size: 64 octets. The 60-octet row of schema version 4 had no spare octet
(no padding, every field in use); the second interface's four octets make
it exactly one cache line, and since batch ring slots start on a page
boundary, every row there is one aligned line (14 in 16 of the 60-octet
rows straddled two).
"""
from __future__ import annotations

import numpy as np

PACKET_DTYPE = np.dtype([
    ("ts_ns", "<u8"),
    ("src_hi", "<u8"), ("src_lo", "<u8"),
    ("dst_hi", "<u8"), ("dst_lo", "<u8"),
    ("l3_bytes", "<u4"),
    ("ingress_if", "<u4"), ("egress_if", "<u4"),
    ("sport", "<u2"), ("dport", "<u2"),
    ("icmp", "<u2"),
    ("ip_version", "u1"), ("proto", "u1"),
    ("tcp_flags", "u1"), ("tos", "u1"),
    ("direction", "u1"), ("fwd_status", "u1"),
])

DIR_INGRESS = 0  # flowDirection 0: ReceivedFromPeer
DIR_EGRESS = 1  # flowDirection 1: SendingToPeer
DIR_UNKNOWN = 255

ICMP_NO_TYPE = 1  # sport of an ICMP / ICMPv6 row whose type and code are unknown (see above)

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
