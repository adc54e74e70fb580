"""Flow table: the shard worker's flow cache, an open-addressing hash table in preallocated numpy arrays.

A ``FlowTable`` meters batches of decoded packets (``PACKET_DTYPE``, in
capture order) into unidirectional flows and returns the flow records
(``FLOW_RECORD_DTYPE``) that ended or reported during the call. There are no
per-flow Python objects: a flow is one row of a few preallocated arrays,
found through an open-addressing index; the per-packet loop is one numba
kernel (``update_flow_table``), and expiry (timers, sweep, eviction) is a
handful of kernels beside it.

The table's storage (row layout, index, record writer) is
``workers.flowrows``; its timers, sweep and eviction are
``workers.expiry``; this module is the packet loop, the flush and the
``FlowTable`` that holds the arrays.

Memory: 69 + 16 + 8 / 0.75 = 95.7 octets a flow when full, plus the output buffer
(one eviction wave plus 1024 records, ~2.7 octets a flow at 1M flows) and a
16 KiB histogram: ``nbytes / max_flows`` is 98.4 holding 1M flows (tested).

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
  conversation classified alike, e.g. neither inside LocalNetworks), and
  swaps ingress and egress interface (the reply crosses the same
  interfaces the other way) or, when no such flow exists, keeps them (a
  source that knows one side only, e.g. a classic pcap's ingress 1);
  ip_version, proto, icmp and fwd_status are the same.
* Full table: a new flow first frees the ``evict_batch`` flows with the
  oldest ``last_ns`` (see Pressure below), END_LACK_OF_RESOURCES.
* ``flush``: every flow, with its due timer's reason or the given one.
* Whatever ends a flow, a flow whose timer is already due ends with that
  timer's reason (see Expiry).

Output: the kernels write records into a reusable buffer; when it could
overflow they return early, the wrapper grows the buffer and resumes, so
one call returns every record it produced, as one array.
"""
from __future__ import annotations

from dataclasses import dataclass

from flowmeter.jit import njit  # first: it sets numba's cache directory before numba is imported

import numpy as np
import numpy.typing as npt

from flowmeter.ipc.packets import PACKET_DTYPE
from workers.expiry import (EVICT_FRACTION, HIST_BUCKETS, advance_clock, due_reason, evict_oldest, fire_due, settle,
                            sweep, sweep_owed)
from workers.flowrows import (ACTIVE, CURSOR, DONE, EVICT_N, FIRST, FREE, FREE_ROW, HI32, IDLE, INTERVAL, LAST, LO16,
                              LO32, LO8, MAX_FLOWS, NOW, NO_PACKETS, N_BYTES, N_CREATED, N_EVICTED, N_PACKETS,
                              N_RECORDS, N_SCANNED, N_STATE, OUT_FULL, PACKET_CLOCK, ROW_DTYPE, S_FIN, TO_SCAN, U16,
                              U32, U56, USED_ROWS, emit_record, end_flow, find_flow, flow_key_hash, home_slot,
                              packet_hash, packet_key, prefetch, rehash)
from workers.records import END_ACTIVE, END_FORCED, END_IDLE, END_LACK_OF_RESOURCES, END_OF_FLOW, FLOW_RECORD_DTYPE

