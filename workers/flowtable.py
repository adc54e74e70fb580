"""Flow table: the shard worker's flow cache, an open-addressing hash table in preallocated numpy arrays.

A ``FlowTable`` meters batches of decoded packets (``PACKET_DTYPE``, in
capture order) into unidirectional flows and returns the flow records
(``FLOW_RECORD_DTYPE``) that ended or reported during the call. There are no
per-flow Python objects: a flow is one row of a few preallocated arrays,
found through an open-addressing index; the per-packet loop is one numba
kernel (``update_flow_table``), and expiry (timers, sweep, eviction) is a
handful of kernels beside it.

Why one module of about 900 lines, expiry included: its kernels call each
other both ways. The packet loop runs the timers, the sweep and the eviction
inside it, and they end flows through the record writer (``_emit``,
``_end``) and the index removal (``_remove``) that the loop uses too, all
over one row layout. Expiry moved alone into ``workers/expiry.py`` would
import this module and be imported by it, an import cycle, which
tests/test_layout.py forbids; avoiding it takes a third module, the layout,
the index and the record writer, below both expiry and the packet loop. So
the kernels stay together here. (Numba's cache is no reason either way: a
cached kernel is stamped with every module it imports, flowmeter/jit.py.)

Flow key: ``(ip_version, proto, src, dst, sport, dport, icmp, direction,
fwd_status, ifindex)``. Per flow: first/last packet time, packets, octets
(sum of ``l3_bytes``), OR of TCP flags, class of service of the first packet.

Table layout (81 octets a flow, plus the index)
-----------------------------------------------
``rows``   ``ROW_DTYPE[max_flows]``, packed, 65 octets::

             src_hi src_lo dst_hi dst_lo   4 x u8   key: addresses
             ports                         u8       sport | dport<<16 | icmp<<32 | ip_version<<48 | proto<<56
             ifindex                       u4
             dirfwd                        u2       direction | fwd_status<<8
             packets bytes                 2 x i8   delta counters of the current reporting interval
             tcp_flags tos state           3 x u1   state: S_FIN once a FIN was seen

``times``  ``int64[max_flows, 2]``: ``(first_ns, last_ns)`` of the current
           reporting interval; ``last_ns = FREE_ROW`` marks a free row,
           ``first_ns = NO_PACKETS`` a flow with no packet since its last
           report. Why apart from the rows: the expiry sweep and the
           eviction scans read only times, 16 octets a row instead of 81
           (about 1 ms instead of 6 ms per pass over 1M flows). Why not one
           array per field: a packet touches its whole flow at a random
           place, and every separate array is one more cache miss.
``slots``  ``uint64[capacity]``, grown (rehashed, never shrunk) so that the
           flows held plus a whole batch of new ones stay within load factor
           0.75, up to ``ceil(max_flows / 0.75)``: an index sized for the
           flows a gateway holds rather than for its maximum stays in the
           CPU caches (100k flows: 1.6 MiB instead of 10.7 MiB at the
           default 1M), which saves a miss on most packets.
           0 = empty, else ``tag << 32 | row + 1``
           where ``tag`` is the upper half of the key's 64-bit hash. Linear
           probing from ``home = tag * capacity >> 32`` (multiply-shift
           instead of a power-of-two mask, so the index is not rounded up to
           2**k slots, which costs up to twice the index memory). The tag
           lets a probe pass non-matching rows without reading them and
           gives every slot's home, so deletion shifts the cluster back (no
           tombstones: probe lengths never degrade with churn).
free rows  an intrusive free list threaded through ``first_ns`` of free rows;
           ``used_rows`` is the high-water mark.

Memory: 65 + 16 + 8 / 0.75 = 91.7 octets a flow when full, plus the output buffer
(one eviction wave plus 1024 records, ~2.6 octets a flow at 1M flows) and a
16 KiB histogram: ``nbytes / max_flows`` is 94.3 holding 1M flows (tested).

The packet loop hides memory latency with software prefetch: 16 packets
ahead it hashes the key and prefetches the home slot, 8 packets ahead it
reads that slot and prefetches the row and times it points to. Both are
hints only (the slot may change before that packet is metered).

Records
-------
* Counters are deltas (IPFIX-NOTES §10): every packet lands in exactly one
  record; the sum over a key's records is what was metered.
* Interim records (END_ACTIVE, the ``Interval`` setting): the flow stays in
  the table with its counters reset; each record's ``first_ns``/``last_ns``
  are the first and last packet *of that interval*, its ``tcp_flags`` the OR
  over that interval's packets; ``tos`` stays the flow's first packet's. A
  flow reported by an interim record and silent since is removed at its
  idle timeout without a further (empty) record.
* TCP (proto 6): RST ends the flow (the RST counted in it) and its reverse
  flow, END_OF_FLOW. FIN marks the flow; when a FIN is seen and the reverse
  flow has one too, both end at that packet. A FIN whose reverse flow is
  not in the table waits for the idle timeout. The reverse key swaps
  addresses and ports and flips direction 0 <-> 1 (255, unknown, stays),
  or, when no such flow exists, keeps the direction (both sides of a
  conversation classified alike, e.g. neither inside LocalNetworks);
  ip_version, proto, icmp, fwd_status and ifindex are the same.
* Full table: a new flow first frees the ``evict_batch`` flows with the
  oldest ``last_ns`` (see Pressure below), END_LACK_OF_RESOURCES.
* ``flush``: every flow, with its due timer's reason or the given one.
* Whatever ends a flow, a flow whose timer is already due ends with that
  timer's reason (see Expiry).

Expiry
------
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

Output: the kernels write records into a reusable buffer; when it could
overflow they return early, the wrapper grows the buffer and resumes, so
one call returns every record it produced, as one array.
"""
from __future__ import annotations

