"""The feed's defences: msgpack limits, clamped agent clocks, socket file modes, CurveZMQ keys.

Real ZeroMQ sockets and a real agent-side client throughout; the end-to-end
test runs ``flowmeter run`` with a feed and counts what a real collector got.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import msgpack
import pytest

from flowmeter.capture.sources.feed import (CLOCK_SKEW, OVER_LIMITS, TOO_MANY_FRAMES, FeedDecoder, FeedSource)
from flowmeter.capture.sources.feedclient import FeedClient, example_frames, metadata_frame, pack_message

REPO = Path(__file__).resolve().parents[2]
SKEW_NS = 5 * 10**9


@pytest.fixture
def where():
    """A short-lived directory (a socket path must stay under 108 octets)."""
    path = tempfile.mkdtemp(prefix="fm-feedsec-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def frame(t: int, sport: int = 5353) -> dict:
    return metadata_frame("10.8.0.2", "198.51.100.53", 17, 76, sport=sport, dport=53, t=t, peer=7)


def collect(source: FeedSource, messages: int, deadline_s: float = 10.0) -> list:
    """Every row read until the source has counted ``messages`` messages (or the deadline)."""
    rows: list = []
    stop = time.monotonic() + deadline_s
    while time.monotonic() < stop:
        for batch in source.read(0.05):
            rows.extend(zip(batch["sport"].tolist(), batch["ts_ns"].tolist()))
        if source.counters()["messages"] >= messages:
            break
    return rows


# --- msgpack limits ---------------------------------------------------------------------

def _flood_of_maps() -> bytes:
    """1 MiB whose every octet after the header is an empty map: a million maps if unpacked."""
    head = b"\x82\xa1v\x01\xa6frames"
    n = (1 << 20) - len(head) - 5
    return head + b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n


def _nested_flood() -> bytes:
    """Frames of 16 unknown keys, each an array of 4000 empty arrays: within every length limit,
    about 250 000 arrays in all."""
    inner = b"\xdc" + (4000).to_bytes(2, "big") + b"\x90" * 4000
    one = b"\xde\x00\x10" + b"".join(bytes([0xa1, 0x61 + i]) + inner for i in range(16))
    n = ((1 << 20) - 64) // len(one)
    return b"\x82\xa1v\x01\xa6frames" + b"\xdc" + n.to_bytes(2, "big") + one * n


def _peak_decoding(decoder: FeedDecoder, data: bytes) -> int:
    tracemalloc.start()
    try:
        decoder.decode(data)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("make, cause", [(_flood_of_maps, TOO_MANY_FRAMES), (_nested_flood, OVER_LIMITS)])
def test_a_hostile_msgpack_message_is_dropped_with_bounded_memory(make, cause):
    data = make()
    assert len(data) > 1_000_000
    decoder = FeedDecoder(log=lambda line: None)
    legal = pack_message(example_frames(4096))
    decoder.decode(legal)  # the kernels are compiled before anything is measured
    legal_peak = _peak_decoding(decoder, legal)
    hostile_peak = _peak_decoding(decoder, data)
    # Unbounded, the flood of maps took 73 MiB and the nested one 64 MiB (traced); a legal
    # message of 4096 frames about 3 MiB.
    assert hostile_peak < max(legal_peak, 4 << 20), (hostile_peak, legal_peak)
    assert decoder.counters() == {"messages": 3, "frames": 2 * 4096, f"dropped messages: {cause}": 1}


@pytest.mark.parametrize("value", [
    {f"k{i}": i for i in range(33)},  # a map of more keys than any frame has
    "x" * 513,  # a str longer than any reason
    msgpack.ExtType(1, b"x"),  # no ext in the schema
])
def test_values_beyond_what_a_legal_message_holds_are_counted(where, value):
    endpoint = f"ipc://{where}/feed.sock"
    with FeedSource(endpoint, log=lambda line: None) as source, FeedClient(endpoint) as client:
        client.send_raw(msgpack.packb({"v": 1, "frames": [frame(time.time_ns()), {"x": value}]}))
        client.send([frame(time.time_ns())])
        rows = collect(source, 2)
        counts = source.counters()
    assert len(rows) == 1
    assert counts == {"messages": 2, "frames": 1, f"dropped messages: {OVER_LIMITS}": 1}


# --- the agent's clock --------------------------------------------------------------------

def test_a_skewed_agent_clock_is_clamped_to_this_hosts_and_counted(where):
    endpoint = f"ipc://{where}/feed.sock"
    lines: list[str] = []
    hour = 3600 * 10**9
    with FeedSource(endpoint, log=lines.append, max_skew_ns=SKEW_NS) as source, FeedClient(endpoint) as client:
        before = time.time_ns()
        client.send([frame(before + hour, 1), frame(before, 2), frame(before - 2 * hour, 3),
                     frame(before + SKEW_NS // 2, 4)])
        client.send([frame(time.time_ns() + 30 * 10**9, 5)])  # within the log interval: held back
        rows = collect(source, 2)
        after = time.time_ns()
        counts = source.counters()
    by_port = dict(rows)  # sport -> ts_ns
    assert sorted(by_port) == [1, 2, 3, 4, 5]
    for port in (1, 3, 5):  # metered at this host's clock
        assert before <= by_port[port] <= after
    assert by_port[2] == before and by_port[4] == before + SKEW_NS // 2  # within the bound: as sent
    assert counts == {"messages": 2, "frames": 5, f"frames with {CLOCK_SKEW}": 3}
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "metered 2 frames" in lines[0] and "7200.0" in lines[0] and "behind it" in lines[0]
    assert "FeedClockSkewSeconds, 5 s" in lines[0]


def test_the_largest_skew_since_the_last_line_is_in_the_next(where):
    now = [0.0]
    lines: list[str] = []
    decoder = FeedDecoder(log=lines.append, clock=lambda: now[0], max_skew_ns=SKEW_NS, log_interval_s=10)
    wall = time.time_ns()
    decoder.decode(pack_message([frame(wall + 60 * 10**9)]))
    decoder.decode(pack_message([frame(wall + 900 * 10**9)]))  # held back ...
    now[0] = 11
    decoder.decode(pack_message([frame(wall + 7 * 10**9)]))  # ... and said here
    assert len(lines) == 2
    assert "60." in lines[0] and "ahead of it" in lines[0]
    assert "900." in lines[1] and "(and 1 more like it" in lines[1]
    assert decoder.counters()[f"frames with {CLOCK_SKEW}"] == 3
