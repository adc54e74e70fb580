"""Sharding is symmetric and keeps order; direction and policy settle each packet."""
from __future__ import annotations

import ipaddress

import numpy as np
from hypothesis import given, settings, strategies as st

from flowmeter.direction import DirectionPolicy
from flowmeter.packets import DIR_EGRESS, DIR_INGRESS, DIR_UNKNOWN, PACKET_DTYPE
from flowmeter.shard import split_by_worker, symmetric_flow_hash

u64 = st.integers(0, 2**64 - 1)
u16 = st.integers(0, 65535)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(u64, u64, u64, u64, u16, u16, st.integers(0, 255)), min_size=1, max_size=50))
def test_hash_is_the_same_for_both_directions(rows):
    p = np.zeros(len(rows), PACKET_DTYPE)
    q = np.zeros(len(rows), PACKET_DTYPE)
    names = ("src_hi", "src_lo", "dst_hi", "dst_lo", "sport", "dport", "proto")
    cols = list(zip(*rows))
    for name, forward, backward in zip(names, cols, [cols[2], cols[3], cols[0], cols[1], cols[5], cols[4], cols[6]]):
        p[name], q[name] = forward, backward
    assert np.array_equal(symmetric_flow_hash(p), symmetric_flow_hash(q))


def test_split_keeps_every_packet_in_order_and_spreads_flows():
    rng = np.random.default_rng(3)
    p = np.zeros(20000, PACKET_DTYPE)
    p["src_lo"] = rng.integers(0, 2**32, len(p))
    p["dst_lo"] = rng.integers(0, 2**32, len(p))
    p["ts_ns"] = np.arange(len(p))
    parts = split_by_worker(p, 4)
    assert sum(len(x) for x in parts) == len(p)
    assert all(np.all(np.diff(x["ts_ns"].astype(np.int64)) > 0) for x in parts)
    assert min(len(x) for x in parts) > len(p) / 4 * 0.9
    # a conversation's two directions land on one worker
    r = p.copy()
    r["src_lo"], r["dst_lo"] = p["dst_lo"], p["src_lo"]
    owners = {}
    for w, x in enumerate(split_by_worker(np.concatenate([p, r]), 4)):
        for a, b in zip(x["src_lo"], x["dst_lo"]):
            owners.setdefault((min(a, b), max(a, b)), set()).add(w)
    assert all(len(s) == 1 for s in owners.values())


def _pkt(src: str, direction: int = DIR_UNKNOWN, fwd: int = 0):
    row = np.zeros(1, PACKET_DTYPE)
    a = ipaddress.ip_address(src)
    row["ip_version"] = a.version
    row["src_hi"], row["src_lo"] = int(a) >> 64, int(a) & (2**64 - 1)
    row["direction"], row["fwd_status"] = direction, fwd
    return row


def test_local_networks_decide_unknown_directions_only():
    pol = DirectionPolicy("Both", ["10.0.0.0/8", "2001:db8:1::/48"])
    rows = np.concatenate([_pkt("10.1.2.3"), _pkt("192.0.2.1"), _pkt("2001:db8:1:2::5"), _pkt("2001:db8:2::5"),
                           _pkt("192.0.2.1", DIR_EGRESS), _pkt("10.1.1.1", DIR_INGRESS)])
    pol.resolve(rows)
    assert list(rows["direction"]) == [DIR_EGRESS, DIR_INGRESS, DIR_EGRESS, DIR_INGRESS, DIR_EGRESS, DIR_INGRESS]


def test_direction_setting_keeps_one_side_and_every_dropped_frame():
    rows = np.concatenate([_pkt("10.0.0.1", DIR_EGRESS), _pkt("10.0.0.1", DIR_INGRESS),
                           _pkt("10.0.0.1", DIR_INGRESS, fwd=129), _pkt("10.0.0.1", DIR_EGRESS, fwd=129)])
    assert DirectionPolicy("Both").keep(rows) is None
    assert list(DirectionPolicy("SendingToPeer").keep(rows)) == [True, False, True, True]
    assert list(DirectionPolicy("ReceivedFromPeer").keep(rows)) == [False, True, True, True]


def test_drop_prefixes_match_case_insensitively_at_the_start():
    pol = DirectionPolicy(drop_prefixes=(("drop", 129), ("REJECT", 130)))
    assert pol.drop_status(b"DROP-in: ") == 129
    assert pol.drop_status(b"reject ssh") == 130
    assert pol.drop_status(b"accepted") == 0
