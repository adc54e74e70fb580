"""The NFLOG source: a netlink socket bound to a log group, read in batches.

Live tests run as root in a network namespace of their own, with an
nftables ruleset that logs UDP datagrams sent over its loopback. They check
that exactly the datagrams sent come out of ``decode_batch`` (count, length,
ports, protocol, direction, log prefix), for IPv4 and IPv6, at the output
and input hooks; that the configuration reaches the kernel; that a second
socket on a bound group fails with one line; and that an overrun is counted
and survived. The message walker is also checked against a plain-Python twin
on hand-built and fuzzed datagrams.
"""
from __future__ import annotations

import contextlib
import errno
import socket
import struct
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowmeter.capture.decode import decode_batch, nflog_prefixes
from flowmeter.capture.process import Capture, CaptureSettings
from flowmeter.capture.sources import RecordBatch
from flowmeter.capture.sources.nflog import NflogSource, SourceError, walk_netlink_messages
from flowmeter.ipc.packets import DIR_EGRESS, DIR_INGRESS, DIR_UNKNOWN, PACKET_DTYPE, ST_OK
from tests.support.netns import Namespaces, available, entered
from tests.support.pcapwrite import ipv4, nflog, udp

RULES = """
table inet flowmeter_nflog_test {
    chain out {
        type filter hook output priority 0; policy accept;
        udp dport 9999 log group 7 prefix "acl-deny: " drop
        udp dport 9998 log group 7 prefix "allowed: " accept
        udp dport 9996 log group 9 prefix "burst: " drop
    }
    chain in {
        type filter hook input priority 0; policy accept;
        udp dport 9997 log group 8 prefix "inbound: " accept
    }
}
"""
LOOPBACK = {4: (socket.AF_INET, "127.0.0.1", 20 + 8), 6: (socket.AF_INET6, "::1", 40 + 8)}
NOW_NS = 1_234_567_890_123_456_789
NATIVE = "<" if sys.byteorder == "little" else ">"



@pytest.fixture(scope="module", autouse=True)
def kernels_loaded():
    """Compiled (the first time on a machine: a minute) before any test's traffic and deadlines."""
    from flowmeter.capture import decode
    from flowmeter.capture.sources import nflog

    nflog.warm_up()
    decode.warm_up()

@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    why_not = available()
    if why_not:
        pytest.fail(why_not)
    rules = tmp_path_factory.mktemp("nft") / "rules.nft"
    rules.write_text(RULES)
    with Namespaces() as ns:
        name = ns.add("nflog")
        ns.run(name, "nft", "-f", str(rules))
        yield name


def send(version: int, port: int, sizes: list[int]) -> int:
    """UDP datagrams of these payload sizes to loopback ``port``; returns the source port."""
    family, address, _ = LOOPBACK[version]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((address, 0))
        for size in sizes:
            with contextlib.suppress(PermissionError):  # what a local drop answers
                sock.sendto(bytes(size), (address, port))
        return sock.getsockname()[1]


def collect(source: NflogSource, want: int, deadline_s: float = 3.0):
    """Decoded rows, their prefixes and their raw record times, until ``want`` rows arrived
    (then one more short read, so that anything extra would show)."""
    rows, prefixes = [], []
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        got = sum(map(len, rows))
        for batch in source.read(0.1 if got < want else 0.05):
            out, status = np.empty(len(batch), PACKET_DTYPE), np.empty(len(batch), np.uint8)
            info = decode_batch(batch, out, status)
            assert (status == ST_OK).all(), status
            names = np.full(len(batch), None, object)
            for prefix, index in nflog_prefixes(batch, info).items():
                names[index] = prefix
            rows.append(out)
            prefixes.extend(names)
        if got >= want:
            break
    return (np.concatenate(rows) if rows else np.empty(0, PACKET_DTYPE)), prefixes


