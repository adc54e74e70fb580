"""The datapath feed: real ZeroMQ sockets on ipc:// endpoints, a real agent-side client."""
from __future__ import annotations

import ipaddress
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import msgpack
import numpy as np
import pytest
import zmq

from flowmeter.capture.sources.feed import (BAD_ADDRESS, BAD_AGENT, BAD_DIR, BAD_IP, BAD_LEN, BAD_OCTET, BAD_PEER,
                                            BAD_PORT, BAD_PROTO, BAD_REASON, BAD_T, BAD_VERDICT, CUT_SHORT,
                                            FRAME_NOT_MAP, FUTURE_T, MULTIPART, NO_FRAMES, NOT_IP, NOT_MAP, NOT_MSGPACK,
                                            OTHER_PROTOCOL, TOO_BIG, TOO_MANY_FRAMES, TRANSPORT_SLACK, TRUNCATED,
                                            TWO_FORMS, UNEXPECTED, WRONG_VERSION, AllowedKeys, FeedDecoder,
                                            FeedSecurity, FeedSource, ServerKey, SourceError)
from flowmeter.capture.sources.feedclient import (FeedClient, example_frames, header_frame, main, metadata_frame,
                                                  pack_message)
from flowmeter.ipc.packets import DIR_EGRESS, DIR_INGRESS, PACKET_DTYPE
from tests.support.pcapwrite import ipv4, ipv6, tcp, udp

DROP_PREFIXES = (("drop", 129), ("deny", 129), ("reject", 130))  # the DropPrefixes default, parsed
T0 = 1_700_000_000_000_000_000


@pytest.fixture
def endpoint():
    """An ipc:// endpoint in a short-lived directory (a socket path must stay under 108 octets)."""
    where = tempfile.mkdtemp(prefix="fm-feed-")
    yield f"ipc://{where}/feed.sock"
    shutil.rmtree(where, ignore_errors=True)