from dataclasses import dataclass

from flowmeter.jit import njit  # first: it sets numba's cache directory before numba is imported

import numpy as np
import numpy.typing as npt
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from flowmeter.ipc.packets import PACKET_DTYPE
from workers.records import END_ACTIVE, END_FORCED, END_IDLE, END_LACK_OF_RESOURCES, END_OF_FLOW, FLOW_RECORD_DTYPE

ROW_DTYPE = np.dtype([
    ("src_hi", "<u8"), ("src_lo", "<u8"), ("dst_hi", "<u8"), ("dst_lo", "<u8"),
    ("ports", "<u8"), ("ifindex", "<u4"), ("dirfwd", "<u2"),
    ("packets", "<i8"), ("bytes", "<i8"),
    ("tcp_flags", "u1"), ("tos", "u1"), ("state", "u1"),
])
FIRST, LAST = 0, 1  # columns of times
NO_PACKETS = 0x7FFF_FFFF_FFFF_FFFF  # first_ns of a flow with no packet since its last report
FREE_ROW = -1  # last_ns of a free row
SWEEP_NS = 1_000_000_000
SWEEPS_PER_S = 2  # passes of the sweep over the used rows per second of meter time
SWEEP_CHUNK = 64  # rows the sweep visits at once inside the packet loop
HIST_BUCKETS = 2048  # radix of the oldest-flow selection: 11 bits per pass

LOAD_FACTOR = 0.75
INITIAL_SLOTS = 4096  # the index's first size; it grows with the flows held
EVICT_FRACTION = 32  # a full table frees max_flows // 32 flows (at least 1) per wave

S_FIN = 1  # row state bit

TCP = 6
TH_FIN = 0x01
TH_RST = 0x04

# Scalar state: one int64 array shared by the kernels (a kernel has no attributes to keep it in).
NOW, IDLE, INTERVAL, CURSOR, CARRY, TO_SCAN, ACTIVE, USED_ROWS, FREE, MAX_FLOWS, EVICT_N = range(11)
N_PACKETS, N_BYTES, N_CREATED, N_EVICTED, N_SCANNED = range(11, 16)
N_RECORDS = 16  # + end reason (1..5)
PACKET_CLOCK = 22  # 1: packet times advance the clock; 0: only update/expire's now_ns does
N_STATE = 24

DONE, OUT_FULL = 0, 1

PF_SLOT = 16  # packets ahead: hash the key, prefetch its home slot
PF_ROW = 8  # packets ahead: read that slot, prefetch the row and times it points to
_RING = 32  # hashes of the packets between (a power of two > PF_SLOT)

_U8 = np.uint64(8)
_U16 = np.uint64(16)
_U32 = np.uint64(32)
_U48 = np.uint64(48)
_U56 = np.uint64(56)
_LO8 = np.uint64(0xFF)
_LO16 = np.uint64(0xFFFF)
_LO32 = np.uint64(0xFFFFFFFF)
_HI32 = np.uint64(0xFFFFFFFF00000000)
_M0 = np.uint64(0x243F6A8885A308D3)
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)


