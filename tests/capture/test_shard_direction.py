"""Sharding is symmetric and keeps order; direction and policy settle each packet."""
from __future__ import annotations

import ipaddress

import numpy as np
from hypothesis import given, settings, strategies as st

from flowmeter.capture.direction import DirectionPolicy
from flowmeter.capture.shard import Router, split_by_worker, symmetric_flow_hash
from flowmeter.ipc.packets import DIR_EGRESS, DIR_INGRESS, DIR_UNKNOWN, PACKET_DTYPE

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


def _route(policy: DirectionPolicy, rows: np.ndarray, workers: int = 1, status=None):
    status = np.zeros(len(rows), np.uint8) if status is None else status
    return Router(workers, policy).route(rows, status)


def test_local_networks_decide_unknown_directions_only():
    pol = DirectionPolicy("Both", ["10.0.0.0/8", "2001:db8:1::/48"])
    rows = np.concatenate([_pkt("10.1.2.3"), _pkt("192.0.2.1"), _pkt("2001:db8:1:2::5"), _pkt("2001:db8:2::5"),
                           _pkt("192.0.2.1", DIR_EGRESS), _pkt("10.1.1.1", DIR_INGRESS)])
    (part,), kept, _, other, _ = _route(pol, rows)
    assert (kept, other) == (6, 0)
    assert list(part["direction"]) == [DIR_EGRESS, DIR_INGRESS, DIR_EGRESS, DIR_INGRESS, DIR_EGRESS, DIR_INGRESS]


def test_direction_setting_keeps_one_side_and_every_dropped_frame():
    rows = np.concatenate([_pkt("10.0.0.1", DIR_EGRESS), _pkt("10.0.0.2", DIR_INGRESS),
                           _pkt("10.0.0.3", DIR_INGRESS, fwd=129), _pkt("10.0.0.4", DIR_EGRESS, fwd=129)])
    rows["l3_bytes"] = [100, 200, 300, 400]

    def kept(direction):
        (part,), n, octets, other, _ = _route(DirectionPolicy(direction), rows.copy())
        assert n == len(part) and octets == int(part["l3_bytes"].sum()) and n + other == len(rows)
        return [str(ipaddress.ip_address(int(x))) for x in part["src_lo"]]

    assert kept("Both") == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
    assert kept("SendingToPeer") == ["10.0.0.1", "10.0.0.3", "10.0.0.4"]
    assert kept("ReceivedFromPeer") == ["10.0.0.2", "10.0.0.3", "10.0.0.4"]


def test_rows_that_are_not_ip_packets_are_not_routed_but_set_no_clock():
    rows = np.concatenate([_pkt("10.0.0.1"), _pkt("10.0.0.2"), _pkt("10.0.0.3")])
    rows["ts_ns"] = [5, 99, 7]
    parts, kept, _, other, newest = _route(DirectionPolicy(), rows, 2, status=np.array([0, 1, 0], np.uint8))
    assert (kept, other, newest) == (2, 0, 7)
    assert sorted(int(x) for p in parts for x in p["ts_ns"]) == [5, 7]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_routing_kernel_shards_like_the_numpy_reference(workers, seed):
    rng = np.random.default_rng(seed)
    p = np.zeros(3000, PACKET_DTYPE)
    for name in ("src_hi", "src_lo", "dst_hi", "dst_lo"):
        p[name] = rng.integers(0, 2**63, len(p), dtype=np.uint64) * rng.integers(0, 2, len(p)).astype(np.uint64)
    for name in ("sport", "dport"):
        p[name] = rng.integers(0, 65536, len(p))
    p["proto"] = rng.choice([1, 6, 17, 47], len(p))
    p["ts_ns"] = np.arange(len(p))
    p["direction"] = DIR_EGRESS
    status = (rng.random(len(p)) < 0.1).astype(np.uint8)
    parts, kept, _, _, _ = _route(DirectionPolicy(), p.copy(), workers, status)
    reference = split_by_worker(p[status == 0], workers)
    assert kept == int((status == 0).sum())
    assert all(np.array_equal(a, b) for a, b in zip(parts, reference, strict=True))


def test_drop_prefixes_match_case_insensitively_at_the_start():
    pol = DirectionPolicy(drop_prefixes=(("drop", 129), ("REJECT", 130)))
    assert pol.drop_status(b"DROP-in: ") == 129
    assert pol.drop_status(b"reject ssh") == 130
    assert pol.drop_status(b"accepted") == 0
