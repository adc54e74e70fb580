"""Expiry: the flow table's timers, its sweep, and the eviction of the oldest flows when it is full.

These kernels run inside the packet loop (``workers.flowtable``) as the
meter clock advances, and end flows through ``workers.flowrows``.

Meter time is packet time: the largest packet timestamp seen, or a larger
``now_ns`` given to ``update``/``expire`` (applied after the batch's
packets); with ``packet_clock`` off, only ``now_ns`` moves it, and a packet
ahead of the clock has its own flow's timers judged at its own time. It only moves forward; timers and the sweep run as it advances,
*inside* the packet loop, before the packet that advanced it is metered.

Timers (RFC 5470 §5.1.1-5.1.2). A flow is *idle-due* when ``now - last_ns
>= idle_timeout``; it is *interval-due* (active timeout, the ``Interval``
setting) when it holds packets and ``now - first_ns >= interval``, where
``first_ns`` is the first packet of the current reporting interval: each
interim record covers exactly ``[first packet, first packet + Interval)``.

Records are defined as if every timer fired exactly at its due time (an
"ideal meter"); the table may fire late, but the *content* of a record
never depends on how late. ``due_reason`` makes that work: when both
timers are overdue at once, the one due first decides -- an interim record
(END_ACTIVE) if ``first + interval <= last + idle`` (the flow is then idle
and goes without a second, empty record), else END_IDLE.

How late is bounded by the *sweep*: a cursor walks the used rows (the
high-water mark of rows in use, not ``max_flows``) twice per second of
meter time, in chunks of up to ``SWEEP_CHUNK`` rows, so every row is
visited within half a second plus one chunk's worth of time (at most
another half second) and a timer fires within 1 s of its due time, while
the work per call is proportional to how far the clock moved (at most one
pass over the table): a wave of timeouts never stalls the capture. A flow that receives a packet has its own timers checked first
(O(1), its row is in cache anyway), so busy flows never wait for the sweep.

Pressure (flowEndReason 5). When a new flow finds the table full, the
table frees the ``k`` flows with the oldest ``last_ns`` in one wave (``k``
defaults to 1/32 of the table): ``oldest_threshold`` finds the k-th
smallest ``last_ns`` exactly, by radix selection over a 2048-bucket
histogram of the times column (about five linear passes, no sorting, no
copy), then one pass frees every row below it (ties in row order). The
cost is amortised over the k new flows that find room afterwards.
Idle-due flows are the oldest, so they go first, with their true reason.
"""
from __future__ import annotations

from flowmeter.jit import njit  # first: it sets numba's cache directory before numba is imported

import numpy as np

from workers.flowrows import (CARRY, CURSOR, EVICT_N, FIRST, FREE_ROW, IDLE, INTERVAL, LAST, NOW, NO_PACKETS, N_EVICTED,
                              N_SCANNED, TO_SCAN, USED_ROWS, emit_record, end_flow)
from workers.records import END_ACTIVE, END_IDLE, END_LACK_OF_RESOURCES

SWEEP_NS = 1_000_000_000
SWEEPS_PER_S = 2  # passes of the sweep over the used rows per second of meter time
SWEEP_CHUNK = 64  # rows the sweep visits at once inside the packet loop
HIST_BUCKETS = 2048  # radix of the oldest-flow selection: 11 bits per pass
EVICT_FRACTION = 32  # a full table frees max_flows // 32 flows (at least 1) per wave


# --------------------------------------------------------------------------- timers

@njit(inline="always")
def due_reason(first_ns: int, last_ns: int, now_ns: int, idle_timeout_ns: int, interval_ns: int) -> int:
    """The end reason of the timer that is due for a flow at ``now_ns``, or 0 if none is.

    ``first_ns`` is ``NO_PACKETS`` for a flow holding no packet since its last
    report: it is never interval-due.
    """
    idle_due = now_ns - last_ns >= idle_timeout_ns
    active_due = interval_ns > 0 and now_ns - first_ns >= interval_ns
    # Both overdue: the earlier one decides, so a late check gives the ideal meter's record.
    if active_due and (not idle_due or first_ns + interval_ns <= last_ns + idle_timeout_ns):
        return END_ACTIVE
    if idle_due:
        return END_IDLE
    return 0


@njit
def fire_due(slots, rows, times, st, out, n, r, now):
    """Fire row ``r``'s timers due at ``now`` (at most one record): ``(n, still in the table)``."""
    reason = due_reason(times[r, FIRST], times[r, LAST], now, st[IDLE], st[INTERVAL])
    if reason == 0:
        return n, True
    if reason == END_ACTIVE:
        n = emit_record(out, n, rows, times, r, END_ACTIVE, st)
        rows[r].packets = 0
        rows[r].bytes = 0
        rows[r].tcp_flags = 0
        times[r, FIRST] = NO_PACKETS
        reason = due_reason(NO_PACKETS, times[r, LAST], now, st[IDLE], st[INTERVAL])
    if reason == END_IDLE:
        return end_flow(slots, rows, times, st, out, n, r, END_IDLE), False
    return n, True


