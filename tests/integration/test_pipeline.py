"""The whole pipeline, capture file to real collector: timeouts, Direction, drops, MaxFlows, bad input, signals.

Captures are built here with ``tests.support.pcapwrite``; each run goes through
``flowmeter replay`` (or ``run``) into nfcapd and into an IPFIX file that
``ipfixDump`` reads (nfdump does not show flowEndReason or
forwardingStatus; ipfixDump does).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from flowmeter.ipc.lifecycle import STOP_SIGNAL

from tests.support import traffic
from tests.support.collectors import Nfcapd, ipfixdump_records, nfdump_totals
from tests.support.pcapwrite import ethernet_ipv4_tcp, ethernet_ipv4_udp, ipv4, nflog, udp, write_pcap

ROOT = Path(__file__).resolve().parents[2]
S = 1_000_000_000
T0 = 1_767_225_600 * S
REASON = {1: "idle", 2: "active", 3: "end", 4: "forced", 5: "resources"}


def flowmeter(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowmeter.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)


def replay(tmp: Path, captures: list[Path], workers: int = 2, **settings):
    """Replay into nfcapd and an IPFIX file; (result, nfdump rows, ipfixDump flow rows)."""
    run_dir = Path(tempfile.mkdtemp(prefix="replay-", dir=tmp))  # each run its own collector files
    nf = Nfcapd(run_dir / "nfcapd")
    ipfix = run_dir / "out.ipfix"
    profile = run_dir / "profile.json"
    profile.write_text(json.dumps({"FlowMetadata": {
        "IpFixCollectors": [nf.collector, f"File/{ipfix}"], "StatisticsIntervalSeconds": 0, **settings}}))
    try:
        r = flowmeter("replay", *map(str, captures), "--profile", str(profile), "--workers", str(workers))
        rows = nf.records()
    finally:
        nf.stop()
    dumped = [d for d in ipfixdump_records(ipfix) if "packetDeltaCount" in d] if ipfix.exists() else []
    return r, rows, dumped


def test_interval_gives_one_interim_record_per_minute_with_deltas(tmp_path):
    # one UDP flow, a packet every 2 s for 4 min 40 s, 100 octets each
    cap = tmp_path / "long.pcap"
    frame = ethernet_ipv4_udp("10.0.0.1", "192.0.2.1", 5000, 53, b"\0" * 72)
    later = ethernet_ipv4_udp("10.0.0.2", "192.0.2.2", 1, 1)  # another flow, a minute after: the clock moves on
    write_pcap(cap, [(T0 + i * 2 * S, frame) for i in range(140)] + [(T0 + 360 * S, later)])
    r, rows, dumped = replay(tmp_path, [cap], Interval=60000, LocalNetworks=["10.0.0.0/8"])
    assert r.returncode == 0, r.stderr
    recs = sorted((d for d in dumped if d["sourceIPv4Address"] == "10.0.0.1"),
                  key=lambda d: d["flowStartMilliseconds"])
    reasons = [REASON[int(d["flowEndReason"])] for d in recs]
    assert reasons == ["active"] * 4 + ["idle"]  # one interim record per minute, then the idle end
    assert [int(d["packetDeltaCount"]) for d in recs] == [30, 30, 30, 30, 20]
    assert all(int(d["octetDeltaCount"]) == 100 * int(d["packetDeltaCount"]) for d in recs)
    starts = [d["flowStartMilliseconds"] for d in recs]
    assert starts[0].endswith("00:00:00.000") and starts[1].endswith("00:01:00.000")  # each minute's own first packet
    assert sum(row["in_packets"] for row in rows if row["src4_addr"] == "10.0.0.1") == 140
    # Interval 0: a single record
    r, rows, dumped = replay(tmp_path, [cap], Interval=0)
    assert [int(d["packetDeltaCount"]) for d in dumped if d["sourceIPv4Address"] == "10.0.0.1"] == [140]


def test_tcp_fin_and_rst_end_flows_and_idle_flows_expire_by_capture_time(tmp_path):
    cap = tmp_path / "tcp.pcap"
    a, b = "10.0.0.1", "192.0.2.1"
    pk = [
        (T0 + 0 * S, ethernet_ipv4_tcp(a, b, 1000, 80, 0x02)),
        (T0 + 1 * S, ethernet_ipv4_tcp(b, a, 80, 1000, 0x12)),
        (T0 + 2 * S, ethernet_ipv4_tcp(a, b, 1000, 80, 0x11)),  # FIN from a
        (T0 + 3 * S, ethernet_ipv4_tcp(b, a, 80, 1000, 0x11)),  # FIN from b: both end
        (T0 + 4 * S, ethernet_ipv4_tcp(a, b, 2000, 443, 0x02)),
        (T0 + 5 * S, ethernet_ipv4_tcp(b, a, 443, 2000, 0x14)),  # RST: both end
        (T0 + 6 * S, ethernet_ipv4_udp(a, b, 3000, 53)),
        (T0 + 7 * S, ethernet_ipv4_udp(a, b, 3000, 53)),         # then 30 s of silence
        (T0 + 37 * S, ethernet_ipv4_udp(a, b, 3000, 53)),
        (T0 + 40 * S, ethernet_ipv4_udp("10.0.0.9", b, 9, 9)),  # moves the clock on
    ]
    write_pcap(cap, pk)
    r, rows, dumped = replay(tmp_path, [cap], IdleTimeout=10000)
    assert r.returncode == 0, r.stderr
    by_port = Counter()
    ends = {}
    for d in dumped:
        key = (int(d["sourceTransportPort"]), int(d["destinationTransportPort"]), d["flowEndMilliseconds"])
        ends[key] = REASON[int(d["flowEndReason"])]
        by_port[int(d["sourceTransportPort"])] += int(d["packetDeltaCount"])
    fin = [v for (s, _, _), v in ends.items() if s in (1000, 80)]
    rst = [v for (s, _, _), v in ends.items() if s in (2000, 443)]
    assert fin == ["end", "end"] and rst == ["end", "end"]
    udp_reasons = sorted(v for (s, _, _), v in ends.items() if s == 3000)
    assert udp_reasons == ["forced", "idle"]  # idle after 10 s of capture time, then a new flow
    idle = next(d for d in dumped if int(d["sourceTransportPort"]) == 3000 and int(d["flowEndReason"]) == 1)
    assert int(idle["packetDeltaCount"]) == 2
    assert by_port[3000] == 3 and sum(by_port.values()) == len(pk)


def _direction_captures(tmp: Path) -> list[Path]:
    eth = tmp / "traffic.pcap"
    frames = []
    for i in range(10):
        frames.append((T0 + i * S, ethernet_ipv4_udp("10.0.0.1", "192.0.2.1", 4000, 53)))  # egress
        frames.append((T0 + i * S + 1, ethernet_ipv4_udp("192.0.2.1", "10.0.0.1", 53, 4000)))  # ingress
    write_pcap(eth, frames)
    log = tmp / "nflog.pcap"
    dropped = ipv4("192.0.2.66", "10.0.0.1", 17, udp(6666, 22))
    accepted = ipv4("192.0.2.77", "10.0.0.1", 17, udp(7777, 22))
    write_pcap(log, [(T0 + 20 * S + i, nflog(dropped, hook=1, prefix=b"DROP in")) for i in range(3)]
               + [(T0 + 21 * S, nflog(accepted, hook=1, prefix=b"accept"))], linktype=239)
    return [eth, log]


@pytest.mark.parametrize("direction,want", [("Both", {0, 1}), ("SendingToPeer", {1}), ("ReceivedFromPeer", {0})])
def test_direction_setting_and_dropped_frames_in_every_case(tmp_path, direction, want):
    caps = _direction_captures(tmp_path)
    r, rows, dumped = replay(tmp_path, caps, Direction=direction, LocalNetworks=["10.0.0.0/8"])
    assert r.returncode == 0, r.stderr
    normal = [d for d in dumped if int(d["forwardingStatus"]) == 64]
    drops = [d for d in dumped if int(d["forwardingStatus"]) != 64]
    assert {int(d["flowDirection"]) for d in normal} == want
    # the dropped frames: ACL deny, in a flow of their own, in all three settings
    assert [(d["sourceIPv4Address"], int(d["forwardingStatus"]), int(d["packetDeltaCount"])) for d in drops] \
        == [("192.0.2.66", 129, 3)]
    assert {row.get("src4_addr") for row in rows} >= {"192.0.2.66"}
    if direction != "Both":
        assert "other direction" in r.stderr


def test_max_flows_smaller_than_concurrent_flows_loses_no_packet(tmp_path):
    cap = tmp_path / "many.pcap"
    p = traffic.generate(20_000, seed=5, duration_s=5)
    traffic.write(str(cap), p)
    r, rows, dumped = replay(tmp_path, [cap], MaxFlows=64, IdleTimeout=60000)
    assert r.returncode == 0, r.stderr
    assert sum(row["in_packets"] for row in rows) == 20_000
    assert sum(int(d["packetDeltaCount"]) for d in dumped) == 20_000
    assert any(int(d["flowEndReason"]) == 5 for d in dumped)
    assert "lack_of_resources" in r.stderr


def test_generated_capture_matches_its_truth_exactly(tmp_path):
    cap = tmp_path / "gen.pcap"
    p = traffic.generate(30_000, seed=11)
    traffic.write(str(cap), p)
    r, rows, _ = replay(tmp_path, [cap], workers=4)
    assert r.returncode == 0, r.stderr
    got, octets = nfdump_totals(rows)
    want = Counter()
    want_octets = Counter()
    for t in traffic.truth(p):
        key = (t[1], t[2], t[3], t[4], t[5])
        want[key] += t[8]
        want_octets[key] += t[9]
    assert got == want and octets == want_octets


def test_truncated_and_garbage_captures_stop_with_one_clear_line(tmp_path):
    good = tmp_path / "good.pcap"
    write_pcap(good, [(T0 + i * S, ethernet_ipv4_udp("10.0.0.1", "192.0.2.1", 1, 2, b"x" * 50)) for i in range(20)])
    data = good.read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[:-30])  # the last record loses its tail
    r, rows, _ = replay(tmp_path, [cut])
    assert r.returncode == 1
    assert sum(row["in_packets"] for row in rows) == 19  # what could be read was metered and exported
    # every process's lines start "flowmeter:"; the exporter's report of its send buffer is not an error
    errors = [line for line in r.stderr.splitlines()
              if line.startswith("flowmeter:") and not re.match(r"flowmeter: exporter: collector .* send buffer", line)]
    assert len(errors) == 1 and "cut.pcap" in errors[0] and "truncated" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(os.urandom(5000))
    r, rows, _ = replay(tmp_path, [junk])
    assert r.returncode == 1 and rows == [] and "Traceback" not in r.stderr
    assert re.search(r"^flowmeter: .*junk\.pcap", r.stderr, re.M)


def _big_capture(tmp: Path, n: int = 3_000_000) -> Path:
    cap = tmp / "big.pcap"
    traffic.write(str(cap), traffic.generate(n, seed=3))
    return cap


def _wait_for_child(pid: int, name: str, timeout_s: float = 120) -> int | None:
    """The pid of the supervisor's child called ``name`` (its process name), once it runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in psutil.Process(pid).children():
            try:
                if child.name() == name:
                    return child.pid
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.05)
    return None