def v4(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def v6(text: str) -> tuple[int, int]:
    value = int(ipaddress.IPv6Address(text))
    return value >> 64, value & (2**64 - 1)


def collect(source: FeedSource, messages: int, deadline_s: float = 5.0) -> np.ndarray:
    """Every row read until the source has counted ``messages`` messages (or the deadline)."""
    rows = []
    stop = time.monotonic() + deadline_s
    while time.monotonic() < stop:
        for batch in source.read(0.05):
            assert batch.dtype == PACKET_DTYPE
            rows.append(batch)
        if source.counters()["messages"] >= messages:
            for batch in source.read(0):
                rows.append(batch)
            break
    return np.concatenate(rows) if rows else np.empty(0, PACKET_DTYPE)


def test_frames_of_both_forms_arrive_with_their_columns(endpoint):
    tcp4 = ipv4("10.0.0.2", "192.0.2.10", 6, tcp(40000, 443, 0x12), tos=0x28)
    udp6 = ipv6("2001:db8::2", "2001:db8:1::53", 17, udp(5353, 53, b"q" * 20), tclass=0xb8)
    frames = [
        header_frame(tcp4, t=T0, dir="in", peer=7),
        header_frame(udp6, t=T0 + 1, dir="out", verdict="drop", reason="Deny: rule 5", peer=2**32 - 1),
        metadata_frame("10.1.1.1", "10.2.2.2", 17, 1400, sport=1234, dport=4321, t=T0 + 2, dir="out",
                       verdict="drop", reason="reject-all", tos=4),
        metadata_frame("2001:db8::1", "2001:db8::2", 58, 104, icmp_type=128, t=T0 + 3, dir="in",
                       verdict="drop", reason="Policer"),  # a reason named like a DropPrefixes value
        metadata_frame("192.0.2.1", "192.0.2.2", 6, 52, sport=22, dport=50000, tcp_flags=0x11, t=T0 + 4,
                       verdict="drop", reason=140),  # a forwardingStatus number
        metadata_frame("192.0.2.1", "192.0.2.2", 47, 576, t=T0 + 5, verdict="drop"),  # no reason: AclDeny
        metadata_frame("192.0.2.1", "192.0.2.2", 47, 576, t=T0 + 6, verdict="drop", reason="why not"),
        metadata_frame("192.0.2.1", "192.0.2.2", 1, 84, icmp_type=8, t=T0 + 7, reason="ignored when forwarded"),
    ]
    with FeedSource(endpoint, drop_reasons=DROP_PREFIXES) as source, FeedClient(endpoint, agent="wgd") as client:
        assert client.send(frames)
        rows = collect(source, 1)
        assert source.counters() == {"messages": 1, "frames": 8}
    assert list(rows["ts_ns"]) == [T0 + i for i in range(8)]
    a, b, c, d, e, f, g, h = rows
    # header form, IPv4 TCP: decoded from the header; direction, verdict and peer from the frame
    assert (a["ip_version"], a["src_hi"], a["src_lo"], a["dst_lo"]) == (4, 0, v4("10.0.0.2"), v4("192.0.2.10"))
    assert (a["proto"], a["sport"], a["dport"], a["tcp_flags"], a["tos"]) == (6, 40000, 443, 0x12, 0x28)
    assert (a["l3_bytes"], a["direction"], a["fwd_status"]) == (40, DIR_INGRESS, 0)
    assert (a["ingress_if"], a["egress_if"]) == (7, 0)  # received from peer 7
    # header form, IPv6 UDP, dropped: "Deny: rule 5" starts with the prefix "deny" (any case)
    assert (b["ip_version"], (b["src_hi"], b["src_lo"]), (b["dst_hi"], b["dst_lo"])) == (
        6, v6("2001:db8::2"), v6("2001:db8:1::53"))
    assert (b["proto"], b["sport"], b["dport"], b["tos"], b["l3_bytes"]) == (17, 5353, 53, 0xb8, 40 + 28)
    assert (b["direction"], b["fwd_status"]) == (DIR_EGRESS, 129)
    assert (b["ingress_if"], b["egress_if"]) == (0, 0)  # to peer 2**32-1, but dropped: it never left
    # metadata form
    assert (c["ip_version"], c["src_lo"], c["dst_lo"], c["proto"], c["sport"], c["dport"]) == (
        4, v4("10.1.1.1"), v4("10.2.2.2"), 17, 1234, 4321)
    assert (c["l3_bytes"], c["tos"], c["direction"], c["fwd_status"]) == (1400, 4, DIR_EGRESS, 130)
    assert (c["ingress_if"], c["egress_if"]) == (0, 0)  # no peer
    assert (d["ip_version"], (d["src_hi"], d["src_lo"]), d["proto"], d["icmp"]) == (
        6, v6("2001:db8::1"), 58, 128 * 256)
    assert d["fwd_status"] == 138
    assert (e["tcp_flags"], e["sport"], e["dport"], e["fwd_status"]) == (0x11, 22, 50000, 140)
    assert (f["proto"], f["fwd_status"], g["fwd_status"]) == (47, 129, 129)
    assert (h["icmp"], h["fwd_status"], h["direction"]) == (8 * 256, 0, DIR_INGRESS)


def test_each_peer_is_an_interface_ingress_from_it_egress_to_it():
    decoder = FeedDecoder(drop_reasons=DROP_PREFIXES)
    udp4 = ipv4("10.8.0.2", "192.0.2.10", 17, udp(5000, 53))
    frames = [header_frame(udp4, t=T0, dir="in", peer=3),
              header_frame(udp4, t=T0 + 1, dir="out", peer=4),
              metadata_frame("10.8.0.2", "192.0.2.10", 17, 28, sport=5000, dport=53, t=T0 + 2, dir="in", peer=5),
              metadata_frame("10.8.0.2", "192.0.2.10", 17, 28, sport=5000, dport=53, t=T0 + 3, dir="out", peer=6),
              metadata_frame("10.8.0.2", "192.0.2.10", 17, 28, t=T0 + 4, dir="out", peer=6, verdict="drop"),
              header_frame(udp4, t=T0 + 5, dir="in", peer=7, verdict="drop")]
    rows = decoder.decode(pack_message(frames))
    assert rows[["ingress_if", "egress_if"]].tolist() == [(3, 0), (0, 4), (5, 0), (0, 6), (0, 0), (7, 0)]
    assert rows["direction"].tolist() == [DIR_INGRESS, DIR_EGRESS] * 2 + [DIR_EGRESS, DIR_INGRESS]


def test_len_of_a_header_frame_wins_over_the_header(endpoint):
    whole = ipv4("10.0.0.2", "192.0.2.10", 17, udp(1, 2, b"x" * 1000))
    frames = [header_frame(whole[:28], t=T0),  # cut after UDP: the IP total length still says 1028
              header_frame(whole[:28], t=T0 + 1, length=60000)]  # e.g. a segmentation-offload super-packet
    with FeedSource(endpoint) as source, FeedClient(endpoint) as client:
        client.send(frames)
        rows = collect(source, 1)
    assert list(rows["l3_bytes"]) == [1028, 60000]
    assert list(rows["dport"]) == [2, 2]


GOOD = metadata_frame("10.0.0.1", "10.0.0.2", 17, 100, sport=1, dport=2, t=T0)


def frame(**changes):
    """GOOD with keys changed (a value of None removes the key)."""
    out = dict(GOOD, **changes)
    return {k: v for k, v in out.items() if v is not None}


@pytest.mark.parametrize("bad, cause", [
    ("not a frame", FRAME_NOT_MAP),
    (frame(t=None), BAD_T),
    (frame(t=-1), BAD_T),
    (frame(t=2**64 - 1 + 0.5), BAD_T),
    (frame(t=True), BAD_T),
    (frame(t=2**64 - 1), FUTURE_T),
    (frame(t=time.time_ns() + 3600 * 10**9), FUTURE_T),
    (frame(dir="sideways"), BAD_DIR),
    (frame(dir=["in"]), BAD_DIR),
    (frame(verdict=None), BAD_VERDICT),
    (frame(verdict="Forward"), BAD_VERDICT),
    (frame(verdict="drop", reason="x" * 129), BAD_REASON),
    (frame(verdict="drop", reason=64), BAD_REASON),
    (frame(verdict="drop", reason=b"deny"), BAD_REASON),
    (frame(peer=2**32), BAD_PEER),
    (frame(peer="wg0"), BAD_PEER),
    (frame(src=None, dst=None, proto=None, sport=None, dport=None, ip="45000014"), BAD_IP),
    (frame(ip=ipv4("10.0.0.1", "10.0.0.2", 17, udp(1, 2))), TWO_FORMS),
    (frame(src=b"\1\2\3"), BAD_ADDRESS),
    (frame(src=ipaddress.IPv6Address("::1").packed), BAD_ADDRESS),
    (frame(dst="10.0.0.2"), BAD_ADDRESS),
    (frame(dst=None), BAD_ADDRESS),
    (frame(proto=256), BAD_PROTO),
    (frame(proto=None), BAD_PROTO),
    (frame(len=None), BAD_LEN),
    (frame(len=0), BAD_LEN),
    (frame(len=2**32), BAD_LEN),
    (frame(sport=65536), BAD_PORT),
    (frame(dport=-1), BAD_PORT),
    (frame(tos=256), BAD_OCTET),
    (frame(tcp_flags=2), OTHER_PROTOCOL),
    (frame(proto=47), OTHER_PROTOCOL),
    (frame(sport=0, dport=0, icmp_type=8), OTHER_PROTOCOL),
    (frame(src=None, dst=None, proto=None, sport=None, dport=None, ip=b"\x00" * 40), NOT_IP),
    (frame(src=None, dst=None, proto=None, sport=None, dport=None, ip=b"\x45\x00\x00"), CUT_SHORT),
    (frame(src=None, dst=None, proto=None, sport=None, dport=None, ip=b""), CUT_SHORT),
])
def test_a_bad_frame_is_dropped_alone(endpoint, bad, cause):
    with FeedSource(endpoint) as source, FeedClient(endpoint) as client:
        client.send([frame(t=T0), bad, frame(t=T0 + 2)])
        rows = collect(source, 1)
        counts = source.counters()
    assert list(rows["ts_ns"]) == [T0, T0 + 2]
    assert counts == {"messages": 1, "frames": 2, f"dropped frames: {cause}": 1}


def test_unknown_keys_are_ignored_and_counted(endpoint):
    lines = []
    with FeedSource(endpoint, log=lines.append) as source, FeedClient(endpoint) as client:
        message = {"v": 1, "later": {"x": 1}, "frames": [frame(colour="blue"), frame(t=T0 + 1)]}
        client.send_raw(msgpack.packb(message))
        rows = collect(source, 1)
        counts = source.counters()
    assert len(rows) == 2
    assert counts == {"messages": 1, "frames": 2, "frames with unknown keys": 1}
    assert any("'colour'" in line for line in lines)


def test_hostile_messages_are_counted_and_good_ones_keep_flowing(endpoint):
    max_message, max_frames = 8192, 16
    good = iter(range(1000))

    def good_message() -> bytes:
        return pack_message([frame(t=T0 + next(good))])

    hostile = [
        (pack_message([GOOD])[:-3], TRUNCATED),
        (b"\xc1" + pack_message([GOOD]), NOT_MSGPACK),  # 0xc1 is never used
        (pack_message([GOOD]) + b"\x00", NOT_MSGPACK),  # octets after the map
        (b"GET / HTTP/1.1\r\n\r\n", NOT_MSGPACK),
        (msgpack.packb({1: 2}), NOT_MSGPACK),  # map keys must be strings
        (msgpack.packb({"v": "caf\u00e9"}, use_bin_type=True).replace(b"\xc3\xa9", b"\xff\xfe"), NOT_MSGPACK),
        (msgpack.packb([1, {"v": 1, "frames": []}]), NOT_MAP),
        (msgpack.packb("frames"), NOT_MAP),
        (msgpack.packb({"v": 2, "frames": [GOOD]}), WRONG_VERSION),
        (msgpack.packb({"v": "1", "frames": [GOOD]}), WRONG_VERSION),
        (msgpack.packb({"v": True, "frames": [GOOD]}), WRONG_VERSION),
        (msgpack.packb({"frames": [GOOD]}), WRONG_VERSION),
        (msgpack.packb({"v": 1, "frames": {"0": GOOD}}), NO_FRAMES),
        (msgpack.packb({"v": 1}), NO_FRAMES),
        (msgpack.packb({"v": 1, "frames": [GOOD] * (max_frames + 1)}), TOO_MANY_FRAMES),
        (msgpack.packb({"v": 1, "agent": "a" * 65, "frames": [GOOD]}), BAD_AGENT),
        (msgpack.packb({"v": 1, "agent": 7, "frames": [GOOD]}), BAD_AGENT),
        (pack_message([GOOD] * 300), TOO_BIG),  # over max_message, under what the transport refuses
        (b"\x91" * 5000, NOT_MSGPACK),  # arrays nested deeper than msgpack's stack
    ]
    assert max_message < len(pack_message([GOOD] * 300)) < max_message + TRANSPORT_SLACK
    expected: dict[str, int] = {}
    with FeedSource(endpoint, max_message=max_message, max_frames=max_frames, log=lambda line: None) as source, \
            FeedClient(endpoint) as client:
        sent = 0
        for data, cause in hostile:
            assert client.send_raw(good_message())
            assert client.send_raw(data)
            sent += 2
            expected[f"dropped messages: {cause}"] = expected.get(f"dropped messages: {cause}", 0) + 1
        assert client.send_raw(pack_message([GOOD]), pack_message([GOOD]))  # two parts: not a feed message
        assert client.send_raw(good_message())
        expected[f"dropped messages: {MULTIPART}"] = 1
        sent += 2
        rows = collect(source, sent)
        counts = source.counters()
    n_good = len(hostile) + 1
    assert sorted(rows["ts_ns"]) == [T0 + i for i in range(n_good)]
    assert counts == {"messages": sent, "frames": n_good, **expected}


def test_a_message_far_over_the_limit_is_refused_by_the_transport(endpoint):
    with FeedSource(endpoint, max_message=4096) as source, FeedClient(endpoint) as client:
        client.send([frame(t=T0)])
        client.send_raw(b"\x00" * (4096 + TRANSPORT_SLACK + 1))  # ZeroMQ closes this connection ...
        client.send([frame(t=T0 + 1)])  # ... and the client's socket reconnects
        rows = collect(source, 2)
        counts = source.counters()
    assert list(rows["ts_ns"]) == [T0, T0 + 1]
    assert counts == {"messages": 2, "frames": 2}


def mutations(rng: random.Random, valid: bytes):
    """Endless hostile messages: random octets, and valid messages damaged in every way."""
    junk = [None, True, -1, 2**64 - 1, 1.5, "", "in", "drop", b"", b"\x45" * 20, [], {}, {"t": 1}, [GOOD],
            msgpack.ExtType(5, b"x"), "x" * 200]
    while True:
        kind = rng.randrange(5)
        if kind == 0:
            yield rng.randbytes(rng.randrange(0, 300))
        elif kind == 1:  # flip octets
            data = bytearray(valid)
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            yield bytes(data)
        elif kind == 2:  # cut or splice
            a, b = sorted(rng.randrange(len(valid) + 1) for _ in range(2))
            yield valid[:a] + rng.randbytes(rng.randrange(8)) + valid[b:]
        else:  # well-formed msgpack, wrong values
            frames = [dict(GOOD), header_frame(ipv4("10.0.0.1", "10.0.0.2", 6, tcp(1, 2)), t=T0)]
            for f in frames:
                for _ in range(rng.randrange(1, 4)):
                    f[rng.choice(sorted(f) + ["ip", "len", "src", "reason", "peer"])] = rng.choice(junk)
            message = {"v": 1, "frames": frames}
            if kind == 4:
                message[rng.choice(["v", "frames", "agent"])] = rng.choice(junk)
            yield msgpack.packb(message, use_bin_type=True)


def test_fuzzed_messages_never_raise_out_of_read(endpoint):
    rng = random.Random(7011)
    valid = pack_message([GOOD, header_frame(ipv4("10.0.0.1", "10.0.0.2", 17, udp(1, 2)), t=T0)], agent="fuzz")
    hostile = mutations(rng, valid)
    sent = rows = 0
    with FeedSource(endpoint, max_message=4096, max_frames=64, log=lambda line: None) as source, \
            FeedClient(endpoint) as client:
        stop = time.monotonic() + 2.0
        while time.monotonic() < stop:
            for _ in range(200):
                assert client.send_raw(next(hostile))
            sent += 200
            rows += len(collect(source, sent))
        counts = source.counters()
    assert counts["messages"] == sent > 1000
    assert counts["frames"] == rows
    assert f"dropped messages: {UNEXPECTED}" not in counts


def test_log_lines_are_limited_to_one_per_cause_per_interval(endpoint):
    lines, now = [], [100.0]
    with FeedSource(endpoint, log=lines.append, log_interval_s=10.0, clock=lambda: now[0]) as source, \
            FeedClient(endpoint) as client:
        for _ in range(5):
            client.send_raw(b"\xc1")
            client.send_raw(msgpack.packb({"v": 9, "frames": []}))
            client.send([frame(dir="up")])
        collect(source, 15)
        assert len(lines) == 3
        assert sum(NOT_MSGPACK in line for line in lines) == 1
        assert sum(WRONG_VERSION in line for line in lines) == 1
        assert sum(BAD_DIR in line for line in lines) == 1
        now[0] += 9.0
        client.send_raw(b"\xc1")
        collect(source, 16)
        assert len(lines) == 3
        now[0] += 1.0
        client.send_raw(b"\xc1")
        collect(source, 17)
        counts = source.counters()
    assert len(lines) == 4
    assert NOT_MSGPACK in lines[3] and "and 5 more like it" in lines[3]
    assert all("\n" not in line for line in lines)
    assert counts[f"dropped messages: {NOT_MSGPACK}"] == 7


def test_a_taken_endpoint_is_a_one_line_error(endpoint):
    with FeedSource(endpoint):
        with pytest.raises(SourceError) as err:
            FeedSource(endpoint)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"feed:{endpoint}: cannot bind: ") and "in use" in message
    assert err.value.strerror == message[len(f"feed:{endpoint}: "):]  # what open_source names the source with

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        tcp_endpoint = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        public, secret = zmq.curve_keypair()
        keys = FeedSecurity(ServerKey("-", public, secret), AllowedKeys((), frozenset([zmq.curve_keypair()[0]])))
        with pytest.raises(SourceError, match=r"^feed:tcp://127\.0\.0\.1:\d+: cannot bind: .*in use"):
            FeedSource(tcp_endpoint, security=keys)


