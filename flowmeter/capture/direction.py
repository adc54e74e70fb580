"""Direction and policy: which way a frame went, whether it was dropped, whether it is metered.

* A frame's direction comes from the capture when it says (pcapng flags,
  SLL packet type, NFLOG hook); otherwise from ``LocalNetworks``: a source
  address inside one of them means the frame leaves this side
  (SendingToPeer, egress, flowDirection 1), anything else arrives
  (ReceivedFromPeer, ingress, 0).
* A frame logged by NFLOG with one of the ``DropPrefixes`` was dropped by
  policy: it gets that prefix's forwardingStatus (e.g. 129 ACL deny).
* The ``Direction`` setting keeps only one direction, except for dropped
  frames, which are always metered, in flows of their own.
"""
from __future__ import annotations

import ipaddress

from flowmeter.ipc.packets import FORWARDED

_ALL = (1 << 64) - 1


class DirectionPolicy:
    """The Direction, LocalNetworks and DropPrefixes settings, parsed.

    ``networks`` holds each LocalNetworks entry as (version, net_hi, mask_hi,
    net_lo, mask_lo) for the capture's routing kernel (``shard.Router``),
    which settles directions and applies Direction batch by batch.
    """

    def __init__(self, direction: str = "Both", local_networks=(), drop_prefixes=()) -> None:
        if direction not in ("Both", "SendingToPeer", "ReceivedFromPeer"):
            raise ValueError(f"Direction: {direction!r} is not Both, SendingToPeer or ReceivedFromPeer")
        self.direction = direction
        self.networks = []
        for net in local_networks:
            net = ipaddress.ip_network(net, strict=False)
            value, mask = int(net.network_address), int(net.netmask)
            if net.version == 4:
                self.networks.append((4, 0, 0, value, mask))
            else:
                self.networks.append((6, value >> 64, mask >> 64, value & _ALL, mask & _ALL))
        self.drop_prefixes = tuple((p.lower().encode(), code) for p, code in drop_prefixes)

    def drop_status(self, prefix: bytes) -> int:
        """forwardingStatus for an NFLOG log prefix: a drop reason, or FORWARDED."""
        low = prefix.lower()
        for start, code in self.drop_prefixes:
            if low.startswith(start):
                return code
        return FORWARDED
