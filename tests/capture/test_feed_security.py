"""The feed's defences: msgpack limits, clamped agent clocks, socket file modes, CurveZMQ keys.

Real ZeroMQ sockets and a real agent-side client throughout; the end-to-end
test runs ``flowmeter run`` with a feed and counts what a real collector got.
"""
from __future__ import annotations

import grp
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import msgpack
import pytest
import zmq
import zmq.auth

from flowmeter.capture.sources.feed import (CLOCK_SKEW, FAILED_HANDSHAKE, OVER_LIMITS, TOO_MANY_FRAMES, UNKNOWN_KEY,
                                            FeedDecoder, FeedSecurity, FeedSource, SourceError, load_allowed_keys,
                                            load_server_key)
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


# --- CurveZMQ keys on a tcp feed ------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def keys(where):
    """A feed's key pair and two agents' (``flowmeter keygen``'s files), the first agent allowed."""
    out = {}
    for name in ("feed", "known", "stranger"):
        r = subprocess.run([sys.executable, "-m", "flowmeter.cli", "keygen", where, "--name", name],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode == 0, r.stderr
        out[name] = (f"{where}/{name}.key", f"{where}/{name}.key_secret")
    assert stat.S_IMODE(os.stat(out["feed"][1]).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(out["feed"][0]).st_mode) == 0o644
    return out


def security(keys, allowed=("known",)) -> FeedSecurity:
    return FeedSecurity(load_server_key(keys["feed"][1]), load_allowed_keys([keys[a][0] for a in allowed]))


def test_a_tcp_feed_without_keys_cannot_be_bound():
    with pytest.raises(SourceError, match=r"^feed:tcp://127\.0\.0\.1:\d+: cannot bind: a tcp feed takes only "
                                          r"agents holding CurveZMQ keys: set FeedServerKey and FeedAllowedKeys"):
        FeedSource(f"tcp://127.0.0.1:{free_port()}")


def test_only_an_agent_with_an_allowed_key_is_let_in_and_the_others_are_counted(keys):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    lines: list[str] = []
    with FeedSource(endpoint, log=lines.append, security=security(keys)) as source, \
            FeedClient(endpoint, server_key=keys["feed"][0], key=keys["known"][1]) as known, \
            FeedClient(endpoint, server_key=keys["feed"][0], key=keys["stranger"][1]) as stranger, \
            FeedClient(endpoint, server_key=zmq.curve_keypair()[0]) as wrong_server, \
            FeedClient(endpoint) as plain:
        now = time.time_ns()
        for i, client in enumerate((known, stranger, wrong_server, plain)):
            client.send([frame(now, sport=100 + i)])
        rows, counts = [], {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for batch in source.read(0.05):
                rows.extend(batch["sport"].tolist())
            counts = source.counters()
            if rows and counts.get(f"refused agents: {UNKNOWN_KEY}", 0) >= 1 \
                    and counts.get(f"refused agents: {FAILED_HANDSHAKE}", 0) >= 2:
                break
    assert rows == [100], counts  # the known agent's frame, none of the others'
    assert counts["messages"] == 1 and counts["frames"] == 1 and counts["agents admitted"] >= 1
    assert counts[f"refused agents: {UNKNOWN_KEY}"] >= 1  # the stranger
    assert counts[f"refused agents: {FAILED_HANDSHAKE}"] >= 2  # a wrong server key, no CURVE (each retries)
    stranger_key = zmq.auth.load_certificate(keys["stranger"][0])[0].decode()
    assert any(f"refused an agent from 127.0.0.1: its public key {stranger_key} is not in FeedAllowedKeys"
               in line for line in lines), lines
    assert any("its CurveZMQ handshake failed" in line for line in lines), lines
    assert all("\n" not in line for line in lines)


def test_allowed_keys_are_files_directories_or_z85_text(keys, where):
    known = zmq.auth.load_certificate(keys["known"][0])[0]
    stranger = zmq.auth.load_certificate(keys["stranger"][0])[0]
    assert load_allowed_keys([keys["known"][0]]).keys == {known}
    assert load_allowed_keys([where]).keys == {known, stranger, zmq.auth.load_certificate(keys["feed"][0])[0]}
    assert load_allowed_keys([known.decode()]).keys == {known}
    with pytest.raises(ValueError, match="is no key file, directory of .key files or 40-character Z85 key"):
        load_allowed_keys(["not a key"])
    with pytest.raises(ValueError, match=r"holds a public key only; FeedServerKey is the \.key_secret file"):
        load_server_key(keys["feed"][0])
    os.chmod(keys["feed"][1], 0o644)
    with pytest.raises(ValueError, match=r"other users may read it: chmod o-rwx it"):
        load_server_key(keys["feed"][1])


# --- flowmeter check --------------------------------------------------------------------------

def check(tmp: str, **settings) -> subprocess.CompletedProcess:
    path = Path(tmp) / "profile.json"
    path.write_text(json.dumps({"FlowMetadata": settings}))
    return subprocess.run([sys.executable, "-m", "flowmeter.cli", "check", str(path)], capture_output=True,
                          text=True, cwd=REPO, timeout=60)


def test_check_refuses_a_tcp_feed_without_keys_in_one_line(where, keys):
    r = check(where, Sources=["feed:tcp://0.0.0.0:5599"])
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"flowmeter: {where}/profile.json: Sources[0]: feed:tcp://0.0.0.0:5599: a tcp feed takes only agents "
        "holding CurveZMQ keys: set FeedServerKey and FeedAllowedKeys (flowmeter keygen makes them), "
        "or use ipc://PATH"]
    r = check(where, Sources=["feed:tcp://0.0.0.0:5599"], FeedServerKey=keys["feed"][1])
    assert r.returncode == 1 and "Sources[0]: feed:tcp://0.0.0.0:5599: a tcp feed" in r.stderr
    r = check(where, Sources=["feed:tcp://0.0.0.0:5599"], FeedServerKey=keys["feed"][1],
              FeedAllowedKeys=[keys["known"][0]])
    assert r.returncode == 0, r.stderr
    assert f"FeedServerKey: {keys['feed'][1]}" in r.stdout
    r = check(where, FeedServerKey=keys["feed"][0])
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "FeedServerKey: " in r.stderr
    assert "holds a public key only" in r.stderr


def test_check_refuses_an_abstract_socket_unless_the_profile_allows_it(where):
    r = check(where, Sources=["feed:ipc://@flowmeter-feed"])
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"flowmeter: {where}/profile.json: Sources[0]: feed:ipc://@flowmeter-feed: an abstract socket "
        "(ipc://@NAME) has no file permissions, so any local user can send to it: use ipc://PATH, "
        "or set FeedAbstractSocket to true"]
    r = check(where, Sources=["feed:ipc://@flowmeter-feed"], FeedAbstractSocket=True)
    assert r.returncode == 0, r.stderr
    with pytest.raises(SourceError, match=r"^feed:ipc://@fm-test: cannot bind: an abstract socket"):
        FeedSource("ipc://@fm-test")
    with FeedSource("ipc://@fm-test", security=FeedSecurity(abstract=True)) as source, \
            FeedClient("ipc://@fm-test") as client:
        client.send([frame(time.time_ns())])
        assert len(collect(source, 1)) == 1