@pytest.mark.parametrize("target, why", [
    ("udp://127.0.0.1:4739", "not ipc://PATH or tcp://HOST:PORT"),
    ("tcp://127.0.0.1:99999", "a port from 1 to 65535"),
    ("tcp://127.0.0.1:*", "not tcp://HOST:PORT"),
    ("ipc:///nonexistent-directory/feed.sock", "No such file or directory"),
    ("ipc:///" + "x" * 120, "longer than"),
])
def test_a_bad_endpoint_is_a_one_line_error(target, why):
    with pytest.raises(SourceError, match=f"^feed:{re.escape(target)}: cannot bind: .*{re.escape(why)}") as err:
        FeedSource(target)
    assert "\n" not in str(err.value)


def test_an_ipc_path_that_is_no_socket_is_left_alone(endpoint):
    path = endpoint[len("ipc://"):]
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(SourceError, match="exists and is not a socket"):
        FeedSource(endpoint)
    with open(path) as f:
        assert f.read() == "precious"


def test_a_socket_file_left_behind_is_replaced_and_removed_on_close(endpoint):
    path = endpoint[len("ipc://"):]
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(path)  # bound, never listening: what a killed process leaves
    source = FeedSource(endpoint)
    assert os.path.exists(path)
    source.close()
    assert not os.path.exists(path)
    assert list(source.read(0)) == []
    source.close()


