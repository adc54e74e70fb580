"""The service manager's notification protocol (sd_notify): ready, stopping, status, watchdog.

A unit of ``Type=notify`` gives its main process ``NOTIFY_SOCKET``: a
datagram socket (a path, or ``@name`` in the abstract namespace) to which
it writes lines ``KEY=VALUE``. The supervisor, the unit's main process,
says:

* ``READY=1`` once every child has reported (each capture process has its
  source open and reads), so ``systemctl start`` returns when flowmeter
  meters, and units ordered after it start then;
* ``STOPPING=1`` when a stop begins (the drain);
* ``STATUS=...`` with the current rates, what ``systemctl status`` shows;
* ``WATCHDOG=1`` from its loop at half the ``WATCHDOG_USEC`` period, so a
  supervisor stuck in its loop is restarted by the service manager
  (``WatchdogSec``). ``WATCHDOG_PID``, when set, names the process the
  pings must come from: another process (a child) never pings.

Without ``NOTIFY_SOCKET`` every call does nothing. A send that fails (the
manager went away) is not retried and never raises: notifications are a
courtesy to the manager, not part of metering. Written without libsystemd:
the protocol is one datagram per message.
"""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

STATUS_S = 2.0  # STATUS= at most this often (systemctl status shows the latest)


class Notifier:
    """Notifications to the service manager, if there is one (``NOTIFY_SOCKET``)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._sock: socket.socket | None = None
        self._pid = os.getpid()
        self.failed = 0  # notifications the socket refused
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        if address.startswith(("/", "\0")):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(address)
                self._sock = sock
            except OSError:
                sock.close()
                self.failed += 1
        usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        mine = not watchdog_pid or watchdog_pid == str(self._pid)
        self.watchdog_s = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else 0.0
        self._pinged = -float("inf")
        self._status_at = -float("inf")
        self.ready_sent = False

    @property
    def active(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> bool:
        """One notification of ``KEY=VALUE`` lines; False when it could not be sent (or no manager)."""
        if self._sock is None or os.getpid() != self._pid:  # a forked child never speaks for the unit
            return False
        try:
            self._sock.send("\n".join(lines).encode("utf-8", "replace"))
            return True
        except OSError:
            self.failed += 1
            return False

    def ready(self, status: str) -> None:
        if not self.ready_sent:
            self.ready_sent = True
            self.send("READY=1", f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def status_due(self, now: float) -> bool:
        """Whether a ``STATUS=`` would be sent now (its text need not be made otherwise)."""
        return now - self._status_at >= STATUS_S

    def status(self, text: str, now: float | None = None) -> None:
        """``STATUS=`` at most every ``STATUS_S``."""
        now = time.monotonic() if now is None else now
        if self.status_due(now):
            self._status_at = now
            self.send(f"STATUS={text}")

    def watchdog(self, now: float | None = None) -> None:
        """``WATCHDOG=1`` when half the watchdog period has passed since the last one."""
        if not self.watchdog_s:
            return
        now = time.monotonic() if now is None else now
        if now - self._pinged >= self.watchdog_s:
            self._pinged = now
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
