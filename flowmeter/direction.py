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

import numpy as np
import numpy.typing as npt

from .packets import DIR_EGRESS, DIR_INGRESS, DIR_UNKNOWN, FORWARDED

_ALL = (1 << 64) - 1


class DirectionPolicy:
    """The Direction, LocalNetworks and DropPrefixes settings applied to packet batches."""

    def __init__(self, direction: str = "Both", local_networks=(), drop_prefixes=()) -> None:
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

    def resolve(self, packets: npt.NDArray) -> None:
        """Give every row of unknown direction one, from LocalNetworks (in place)."""
        unknown = packets["direction"] == DIR_UNKNOWN
        if not unknown.any():
            return
        inside = np.zeros(len(packets), dtype=bool)
        hi, lo, ver = packets["src_hi"], packets["src_lo"], packets["ip_version"]
        for version, net_hi, mask_hi, net_lo, mask_lo in self.networks:
            inside |= ((ver == version) & ((hi & np.uint64(mask_hi)) == np.uint64(net_hi))
                       & ((lo & np.uint64(mask_lo)) == np.uint64(net_lo)))
        packets["direction"][unknown] = np.where(inside[unknown], DIR_EGRESS, DIR_INGRESS)

    def drop_status(self, prefix: bytes) -> int:
        """forwardingStatus for an NFLOG log prefix: a drop reason, or FORWARDED."""
        low = prefix.lower()
        for start, code in self.drop_prefixes:
            if low.startswith(start):
                return code
        return FORWARDED

    def keep(self, packets: npt.NDArray) -> npt.NDArray[np.bool_] | None:
        """Rows the Direction setting meters (None = all); dropped frames always are."""
        if self.direction == "Both":
            return None
        wanted = DIR_EGRESS if self.direction == "SendingToPeer" else DIR_INGRESS
        return (packets["direction"] == wanted) | (packets["fwd_status"] != FORWARDED)