@intrinsic
def _prefetch(typingctx, arr, byte_offset):
    """Hint the CPU to load the cache line at ``arr``'s data + ``byte_offset`` (LLVM ``llvm.prefetch``)."""
    if not isinstance(arr, types.Array) or not isinstance(byte_offset, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        addr = builder.add(builder.ptrtoint(ary.data, ir.IntType(64)), builder.sext(args[1], ir.IntType(64))
                           if args[1].type.width < 64 else args[1])
        ptr = builder.inttoptr(addr, ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        name = "llvm.prefetch.p0" if getattr(ptr.type, "is_opaque", False) else "llvm.prefetch.p0i8"
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])  # read, keep, data
        return context.get_dummy_value()

    return types.void(arr, byte_offset), codegen


# --------------------------------------------------------------------------- hashing and probing

@njit(inline="always")
def _mix(h, w):
    h = (h ^ w) * _M1
    return h ^ (h >> _S31)


@njit(inline="always")
def flow_key_hash(src_hi, src_lo, dst_hi, dst_lo, ports, ifx_dirfwd):
    """64-bit hash of a flow key given as six 64-bit words (multiply-xorshift, splitmix64 finaliser)."""
    h = _mix(_mix(_mix(_mix(_mix(_mix(_M0, src_hi), src_lo), dst_hi), dst_lo), ports), ifx_dirfwd)
    h = (h ^ (h >> _S30)) * _M2
    h = (h ^ (h >> _S27)) * _M3
    return h ^ (h >> _S31)


@njit(inline="always")
def _packet_key(pk, i):
    """Packet ``i``'s key as stored in a row: ``(src_hi, src_lo, dst_hi, dst_lo, ports, ifindex, dirfwd)``."""
    ports = (np.uint64(pk[i].sport) | (np.uint64(pk[i].dport) << _U16) | (np.uint64(pk[i].icmp) << _U32)
             | (np.uint64(pk[i].ip_version) << _U48) | (np.uint64(pk[i].proto) << _U56))
    dirfwd = np.uint64(pk[i].direction) | (np.uint64(pk[i].fwd_status) << _U8)
    return pk[i].src_hi, pk[i].src_lo, pk[i].dst_hi, pk[i].dst_lo, ports, np.uint64(pk[i].ifindex), dirfwd


@njit(inline="always")
def _packet_hash(pk, i):
    src_hi, src_lo, dst_hi, dst_lo, ports, ifindex, dirfwd = _packet_key(pk, i)
    return flow_key_hash(src_hi, src_lo, dst_hi, dst_lo, ports, ifindex | (dirfwd << _U32))


@njit(inline="always")
def _home(tag, cap):
    return np.int64((tag * np.uint64(cap)) >> _U32)


@njit(inline="always")
def _find(slots, rows, h, src_hi, src_lo, dst_hi, dst_lo, ports, ifindex, dirfwd):
    """``(slot, row)`` of a key; ``row == -1`` if absent, ``slot`` then being where it would go."""
    cap = slots.shape[0]
    tag = h >> _U32
    i = _home(tag, cap)
    while True:
        s = slots[i]
        if s == 0:
            return i, -1
        if (s >> _U32) == tag:
            r = np.int64(s & _LO32) - 1
            if (rows[r].src_lo == src_lo and rows[r].dst_lo == dst_lo and rows[r].ports == ports
                    and rows[r].src_hi == src_hi and rows[r].dst_hi == dst_hi
                    and np.uint64(rows[r].ifindex) == ifindex and np.uint64(rows[r].dirfwd) == dirfwd):
                return i, r
        i += 1
        if i == cap:
            i = 0


@njit
def _delete_slot(slots, i):
    """Empty slot ``i`` by shifting the rest of its cluster back (Knuth 6.4, Algorithm R)."""
    cap = slots.shape[0]
    j = i
    while True:
        j += 1
        if j == cap:
            j = 0
        s = slots[j]
        if s == 0:
            break
        k = _home(s >> _U32, cap)
        # The entry at j may move back to i unless its home lies cyclically in (i, j].
        stays = (i < k <= j) if i <= j else (i < k or k <= j)
        if not stays:
            slots[i] = s
            i = j
    slots[i] = 0