def _wait_for_cpu(pid: int, seconds: float, timeout_s: float = 60) -> None:
    """Return once process ``pid`` has used ``seconds`` of CPU (it is metering), polled every 5 ms."""
    proc = psutil.Process(pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cpu = proc.cpu_times()
        if cpu.user + cpu.system >= seconds:
            return
        time.sleep(0.005)
    raise AssertionError(f"pid {pid} used less than {seconds} s of CPU in {timeout_s} s")


def _signal_pending(pid: int, signum: int) -> bool:
    """Whether ``signum`` waits for the (stopped) process ``pid``, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    pending = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
    return bool(pending >> (signum - 1) & 1)


def _wait_until_stopped(pid: int, timeout_s: float = 10) -> None:
    """Return once every thread of ``pid`` is in the stopped state (``T`` in /proc/PID/task/*/stat).

    SIGSTOP takes effect only when the process next runs: on a busy machine a
    signal sent meanwhile can be taken first (the kernel takes the lowest
    number first, and SIGUSR1 is below SIGSTOP), and never be seen pending.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:  # a thread that ended
                pass
        if states and all(s in "tT" for s in states):
            return
        time.sleep(0.002)
    raise AssertionError(f"pid {pid} did not stop within {timeout_s} s")


def test_sigterm_during_run_drains_every_metered_flow(tmp_path):
    cap = _big_capture(tmp_path)
    nf = Nfcapd(tmp_path / "nfcapd")
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"FlowMetadata": {"IpFixCollectors": [nf.collector], "Sources": [f"pcap:{cap}"],
                                                    "StatisticsIntervalSeconds": 0, "Workers": 2}}))
    proc = subprocess.Popen([sys.executable, "-m", "flowmeter.cli", "run", "--profile", str(profile)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    capture = _wait_for_child(proc.pid, "fm-capture-0")
    assert capture, "capture-0 not found"
    # The capture is frozen part way, whatever the machine's speed: after 50 ms of its CPU it has
    # metered some packets and is far from the end of 3M. It sees the supervisor's stop when thawed.
    _wait_for_cpu(capture, 0.05)
    os.kill(capture, signal.SIGSTOP)
    try:
        _wait_until_stopped(capture)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not _signal_pending(capture, STOP_SIGNAL) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _signal_pending(capture, STOP_SIGNAL), "the supervisor did not pass the stop on"
    finally:
        try:
            os.kill(capture, signal.SIGCONT)
        except ProcessLookupError:  # killed meanwhile (as hung, say): the run's stderr says by whom
            proc.kill()
            raise AssertionError("capture-0 died while stopped:\n" + proc.communicate(timeout=60)[1]) from None
    out, err = proc.communicate(timeout=120)
    rows = nf.records()
    assert proc.returncode == 0, err
    metered = int(re.search(r"([\d,]+) packets metered", err).group(1).replace(",", ""))
    assert 0 < metered < 3_000_000  # stopped part way
    assert sum(r["in_packets"] for r in rows) == metered  # nothing metered is lost on a clean stop


def test_a_killed_worker_is_restarted_and_what_it_held_is_counted_as_lost(tmp_path):
    cap = _big_capture(tmp_path)
    nf = Nfcapd(tmp_path / "nfcapd")
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"FlowMetadata": {"IpFixCollectors": [nf.collector], "StatisticsIntervalSeconds": 0}}))
    proc = subprocess.Popen([sys.executable, "-m", "flowmeter.cli", "replay", str(cap), "--workers", "2",
                             "--profile", str(profile)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    victim = _wait_for_child(proc.pid, "fm-worker-1")
    assert victim, "worker-1 not found"
    _wait_for_cpu(victim, 0.02)  # metering, far from the end of 3M packets
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    rows = nf.records()
    assert proc.returncode == 1, err  # a replay that lost packets is not complete
    m = re.search(r"^restarts: worker-1 killed by signal 9 at ([\d.]+) s; restarted ([\d.]+) s later$", err, re.M)
    assert m and float(m.group(2)) < 2, err
    metered = int(re.search(r"([\d,]+) packets metered", err).group(1).replace(",", ""))
    frames = int(re.search(r"([\d,]+) frames", err).group(1).replace(",", ""))
    assert frames == 3_000_000, err  # the whole capture was read: worker-0 and the new worker-1 went on
    lost_line = next(x for x in err.splitlines() if x.startswith("lost: "))
    lost = sum(int(n.replace(",", "")) for n in re.findall(r"([\d,]+) packets", lost_line))
    assert lost > 0, err
    assert sum(r["in_packets"] for r in rows) + lost == metered, err


@pytest.mark.parametrize("command", ["replay", "run"])
def test_every_process_log_line_names_its_process_on_the_commands_stderr(tmp_path, command):
    cap = tmp_path / "few.pcap"
    write_pcap(cap, [(T0 + i * S, ethernet_ipv4_udp("10.0.0.1", "192.0.2.1", 1000 + i, 53)) for i in range(5)])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a port where nothing listens: sends fail
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"FlowMetadata": {"IpFixCollectors": [f"Udp/127.0.0.1:{port}"],
                                                    "Sources": [f"pcap:{cap}"], "StatisticsIntervalSeconds": 0}}))
    args = ["run", "--profile", str(profile)] if command == "run" else ["replay", str(cap), "--profile", str(profile)]
    r = flowmeter(*args)
    assert r.returncode == 0, r.stderr
    collector = f"collector Udp/127.0.0.1:{port}"
    lines = r.stderr.splitlines()
    # the exporter's info line (what the kernel granted) and its warning (what could not be sent) both
    # reach the command's stderr, named after the process that wrote them
    assert any(re.match(rf"flowmeter: exporter: {collector}: send buffer \d+ octets granted", x) for x in lines), lines
    assert any(re.match(rf"flowmeter: exporter: {collector}: \d+ messages not sent", x) for x in lines), lines
    # and no process's line lacks the prefix: the only others are the summary's (per collector, lost)
    assert all(x.startswith(("flowmeter: ", f"{collector}: ", "lost: ")) for x in lines if collector in x), lines
