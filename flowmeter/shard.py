"""Sharding: which worker owns a packet's flow.

The hash is *symmetric*: swapping source and destination (addresses and
ports) gives the same value, so both directions of a conversation land on
the same worker, where TCP end-of-flow can see both FINs. It adds a 64-bit
mix of each endpoint (address, port) instead of ordering the endpoints:
addition commutes, and it vectorises in numpy without a 128-bit compare.

>>> import numpy as np
>>> from flowmeter.packets import PACKET_DTYPE
>>> p = np.zeros(2, PACKET_DTYPE)
>>> p["src_lo"], p["dst_lo"], p["sport"], p["dport"], p["proto"] = [1, 2], [2, 1], [80, 999], [999, 80], 6
>>> h = symmetric_flow_hash(p)
>>> bool(h[0] == h[1])
True
"""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64 finaliser: every input bit reaches every output bit."""
    x = (x ^ (x >> np.uint64(30))) * _M2
    x = (x ^ (x >> np.uint64(27))) * _M3
    return x ^ (x >> np.uint64(31))


def _endpoint(hi, lo, port) -> npt.NDArray[np.uint64]:
    return _mix(_mix(hi * _M1 + lo) + port.astype(np.uint64))


def symmetric_flow_hash(packets: npt.NDArray) -> npt.NDArray[np.uint64]:
    """A 64-bit hash of the conversation of each ``PACKET_DTYPE`` row, equal for both directions."""
    with np.errstate(over="ignore"):
        a = _endpoint(packets["src_hi"], packets["src_lo"], packets["sport"])
        b = _endpoint(packets["dst_hi"], packets["dst_lo"], packets["dport"])
        return _mix(a + b + packets["proto"].astype(np.uint64) * _M1)


def split_by_worker(packets: npt.NDArray, workers: int) -> list[npt.NDArray]:
    """``packets`` cut into one contiguous array per worker, packet order kept within each."""
    if workers == 1:
        return [packets]
    owner = (symmetric_flow_hash(packets) >> np.uint64(33)) % np.uint64(workers)
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner.astype(np.intp), minlength=workers)
    ordered = packets[order]
    bounds = np.concatenate(([0], np.cumsum(counts)))
    return [ordered[bounds[i]:bounds[i + 1]] for i in range(workers)]
