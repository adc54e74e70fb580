"""Message sizes that fit the path: re-cutting, EMSGSIZE, UDP GSO over a small MTU.

The sends are real: each test that sends makes a network namespace of its
own and lowers the MTU of that namespace's loopback (``ip link set lo mtu``),
so the kernel's path MTU, its ``EMSGSIZE`` and its ``EINVAL`` for segments
over the MTU are the kernel's, not a mock's.
"""
from __future__ import annotations

import errno
import socket
import time

import numpy as np
import pytest

from exporter.exporting import ExportingProcess, ExportSettings
from exporter.message import HEADER, SET_HEADER, Message, encode, message_rows, recut
from exporter.template import default_registry
from exporter.transport import CollectorAddress, UdpTransport
from tests.support.collectors import UdpSink
from tests.support.netns import Namespaces, available, entered
from tests.support.synthetic import synthetic_records

REGISTRY = default_registry()
BY_ID = {t.template_id: t for t in REGISTRY}
V4, V6 = "ipv4_tcp", "ipv6_udp"


def sets(msg: bytes) -> list[tuple[int, bytes]]:
    """(set id, body) of each set of one message."""
    length = HEADER.unpack_from(msg)[1]
    assert length == len(msg)
    off, out = 16, []
    while off < length:
        sid, slen = SET_HEADER.unpack_from(msg, off)
        out.append((sid, bytes(msg[off + 4:off + slen])))
        off += slen
    return out


def data_bytes(messages, template_id: int) -> bytes:
    return b"".join(body for m in messages for sid, body in sets(bytes(m)) if sid == template_id)