@pytest.mark.parametrize("mode, why", [("0666", "lets every local user reach the feed"),
                                       ("0400", "does not let flowmeter's own user write"),
                                       ("rw", 'is not an octal mode such as "0600" or "0660"')])
def test_check_refuses_a_socket_mode_open_to_everyone(where, mode, why):
    r = check(where, FeedSocketMode=mode)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert f"FeedSocketMode: {json.dumps(mode)} " in r.stderr and why in r.stderr


# --- ipc socket files ------------------------------------------------------------------------

def test_an_ipc_socket_file_is_made_with_the_mode_and_group_configured(where):
    group = f"fmfeed{os.getpid() % 100000}"
    subprocess.run(["groupadd", group], check=True, timeout=30)
    try:
        gid = grp.getgrnam(group).gr_gid
        r = check(where, FeedSocketGroup="no-such-group-here")
        assert r.returncode == 1 and '"no-such-group-here" is no group of this system' in r.stderr
        assert check(where, FeedSocketGroup=group, FeedSocketMode="0660").returncode == 0

        endpoint = f"ipc://{where}/feed.sock"
        path = endpoint[len("ipc://"):]
        with FeedSource(endpoint):  # the default: the owner alone
            st = os.stat(path)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == os.getgid()
            assert _connects_as("nobody", path) == "Permission denied"
        with FeedSource(endpoint, security=FeedSecurity(socket_mode=0o660, socket_group=group)) as source:
            st = os.stat(path)
            assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
            assert _connects_as("nobody", path) == "Permission denied"  # not a member of the group
            assert _connects_as("nobody", path, group=gid) == "connected"
            with FeedClient(endpoint) as client:
                client.send([frame(time.time_ns())])
                assert len(collect(source, 1)) == 1
    finally:
        subprocess.run(["groupdel", group], check=True, timeout=30)


