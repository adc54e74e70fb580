"""Flow table: the numba table against its plain-Python twin, and the behaviours a worker relies on.

``RefFlowTable`` is a dict of flows implementing the semantics of
``workers/flowtable.py`` the obvious way: on every clock step it fires every
due timer of every flow (the "ideal meter"), O(flows) per packet. The numba
table fires timers lazily (own packet, reverse lookup, a bounded sweep), so
the two emit the same records, possibly in different calls; the property
tests compare the whole record multiset at the end of random streams.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowmeter.ipc.packets import DIR_EGRESS, DIR_INGRESS, DIR_UNKNOWN, PACKET_DTYPE
from workers.flowrows import USED_ROWS
from workers.flowtable import FlowTable, load_kernels
from workers.records import END_ACTIVE, END_FORCED, END_IDLE, END_LACK_OF_RESOURCES, END_OF_FLOW, FLOW_RECORD_DTYPE

S = 1_000_000_000
T0 = 1_700_000_000 * S
KEY = ("ip_version", "proto", "src_hi", "src_lo", "dst_hi", "dst_lo", "sport", "dport", "icmp",
       "direction", "fwd_status", "ingress_if", "egress_if")
SYN, FIN, RST, PSH, ACK = 0x02, 0x01, 0x04, 0x08, 0x10


# --------------------------------------------------------------------------- the plain-Python twin

def _flip(direction: int) -> int:
    return {DIR_INGRESS: DIR_EGRESS, DIR_EGRESS: DIR_INGRESS}.get(direction, direction)


def reverse_key(k: tuple) -> tuple:
    ver, proto, shi, slo, dhi, dlo, sport, dport, icmp, direction, fwd, ingress, egress = k
    return (ver, proto, dhi, dlo, shi, slo, dport, sport, icmp, _flip(direction), fwd, egress, ingress)


def reverse_candidates(k: tuple) -> list[tuple]:
    """Where the table looks for a flow's reverse, in its order: interfaces swapped and direction
    flipped, then the same direction, then the same interfaces (a source that sees one side only)."""
    r = reverse_key(k)
    same_dir = r[:9] + k[9:11] + r[11:]
    same_ifs = r[:11] + k[11:]
    return [r, same_dir, same_ifs, same_ifs[:9] + k[9:11] + k[11:]]


class RefFlowTable:
    """The flow table's semantics in plain Python: dict of flows, every timer fired at every clock step."""

    def __init__(self, max_flows, idle_timeout_ns, interval_ns, evict_batch=None):
        self.max_flows, self.idle, self.interval = max_flows, idle_timeout_ns, interval_ns
        self.evict_batch = evict_batch or max(1, max_flows // 32)
        self.flows: dict[tuple, dict] = {}
        self.now = 0
        self.out: list[tuple] = []

    def _due(self, f):
        idle_due = self.now - f["last"] >= self.idle
        active_due = self.interval > 0 and f["packets"] > 0 and self.now - f["first"] >= self.interval
        if active_due and (not idle_due or f["first"] + self.interval <= f["last"] + self.idle):
            return END_ACTIVE
        return END_IDLE if idle_due else 0

    def _emit(self, k, reason):
        f = self.flows[k]
        if f["packets"]:
            self.out.append(k + (f["first"], f["last"], f["packets"], f["bytes"], f["flags"], f["tos"], reason))

    def _fire(self, k) -> bool:
        reason = self._due(self.flows[k])
        if reason == END_ACTIVE:
            self._emit(k, END_ACTIVE)
            self.flows[k].update(packets=0, bytes=0, flags=0)
            reason = self._due(self.flows[k])
        if reason == END_IDLE:
            self._emit(k, END_IDLE)
            del self.flows[k]
            return False
        return True

    def _advance(self, t):
        if t is not None and t > self.now:
            self.now = t
            for k in list(self.flows):
                self._fire(k)

    def _end(self, k, reason):
        self._emit(k, reason)
        del self.flows[k]

    def update(self, packets, now_ns=None):
        for p in packets:
            ts = int(p["ts_ns"])
            self._advance(ts)
            k = tuple(int(p[name]) for name in KEY)
            if k not in self.flows:
                if len(self.flows) >= self.max_flows:
                    oldest = sorted(self.flows, key=lambda key: self.flows[key]["last"])[:self.evict_batch]
                    for old in oldest:
                        self._end(old, END_LACK_OF_RESOURCES)
                self.flows[k] = dict(first=ts, last=ts, packets=0, bytes=0, flags=0, tos=int(p["tos"]), fin=False)
            f = self.flows[k]
            if f["packets"] == 0:
                f["first"] = f["last"] = ts
            f["first"], f["last"] = min(f["first"], ts), max(f["last"], ts)
            f["packets"] += 1
            f["bytes"] += int(p["l3_bytes"])
            f["flags"] |= int(p["tcp_flags"])
            flags = int(p["tcp_flags"])
            if k[1] == 6 and flags & (FIN | RST):
                f["fin"] = f["fin"] or not flags & RST
                rk = next((c for c in reverse_candidates(k) if c in self.flows), reverse_key(k))
                end_both = bool(flags & RST) or (rk != k and rk in self.flows and self.flows[rk]["fin"])
                if end_both:
                    self._end(k, END_OF_FLOW)
                    if rk != k and rk in self.flows:
                        self._end(rk, END_OF_FLOW)
        self._advance(now_ns)

    def flush(self, reason=END_FORCED, now_ns=None):
        self._advance(now_ns)
        for k in list(self.flows):
            self._end(k, reason)


def as_tuples(records: np.ndarray) -> list[tuple]:
    cols = KEY + ("first_ns", "last_ns", "packets", "bytes", "tcp_flags", "tos", "end_reason")
    return [tuple(int(r[c]) for c in cols) for r in records]


# --------------------------------------------------------------------------- packet streams

def packet_rows(rows: list[dict]) -> np.ndarray:
    pk = np.zeros(len(rows), dtype=PACKET_DTYPE)
    for name in rows[0] if rows else ():
        pk[name] = [row[name] for row in rows]
    return pk


def conversation(i: int, proto: int = 6, direction: int = DIR_EGRESS, v6: bool = False,
                 ingress_if: int = 3, egress_if: int = 5, fwd_status: int = 0) -> dict:
    """The forward side of conversation ``i`` (key fields of a packet)."""
    return dict(ip_version=6 if v6 else 4, proto=proto,
                src_hi=0x20010DB8_00000000 if v6 else 0, src_lo=0x0A000001 + i,
                dst_hi=0x20010DB8_000000FF if v6 else 0, dst_lo=0xC0000201 + 7 * i,
                sport=10000 + i % 50000 if proto in (6, 17) else 0, dport=443 if proto in (6, 17) else 0,
                icmp=0x0800 if proto in (1, 58) else 0, direction=direction, fwd_status=fwd_status,
                ingress_if=ingress_if, egress_if=egress_if)


def backward(key: dict) -> dict:
    """The reverse side of a conversation."""
    b = dict(key, src_hi=key["dst_hi"], src_lo=key["dst_lo"], dst_hi=key["src_hi"], dst_lo=key["src_lo"],
             sport=key["dport"], dport=key["sport"], direction=_flip(key["direction"]),
             ingress_if=key["egress_if"], egress_if=key["ingress_if"])
    return b


def pkt(key: dict, t_ns: int, flags: int = ACK, l3: int = 100, tos: int = 0) -> dict:
    return dict(key, ts_ns=t_ns, tcp_flags=flags if key["proto"] == 6 else 0, l3_bytes=l3, tos=tos)


GAPS = [1_000, 2_000_000, 400_000_000, 1_100_000_000, 4 * S, 12 * S, 31 * S, 75 * S]
FLAGS = [SYN, SYN | ACK, ACK, PSH | ACK, FIN | ACK, FIN, RST, RST | ACK]


@st.composite
def streams(draw, max_conversations=4):
    """A packet stream over a few conversations (both sides), cut into batches with optional clock ticks."""
    convs = draw(st.lists(st.tuples(st.sampled_from([6, 6, 6, 17, 1, 50]),
                                    st.sampled_from([DIR_INGRESS, DIR_EGRESS, DIR_UNKNOWN]),
                                    st.booleans(), st.sampled_from([0, 129]),
                                    st.sampled_from([(3, 5), (7, 0), (1, 1), (0, 0)])),
                          min_size=1, max_size=max_conversations))
    keys = [conversation(i, proto, d, v6, ingress_if=ifs[0], egress_if=ifs[1], fwd_status=fwd)
            for i, (proto, d, v6, fwd, ifs) in enumerate(convs)]
    n = draw(st.integers(1, 60))
    t = T0
    rows, cuts = [], []
    for _ in range(n):
        t += draw(st.sampled_from(GAPS))
        key = keys[draw(st.integers(0, len(keys) - 1))]
        if draw(st.booleans()):
            # the reverse side; sometimes on the same interfaces (a source that sees one side only)
            key = backward(key) if draw(st.booleans()) else dict(backward(key), ingress_if=key["ingress_if"],
                                                                  egress_if=key["egress_if"])
        flags, l3, tos = draw(st.sampled_from(FLAGS)), draw(st.integers(20, 1500)), draw(st.sampled_from([0, 0xB8]))
        rows.append(pkt(key, t, flags, l3, tos))
        # After this packet: None = same batch; 0 = new batch; else new batch and a clock tick that much later.
        cuts.append(draw(st.sampled_from([None, None, 0, 300_000_000, 2 * S, 40 * S])))
    batches, current = [], []
    for i, (row, cut) in enumerate(zip(rows, cuts)):
        current.append(row)
        if cut is not None:
            tick = row["ts_ns"] + cut if cut else None
            batches.append((packet_rows(current), tick))
            current = []
            for later in rows[i + 1:] if tick else ():  # later packets come after the tick
                later["ts_ns"] += cut
    if current:
        batches.append((packet_rows(current), None))
    return batches


def run_both(batches, max_flows, idle, interval, evict_batch=None, flush_now=None):
    table = FlowTable(max_flows, idle, interval, evict_batch=evict_batch)
    ref = RefFlowTable(max_flows, idle, interval, evict_batch)
    got = []
    for pk, tick in batches:
        got += as_tuples(table.update(pk, tick))
        ref.update(pk, tick)
        assert table.active <= max_flows
    got += as_tuples(table.flush(now_ns=flush_now))
    ref.flush(now_ns=flush_now)
    return table, got, ref.out


def assert_conserved(batches, records):
    """Every metered packet and octet is in exactly one record of its key."""
    metered_p, metered_b = Counter(), Counter()
    for pk, _ in batches:
        for p in pk:
            k = tuple(int(p[name]) for name in KEY)
            metered_p[k] += 1
            metered_b[k] += int(p["l3_bytes"])
    got_p, got_b = Counter(), Counter()
    for r in records:
        k = r[:len(KEY)]
        got_p[k] += r[len(KEY) + 2]
        got_b[k] += r[len(KEY) + 3]
        assert r[len(KEY) + 2] >= 1  # no empty records
        assert r[len(KEY)] <= r[len(KEY) + 1]  # first <= last
    assert got_p == metered_p
    assert got_b == metered_b


def assert_index_consistent(table: FlowTable) -> None:
    """White-box: every used row has exactly one slot, reachable by linear probing from its home."""
    slots, times = table._slots, table._times
    cap = len(slots)
    used = {}
    for i, s in enumerate(slots.tolist()):
        if s:
            row, tag = (s & 0xFFFFFFFF) - 1, s >> 32
            assert times[row, 1] >= 0 and row not in used  # a used row, once
            used[row] = i
            home = (tag * cap) >> 32
            j = home
            while j != i:  # no empty slot between home and the entry, or probing stops short
                assert slots[j] != 0
                j = (j + 1) % cap
    assert sorted(used) == sorted(np.flatnonzero(times[:table._st[USED_ROWS], 1] >= 0).tolist())
    assert len(used) == table.active <= table.max_flows


# --------------------------------------------------------------------------- properties

@settings(max_examples=100, deadline=None)
@given(streams(), st.sampled_from([10 * S, 30 * S]), st.sampled_from([0, 5 * S, 60 * S]),
       st.sampled_from([None, 0, 200 * S]))
def test_table_matches_reference_model_on_random_streams(batches, idle, interval, flush_after):
    flush_now = None if flush_after is None else int(batches[-1][0]["ts_ns"].max(initial=T0)) + flush_after
    table, got, want = run_both(batches, 64, idle, interval, flush_now=flush_now)
    assert sorted(got) == sorted(want)
    assert_conserved(batches, got)
    assert table.active == 0


@settings(max_examples=100, deadline=None)
@given(streams(max_conversations=8), st.integers(1, 5), st.integers(1, 3), st.sampled_from([0, 5 * S]))
def test_full_table_matches_reference_model(batches, max_flows, evict_batch, interval):
    # No idle timer fires here, so "full" means the same to both (see module docstring).
    evict_batch = min(evict_batch, max_flows)
    _, got, want = run_both(batches, max_flows, 10**6 * S, interval, evict_batch)
    assert sorted(got) == sorted(want)
    assert_conserved(batches, got)


@settings(max_examples=100, deadline=None)
@given(streams(max_conversations=8), st.integers(1, 6), st.sampled_from([2 * S, 10 * S]),
       st.sampled_from([0, 3 * S]))
def test_no_packet_is_lost_under_pressure_and_timeouts(batches, max_flows, idle, interval):
    table = FlowTable(max_flows, idle, interval)
    got = []
    for pk, tick in batches:
        got += as_tuples(table.update(pk, tick))
        assert_index_consistent(table)
    got += as_tuples(table.flush())
    assert_conserved(batches, got)
    assert {r[-1] for r in got} <= {END_IDLE, END_ACTIVE, END_OF_FLOW, END_FORCED, END_LACK_OF_RESOURCES}
    c = table.counters
    assert c.packets == sum(len(pk) for pk, _ in batches) == sum(r[len(KEY) + 2] for r in got)
    assert sum(c.records.values()) == len(got)
    assert table.active == 0 and not table._slots.any()


@pytest.mark.parametrize("interval", [0, 2 * S])
def test_records_beyond_the_output_buffer_are_all_returned_in_order_of_metering(interval):
    # Whole-table eviction waves, RSTs and FINs in one big batch overflow the output buffer many
    # times over: the kernel stops, the buffer grows, metering resumes at the right packet.
    rng = np.random.default_rng(7)
    keys = [conversation(i, proto=6) for i in range(400)]
    rows = []
    for n in range(5000):
        key = keys[rng.integers(len(keys))]
        rows.append(pkt(key if rng.integers(2) else backward(key), T0 + n * 1_000_000,
                        int(rng.choice([ACK, ACK, FIN | ACK, RST])), int(rng.integers(40, 1500))))
    batches = [(packet_rows(rows), None)]
    table, got, want = run_both(batches, 64, 10**6 * S, interval, evict_batch=64)
    assert table.counters.evictions > 1000
    assert sorted(got) == sorted(want)
    assert_conserved(batches, got)


# --------------------------------------------------------------------------- interim records

def long_flow(seconds: int) -> np.ndarray:
    key = conversation(0, proto=17)
    return packet_rows([pkt(key, T0 + s * S, l3=200) for s in range(seconds)])


def test_interval_60s_gives_one_interim_record_per_minute_of_a_long_flow():
    table = FlowTable(1000, 300 * S, 60 * S)
    pk = long_flow(600)
    interim = []
    for i in range(len(pk)):  # one packet a call: see when each record comes out
        for r in table.update(pk[i:i + 1]):
            interim.append(r)
            assert r["first_ns"] + 60 * S <= table.now_ns < r["first_ns"] + 61 * S  # fired within 1 s
    assert [int(r["end_reason"]) for r in interim] == [END_ACTIVE] * 9
    for minute, r in enumerate(interim):
        assert int(r["first_ns"]) == T0 + 60 * minute * S  # the interval's own first and last packet
        assert int(r["last_ns"]) == T0 + (60 * minute + 59) * S
        assert (int(r["packets"]), int(r["bytes"])) == (60, 60 * 200)
    final = table.flush()
    assert [int(r["end_reason"]) for r in final] == [END_FORCED]
    assert (int(final[0]["first_ns"]), int(final[0]["packets"])) == (T0 + 540 * S, 60)


def test_interval_fires_then_idle_timeout_removes_the_reported_flow_silently():
    table = FlowTable(1000, 300 * S, 60 * S)
    got = list(table.update(long_flow(600)))
    got += list(table.expire(T0 + 2000 * S))
    assert [int(r["end_reason"]) for r in got] == [END_ACTIVE] * 10
    assert sum(int(r["packets"]) for r in got) == 600
    assert table.active == 0


@pytest.mark.parametrize("interval_due_s, reason", [(60, END_ACTIVE), (61, END_IDLE)])
def test_when_both_timers_are_overdue_the_earlier_one_decides(interval_due_s, reason):
    # last packet at 50 s, idle 10 s: idle-due at 60 s; interval-due at first packet + Interval.
    table = FlowTable(10, 10 * S, interval_due_s * S)
    key = conversation(1, proto=17)
    table.update(packet_rows([pkt(key, T0 + s * S) for s in range(0, 51, 5)]))
    (r,) = table.expire(T0 + 100 * S)  # both overdue when the sweep gets there
    assert (int(r["end_reason"]), int(r["packets"])) == (reason, 11)
    assert table.active == 0
    table.update(packet_rows([pkt(key, T0 + s * S) for s in range(200, 251, 5)]))
    (r,) = table.flush(now_ns=T0 + 400 * S)  # the same decision when a flush finds them overdue
    assert (int(r["end_reason"]), int(r["packets"])) == (reason, 11)


def test_interval_0_gives_a_single_record():
    table = FlowTable(1000, 300 * S, 0)
    assert len(table.update(long_flow(600))) == 0
    (forced,) = table.flush()
    assert (int(forced["packets"]), int(forced["end_reason"])) == (600, END_FORCED)
    table = FlowTable(1000, 300 * S, 0)
    table.update(long_flow(600))
    (idle,) = table.expire(T0 + 599 * S + 300 * S)
    assert (int(idle["packets"]), int(idle["end_reason"])) == (600, END_IDLE)


def test_set_interval_at_runtime_keeps_flows_and_applies_at_once():
    table = FlowTable(1000, 300 * S, 0)
    pk = long_flow(200)
    assert len(table.update(pk[:150])) == 0
    table.set_interval(60 * S)  # SIGHUP: Interval 0 -> 60 s
    assert table.active == 1 and table.interval_ns == 60 * S
    got = list(table.update(pk[150:151]))  # the current interval is 150 s old: report it now
    assert [(int(r["packets"]), int(r["end_reason"])) for r in got] == [(150, END_ACTIVE)]
    got += list(table.update(pk[151:]))
    table.set_interval(0)
    got += list(table.flush())
    assert [int(r["end_reason"]) for r in got] == [END_ACTIVE, END_FORCED]
    assert sum(int(r["packets"]) for r in got) == 200
    with pytest.raises(ValueError, match="interval_ns"):
        table.set_interval(-1)


# --------------------------------------------------------------------------- idle timeout and the sweep

def test_idle_expiry_fires_within_one_second_of_due_time_by_packet_time():
    table = FlowTable(5000, 15 * S, 0)
    keys = [conversation(i, proto=17) for i in range(3000)]
    t_last = {}
    rows = []
    for i, key in enumerate(keys):  # 3000 flows over 3 s
        t = T0 + i * 1_000_000
        rows.append(pkt(key, t))
        t_last[key["src_lo"]] = t
    assert len(table.update(packet_rows(rows))) == 0
    seen = 0
    now = T0 + 3 * S
    while now < T0 + 25 * S:  # the clock advances by 100 ms ticks, no packets
        now += 100_000_000
        for r in table.expire(now):
            due = t_last[int(r["src_lo"])] + 15 * S
            assert due <= now < due + S
            assert int(r["end_reason"]) == END_IDLE
            seen += 1
    assert seen == 3000 and table.active == 0


def test_packets_of_another_flow_advance_the_clock_for_idle_expiry():
    table = FlowTable(100, 10 * S, 0)
    quiet, busy = conversation(1, proto=17), conversation(2, proto=17)
    table.update(packet_rows([pkt(quiet, T0)]))
    out = []
    for s in range(1, 12):
        for r in table.update(packet_rows([pkt(busy, T0 + s * S)])):
            out.append((int(r["src_lo"]), int(r["end_reason"]), table.now_ns))
    assert out == [(quiet["src_lo"], END_IDLE, T0 + 10 * S)]


def test_explicit_clock_tick_advances_time_with_an_empty_batch():
    table = FlowTable(100, 10 * S, 0)
    table.update(packet_rows([pkt(conversation(1), T0)]))
    assert len(table.update(np.empty(0, PACKET_DTYPE), now_ns=T0 + 9 * S)) == 0
    (r,) = table.update(np.empty(0, PACKET_DTYPE), now_ns=T0 + 10 * S)
    assert int(r["end_reason"]) == END_IDLE and table.now_ns == T0 + 10 * S


def test_sweep_work_is_proportional_to_the_time_the_clock_advanced():
    table = FlowTable(100_000, 60 * S, 0)
    keys = [pkt(conversation(i, proto=17), T0 + i) for i in range(50_000)]
    table.update(packet_rows(keys))
    before = table.counters.rows_scanned
    table.expire(T0 + 10_000_000)  # 10 ms of meter time: 1% of a pass over 100k rows
    assert 500 <= table.counters.rows_scanned - before <= 1100
    before = table.counters.rows_scanned
    table.expire(T0 + 100 * S)  # a long jump: one whole pass, no more
    assert table.counters.rows_scanned - before == 50_000


def test_a_wave_of_timeouts_is_returned_in_one_array():
    table = FlowTable(50_000, 5 * S, 0)
    table.update(packet_rows([pkt(conversation(i, proto=17), T0 + i) for i in range(40_000)]))
    records = table.expire(T0 + 60 * S)
    assert len(records) == 40_000 and records.dtype == FLOW_RECORD_DTYPE
    assert set(records["end_reason"].tolist()) == {END_IDLE}


# --------------------------------------------------------------------------- TCP end of flow

def tcp_pair(direction=DIR_EGRESS):
    a = conversation(5, proto=6, direction=direction)
    return a, backward(a)


@pytest.mark.parametrize("direction", [DIR_EGRESS, DIR_INGRESS, DIR_UNKNOWN])
def test_fin_on_both_sides_ends_both_flows(direction):
    a, b = tcp_pair(direction)
    table = FlowTable(100, 60 * S, 0)
    t = T0
    quiet = [pkt(a, t, SYN), pkt(b, t + 1, SYN | ACK), pkt(a, t + 2, ACK), pkt(a, t + 3, FIN | ACK)]
    assert len(table.update(packet_rows(quiet))) == 0  # one FIN: both sides still open
    got = table.update(packet_rows([pkt(b, t + 4, FIN | ACK)]))
    assert sorted((int(r["direction"]), int(r["packets"]), int(r["end_reason"])) for r in got) == sorted(
        [(a["direction"], 3, END_OF_FLOW), (b["direction"], 2, END_OF_FLOW)])
    assert {int(r["tcp_flags"]) for r in got} == {SYN | ACK | FIN}
    assert table.active == 0


def test_fin_without_reverse_flow_waits_for_idle_timeout():
    a, _ = tcp_pair()
    table = FlowTable(100, 60 * S, 0)
    assert len(table.update(packet_rows([pkt(a, T0, FIN | ACK)]))) == 0
    assert table.active == 1
    (r,) = table.expire(T0 + 60 * S)
    assert int(r["end_reason"]) == END_IDLE


def test_reverse_flow_of_the_same_direction_closes_when_no_opposite_one_exists():
    # neither side inside LocalNetworks: both directions are ingress, the close still pairs up
    a, b = tcp_pair(DIR_EGRESS)
    same_direction = dict(b, direction=DIR_EGRESS)
    table = FlowTable(100, 60 * S, 0)
    out = table.update(packet_rows([pkt(a, T0, FIN), pkt(same_direction, T0 + 1, FIN)]))
    assert sorted(int(r["end_reason"]) for r in out) == [END_OF_FLOW, END_OF_FLOW]
    assert table.active == 0


@pytest.mark.parametrize("reverse_exists", [True, False])
def test_rst_ends_the_flow_and_its_reverse(reverse_exists):
    a, b = tcp_pair()
    table = FlowTable(100, 60 * S, 0)
    before = [pkt(a, T0, SYN)] + ([pkt(b, T0 + 1, SYN | ACK)] if reverse_exists else [])
    assert len(table.update(packet_rows(before))) == 0
    got = table.update(packet_rows([pkt(a, T0 + 2, RST, l3=40)]))
    want = [(a["src_lo"], 2, END_OF_FLOW)] + ([(b["src_lo"], 1, END_OF_FLOW)] if reverse_exists else [])
    assert sorted((int(r["src_lo"]), int(r["packets"]), int(r["end_reason"])) for r in got) == sorted(want)
    assert table.active == 0
    assert len(table.update(packet_rows([pkt(a, T0 + 3, ACK)]))) == 0  # a later packet starts a new flow
    assert table.active == 1 and table.counters.flows_created == 2 + reverse_exists


# --------------------------------------------------------------------------- a full table

def test_full_table_evicts_the_oldest_flow_and_loses_no_packet():
    keys = [conversation(i, proto=17) for i in range(6)]
    table = FlowTable(4, 3600 * S, 0, evict_batch=1)
    first = [pkt(keys[i], T0 + i * S) for i in range(4)] + [pkt(keys[0], T0 + 10 * S)]  # key 0 is fresh again
    assert len(table.update(packet_rows(first))) == 0
    (evicted,) = table.update(packet_rows([pkt(keys[4], T0 + 11 * S)]))
    assert (int(evicted["src_lo"]), int(evicted["end_reason"])) == (keys[1]["src_lo"], END_LACK_OF_RESOURCES)
    (evicted,) = table.update(packet_rows([pkt(keys[5], T0 + 12 * S)]))
    assert int(evicted["src_lo"]) == keys[2]["src_lo"]
    rest = table.flush()
    assert sorted(int(r["src_lo"]) for r in rest) == sorted(keys[i]["src_lo"] for i in (0, 3, 4, 5))
    assert table.counters.evictions == 2 and table.counters.records[END_LACK_OF_RESOURCES] == 2


def test_eviction_wave_frees_a_batch_of_the_oldest_flows():
    table = FlowTable(1000, 3600 * S, 0)  # default wave: 1000 // 32 = 31 flows
    rows = [pkt(conversation(i, proto=17), T0 + i * 1000) for i in range(1001)]
    got = table.update(packet_rows(rows))
    assert len(got) == 31 and table.active == 1000 - 31 + 1
    assert sorted(int(r["src_lo"]) for r in got) == [conversation(i)["src_lo"] for i in range(31)]
    assert set(got["end_reason"].tolist()) == {END_LACK_OF_RESOURCES}


def test_idle_flows_evicted_from_a_full_table_keep_their_idle_reason():
    table = FlowTable(4, 10 * S, 0, evict_batch=2)
    keys = [conversation(i, proto=17) for i in range(5)]
    rows = [pkt(keys[i], T0 + i) for i in range(4)]
    # Flows 2 and 3 stay busy; 0 and 1 fall due exactly when flow 4 arrives, 2 ns after the last
    # packet: too soon for the sweep, so the eviction wave meets them first.
    rows += [pkt(keys[2 + k % 2], T0 + k * 100_000_000) for k in range(1, 100)] + [pkt(keys[3], T0 + 10 * S - 1)]
    assert len(table.update(packet_rows(rows))) == 0
    got = table.update(packet_rows([pkt(keys[4], T0 + 10 * S + 1)]))
    assert sorted((int(r["src_lo"]), int(r["end_reason"])) for r in got) == [
        (keys[0]["src_lo"], END_IDLE), (keys[1]["src_lo"], END_IDLE)]
    assert table.counters.evictions == 0 and table.active == 3


# --------------------------------------------------------------------------- API and memory

def test_memory_per_flow_at_one_million_flows_is_at_most_100_octets():
    table = FlowTable(1_000_000, 15 * S, 0)
    pk = np.zeros(1_000_000, dtype=PACKET_DTYPE)
    pk["src_lo"] = np.arange(1_000_000)
    pk["ts_ns"] = T0
    for start in range(0, len(pk), 65536):  # in capture-sized batches: the index grows as flows come
        assert len(table.update(pk[start:start + 65536])) == 0
    assert table.active == 1_000_000
    per_flow = table.nbytes / table.max_flows
    print(f"flow table: {per_flow:.1f} octets per flow holding 1M flows, {table.capacity} index slots")
    assert per_flow <= 100
    assert table.capacity == 1_333_334  # grown to its full size, never beyond
    assert_index_consistent(table)


def test_the_index_grows_with_the_flows_held_and_keeps_every_flow():
    table = FlowTable(100_000, 15 * S, 0)
    assert table.capacity < 10_000  # a few flows: a small index
    sizes = []
    for k in range(50):
        pk = np.zeros(1000, dtype=PACKET_DTYPE)
        pk["src_lo"] = np.arange(k * 1000, (k + 1) * 1000) % 30_000  # 30,000 flows, each seen again later
        pk["ts_ns"] = T0 + k
        pk["l3_bytes"] = 100
        assert len(table.update(pk)) == 0
        sizes.append(table.capacity)
        assert (table.active + 1000) * 3 <= table.capacity * 4  # room for a whole batch of new flows
    assert sizes == sorted(sizes) and sizes[-1] < 100_000 * 4 // 3  # grown, not to the maximum
    assert table.active == 30_000
    assert_index_consistent(table)
    got = table.flush()
    assert len(got) == 30_000 and int(got["packets"].sum()) == 50_000 and int(got["bytes"].sum()) == 5_000_000


def test_load_kernels_runs_every_kernel_once():
    load_kernels()  # compiles or loads both kernels; the eviction path included


def test_update_rejects_a_batch_of_another_dtype():
    with pytest.raises(TypeError, match="PACKET_DTYPE"):
        FlowTable(10, S, 0).update(np.zeros(3, FLOW_RECORD_DTYPE))


@pytest.mark.parametrize("args", [(0, S, 0), (10, 0, 0), (10, S, -1)])
def test_bad_settings_are_refused(args):
    with pytest.raises(ValueError):
        FlowTable(*args)


def test_out_of_order_packets_keep_first_before_last_and_the_clock_monotonic():
    key = conversation(1, proto=17)
    table = FlowTable(10, 60 * S, 0)
    table.update(packet_rows([pkt(key, T0 + 5 * S), pkt(key, T0 + 2 * S), pkt(key, T0 + 7 * S)]))
    assert table.now_ns == T0 + 7 * S
    (r,) = table.flush()
    assert (int(r["first_ns"]), int(r["last_ns"]), int(r["packets"])) == (T0 + 2 * S, T0 + 7 * S, 3)


def test_counters_count_packets_octets_flows_and_records_per_reason():
    table = FlowTable(10, 60 * S, 0)
    a, b = tcp_pair()
    table.update(packet_rows([pkt(a, T0, SYN, l3=60), pkt(b, T0 + 1, RST, l3=40), pkt(conversation(2, 17), T0 + 2)]))
    table.flush()
    c = table.counters
    assert (c.packets, c.octets, c.flows_created, c.evictions) == (3, 200, 3, 0)
    assert c.records == {END_IDLE: 0, END_ACTIVE: 0, END_OF_FLOW: 2, END_FORCED: 1, END_LACK_OF_RESOURCES: 0}


def test_keys_differing_in_any_field_are_different_flows():
    base = conversation(1, proto=6, direction=DIR_EGRESS)
    variants = [base] + [dict(base, **{name: value}) for name, value in (
        ("ip_version", 6), ("proto", 17), ("src_hi", 1), ("src_lo", 1), ("dst_hi", 1), ("dst_lo", 1),
        ("sport", 1), ("dport", 1), ("icmp", 1), ("direction", DIR_UNKNOWN), ("fwd_status", 129), ("ingress_if", 9),
        ("egress_if", 9))]
    table = FlowTable(100, 60 * S, 0)
    table.update(packet_rows([pkt(v, T0 + i) for i, v in enumerate(variants)]))
    assert table.active == len(variants) == len(KEY) + 1
    per_key = defaultdict(int)
    for r in as_tuples(table.flush()):
        per_key[r[:len(KEY)]] += r[len(KEY) + 2]
    assert len(per_key) == len(variants) and set(per_key.values()) == {1}


def test_without_packet_clock_a_producer_running_ahead_does_not_expire_another_producers_flows():
    # Two capture processes feed one worker: A's packets are at 100 s while B is still at 50 s.
    a = conversation(1, proto=17)
    b = conversation(2, proto=17)
    table = FlowTable(100, 15 * S, 0, packet_clock=False)
    assert len(table.update(packet_rows([pkt(b, T0 + 40 * S)]), now_ns=T0 + 40 * S)) == 0
    assert len(table.update(packet_rows([pkt(a, T0 + 100 * S)]), now_ns=T0 + 40 * S)) == 0
    # B's next packet, 10 s after its last: the same flow (idle timeout 15 s), though A is at 100 s.
    assert len(table.update(packet_rows([pkt(b, T0 + 50 * S)]), now_ns=T0 + 50 * S)) == 0
    assert table.active == 2 and table.now_ns == T0 + 50 * S
    (r,) = table.update(packet_rows([]), now_ns=T0 + 66 * S)  # the low-water mark passes B's idle time
    assert (int(r["packets"]), int(r["end_reason"])) == (2, END_IDLE)
    assert int(r["first_ns"]) == T0 + 40 * S and int(r["last_ns"]) == T0 + 50 * S


def test_without_packet_clock_a_packet_ahead_of_the_clock_ends_its_own_idle_flow():
    b = conversation(2, proto=17)
    table = FlowTable(100, 15 * S, 0, packet_clock=False)
    table.update(packet_rows([pkt(b, T0)]), now_ns=T0)
    (r,) = table.update(packet_rows([pkt(b, T0 + 20 * S)]), now_ns=T0 + 1 * S)  # 20 s later: a new flow
    assert (int(r["packets"]), int(r["end_reason"]), int(r["last_ns"])) == (1, END_IDLE, T0)
    assert table.active == 1


def test_lent_output_gives_the_same_records_as_copies():
    """lend_output: each call's records are a view of the table's buffer, equal to what a copying table returns."""
    from flowmeter.ipc.packets import PACKET_DTYPE
    from workers.flowtable import FlowTable

    rng = np.random.default_rng(7)
    lent, owned = (FlowTable(500, 2_000_000_000, 0, lend_output=flag) for flag in (True, False))
    for step in range(40):
        pk = np.zeros(300, PACKET_DTYPE)
        pk["ts_ns"] = np.sort(rng.integers(step * 10**9, (step + 1) * 10**9, 300)).astype(np.uint64)
        pk["src_lo"] = rng.integers(1, 900, 300)
        pk["dst_lo"] = 7
        pk["proto"] = 17
        pk["l3_bytes"] = rng.integers(28, 1500, 300)
        a, b = lent.update(pk), owned.update(pk)
        assert a.tobytes() == b.tobytes()
    a, b = lent.flush(now_ns=60 * 10**9), owned.flush(now_ns=60 * 10**9)
    assert len(a) > 0 and a.tobytes() == b.tobytes()