def record_count(msg: bytes) -> int:
    return sum(len(body) // BY_ID[sid].record_length for sid, body in sets(msg) if sid >= 256)


def check_sequence(messages: list[bytes]) -> int:
    """Every header's sequence number is the data records before it, per domain (RFC 7011 §3.1)."""
    expected: dict[int, int] = {}
    for m in messages:
        seq, domain = HEADER.unpack_from(m)[3:5]
        assert seq == expected.get(domain, 0), f"domain {domain}: sequence {seq}, {expected.get(domain, 0)} expected"
        expected[domain] = expected.get(domain, 0) + record_count(m)
    return sum(expected.values())


# --- re-cutting, no network ---------------------------------------------------

def test_recut_of_one_set_rows_keeps_every_record_and_the_totals():
    t = REGISTRY[V4]
    recs = synthetic_records(V4, 1000, seed=3)
    wire = encode(t, recs)
    per = (1452 - 20) // t.record_length
    rows = message_rows(t, wire, 0, 1000 // per, per, domain=7)
    for size in (1392, 1252, 1232, 600, 256):
        cuts = recut(rows, size, BY_ID.get)
        new = [r for c in cuts for r in c.rows]
        assert all(len(r) <= size for r in new)
        assert data_bytes(new, t.template_id) == bytes(wire[:len(rows) * per * t.record_length])
        assert all(HEADER.unpack_from(bytes(r))[4] == 7 for r in new)
        assert [c.records for c in cuts for _ in c.rows] == [record_count(bytes(r)) for r in new]
        kept = recs[:len(rows) * per]
        assert sum(int(c.packets.sum()) for c in cuts) == int(kept["packetDeltaCount"].sum())
        assert sum(int(c.octets.sum()) for c in cuts) == int(kept["octetDeltaCount"].sum())
        assert len(cuts) <= 2  # full messages in one array, the rest in one message


def test_recut_of_a_message_of_several_sets_keeps_their_order():
    t4, t6 = REGISTRY[V4], REGISTRY[V6]
    r4, r6 = synthetic_records(V4, 9, seed=1), synthetic_records(V6, 7, seed=2)
    m = Message(1452)
    m.begin(3)
    assert m.add_records(t4, encode(t4, r4)) == 9
    assert m.add_records(t6, encode(t6, r6)) == 7
    row = np.frombuffer(bytes(m.finish(0, 0)), dtype=np.uint8).reshape(1, -1)
    cuts = recut(row, 300, BY_ID.get)
    new = [bytes(r) for c in cuts for r in c.rows]
    assert all(len(r) <= 300 for r in new) and len(new) > 2
    assert data_bytes(new, t4.template_id) == bytes(encode(t4, r4))
    assert data_bytes(new, t6.template_id) == bytes(encode(t6, r6))
    ids = [sid for r in new for sid, _ in sets(r)]
    assert ids == sorted(ids, key=lambda i: i != t4.template_id)  # every v4 set before every v6 one
    assert sum(int(c.packets[0]) for c in cuts) == int(r4["packetDeltaCount"].sum() + r6["packetDeltaCount"].sum())


# --- real sends in a namespace with a small loopback MTU ------------------------

@pytest.fixture
def ns():
    why = available()
    assert not why, why
    with Namespaces() as namespaces:
        name = namespaces.add("mtu")
        yield namespaces, name


def Receiver(family: int) -> UdpSink:
    """A UDP socket in the namespace (IPv4 or IPv6 loopback) that keeps every datagram."""
    return UdpSink(0.2, "::1" if family == socket.AF_INET6 else "127.0.0.1")


def set_mtu(namespaces: Namespaces, name: str, mtu: int) -> None:
    namespaces.run(name, "ip", "link", "set", "lo", "mtu", str(mtu))


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_emsgsize_recuts_queued_messages_without_loss_or_template_storm(ns, family):
    namespaces, name = ns
    t = REGISTRY[V4]
    set_mtu(namespaces, name, 1500)
    with entered(name):
        rx = Receiver(family)
        exp = ExportingProcess(ExportSettings(collectors=(rx.address,), stats_interval_s=0, refresh_messages=0,
                                              refresh_s=600), REGISTRY)
    s = exp.sessions[0]
    assert s.message_size == 1452  # MaxMessageSize, below the path's 1472 / 1452
    batches = [synthetic_records(V4, 700, seed=i) for i in range(4)]
    now = time.monotonic()
    exp.export(t, batches[0], 5, now)
    # the tunnel shrinks: the next messages are made at 1452 (the path is read every few seconds),
    # the kernel refuses them, they are cut at the new size and go again
    set_mtu(namespaces, name, 1280)
    exp.export(t, batches[1], 5, now + 0.1)
    exp.export(t, batches[2], 5, now + 0.2)
    small = 1280 - (48 if family == socket.AF_INET6 else 28)
    assert s.message_size == small
    # it grows back once the path is read again
    set_mtu(namespaces, name, 1500)
    exp.export(t, batches[3], 5, now + 5)
    exp.flush(now + 5)
    c = s.counters
    assert c.not_sent_messages == 0 and c.errors == {}
    assert c.refused >= 1 and c.recuts > 0
    assert s.message_size == 1452
    msgs = rx.messages()
    assert check_sequence(msgs) == sum(len(b) for b in batches)
    assert data_bytes(msgs, t.template_id) == b"".join(bytes(encode(t, b)) for b in batches)
    templates = [m for m in msgs if any(sid < 256 for sid, _ in sets(m))]
    assert len(templates) == 1 == c.template_messages  # the first only: no template storm
    sizes = [len(m) for m in msgs]
    per = (1452 - 20) // t.record_length
    assert max(sizes) == 20 + per * t.record_length  # full messages at 1452 before and after
    assert 20 + (small - 20) // t.record_length * t.record_length in sizes  # and full ones at the small size
    assert sum(record_count(m) for m in msgs) == c.data_records


def test_template_messages_are_made_at_the_session_size(ns):
    namespaces, name = ns
    set_mtu(namespaces, name, 1280)
    with entered(name):
        rx = Receiver(socket.AF_INET)
        exp = ExportingProcess(ExportSettings(collectors=(rx.address,), max_message=9000, stats_interval_s=1),
                               REGISTRY)
    assert exp.sessions[0].message_size == 1252  # the path wins over a larger MaxMessageSize
    t = REGISTRY[V6]
    exp.export(t, synthetic_records(V6, 500), 1)
    exp.send_statistics()
    exp.flush()
    msgs = rx.messages()
    assert max(len(m) for m in msgs) <= 1252
    assert check_sequence(msgs) == 501  # the flow records and one statistics record
    assert exp.sessions[0].counters.recuts == 0  # built at its size from the start: nothing to cut


def test_segmented_send_over_the_path_mtu_is_emsgsize_and_keeps_gso(ns):
    namespaces, name = ns
    set_mtu(namespaces, name, 1280)
    with entered(name):
        rx = Receiver(socket.AF_INET)
        tx = UdpTransport(rx.address)
    try:
        assert tx.path_mtu() == 1280 and tx.path_budget() == 1252
        sent, error = tx.send_rows(np.zeros((8, 1400), dtype=np.uint8), 0.0)
        assert sent == 0 and error is not None and error.errno == errno.EMSGSIZE and error.lost == 8
        assert tx.gso  # the kernel's EINVAL meant "segments over the MTU", not "cannot segment"
        sent, error = tx.send_rows(np.zeros((8, 1252), dtype=np.uint8), 0.0)
        assert (sent, error, tx.gso) == (8, None, True)
        assert len(rx.messages()) == 8
    finally:
        tx.close()


def test_segmented_send_the_kernel_cannot_make_turns_gso_off(ns):
    namespaces, name = ns
    set_mtu(namespaces, name, 1280)
    with entered(name):
        rx = Receiver(socket.AF_INET)
        tx = UdpTransport(rx.address)
    try:
        # a socket without UDP checksums cannot be segmented: the kernel says EINVAL at any size
        tx._sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_NO_CHECK", 11), 1)
        sent, error = tx.send_rows(np.zeros((8, 1000), dtype=np.uint8), 0.0)
        assert (sent, error, tx.gso) == (8, None, False)  # one send each instead, all left
        assert len(rx.messages()) == 8
    finally:
        tx.close()


def test_collectors_of_different_sizes_and_domains(ns, tmp_path):
    namespaces, name = ns
    set_mtu(namespaces, name, 1280)
    path = tmp_path / "out.ipfix"
    with entered(name):
        rx = Receiver(socket.AF_INET6)
        udp = CollectorAddress("udp", rx.address.host, rx.address.port, domain=9)
        exp = ExportingProcess(ExportSettings(collectors=(udp, CollectorAddress("file", path=str(path))),
                                              stats_interval_s=1), REGISTRY)
    t = REGISTRY[V4]
    recs = synthetic_records(V4, 2000, seed=5)
    exp.export(t, recs, 5)
    exp.send_statistics()
    exp.close()
    udp_msgs = rx.messages()
    data = path.read_bytes()
    file_msgs, off = [], 0
    while off < len(data):
        n = int.from_bytes(data[off + 2:off + 4], "big")
        file_msgs.append(data[off:off + n])
        off += n
    assert 1400 < max(len(m) for m in file_msgs) <= 1452 and max(len(m) for m in udp_msgs) <= 1232
    for msgs, flow_domain in ((udp_msgs, 9), (file_msgs, 5)):
        assert data_bytes(msgs, t.template_id) == bytes(encode(t, recs))
        assert {HEADER.unpack_from(m)[4] for m in msgs} == {flow_domain, 0}  # statistics stay in domain 0
        assert check_sequence(msgs) == 2001
    totals = exp.totals()["collectors"]
    assert totals[str(udp)]["message_size"] == 1232 and totals[str(udp)]["recuts"] > 0
    assert totals[f"File/{path}"]["message_size"] == 1452 and totals[f"File/{path}"]["recuts"] == 0


def test_reload_changes_a_collectors_size_and_domain(ns):
    namespaces, name = ns
    set_mtu(namespaces, name, 1500)
    with entered(name):
        rx = Receiver(socket.AF_INET)
        exp = ExportingProcess(ExportSettings(collectors=(rx.address,), stats_interval_s=0), REGISTRY)
    t = REGISTRY[V4]
    exp.export(t, synthetic_records(V4, 300, seed=1), 5)
    exp.flush()
    smaller = CollectorAddress("udp", rx.address.host, rx.address.port, max_message=700)
    exp.reload(ExportSettings(collectors=(smaller,), stats_interval_s=0))
    exp.export(t, synthetic_records(V4, 300, seed=2), 5)
    exp.flush()
    first = rx.messages()
    assert check_sequence(first) == 600  # the same session: its sequence numbers go on
    assert max(len(m) for m in first[-3:]) <= 700
    other = CollectorAddress("udp", rx.address.host, rx.address.port, max_message=700, domain=11)
    exp.reload(ExportSettings(collectors=(other,), stats_interval_s=0))
    exp.export(t, synthetic_records(V4, 300, seed=3), 5)
    exp.flush()
    second = rx.messages()
    assert {HEADER.unpack_from(m)[4] for m in second} == {11}
    assert check_sequence(second) == 300  # another domain: its own sequence numbers, from 0
    assert any(sid < 256 for sid, _ in sets(second[0]))  # its templates first