@njit
def _remove(slots, rows, times, st, r):
    """Take row ``r`` out of the index and put it on the free list."""
    cap = slots.shape[0]
    h = flow_key_hash(rows[r].src_hi, rows[r].src_lo, rows[r].dst_hi, rows[r].dst_lo, rows[r].ports,
                      np.uint64(rows[r].ifindex) | (np.uint64(rows[r].dirfwd) << _U32))
    tag = h >> _U32
    want = (tag << _U32) | np.uint64(r + 1)
    i = _home(tag, cap)
    while slots[i] != want:
        i += 1
        if i == cap:
            i = 0
    _delete_slot(slots, i)
    times[r, LAST] = FREE_ROW
    times[r, FIRST] = st[FREE]
    st[FREE] = r
    st[ACTIVE] -= 1


# --------------------------------------------------------------------------- records

@njit
def _emit(out, n, rows, times, r, reason, st):
    p = rows[r].ports
    df = np.uint64(rows[r].dirfwd)
    out[n].first_ns = times[r, FIRST]
    out[n].last_ns = times[r, LAST]
    out[n].packets = rows[r].packets
    out[n].bytes = rows[r].bytes
    out[n].src_hi = rows[r].src_hi
    out[n].src_lo = rows[r].src_lo
    out[n].dst_hi = rows[r].dst_hi
    out[n].dst_lo = rows[r].dst_lo
    out[n].ifindex = rows[r].ifindex
    out[n].sport = p & _LO16
    out[n].dport = (p >> _U16) & _LO16
    out[n].icmp = (p >> _U32) & _LO16
    out[n].ip_version = (p >> _U48) & _LO8
    out[n].proto = p >> _U56
    out[n].tcp_flags = rows[r].tcp_flags
    out[n].tos = rows[r].tos
    out[n].direction = df & _LO8
    out[n].fwd_status = df >> _U8
    out[n].end_reason = reason
    st[N_RECORDS + reason] += 1
    return n + 1


@njit
def _end(slots, rows, times, st, out, n, r, reason):
    """Emit row ``r``'s last record (none if it holds no packet since its last report), remove it."""
    if times[r, FIRST] != NO_PACKETS:
        n = _emit(out, n, rows, times, r, reason, st)
    _remove(slots, rows, times, st, r)
    return n


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
def _fire_due(slots, rows, times, st, out, n, r, now):
    """Fire row ``r``'s timers due at ``now`` (at most one record): ``(n, still in the table)``."""
    reason = due_reason(times[r, FIRST], times[r, LAST], now, st[IDLE], st[INTERVAL])
    if reason == 0:
        return n, True
    if reason == END_ACTIVE:
        n = _emit(out, n, rows, times, r, END_ACTIVE, st)
        rows[r].packets = 0
        rows[r].bytes = 0
        rows[r].tcp_flags = 0
        times[r, FIRST] = NO_PACKETS
        reason = due_reason(NO_PACKETS, times[r, LAST], now, st[IDLE], st[INTERVAL])
    if reason == END_IDLE:
        return _end(slots, rows, times, st, out, n, r, END_IDLE), False
    return n, True