@njit(inline="always")
def advance_clock(st, now):
    """Move the clock forward to ``now`` and owe the sweep its rows for the elapsed time.

    The rate is ``SWEEPS_PER_S`` passes over the used rows per second of
    meter time, owed in row·ns in ``st[CARRY]`` (``settle`` turns it into
    whole rows), so many tiny ticks scan exactly as much as one big one. A
    jump of a pass's time or more asks for one whole pass: visiting a row
    twice in one tick finds nothing new. ``dt * used`` stays below 2**61
    because ``dt < 1e9`` and tables hold fewer than 2**31 rows.
    """
    if now <= st[NOW]:
        return
    dt = now - st[NOW]
    st[NOW] = now
    if dt * SWEEPS_PER_S >= SWEEP_NS:
        st[TO_SCAN] = st[USED_ROWS]
        st[CARRY] = 0
    else:
        st[CARRY] += dt * SWEEPS_PER_S * st[USED_ROWS]


@njit(inline="always")
def sweep_owed(st):
    """True when the sweep owes a chunk of rows (or a whole pass): the packet loop sweeps only then.

    Sweeping a chunk of ``SWEEP_CHUNK`` rows at a time (fewer in a smaller
    table) instead of a row or two per packet keeps the per-packet cost to
    one multiply and one compare.
    """
    used = st[USED_ROWS]
    chunk = SWEEP_CHUNK if used > SWEEP_CHUNK else used
    return st[TO_SCAN] > 0 or (used > 0 and st[CARRY] >= chunk * SWEEP_NS)


@njit(inline="always")
def settle(st):
    """Turn the row·ns owed into whole rows to visit, at most one pass."""
    rows = st[CARRY] // SWEEP_NS
    st[CARRY] -= rows * SWEEP_NS
    todo = st[TO_SCAN] + rows
    st[TO_SCAN] = todo if todo < st[USED_ROWS] else st[USED_ROWS]


@njit
def sweep(slots, rows, times, st, out, n):
    """Visit ``st[TO_SCAN]`` rows from the cursor, firing due timers; stops early when ``out`` is full."""
    cur = st[CURSOR]
    todo = st[TO_SCAN]
    used = st[USED_ROWS]
    now = st[NOW]
    idle = st[IDLE]
    interval = st[INTERVAL]
    limit = out.shape[0]
    st[N_SCANNED] += todo
    while todo > 0 and n < limit:
        if cur >= used:
            cur = 0
        last = times[cur, LAST]
        if last != FREE_ROW and due_reason(times[cur, FIRST], last, now, idle, interval) != 0:
            n, _ = fire_due(slots, rows, times, st, out, n, cur, now)
        cur += 1
        todo -= 1
    st[N_SCANNED] -= todo
    st[CURSOR] = cur
    st[TO_SCAN] = todo
    return n


# --------------------------------------------------------------------------- pressure

@njit
def oldest_threshold(times, used_rows: int, k: int, hist) -> tuple[int, int]:
    """``(t, ties)``: the k-th smallest ``last_ns`` among used rows, and how many rows equal to ``t`` to take.

    The k oldest flows are then every used row with ``last_ns < t`` plus the
    first ``ties`` rows with ``last_ns == t``. Radix selection: each pass
    histograms the candidate range into ``len(hist)`` buckets and keeps the
    bucket holding the k-th value, so a span of 2**40 ns (18 minutes)
    resolves in 4 passes plus one for the range. Why not ``np.partition``:
    it needs a copy of the whole column, 8 more octets a flow, at the moment
    the table is under memory pressure.
    """
    lo = np.int64(0x7FFFFFFFFFFFFFFF)
    hi = np.int64(-0x7FFFFFFFFFFFFFFF)
    for r in range(used_rows):
        v = times[r, LAST]
        if v != FREE_ROW:
            if v < lo:
                lo = v
            if v > hi:
                hi = v
    nb = hist.shape[0]
    while lo < hi:
        span = hi - lo
        shift = 0
        while (span >> shift) >= nb:
            shift += 1
        hist[:] = 0
        for r in range(used_rows):
            v = times[r, LAST]
            if lo <= v <= hi:  # FREE_ROW is below any lo
                hist[(v - lo) >> shift] += 1
        below = 0
        b = 0
        while below + hist[b] < k:
            below += hist[b]
            b += 1
        k -= below
        lo = lo + (np.int64(b) << shift)
        top = lo + (np.int64(1) << shift) - 1
        if top < hi:
            hi = top
    return lo, k


@njit
def evict_oldest(slots, rows, times, st, hist, out, n):
    """Free ``st[EVICT_N]`` rows: the flows with the least recent last packet, in one wave."""
    used = st[USED_ROWS]
    t, ties = oldest_threshold(times, used, st[EVICT_N], hist)
    for r in range(used):
        v = times[r, LAST]
        if v == FREE_ROW:
            continue
        if v < t or (v == t and ties > 0):
            if v == t:
                ties -= 1
            n, alive = fire_due(slots, rows, times, st, out, n, r, st[NOW])
            if alive:
                n = end_flow(slots, rows, times, st, out, n, r, END_LACK_OF_RESOURCES)
                st[N_EVICTED] += 1
    return n