def test_fileno_wakes_a_selector_and_read_drains_it(endpoint):
    import selectors

    with FeedSource(endpoint) as source, FeedClient(endpoint) as client, selectors.DefaultSelector() as sel:
        sel.register(source.fileno(), selectors.EVENT_READ)
        client.send([frame(t=T0)])
        assert sel.select(timeout=5.0)
        rows = collect(source, 1)
    assert list(rows["ts_ns"]) == [T0]


def test_example_client_sends_frames_of_both_forms(endpoint, capsys):
    with FeedSource(endpoint, drop_reasons=DROP_PREFIXES) as source:
        assert main([endpoint, "--frames", "100", "--drop-every", "10", "--per-message", "32"]) == 0
        rows = collect(source, 4)
        counts = source.counters()
    assert "sent 100 frames in 4 messages" in capsys.readouterr().out
    assert counts == {"messages": 4, "frames": 100}
    assert np.count_nonzero(rows["fwd_status"] == 129) == 10  # "deny: example rule 7"
    assert sorted(np.unique(rows["ip_version"])) == [4, 6]
    assert sorted(np.unique(rows["direction"])) == [DIR_INGRESS, DIR_EGRESS]
    # each peer is an interface: frames from peers 1 and 3 ("in") came in on them, those to 2 and 4 left on them
    received, sent = rows["direction"] == DIR_INGRESS, (rows["direction"] == DIR_EGRESS) & (rows["fwd_status"] == 0)
    assert sorted(np.unique(rows["ingress_if"][received])) == [1, 3] and (rows["egress_if"][received] == 0).all()
    assert sorted(np.unique(rows["egress_if"][sent])) == [2, 4] and (rows["ingress_if"][sent] == 0).all()
    assert len(example_frames(3)) == 3


def test_example_client_runs_as_a_module(endpoint):
    with FeedSource(endpoint) as source:
        done = subprocess.run([sys.executable, "-m", "flowmeter.capture.sources.feedclient", endpoint, "--frames", "10"],
                              capture_output=True, text=True, timeout=60,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        assert done.returncode == 0, done.stderr
        rows = collect(source, 1)
    assert len(rows) == 10
