"""The sd_notify protocol on a real datagram socket: what a Type=notify unit's manager receives."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from flowmeter.notify import Notifier

ROOT = Path(__file__).resolve().parents[2]


class Manager:
    """The service manager's end: a bound AF_UNIX datagram socket (a path, or an abstract name)."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.address = address

    def messages(self, timeout_s: float = 0.2) -> list[str]:
        self.sock.settimeout(timeout_s)
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except socket.timeout:
                return out

    def wait_for(self, line: str, timeout_s: float, seen: list[str]) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            seen += self.messages(0.1)
            if any(line in m.split("\n") for m in seen):
                return True
        return False


def test_no_notify_socket_means_no_manager_and_no_error():
    n = Notifier({})
    assert not n.active and not n.send("READY=1") and n.watchdog_s == 0


def test_ready_once_status_paced_and_stopping(tmp_path):
    manager = Manager(str(tmp_path / "notify"))
    n = Notifier({"NOTIFY_SOCKET": manager.address})
    n.ready("metering")
    n.ready("again")  # once only
    n.status("one", now=100.0)
    n.status("two", now=100.5)  # within STATUS_S: not sent
    n.status("three", now=103.0)
    n.stopping("draining")
    assert manager.messages() == ["READY=1\nSTATUS=metering", "STATUS=one", "STATUS=three",
                                  "STOPPING=1\nSTATUS=draining"]


def test_abstract_socket_and_watchdog_at_half_its_period():
    name = f"@flowmeter-notify-test-{os.getpid()}"
    manager = Manager(name)
    n = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "2000000"})
    assert n.watchdog_s == 1.0
    for now in (10.0, 10.4, 11.0, 11.9, 12.1):
        n.watchdog(now)
    assert manager.messages() == ["WATCHDOG=1"] * 3  # at 10.0, 11.0 and 12.1


def test_watchdog_meant_for_another_process_and_forked_children_stay_silent(tmp_path):
    manager = Manager(str(tmp_path / "notify"))
    other = Notifier({"NOTIFY_SOCKET": manager.address, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_s == 0
    n = Notifier({"NOTIFY_SOCKET": manager.address})
    pid = os.fork()
    if pid == 0:  # a child of the unit's main process: never speaks for it
        os._exit(0 if not n.send("READY=1") else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert manager.messages() == []


def test_a_gone_manager_is_counted_never_raised(tmp_path):
    manager = Manager(str(tmp_path / "notify"))
    n = Notifier({"NOTIFY_SOCKET": manager.address})
    manager.sock.close()
    os.unlink(tmp_path / "notify")
    assert not n.send("STATUS=x") and n.failed == 1


def test_flowmeter_run_says_ready_pings_the_watchdog_and_says_stopping(tmp_path):
    """``flowmeter run`` as a Type=notify unit's main process, on loopback (nothing is sent to it)."""
    manager = Manager(str(tmp_path / "notify"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as collector:
        collector.bind(("127.0.0.1", 0))
        profile = tmp_path / "p.json"
        profile.write_text(json.dumps({"FlowMetadata": {
            "Sources": ["afpacket:lo"], "StatisticsIntervalSeconds": 0,
            "IpFixCollectors": [f"Udp/127.0.0.1:{collector.getsockname()[1]}"]}}))
        env = {**os.environ, "NOTIFY_SOCKET": manager.address, "WATCHDOG_USEC": "1000000"}
        proc = subprocess.Popen([sys.executable, "-m", "flowmeter.cli", "run", "--profile", str(profile)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        try:
            seen: list[str] = []
            assert manager.wait_for("READY=1", 60, seen), (seen, proc.poll())
            ready = next(m for m in seen if "READY=1" in m.split("\n"))
            assert "STATUS=metering 1 source(s)" in ready
            assert manager.wait_for("WATCHDOG=1", 3, seen)
            time.sleep(1.2)
            seen += manager.messages()
            assert sum(m == "WATCHDOG=1" for m in seen) >= 2  # every half second while it runs
            proc.send_signal(signal.SIGTERM)
            assert manager.wait_for("STOPPING=1", 10, seen), seen
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert proc.returncode == 0, err
    # READY before any STOPPING; nothing from the children (every message is the supervisor's kind)
    kinds = [m.split("\n")[0].split("=")[0] for m in seen]
    assert kinds.index("READY") < kinds.index("STOPPING")
    assert set(kinds) <= {"READY", "STATUS", "WATCHDOG", "STOPPING"}
