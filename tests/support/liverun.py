"""``flowmeter run`` started the way operators start it, for the live and lifecycle tests.

``Run`` starts the command in a network namespace made by the test
(``tests.support.netns``), in a session of its own: its process group is
what systemd's ``KillMode=control-group`` and a terminal's Ctrl-C signal.
With ``terminal=True`` the session's controlling terminal is a pty held by
the test: ``ctrl_c()`` types Ctrl-C into it, and the terminal's line
discipline, not the test, sends SIGINT to the foreground process group.

``NsNfcapd`` is nfcapd inside a namespace (its socket and its
``/proc/net/udp`` are that namespace's). ``kill_leftover_runs()`` kills
every run a test left behind, whole process groups (an autouse fixture).
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

from tests.support.collectors import Nfcapd
from tests.support.netns import entered

ROOT = Path(__file__).resolve().parents[2]
A4, B4, A6, B6 = "10.9.0.1", "10.9.0.2", "fd09::1", "fd09::2"  # the lab's two ends (tests/integration/conftest.py)
_RUNS: list[subprocess.Popen] = []  # every flowmeter started; none outlives its test


def kill_leftover_runs() -> None:
    while _RUNS:
        proc = _RUNS.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole pipeline: its own session
            proc.wait(10)


def _controlling_terminal() -> None:
    """In the child, after setsid: stdin (the pty's slave) becomes the session's controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Run:
    """``flowmeter run`` inside a namespace; ``stop()`` drains it with SIGTERM (see the module notes)."""

    def __init__(self, ns: str, tmp: Path, opened: int, terminal: bool = False, *, wrap: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, **settings) -> None:
        """``wrap``: a command that runs flowmeter (e.g. setpriv as another user); ``env``: added to its
        environment."""
        self.profile = tmp / "profile.json"
        self.profile.write_text(json.dumps({"FlowMetadata": {"StatisticsIntervalSeconds": 0, **settings}}))
        self.lines: list[str] = []
        self._pty = None
        cmd = [*wrap, sys.executable, "-m", "flowmeter.cli", "run", "--profile", str(self.profile)]
        env = {**os.environ, "FLOWMETER_DEBUG": "1", **(env or {})}
        with entered(ns):
            if terminal:
                self._pty, slave = os.openpty()
                self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdin=slave,
                                             stdout=slave, stderr=slave, preexec_fn=_controlling_terminal)
                os.close(slave)
            else:
                self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        _RUNS.append(self.proc)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 300  # the first run on a machine compiles the kernels
        while sum(line.rstrip().endswith(" open") for line in self.lines) < opened:  # "SOURCE open"
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self._reader.join(5)
                raise AssertionError("flowmeter run did not open its sources:\n" + "".join(self.lines))
            time.sleep(0.05)

    def _read(self) -> None:
        if self._pty is None:
            for line in self.proc.stdout:
                self.lines.append(line)
            return
        pending = b""
        while True:
            try:
                chunk = os.read(self._pty, 65536)
            except OSError:  # EIO: every process holding the slave has ended
                break
            if not chunk:
                break
            pending += chunk
            *done, pending = pending.split(b"\n")
            self.lines.extend(x.decode(errors="replace").replace("\r", "") + "\n" for x in done)
        if pending:
            self.lines.append(pending.decode(errors="replace"))
        os.close(self._pty)

    @property
    def pgid(self) -> int:
        return self.proc.pid  # a session leader's group id is its pid

    def ctrl_c(self) -> None:
        """Ctrl-C typed into the run's terminal (the line discipline signals the foreground group)."""
        assert self._pty is not None, "started without a terminal"
        os.write(self._pty, b"\x03")

    def wait(self, timeout: float = 60) -> tuple[int, str]:
        """The exit code and everything the run wrote, once it has ended."""
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.pgid, signal.SIGKILL)
                self.proc.wait(10)
            self._reader.join(5)
        return self.proc.returncode, "".join(self.lines)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        code, out = self.wait()
        assert code == 0, out
        return out


def summary_figure(out: str, pattern: str) -> int:
    """A number from the run's summary: the first match of ``pattern`` (one group, digits with commas)."""
    m = re.search(pattern, out)
    assert m, f"{pattern!r} not in:\n{out}"
    return int(m.group(1).replace(",", ""))


class NsNfcapd:
    """nfcapd inside a namespace (its socket and its /proc/net/udp are that namespace's); stopped on exit."""

    def __init__(self, ns: str, tmp: Path, **kw) -> None:
        self.ns = ns
        with entered(ns):
            self.nf = Nfcapd(tmp / "nfcapd", **kw)
        self.collector, self.port = self.nf.collector, self.nf.port

    def records(self) -> list[dict]:
        with entered(self.ns):
            return self.nf.records()

    def __enter__(self) -> NsNfcapd:
        return self

    def __exit__(self, *exc) -> None:
        with entered(self.ns):
            self.nf.stop()


class SteadyTraffic:
    """UDP datagrams from namespace ``ns`` to ``dst`` at about ``rate`` a second, over ``flows``
    source ports, until ``stop()`` (or the end of a ``with``); ``sent`` counts them."""

    def __init__(self, ns: str, dst: str, flows: int = 100, rate: int = 1000, port: int = 9000,
                 payload: int = 64) -> None:
        family = socket.AF_INET6 if ":" in dst else socket.AF_INET
        with entered(ns):
            self._socks = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(flows)]
        self.dst, self.port, self.rate, self.payload = dst, port, rate, b"x" * payload
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send, daemon=True)
        self._thread.start()

    def _send(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            due = int((time.monotonic() - start) * self.rate)
            while self.sent < due:
                sock = self._socks[self.sent % len(self._socks)]
                try:
                    sock.sendto(self.payload, (self.dst, self.port))
                except OSError:
                    pass  # an ICMP error reported on this socket: the datagram left anyway
                self.sent += 1
            time.sleep(0.002)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        for sock in self._socks:
            sock.close()
        return self.sent

    def __enter__(self) -> SteadyTraffic:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