def test_a_dropped_frame_keeps_its_in_device_and_loses_its_out_device():
    """In FORWARD the kernel logs both devices; a frame the rule drops never left: egress 0."""
    p = ipv4("10.1.0.1", "10.2.0.1", 17, udp(1000, 53))
    frames = [nflog(p, hook=2, prefix=b"drop: telnet", indev=3, outdev=4),
              nflog(p, hook=2, prefix=b"allowed", indev=3, outdev=4),
              nflog(p, hook=2, indev=4, outdev=3)]
    batch = RecordBatch(np.frombuffer(b"".join(frames), np.uint8),
                        np.cumsum([0] + [len(f) for f in frames[:-1]]).astype(np.uint64),
                        np.array([len(f) for f in frames], np.uint32), np.array([len(f) for f in frames], np.uint32),
                        NOW_NS + np.arange(3, dtype=np.uint64), np.full(3, 239, np.uint16), np.zeros(3, np.uint32),
                        np.full(3, DIR_UNKNOWN, np.uint8))
    sent = []
    capture = Capture(CaptureSettings(index=0, drop_prefixes=(("drop", 129),)), 1, lambda w, f: sent.append(f))
    capture.meter_batch(batch)
    rows = np.frombuffer(bytes(sent[0][1]), PACKET_DTYPE)
    assert rows[["fwd_status", "ingress_if", "egress_if"]].tolist() == [(129, 3, 0), (0, 3, 4), (0, 4, 3)]


# --- live, in a namespace --------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 6])
def test_logged_datagrams_become_rows_with_their_prefix(namespace, version):
    denied, allowed = [10, 11, 12, 13, 300], [0, 7, 1000]
    _, _, headers = LOOPBACK[version]
    with entered(namespace), NflogSource(7) as source:
        assert not list(source.read(0.01))
        sport_denied = send(version, 9999, denied)
        sport_allowed = send(version, 9998, allowed)
        rows, prefixes = collect(source, len(denied) + len(allowed))
        counters = source.counters()
    assert len(rows) == len(denied) + len(allowed)
    assert counters["frames"] == len(rows) and counters["malformed"] == counters["frames lost"] == 0
    assert (rows["ip_version"] == version).all() and (rows["proto"] == 17).all()
    assert (rows["direction"] == DIR_EGRESS).all()  # logged at the output hook
    lo = socket.if_nametoindex("lo")  # (1, in every namespace)
    assert (rows["ingress_if"] == 0).all() and (rows["egress_if"] == lo).all()  # OUTPUT: the out-device only
    by_prefix = {b"acl-deny: ": (denied, sport_denied, 9999), b"allowed: ": (allowed, sport_allowed, 9998)}
    assert set(prefixes) == set(by_prefix)
    for prefix, (sizes, sport, dport) in by_prefix.items():
        mine = rows[[p == prefix for p in prefixes]]
        assert sorted(mine["l3_bytes"]) == sorted(size + headers for size in sizes)
        assert set(mine["sport"]) == {sport} and set(mine["dport"]) == {dport}


def test_copy_range_cuts_the_frame_not_its_length(namespace):
    with entered(namespace), NflogSource(7, copy_range=64) as source:
        send(4, 9999, [1400])
        deadline, seen = time.monotonic() + 3, []
        while not seen and time.monotonic() < deadline:
            for batch in source.read(0.1):
                out, status = np.empty(len(batch), PACKET_DTYPE), np.empty(len(batch), np.uint8)
                decode_batch(batch, out, status)
                seen += [(int(batch.caplen[i]), int(out["l3_bytes"][i]), int(status[i])) for i in range(len(batch))]
    ((caplen, l3_bytes, status),) = seen
    assert caplen < 64 + 200 and l3_bytes == 1428 and status == ST_OK


