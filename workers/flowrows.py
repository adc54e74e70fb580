"""Flow rows: the flow table's storage, and the kernels that find a flow and end it into a record.

The packet loop (``workers.flowtable``) and expiry (``workers.expiry``) work
on the same arrays: both find a flow through the index, end it into a
record and free its row and slot. That shared part lives here, below both,
so that neither imports the other.

Flow key: ``(ip_version, proto, src, dst, sport, dport, icmp, direction,
fwd_status, ingress_if, egress_if)``. Per flow: first/last packet time, packets, octets
(sum of ``l3_bytes``), OR of TCP flags, class of service of the first packet.

Table layout (85 octets a flow, plus the index)
-----------------------------------------------
``rows``   ``ROW_DTYPE[max_flows]``, packed, 69 octets::

             src_hi src_lo dst_hi dst_lo   4 x u8   key: addresses
             ports                         u8       sport | dport<<16 | icmp<<32 | ip_version<<48 | proto<<56
             ifaces                        u8       ingress_if | egress_if<<32
             dirfwd                        u2       direction | fwd_status<<8
             packets bytes                 2 x i8   delta counters of the current reporting interval
             tcp_flags tos state           3 x u1   state: S_FIN once a FIN was seen

``times``  ``int64[max_flows, 2]``: ``(first_ns, last_ns)`` of the current
           reporting interval; ``last_ns = FREE_ROW`` marks a free row,
           ``first_ns = NO_PACKETS`` a flow with no packet since its last
           report. Why apart from the rows: the expiry sweep and the
           eviction scans read only times, 16 octets a row instead of 85
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
"""
from __future__ import annotations

from flowmeter.jit import njit  # first: it sets numba's cache directory before numba is imported

import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

ROW_DTYPE = np.dtype([
    ("src_hi", "<u8"), ("src_lo", "<u8"), ("dst_hi", "<u8"), ("dst_lo", "<u8"),
    ("ports", "<u8"), ("ifaces", "<u8"), ("dirfwd", "<u2"),
    ("packets", "<i8"), ("bytes", "<i8"),
    ("tcp_flags", "u1"), ("tos", "u1"), ("state", "u1"),
])
FIRST, LAST = 0, 1  # columns of times
NO_PACKETS = 0x7FFF_FFFF_FFFF_FFFF  # first_ns of a flow with no packet since its last report
FREE_ROW = -1  # last_ns of a free row

S_FIN = 1  # row state bit

# Scalar state: one int64 array shared by the kernels (a kernel has no attributes to keep it in).
NOW, IDLE, INTERVAL, CURSOR, CARRY, TO_SCAN, ACTIVE, USED_ROWS, FREE, MAX_FLOWS, EVICT_N = range(11)
N_PACKETS, N_BYTES, N_CREATED, N_EVICTED, N_SCANNED = range(11, 16)
N_RECORDS = 16  # + end reason (1..5)
PACKET_CLOCK = 22  # 1: packet times advance the clock; 0: only update/expire's now_ns does
N_STATE = 24

DONE, OUT_FULL = 0, 1

U8 = np.uint64(8)
U16 = np.uint64(16)
U32 = np.uint64(32)
U48 = np.uint64(48)
U56 = np.uint64(56)
LO8 = np.uint64(0xFF)
LO16 = np.uint64(0xFFFF)
LO32 = np.uint64(0xFFFFFFFF)
HI32 = np.uint64(0xFFFFFFFF00000000)
M0 = np.uint64(0x243F6A8885A308D3)
M1 = np.uint64(0x9E3779B97F4A7C15)
M2 = np.uint64(0xBF58476D1CE4E5B9)
M3 = np.uint64(0x94D049BB133111EB)
S27 = np.uint64(27)
S30 = np.uint64(30)
S31 = np.uint64(31)


@intrinsic
def prefetch(typingctx, arr, byte_offset):
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
    h = (h ^ w) * M1
    return h ^ (h >> S31)


@njit(inline="always")
def flow_key_hash(src_hi, src_lo, dst_hi, dst_lo, ports, ifaces, dirfwd):
    """64-bit hash of a flow key given as seven 64-bit words (multiply-xorshift, splitmix64 finaliser)."""
    h = _mix(_mix(_mix(_mix(_mix(_mix(_mix(M0, src_hi), src_lo), dst_hi), dst_lo), ports), ifaces), dirfwd)
    h = (h ^ (h >> S30)) * M2
    h = (h ^ (h >> S27)) * M3
    return h ^ (h >> S31)