@njit(inline="always")
def _advance(st, now):
    """Move the clock forward to ``now`` and owe the sweep its rows for the elapsed time.

    The rate is ``SWEEPS_PER_S`` passes over the used rows per second of
    meter time, owed in row·ns in ``st[CARRY]`` (``_settle`` turns it into
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
def _sweep_owed(st):
    """True when the sweep owes a chunk of rows (or a whole pass): the packet loop sweeps only then.

    Sweeping a chunk of ``SWEEP_CHUNK`` rows at a time (fewer in a smaller
    table) instead of a row or two per packet keeps the per-packet cost to
    one multiply and one compare.
    """
    used = st[USED_ROWS]
    chunk = SWEEP_CHUNK if used > SWEEP_CHUNK else used
    return st[TO_SCAN] > 0 or (used > 0 and st[CARRY] >= chunk * SWEEP_NS)


@njit(inline="always")
def _settle(st):
    """Turn the row·ns owed into whole rows to visit, at most one pass."""
    rows = st[CARRY] // SWEEP_NS
    st[CARRY] -= rows * SWEEP_NS
    todo = st[TO_SCAN] + rows
    st[TO_SCAN] = todo if todo < st[USED_ROWS] else st[USED_ROWS]


@njit
def _sweep(slots, rows, times, st, out, n):
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
            n, _ = _fire_due(slots, rows, times, st, out, n, cur, now)
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
def _evict_oldest(slots, rows, times, st, hist, out, n):
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
            n, alive = _fire_due(slots, rows, times, st, out, n, r, st[NOW])
            if alive:
                n = _end(slots, rows, times, st, out, n, r, END_LACK_OF_RESOURCES)
                st[N_EVICTED] += 1
    return n


# --------------------------------------------------------------------------- kernels

@njit
def update_flow_table(pk, start, end_now, slots, rows, rows_u8, times, st, hist, out, n):
    """Meter packets ``pk[start:]``, then advance the clock to ``end_now`` (-1: no tick).

    Returns ``(next packet, records in out, DONE | OUT_FULL)``. On OUT_FULL the
    caller grows ``out`` and calls again from ``next packet``: everything
    before it is metered, and the clock and the sweep's progress are in ``st``.
    ``rows_u8`` is ``rows`` viewed as octets (prefetch addresses).
    """
    npk = pk.shape[0]
    cap = slots.shape[0]
    isz = rows.itemsize
    ring = np.empty(_RING, dtype=np.uint64)
    for j in range(start, min(start + PF_SLOT, npk)):
        ring[j & (_RING - 1)] = _packet_hash(pk, j)
    i = start
    while i < npk:
        ts = np.int64(pk[i].ts_ns)
        if st[PACKET_CLOCK]:
            _advance(st, ts)
        # This packet's flow is judged at the packet's own time (never before the clock): with
        # several producers the clock is their common low-water mark, and a packet may be ahead.
        now = ts if ts > st[NOW] else st[NOW]
        if _sweep_owed(st):
            _settle(st)
            n = _sweep(slots, rows, times, st, out, n)
            if st[TO_SCAN] > 0:
                return i, n, OUT_FULL
        if out.shape[0] - n < 3:  # records one packet can cause besides a wave: own timer or end, reverse end
            return i, n, OUT_FULL

        j = i + PF_SLOT
        if j < npk:
            hj = _packet_hash(pk, j)
            ring[j & (_RING - 1)] = hj
            _prefetch(slots, _home(hj >> _U32, cap) * 8)
        j = i + PF_ROW
        if j < npk:
            s = slots[_home(ring[j & (_RING - 1)] >> _U32, cap)]
            if s != 0:
                rj = np.int64(s & _LO32) - 1
                _prefetch(rows_u8, rj * isz)
                _prefetch(rows_u8, rj * isz + isz - 1)
                _prefetch(times, rj * 16)

        h = ring[i & (_RING - 1)]
        src_hi, src_lo, dst_hi, dst_lo, ports, ifindex, dirfwd = _packet_key(pk, i)
        # _find, written out: as a call it costs reference-count updates of two arrays per packet
        tag = h >> _U32
        pos = _home(tag, cap)
        r = -1
        while True:
            s = slots[pos]
            if s == 0:
                break
            if (s >> _U32) == tag:
                c = np.int64(s & _LO32) - 1
                if (rows[c].src_lo == src_lo and rows[c].dst_lo == dst_lo and rows[c].ports == ports
                        and rows[c].src_hi == src_hi and rows[c].dst_hi == dst_hi
                        and np.uint64(rows[c].ifindex) == ifindex and np.uint64(rows[c].dirfwd) == dirfwd):
                    r = c
                    break
            pos += 1
            if pos == cap:
                pos = 0
        if r >= 0 and due_reason(times[r, FIRST], times[r, LAST], now, st[IDLE], st[INTERVAL]) != 0:
            n, alive = _fire_due(slots, rows, times, st, out, n, r, now)
            if not alive:  # ended on its idle timer: this packet starts a new flow
                pos, r = _find(slots, rows, h, src_hi, src_lo, dst_hi, dst_lo, ports, ifindex, dirfwd)
        if r < 0:
            if st[ACTIVE] >= st[MAX_FLOWS]:
                if out.shape[0] - n < st[EVICT_N] + 2:
                    # Not metered yet: on resume this packet starts over and finds its timers fired.
                    return i, n, OUT_FULL
                n = _evict_oldest(slots, rows, times, st, hist, out, n)
                pos, r = _find(slots, rows, h, src_hi, src_lo, dst_hi, dst_lo, ports, ifindex, dirfwd)
            if st[FREE] >= 0:
                r = st[FREE]
                st[FREE] = times[r, FIRST]
            else:
                r = st[USED_ROWS]
                st[USED_ROWS] += 1
            rows[r].src_hi = src_hi
            rows[r].src_lo = src_lo
            rows[r].dst_hi = dst_hi
            rows[r].dst_lo = dst_lo
            rows[r].ports = ports
            rows[r].ifindex = ifindex
            rows[r].dirfwd = dirfwd
            rows[r].packets = 0
            rows[r].bytes = 0
            rows[r].tcp_flags = 0
            rows[r].tos = pk[i].tos
            rows[r].state = 0
            times[r, FIRST] = NO_PACKETS
            times[r, LAST] = ts
            slots[pos] = ((h >> _U32) << _U32) | np.uint64(r + 1)
            st[ACTIVE] += 1
            st[N_CREATED] += 1

        l3 = np.int64(pk[i].l3_bytes)
        flags = pk[i].tcp_flags
        if times[r, FIRST] == NO_PACKETS:
            times[r, FIRST] = ts
            times[r, LAST] = ts
        else:
            if ts < times[r, FIRST]:
                times[r, FIRST] = ts
            if ts > times[r, LAST]:
                times[r, LAST] = ts
        rows[r].packets += 1
        rows[r].bytes += l3
        rows[r].tcp_flags |= flags
        st[N_PACKETS] += 1
        st[N_BYTES] += l3

        if (ports >> _U56) == TCP and (flags & (TH_FIN | TH_RST)) != 0:
            end_both = (flags & TH_RST) != 0
            if not end_both:
                rows[r].state |= S_FIN
            # The reverse flow of the same conversation (a TCP close needs both FINs).
            d = dirfwd & _LO8
            if d == 0:
                d = np.uint64(1)
            elif d == 1:
                d = np.uint64(0)
            rports = (ports & _HI32) | ((ports & _LO16) << _U16) | ((ports >> _U16) & _LO16)
            rdirfwd = (dirfwd & ~_LO8) | d
            rh = flow_key_hash(dst_hi, dst_lo, src_hi, src_lo, rports, ifindex | (rdirfwd << _U32))
            _, rr = _find(slots, rows, rh, dst_hi, dst_lo, src_hi, src_lo, rports, ifindex, rdirfwd)
            if rr < 0 and rdirfwd != dirfwd:
                # both sides given the same direction (e.g. neither side in LocalNetworks)
                rh = flow_key_hash(dst_hi, dst_lo, src_hi, src_lo, rports, ifindex | (dirfwd << _U32))
                _, rr = _find(slots, rows, rh, dst_hi, dst_lo, src_hi, src_lo, rports, ifindex, dirfwd)
            if rr >= 0 and rr != r:
                n, alive = _fire_due(slots, rows, times, st, out, n, rr, now)
                if alive and (end_both or (rows[rr].state & S_FIN) != 0):
                    n = _end(slots, rows, times, st, out, n, rr, END_OF_FLOW)
                    end_both = True
            if end_both:
                n = _end(slots, rows, times, st, out, n, r, END_OF_FLOW)
        i += 1

    _advance(st, end_now)
    _settle(st)
    if st[TO_SCAN] > 0:
        n = _sweep(slots, rows, times, st, out, n)
        if st[TO_SCAN] > 0:
            return npk, n, OUT_FULL
    return npk, n, DONE


@njit
def rehash(old, new):
    """Move every entry of the index ``old`` into the empty, larger index ``new`` (its homes
    come from the tags the slots keep: no row is read)."""
    cap = new.shape[0]
    for k in range(old.shape[0]):
        s = old[k]
        if s != 0:
            pos = _home(s >> _U32, cap)
            while new[pos] != 0:
                pos += 1
                if pos == cap:
                    pos = 0
            new[pos] = s


@njit
def flush_flow_table(slots, rows, times, st, out, reason):
    """End every flow: one record each (its due timer's reason, else ``reason``); ``out`` must hold them.

    Returns the number of records. Why no ``_remove`` per flow: clearing the
    whole index at the end is one memset instead of a random probe per flow.
    """
    n = 0
    for r in range(st[USED_ROWS]):
        last = times[r, LAST]
        if last == FREE_ROW:
            continue
        if times[r, FIRST] != NO_PACKETS:
            due = due_reason(times[r, FIRST], last, st[NOW], st[IDLE], st[INTERVAL])
            # An interim record at the end holds everything: the flow then has nothing left.
            n = _emit(out, n, rows, times, r, due if due != 0 else reason, st)
        times[r, LAST] = FREE_ROW
    slots[:] = 0
    st[ACTIVE] = 0
    st[USED_ROWS] = 0  # every row is free: allocate from the start again
    st[FREE] = -1
    st[CURSOR] = 0
    st[TO_SCAN] = 0
    return n


# --------------------------------------------------------------------------- the Python face

@dataclass(frozen=True, slots=True)
class FlowTableCounters:
    """Totals since the table was made (for the worker's periodic statistics)."""

    packets: int
    octets: int
    flows_created: int
    evictions: int  # flows removed early because the table was full
    rows_scanned: int  # rows visited by the expiry sweep: its work
    records: dict[int, int]  # end reason -> records emitted


class FlowTable:
    """One shard's flow cache: meters ``PACKET_DTYPE`` batches, emits ``FLOW_RECORD_DTYPE`` records.

    ``max_flows`` flows at most; ``idle_timeout_ns`` > 0; ``interval_ns`` is the
    active timeout for interim records, 0 = none. ``evict_batch`` is how many
    flows one eviction wave frees (default ``max(1, max_flows // 32)``).
    ``packet_clock`` (default) lets packet times advance the meter clock; a
    worker fed by several capture processes turns it off and advances the
    clock itself to their common low-water mark (``update``'s ``now_ns``),
    so that one producer running ahead never expires another's flows early.
    ``lend_output``: the records returned are a view of the table's output
    buffer, valid until the next call, instead of a copy (a caller that
    turns them into template records at once, as the worker does).
    Not thread-safe: one worker owns it (the kernels release the GIL).
    """

    def __init__(self, max_flows: int, idle_timeout_ns: int, interval_ns: int,
                 *, evict_batch: int | None = None, packet_clock: bool = True, lend_output: bool = False) -> None:
        if not 1 <= max_flows < 2**31 - 1:
            raise ValueError(f"max_flows: {max_flows} is not between 1 and {2**31 - 2}")
        if idle_timeout_ns <= 0:
            raise ValueError(f"idle_timeout_ns: {idle_timeout_ns} is not a positive number of ns")
        _check_interval(interval_ns)
        evict = max(1, max_flows // EVICT_FRACTION) if evict_batch is None else evict_batch
        if not 1 <= evict <= max_flows:
            raise ValueError(f"evict_batch: {evict_batch} is not between 1 and max_flows ({max_flows})")
        self._max_capacity = _index_size(max_flows)
        self._slots = np.zeros(min(self._max_capacity, INITIAL_SLOTS), dtype=np.uint64)
        self._rows = np.zeros(max_flows, dtype=ROW_DTYPE)
        self._rows_u8 = self._rows.view(np.uint8)
        self._times = np.full((max_flows, 2), FREE_ROW, dtype=np.int64)
        self._st = np.zeros(N_STATE, dtype=np.int64)
        self._st[IDLE] = idle_timeout_ns
        self._st[INTERVAL] = interval_ns
        self._st[MAX_FLOWS] = max_flows
        self._st[EVICT_N] = evict
        self._st[FREE] = -1
        self._st[PACKET_CLOCK] = int(packet_clock)
        self._hist = np.zeros(HIST_BUCKETS, dtype=np.int64)
        # Room for one eviction wave and more, so that a full table rarely makes the kernel stop early.
        self._out_base = evict + 1024
        self._out = np.zeros(self._out_base, dtype=FLOW_RECORD_DTYPE)
        self._lend = lend_output

    # -- metering

    def update(self, packets: npt.NDArray, now_ns: int | None = None) -> npt.NDArray:
        """Meter a ``PACKET_DTYPE`` batch in order; return the ``FLOW_RECORD_DTYPE`` records that ended.

        ``now_ns``, if given, advances the clock after the batch (a capture
        clock tick, or wall time for a live source), even for an empty batch.
        """
        if packets.dtype != PACKET_DTYPE:
            raise TypeError(f"packets: dtype {packets.dtype} is not PACKET_DTYPE")
        pk = np.ascontiguousarray(packets)
        if len(self._slots) < self._max_capacity and _index_size(self.active + len(pk)) > len(self._slots):
            self._grow_index(self.active + len(pk))
        end_now = -1 if now_ns is None else int(now_ns)
        start, n = 0, 0
        while True:
            start, n, status = update_flow_table(pk, start, end_now, self._slots, self._rows, self._rows_u8,
                                                 self._times, self._st, self._hist, self._out, n)
            if status == DONE:
                return self._take(n)
            self._grow(n)

    def expire(self, now_ns: int) -> npt.NDArray:
        """Advance the clock to ``now_ns`` without packets; return the records whose timers fired."""
        return self.update(_NO_PACKETS, now_ns)

    def flush(self, reason: int = END_FORCED, now_ns: int | None = None) -> npt.NDArray:
        """End every flow (end of input, shutdown); the table is empty afterwards.

        A flow whose timer is due gets that timer's reason, the others
        ``reason``. ``now_ns`` optionally advances the clock first.
        """
        if not END_IDLE <= reason <= END_LACK_OF_RESOURCES:
            raise ValueError(f"reason: {reason} is not a flowEndReason (1-5)")
        first = self.expire(now_ns) if now_ns is not None else None
        if first is not None and self._lend:
            first = first.copy()  # the flush below writes the same buffer
        if len(self._out) < self.active:
            self._out = np.empty(self.active, dtype=FLOW_RECORD_DTYPE)
        rest = self._take(flush_flow_table(self._slots, self._rows, self._times, self._st, self._out, reason))
        return rest if first is None or len(first) == 0 else np.concatenate([first, rest])

    def set_interval(self, interval_ns: int) -> None:
        """Change the active timeout (SIGHUP reload); cached flows stay and follow the new value."""
        _check_interval(interval_ns)
        self._st[INTERVAL] = interval_ns

    def _grow_index(self, flows: int) -> None:
        """Rehash into an index that holds ``flows`` within the load factor (at least twice the slots)."""
        size = min(self._max_capacity, max(2 * len(self._slots), _index_size(flows)))
        bigger = np.zeros(size, dtype=np.uint64)
        rehash(self._slots, bigger)
        self._slots = bigger

    def _grow(self, n: int) -> None:
        bigger = np.empty(2 * len(self._out), dtype=FLOW_RECORD_DTYPE)
        bigger[:n] = self._out[:n]
        self._out = bigger

    def _take(self, n: int) -> npt.NDArray:
        """The first ``n`` records of the output buffer, as an array the caller owns (or borrows)."""
        if len(self._out) <= self._out_base:
            return self._out[:n] if self._lend else self._out[:n].copy()
        # A wave of records grew the buffer: hand it over instead of copying, start a small one.
        records = self._out[:n]
        self._out = np.empty(self._out_base, dtype=FLOW_RECORD_DTYPE)
        return records

    # -- properties

    @property
    def active(self) -> int:
        """Flows in the table."""
        return int(self._st[ACTIVE])

    @property
    def max_flows(self) -> int:
        return len(self._rows)

    @property
    def capacity(self) -> int:
        """Slots of the hash index now: it grows with the flows held, up to ``ceil(max_flows / 0.75)``."""
        return len(self._slots)

    @property
    def now_ns(self) -> int:
        """Meter time: the largest packet timestamp or clock tick seen."""
        return int(self._st[NOW])

    @property
    def idle_timeout_ns(self) -> int:
        return int(self._st[IDLE])

    @property
    def interval_ns(self) -> int:
        return int(self._st[INTERVAL])

    @property
    def nbytes(self) -> int:
        """Octets held by the table's arrays: rows, times, index, output buffer, state."""
        return (self._rows.nbytes + self._times.nbytes + self._slots.nbytes + self._out.nbytes
                + self._hist.nbytes + self._st.nbytes)

    @property
    def counters(self) -> FlowTableCounters:
        st = self._st
        return FlowTableCounters(
            packets=int(st[N_PACKETS]), octets=int(st[N_BYTES]), flows_created=int(st[N_CREATED]),
            evictions=int(st[N_EVICTED]), rows_scanned=int(st[N_SCANNED]),
            records={reason: int(st[N_RECORDS + reason])
                     for reason in (END_IDLE, END_ACTIVE, END_OF_FLOW, END_FORCED, END_LACK_OF_RESOURCES)})


_NO_PACKETS = np.empty(0, dtype=PACKET_DTYPE)


def load_kernels() -> None:
    """Compile the kernels, or load them from numba's cache, now rather than at the first batch.

    Call it in the supervisor before forking the workers (DESIGN.md "Data
    plane": start-up is part of performance): the first kernel call of a
    process also pays numba's one-time set-up, about 0.1 s (see flowmeter/jit.py).
    """
    table = FlowTable(2, 1, 0, evict_batch=1)
    pk = np.zeros(3, dtype=PACKET_DTYPE)
    pk["src_lo"] = [1, 2, 3]
    table.update(pk)
    table.flush()
    rehash(np.zeros(2, dtype=np.uint64), np.zeros(4, dtype=np.uint64))


def _index_size(flows: int) -> int:
    """Slots that hold ``flows`` within the load factor: ``ceil(flows / 0.75)``."""
    return max(2, -(-flows * 4 // 3))


def _check_interval(interval_ns: int) -> None:
    if interval_ns < 0:
        raise ValueError(f"interval_ns: {interval_ns} is not 0 (no interim records) or a positive number of ns")