def test_input_hook_is_ingress_and_stamped_by_the_kernel(namespace):
    """NFULA_TIMESTAMP comes only with PREROUTING/INPUT/FORWARD frames: the input
    hook's frame carries its send time, the output hook's gets the receive time."""
    with entered(namespace), NflogSource(7) as egress, NflogSource(8) as ingress:
        before = time.time_ns()
        send(4, 9997, [5])
        send(4, 9999, [5])
        sent = time.time_ns()
        time.sleep(0.03)  # whatever is stamped on receipt is stamped after this
        rows_in, prefixes_in = collect(ingress, 1)
        rows_out, _ = collect(egress, 1)
    assert prefixes_in == [b"inbound: "] and rows_in["dport"][0] == 9997
    assert rows_in["direction"][0] == DIR_INGRESS and rows_out["direction"][0] == DIR_EGRESS
    assert (int(rows_in["ingress_if"][0]), int(rows_in["egress_if"][0])) == (1, 0)  # INPUT: in-device lo
    assert (int(rows_out["ingress_if"][0]), int(rows_out["egress_if"][0])) == (0, 1)  # OUTPUT: out-device lo
    assert before <= int(rows_in["ts_ns"][0]) <= sent
    assert int(rows_out["ts_ns"][0]) > sent + 20_000_000


def test_configuration_reaches_the_kernel(namespace):
    with entered(namespace), NflogSource(7, copy_range=100, flush_timeout_ms=25) as source:
        port_id = source._sock.getsockname()[0]
        with open("/proc/thread-self/net/netfilter/nfnetlink_log") as table:
            rows = [line.split() for line in table]
    # group, peer port id, queue length, copy mode, copy range, flush timeout (1/100 s), use
    assert [row[:6] for row in rows] == [["7", str(port_id), "0", "2", "100", "3"]]


def test_second_source_on_a_bound_group_is_a_one_line_error(namespace):
    with entered(namespace):
        with NflogSource(7):
            with pytest.raises(SourceError) as failure:
                NflogSource(7)
        message = str(failure.value)
        assert "\n" not in message and message.startswith("nflog:7: ") and "already bound" in message
        assert failure.value.errno == errno.EPERM
        with NflogSource(7):  # closing the first one freed the group
            pass


def test_overrun_is_counted_and_reading_continues(namespace):
    burst, after = 2000, 5
    with entered(namespace), NflogSource(9, receive_buffer=4096) as source:
        send(4, 9996, [20] * burst)  # nobody reads meanwhile: the socket's buffer overflows
        first, _ = collect(source, burst, deadline_s=0.3)
        overrun = source.counters()
        send(4, 9996, [30] * after)
        later, prefixes = collect(source, after)
        counters = source.counters()
    assert overrun["socket overruns"] >= 1 and 0 < len(first) < burst
    assert len(later) == after and set(later["l3_bytes"]) == {58} and set(prefixes) == {b"burst: "}
    # the kernel's sequence numbers account for every frame it logged
    assert counters["frames"] + counters["frames lost"] == burst + after
    assert counters["frames"] == len(first) + len(later) and counters["malformed"] == 0


# --- the message walker, against a plain-Python twin -----------------------------------


def twin_walk(data: bytes, big: bool, now_ns: int, next_seq: int):
    """What ``walk_netlink_messages`` computes, one message at a time."""
    order = ">" if big else "<"
    records, malformed, errors, lost, p = [], 0, 0, 0, 0
    while p < len(data):
        if len(data) - p < 16:
            malformed += 1
            break
        length, mtype = struct.unpack_from(order + "IH", data, p)
        if length < 16 or length > len(data) - p:
            malformed += 1
            break
        if mtype == 0x0400 and length < 20:
            malformed += 1
        elif mtype == 0x0400:
            stamp, q = now_ns, p + 20
            while p + length - q >= 4:
                alen, atype = struct.unpack_from(order + "HH", data, q)
                if alen < 4 or alen > p + length - q:
                    break
                if atype & 0x3FFF == 3 and alen >= 20:
                    sec, usec = struct.unpack_from(">QQ", data, q + 4)
                    stamp = (sec * 10**9 + usec * 1000) % 2**64
                elif atype & 0x3FFF == 12 and alen >= 8:
                    (seq,) = struct.unpack_from(">I", data, q + 4)
                    if next_seq >= 0:
                        lost += (seq - next_seq) % 2**32
                    next_seq = (seq + 1) % 2**32
                q += (alen + 3) & ~3
            records.append((p + 16, length - 16, stamp))
        elif mtype == 2 and length >= 20 and struct.unpack_from(order + "i", data, p + 16)[0]:
            errors += 1
        p += (length + 3) & ~3
    return records, malformed, errors, lost