@njit(inline="always")
def packet_key(pk, i):
    """Packet ``i``'s key as stored in a row: ``(src_hi, src_lo, dst_hi, dst_lo, ports, ifaces, dirfwd)``."""
    ports = (np.uint64(pk[i].sport) | (np.uint64(pk[i].dport) << U16) | (np.uint64(pk[i].icmp) << U32)
             | (np.uint64(pk[i].ip_version) << U48) | (np.uint64(pk[i].proto) << U56))
    dirfwd = np.uint64(pk[i].direction) | (np.uint64(pk[i].fwd_status) << U8)
    ifaces = np.uint64(pk[i].ingress_if) | (np.uint64(pk[i].egress_if) << U32)
    return pk[i].src_hi, pk[i].src_lo, pk[i].dst_hi, pk[i].dst_lo, ports, ifaces, dirfwd


@njit(inline="always")
def packet_hash(pk, i):
    src_hi, src_lo, dst_hi, dst_lo, ports, ifaces, dirfwd = packet_key(pk, i)
    return flow_key_hash(src_hi, src_lo, dst_hi, dst_lo, ports, ifaces, dirfwd)


@njit(inline="always")
def home_slot(tag, cap):
    return np.int64((tag * np.uint64(cap)) >> U32)


@njit(inline="always")
def find_flow(slots, rows, h, src_hi, src_lo, dst_hi, dst_lo, ports, ifaces, dirfwd):
    """``(slot, row)`` of a key; ``row == -1`` if absent, ``slot`` then being where it would go."""
    cap = slots.shape[0]
    tag = h >> U32
    i = home_slot(tag, cap)
    while True:
        s = slots[i]
        if s == 0:
            return i, -1
        if (s >> U32) == tag:
            r = np.int64(s & LO32) - 1
            if (rows[r].src_lo == src_lo and rows[r].dst_lo == dst_lo and rows[r].ports == ports
                    and rows[r].src_hi == src_hi and rows[r].dst_hi == dst_hi
                    and rows[r].ifaces == ifaces and np.uint64(rows[r].dirfwd) == dirfwd):
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
        k = home_slot(s >> U32, cap)
        # The entry at j may move back to i unless its home lies cyclically in (i, j].
        stays = (i < k <= j) if i <= j else (i < k or k <= j)
        if not stays:
            slots[i] = s
            i = j
    slots[i] = 0


@njit
def remove_flow(slots, rows, times, st, r):
    """Take row ``r`` out of the index and put it on the free list."""
    cap = slots.shape[0]
    h = flow_key_hash(rows[r].src_hi, rows[r].src_lo, rows[r].dst_hi, rows[r].dst_lo, rows[r].ports,
                      rows[r].ifaces, np.uint64(rows[r].dirfwd))
    tag = h >> U32
    want = (tag << U32) | np.uint64(r + 1)
    i = home_slot(tag, cap)
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
def emit_record(out, n, rows, times, r, reason, st):
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
    out[n].ingress_if = rows[r].ifaces & LO32
    out[n].egress_if = rows[r].ifaces >> U32
    out[n].sport = p & LO16
    out[n].dport = (p >> U16) & LO16
    out[n].icmp = (p >> U32) & LO16
    out[n].ip_version = (p >> U48) & LO8
    out[n].proto = p >> U56
    out[n].tcp_flags = rows[r].tcp_flags
    out[n].tos = rows[r].tos
    out[n].direction = df & LO8
    out[n].fwd_status = df >> U8
    out[n].end_reason = reason
    st[N_RECORDS + reason] += 1
    return n + 1


@njit
def end_flow(slots, rows, times, st, out, n, r, reason):
    """Emit row ``r``'s last record (none if it holds no packet since its last report), remove it."""
    if times[r, FIRST] != NO_PACKETS:
        n = emit_record(out, n, rows, times, r, reason, st)
    remove_flow(slots, rows, times, st, r)
    return n


@njit
def rehash(old, new):
    """Move every entry of the index ``old`` into the empty, larger index ``new`` (its homes
    come from the tags the slots keep: no row is read)."""
    cap = new.shape[0]
    for k in range(old.shape[0]):
        s = old[k]
        if s != 0:
            pos = home_slot(s >> U32, cap)
            while new[pos] != 0:
                pos += 1
                if pos == cap:
                    pos = 0
            new[pos] = s