def _connects_as(user: str, path: str, group: int | None = None) -> str:
    """Connect to a Unix socket as ``user`` (with ``group`` as an extra group): "connected" or the error."""
    import pwd

    account = pwd.getpwnam(user)
    script = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
              "try:\n    s.connect(sys.argv[1]); print('connected')\n"
              "except OSError as e:\n    print(e.strerror)\n")
    r = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True, timeout=30,
                       user=account.pw_uid, group=account.pw_gid,
                       extra_groups=[group] if group is not None else [])
    return r.stdout.strip() or r.stderr.strip()


# --- end to end: flowmeter run, a real collector file, ipfixDump ------------------------------

def test_a_run_exports_the_allowed_agents_flows_only_and_reports_the_refused(where, keys):
    import threading
    import urllib.request

    from tests.support.collectors import ipfixdump_records

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    metrics = f"127.0.0.1:{free_port()}"
    ipfix = Path(where) / "out.ipfix"
    profile = Path(where) / "profile.json"
    profile.write_text(json.dumps({"FlowMetadata": {
        "Sources": [f"feed:{endpoint}"], "IpFixCollectors": [f"File/{ipfix}"], "StatisticsIntervalSeconds": 0,
        "FeedServerKey": keys["feed"][1], "FeedAllowedKeys": [keys["known"][0]], "MetricsAddress": metrics}}))
    proc = subprocess.Popen([sys.executable, "-m", "flowmeter.cli", "run", "--profile", str(profile)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300  # the first run on a machine compiles the kernels
        while not any(f"feed:{endpoint} open" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        now = time.time_ns()
        with FeedClient(endpoint, server_key=keys["feed"][0], key=keys["known"][1]) as known, \
                FeedClient(endpoint, server_key=keys["feed"][0], key=keys["stranger"][1]) as stranger:
            for i in range(5):
                known.send([frame(now + i, sport=100)])
                stranger.send([frame(now + i, sport=200)])
            page = ""
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and 'count="refused agents: unknown key"' not in page:
                time.sleep(0.5)
                with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as response:
                    page = response.read().decode()
        status = subprocess.run([sys.executable, "-m", "flowmeter.cli", "status"], capture_output=True, text=True,
                                cwd=REPO, timeout=60).stdout
    finally:
        proc.send_signal(15)
        proc.wait(60)
        reader.join(10)
    log = "".join(lines)
    assert proc.returncode == 0, log
    assert 'count="refused agents: unknown key"' in page, page
    assert "refused agents: unknown key" in status, status
    assert "is not in FeedAllowedKeys" in log, log
    records = [r for r in ipfixdump_records(ipfix) if "packetDeltaCount" in r]
    assert [(int(r["sourceTransportPort"]), int(r["packetDeltaCount"])) for r in records] == [(100, 5)], records


def test_the_example_client_sends_with_keys(keys):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with FeedSource(endpoint, security=security(keys)) as source:
        sender = subprocess.Popen([sys.executable, "-m", "flowmeter.capture.sources.feedclient", endpoint,
                                   "--frames", "10", "--server-key", keys["feed"][0], "--key", keys["known"][1]],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        rows = collect(source, 1, deadline_s=30)  # the handshake waits for read
        out, err = sender.communicate(timeout=60)
    assert sender.returncode == 0, err
    assert f"sent 10 frames in 1 messages to {endpoint}" in out
    assert len(rows) == 10
    r = subprocess.run([sys.executable, "-m", "flowmeter.capture.sources.feedclient", endpoint, "--key",
                        keys["known"][1]], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and "--server-key and --key go together" in r.stderr