def kernel_walk(data: bytes, big: bool, now_ns: int, next_seq: int):
    """The kernel on ``data`` followed by bytes it must not read."""
    buf = np.frombuffer(data + b"\xff" * 64, np.uint8)
    cap = len(data) // 20 + 1
    offset, caplen = np.zeros(cap, np.uint64), np.zeros(cap, np.uint32)
    origlen, ts_ns = np.zeros(cap, np.uint32), np.zeros(cap, np.uint64)
    n, malformed, errors, lost = walk_netlink_messages(buf, 0, len(data), big, now_ns, 0, offset, caplen,
                                                       origlen, ts_ns, np.array([next_seq], np.int64))
    assert (caplen[:n] == origlen[:n]).all()
    return list(zip(offset[:n].tolist(), caplen[:n].tolist(), ts_ns[:n].tolist())), malformed, errors, lost


def attr(atype: int, value: bytes, order: str = NATIVE) -> bytes:
    return struct.pack(order + "HH", 4 + len(value), atype) + value + b"\0" * (-len(value) % 4)


def message(mtype: int, body: bytes, order: str = NATIVE, length: int | None = None) -> bytes:
    data = struct.pack(order + "IHHII", 16 + len(body) if length is None else length, mtype, 0, 0, 0) + body
    return data + b"\0" * (-len(data) % 4)


def packet(*attributes: bytes, order: str = NATIVE) -> bytes:
    return message(0x0400, struct.pack("!BBH", 2, 0, 7) + b"".join(attributes), order)


def test_walker_records_packets_and_counts_the_rest():
    ip = bytes.fromhex("4500001c0000400040110000c0000201c0000202") + struct.pack("!HHHH", 1, 2, 8, 0)
    first = packet(attr(1, b"\x08\x00\x01\x00"), attr(3, struct.pack(">QQ", 1_700_000_000, 123_456)),
                   attr(12, struct.pack(">I", 5)), attr(9, ip))
    datagram = b"".join([
        first,
        message(3, b"\0" * 4),                                     # NLMSG_DONE
        message(2, struct.pack(NATIVE + "i", -errno.EPERM) + b"\0" * 16),  # an error
        message(2, struct.pack(NATIVE + "i", 0) + b"\0" * 16),     # an acknowledgement
        message(0x0400, b""),                                      # no nfgenmsg: malformed, skipped
        packet(attr(12, struct.pack(">I", 9)), attr(10, b"x\0")),  # 6, 7, 8 lost
        packet(struct.pack(NATIVE + "HH", 99, 3)),                 # attribute past the end
        message(0x0400, b"", length=8),                            # malformed: ends the walk
        packet(attr(9, ip)),                                       # never reached
    ])
    records, malformed, errors, lost = kernel_walk(datagram, sys.byteorder == "big", NOW_NS, -1)
    assert (records, malformed, errors, lost) == twin_walk(datagram, sys.byteorder == "big", NOW_NS, -1)
    assert [ts for _, _, ts in records] == [1_700_000_000_123_456_000, NOW_NS, NOW_NS]
    assert records[0][:2] == (16, len(first) - 16)
    assert (malformed, errors, lost) == (2, 1, 3)


@pytest.mark.parametrize("data", [b"\x01", b"\0" * 15, message(0x0400, b"\0" * 8, length=400)])
def test_walker_stops_at_a_cut_message(data):
    assert kernel_walk(data, False, NOW_NS, -1) == ([], 1, 0, 0) == twin_walk(data, False, NOW_NS, -1)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=40),
    st.builds(lambda a, o: packet(*a, order=o),
              st.lists(st.builds(attr, st.sampled_from([1, 3, 9, 10, 12, 0x4003]), st.binary(max_size=24)),
                       max_size=4), st.sampled_from("<>"))), max_size=6),
    st.booleans(), st.integers(-1, 2**32 - 1))
def test_walker_matches_its_twin(parts, big, next_seq):
    data = b"".join(parts)
    assert kernel_walk(data, big, NOW_NS, next_seq) == twin_walk(data, big, NOW_NS, next_seq)