LOAD_FACTOR = 0.75
INITIAL_SLOTS = 4096  # the index's first size; it grows with the flows held
TCP = 6
TH_FIN = 0x01
TH_RST = 0x04
PF_SLOT = 16  # packets ahead: hash the key, prefetch its home slot
PF_ROW = 8  # packets ahead: read that slot, prefetch the row and times it points to
_RING = 32  # hashes of the packets between (a power of two > PF_SLOT)


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
        ring[j & (_RING - 1)] = packet_hash(pk, j)
    i = start
    while i < npk:
        ts = np.int64(pk[i].ts_ns)
        if st[PACKET_CLOCK]:
            advance_clock(st, ts)
        # This packet's flow is judged at the packet's own time (never before the clock): with
        # several producers the clock is their common low-water mark, and a packet may be ahead.
        now = ts if ts > st[NOW] else st[NOW]
        if sweep_owed(st):
            settle(st)
            n = sweep(slots, rows, times, st, out, n)
            if st[TO_SCAN] > 0:
                return i, n, OUT_FULL
        if out.shape[0] - n < 3:  # records one packet can cause besides a wave: own timer or end, reverse end
            return i, n, OUT_FULL

        j = i + PF_SLOT
        if j < npk:
            hj = packet_hash(pk, j)
            ring[j & (_RING - 1)] = hj
            prefetch(slots, home_slot(hj >> U32, cap) * 8)
        j = i + PF_ROW
        if j < npk:
            s = slots[home_slot(ring[j & (_RING - 1)] >> U32, cap)]
            if s != 0:
                rj = np.int64(s & LO32) - 1
                prefetch(rows_u8, rj * isz)
                prefetch(rows_u8, rj * isz + isz - 1)
                prefetch(times, rj * 16)

        h = ring[i & (_RING - 1)]
        src_hi, src_lo, dst_hi, dst_lo, ports, ifaces, dirfwd = packet_key(pk, i)
        # find_flow, written out: as a call it costs reference-count updates of two arrays per packet
        tag = h >> U32
        pos = home_slot(tag, cap)
        r = -1
        while True:
            s = slots[pos]
            if s == 0:
                break
            if (s >> U32) == tag:
                c = np.int64(s & LO32) - 1
                if (rows[c].src_lo == src_lo and rows[c].dst_lo == dst_lo and rows[c].ports == ports
                        and rows[c].src_hi == src_hi and rows[c].dst_hi == dst_hi
                        and rows[c].ifaces == ifaces and np.uint64(rows[c].dirfwd) == dirfwd):
                    r = c
                    break
            pos += 1
            if pos == cap:
                pos = 0
        if r >= 0 and due_reason(times[r, FIRST], times[r, LAST], now, st[IDLE], st[INTERVAL]) != 0:
            n, alive = fire_due(slots, rows, times, st, out, n, r, now)
            if not alive:  # ended on its idle timer: this packet starts a new flow
                pos, r = find_flow(slots, rows, h, src_hi, src_lo, dst_hi, dst_lo, ports, ifaces, dirfwd)
        if r < 0:
            if st[ACTIVE] >= st[MAX_FLOWS]:
                if out.shape[0] - n < st[EVICT_N] + 2:
                    # Not metered yet: on resume this packet starts over and finds its timers fired.
                    return i, n, OUT_FULL
                n = evict_oldest(slots, rows, times, st, hist, out, n)
                pos, r = find_flow(slots, rows, h, src_hi, src_lo, dst_hi, dst_lo, ports, ifaces, dirfwd)
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
            rows[r].ifaces = ifaces
            rows[r].dirfwd = dirfwd
            rows[r].packets = 0
            rows[r].bytes = 0
            rows[r].tcp_flags = 0
            rows[r].tos = pk[i].tos
            rows[r].state = 0
            times[r, FIRST] = NO_PACKETS
            times[r, LAST] = ts
            slots[pos] = ((h >> U32) << U32) | np.uint64(r + 1)
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

        if (ports >> U56) == TCP and (flags & (TH_FIN | TH_RST)) != 0:
            end_both = (flags & TH_RST) != 0
            if not end_both:
                rows[r].state |= S_FIN
            # The reverse flow of the same conversation (a TCP close needs both FINs).
            d = dirfwd & LO8
            if d == 0:
                d = np.uint64(1)
            elif d == 1:
                d = np.uint64(0)
            rports = (ports & HI32) | ((ports & LO16) << U16) | ((ports >> U16) & LO16)
            rdirfwd = (dirfwd & ~LO8) | d
            rifaces = (ifaces >> U32) | ((ifaces & LO32) << U32)
            rr = -1
            # The reverse flow: interfaces swapped, direction flipped; else (both sides given the
            # same direction, e.g. neither in LocalNetworks; or a source that sees one side only)
            # the same direction, the same interfaces.
            for k in range(4):
                kif = rifaces if k < 2 else ifaces
                kdf = rdirfwd if k % 2 == 0 else dirfwd
                if (k % 2 == 1 and rdirfwd == dirfwd) or (k >= 2 and rifaces == ifaces):
                    continue
                rh = flow_key_hash(dst_hi, dst_lo, src_hi, src_lo, rports, kif, kdf)
                _, rr = find_flow(slots, rows, rh, dst_hi, dst_lo, src_hi, src_lo, rports, kif, kdf)
                if rr >= 0:
                    break
            if rr >= 0 and rr != r:
                n, alive = fire_due(slots, rows, times, st, out, n, rr, now)
                if alive and (end_both or (rows[rr].state & S_FIN) != 0):
                    n = end_flow(slots, rows, times, st, out, n, rr, END_OF_FLOW)
                    end_both = True
            if end_both:
                n = end_flow(slots, rows, times, st, out, n, r, END_OF_FLOW)
        i += 1

    advance_clock(st, end_now)
    settle(st)
    if st[TO_SCAN] > 0:
        n = sweep(slots, rows, times, st, out, n)
        if st[TO_SCAN] > 0:
            return npk, n, OUT_FULL
    return npk, n, DONE


@njit
def flush_flow_table(slots, rows, times, st, out, reason):
    """End every flow: one record each (its due timer's reason, else ``reason``); ``out`` must hold them.

    Returns the number of records. Why no ``remove_flow`` per flow: clearing the
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
            n = emit_record(out, n, rows, times, r, due if due != 0 else reason, st)
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
        # Rows from st[USED_ROWS] up are never read (a row is written when it is taken): zeros, not
        # FREE_ROW, so that the column's pages are not touched before flows use them.
        self._times = np.zeros((max_flows, 2), dtype=np.int64)
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
        """Change the active timeout (reload); cached flows stay and follow the new value."""
        _check_interval(interval_ns)
        self._st[INTERVAL] = interval_ns

    def set_idle_timeout(self, idle_timeout_ns: int) -> None:
        """Change the idle timeout (reload); cached flows stay and follow the new value."""
        if idle_timeout_ns <= 0:
            raise ValueError(f"idle_timeout_ns: {idle_timeout_ns} is not a positive number of ns")
        self._st[IDLE] = idle_timeout_ns

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
