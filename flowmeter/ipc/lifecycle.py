"""The contract a stage process runs under: bootstrap, exit codes, stop flag, control channel.

The supervisor forks every stage process (capture, worker, exporter) into
``child_main``, which names the process (``fm-worker-1`` in ps and top),
sets up its log lines (``flowmeter: worker-1: ...`` on the stderr it shares
with the supervisor), resets the signal handlers it inherited, runs the
stage's entry function and exits with its code, or with ``CRASH_EXIT`` and
one line when an exception escapes (the supervisor restarts it), or with
``CONFIG_EXIT`` when the error is one a restart cannot fix
(``FatalStageError``, a permission; the supervisor stops the run).

Every stage's entry function has one shape::

    run(settings, endpoints, handover) -> exit code

``settings`` and ``endpoints`` are frozen values; ``handover`` holds what the
supervisor made before the fork and the child inherits (shared memory, an
opened capture socket, a callable). Inside, ``StageRuntime`` is what every
stage holds the same way: its ZeroMQ context and sockets, a ``StopFlag``
that the signal handlers only set ("record in the handler, act in the
loop"), a ``ParentWatch``, and the ``ControlChannel`` that carries its
counters (``flowmeter.ipc.counters``) and errors to the supervisor.

Signals: a stop reaches every process of the group at once (systemd's
``KillMode=control-group``, a terminal's Ctrl-C), but only the supervisor
may act on it: a worker that stopped before its captures would flush its
flows to an exporter that is gone. So a supervised child ignores SIGTERM,
SIGINT and SIGHUP and follows its supervisor's own signals instead:
``STOP_SIGNAL`` (SIGUSR1) to stop, ``STOP_NOW_SIGNAL`` (a real-time signal:
never merged with another) to stop without waiting (what it still holds is
counted in its last report, not sent), and ``RELOAD_SIGNAL`` (SIGUSR2) to
re-read the settings. ``child_main`` blocks them until the stage's
``StopFlag`` has its handlers, so one sent while the child starts waits for
it instead of being lost. A stage run without a
supervisor (``flowmeter exporter``, tests) takes SIGTERM, SIGINT and SIGHUP
itself.

A child whose supervisor dies ends by itself: a capture gets
``PARENT_GONE_SIGNAL`` from the kernel (``PR_SET_PDEATHSIG``) and drains; a worker
or the exporter keeps going until its producers have ended, at most
``ORPHAN_GRACE_S``.
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable

import zmq

from flowmeter.ipc.counters import RoleCounters
from flowmeter.ipc.logs import LOGGER, setup_logging
from flowmeter.ipc.schema import ErrorReport, Report

STOP_DEADLINE_S = 30.0  # per stage, before SIGKILL
ORPHAN_GRACE_S = STOP_DEADLINE_S  # a worker or exporter without supervisor waits this long for its producers
CRASH_EXIT = 70  # a child's exit code for an unexpected exception (sysexits EX_SOFTWARE): it is restarted
CONFIG_EXIT = 78  # a setting or a permission a restart cannot fix (sysexits EX_CONFIG): the run stops
PROGRESS_S = 0.5  # a child's counters reach the supervisor this often (its heartbeat)
URGENT_S = 0.02  # ... and this soon after a change of what a crash would lose
CONTROL_LINGER_MS = 2000  # at exit, the last counters wait this long for the supervisor
# A socket that connects before its peer has bound (the processes start at the same time) tries
# again after RECONNECT_MS, doubling up to RECONNECT_MAX_MS: ZeroMQ's default is a flat 100 ms, a
# stall that a short replay would pay whenever a consumer binds a moment after its producer starts.
RECONNECT_MS = 2
RECONNECT_MAX_MS = 100

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # a stage without a supervisor stops on these
OUTSIDE_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)  # ... and reloads on SIGHUP; a supervised child ignores all three
STOP_SIGNAL = signal.SIGUSR1  # from the supervisor: stop (drain)
STOP_NOW_SIGNAL = signal.SIGRTMIN + 1  # from the supervisor: stop without waiting (real-time: queued, never merged)
RELOAD_SIGNAL = signal.SIGUSR2  # from the supervisor: re-read the settings
# from the kernel when the supervisor dies (PR_SET_PDEATHSIG): a stop. It comes once per thread the
# supervisor had (the child is handed to each in turn as they end), so it counts once, never "again"
PARENT_GONE_SIGNAL = signal.SIGRTMIN + 2
SUPERVISOR_SIGNALS = (STOP_SIGNAL, STOP_NOW_SIGNAL, RELOAD_SIGNAL, PARENT_GONE_SIGNAL)

class FatalStageError(Exception):
    """An error a restart of the process cannot fix (a source that cannot be opened, a permission):
    the process ends with ``CONFIG_EXIT`` and its one line, and the supervisor stops the run."""


def _prctl(option: int, arg: Any) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def set_process_name(name: str) -> None:
    """Name the process for ps/top (``fm-worker-1``); Linux keeps 15 characters."""
    _prctl(PR_SET_NAME, ctypes.c_char_p(f"fm-{name}"[:15].encode()))


def end_with_parent() -> None:
    """Get ``PARENT_GONE_SIGNAL`` when the supervisor dies (killed, say): this process then drains as on a stop.

    The supervisor may have died before the request was made: then this
    process has another parent already. The supervisor's pid is the one
    recorded at the fork (not "1", the usual reaper: in a container the
    supervisor itself is pid 1, and its children must not take that for
    its death).
    """
    spawner = multiprocessing.parent_process()
    supervisor = spawner.pid if spawner is not None else os.getppid()
    if _prctl(PR_SET_PDEATHSIG, PARENT_GONE_SIGNAL) and os.getppid() != supervisor:
        os.kill(os.getpid(), PARENT_GONE_SIGNAL)


def child_main(name: str, target: Callable[..., int], args: tuple, nice: int = 0, foreign: tuple = (),
               pdeathsig: bool = False) -> None:
    """Entry of every child: its name, log lines, priority, fresh signal state; one line and a reserved code on a crash.

    ``foreign`` are the live sources other processes read: this child's
    copies are closed. ``pdeathsig``: a stop when the supervisor dies.
    """
    # The supervisor's signals wait (blocked) until the stage's StopFlag takes them; the outside
    # world's stop and reload signals are the supervisor's alone (see the module notes).
    signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISOR_SIGNALS)
    for s in OUTSIDE_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    set_process_name(name)
    setup_logging(name)
    if pdeathsig:
        end_with_parent()
    for source in foreign:
        source.close()
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    try:
        code = target(*args)
    except (FatalStageError, PermissionError) as exc:  # a restart would meet it again
        logging.getLogger(LOGGER).error("%s", exc)
        sys.stderr.flush()
        os._exit(CONFIG_EXIT)
    except Exception as exc:  # the top of a process: one line, one exit code
        logging.getLogger(LOGGER).error("%s: %s", type(exc).__name__, exc)
        if os.environ.get("FLOWMETER_DEBUG"):
            traceback.print_exc()
        sys.stderr.flush()
        os._exit(CRASH_EXIT)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


class ParentWatch:
    """Whether this child's supervisor is gone, and for how long (its parent changed: reparented).

    A worker or the exporter whose supervisor died keeps going until its
    producers end (the captures drain: they get ``PARENT_GONE_SIGNAL`` when it dies), but
    no longer than ``ORPHAN_GRACE_S``: a pipeline never outlives its
    supervisor for good.
    """

    def __init__(self) -> None:
        self.parent = os.getppid()
        self.since = 0.0

    def expired(self, now: float) -> bool:
        if os.getppid() == self.parent:
            return False
        self.since = self.since or now
        return now - self.since >= ORPHAN_GRACE_S


class StopFlag:
    """The signals a stage acts on, recorded by their handlers and read by its loop.

    Supervised (``supervised=True``, see the module notes): ``STOP_SIGNAL``
    asks for a stop, ``STOP_NOW_SIGNAL`` for a stop at once,
    ``RELOAD_SIGNAL`` for a reload; SIGTERM, SIGINT and SIGHUP are ignored.
    Alone: SIGTERM and SIGINT ask for a stop (a second one: at once), SIGHUP
    for a reload. A reload is recorded only where the stage reloads
    (``reload=True``) and ignored elsewhere. ``set()`` asks for a stop from
    the program itself (a test, a supervisor that is gone). Handlers are
    installed only from the main thread (a stage run in a thread, in tests,
    is stopped with ``set()``) and put back by ``restore()``.
    """

    def __init__(self, reload: bool = False, supervised: bool = False) -> None:
        self.reload = reload
        self.supervised = supervised
        self.stops = 0  # stop requests so far
        self.now = False  # a stop at once was asked (STOP_NOW_SIGNAL)
        self._reloads = 0
        self._old: dict[int, Any] = {}

    def install(self) -> StopFlag:
        if threading.current_thread() is not threading.main_thread():
            return self
        if self.supervised:
            stop, reload, ignored = (STOP_SIGNAL,), RELOAD_SIGNAL, OUTSIDE_SIGNALS
        else:
            stop, reload, ignored = STOP_SIGNALS, signal.SIGHUP, ()
        for s in stop:
            self._old[s] = signal.signal(s, self._on_stop)
        if self.supervised:
            self._old[STOP_NOW_SIGNAL] = signal.signal(STOP_NOW_SIGNAL, self._on_stop_now)
            self._old[PARENT_GONE_SIGNAL] = signal.signal(PARENT_GONE_SIGNAL, self._on_parent_gone)
        self._old[reload] = signal.signal(reload, self._on_reload if self.reload else signal.SIG_IGN)
        for s in ignored:
            self._old[s] = signal.signal(s, signal.SIG_IGN)
        if self.supervised:  # what the supervisor sent while this process started is taken now
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SUPERVISOR_SIGNALS)
        return self

    def _on_stop(self, signum: int, frame: Any) -> None:
        self.stops += 1

    def _on_parent_gone(self, signum: int, frame: Any) -> None:
        self.stops = max(self.stops, 1)

    def _on_stop_now(self, signum: int, frame: Any) -> None:
        self.stops += 1
        self.now = True

    @property
    def at_once(self) -> bool:
        """A stop without waiting: ``STOP_NOW_SIGNAL``, or a second stop request."""
        return self.now or self.stops >= 2

    def _on_reload(self, signum: int, frame: Any) -> None:
        self._reloads += 1

    def set(self) -> None:
        self.stops += 1

    def __bool__(self) -> bool:
        return self.stops > 0

    def take_reloads(self) -> int:
        """Reload requests received since the last call."""
        n, self._reloads = self._reloads, 0
        return n

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old.clear()


class ControlChannel:
    """A child's line to the supervisor: its counters (``progress``, rate-limited; ``final``) and errors."""

    def __init__(self, ctx: zmq.Context, endpoint: str, sender: str) -> None:
        self.sender = sender
        self.pid = os.getpid()
        self._owed = False  # an urgent report was held back by the rate limit
        self._sock = ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.LINGER, CONTROL_LINGER_MS)
        self._sock.connect(endpoint)
        self._last = time.monotonic()

    def progress(self, counters: Callable[[], RoleCounters], now: float | None = None, urgent: bool = False) -> None:
        """Send ``counters()`` if ``PROGRESS_S`` has passed since the last time (the call is cheap otherwise).

        ``urgent``: a count that says what a crash would lose changed (packets
        handed on, records sent): sent after ``URGENT_S`` already, or at the
        first call after that, so a killed process's last report is that
        close to its end. Every report is also the process's heartbeat.
        """
        now = time.monotonic() if now is None else now
        self._owed = self._owed or urgent
        if now - self._last >= (URGENT_S if self._owed else PROGRESS_S):
            self._send(Report(self.sender, counters(), pid=self.pid).pack())
            self._last = now
            self._owed = False

    def final(self, counters: RoleCounters) -> None:
        self._send(Report(self.sender, counters, final=True, pid=self.pid).pack())

    def error(self, role: str, message: str) -> None:
        self._send(ErrorReport(self.sender, role, message, self.pid).pack())

    def _send(self, message: bytes) -> None:
        """Never waits: with the supervisor gone (no peer) a blocking send would never return, and
        a report that cannot be queued is only a report (the next one says more)."""
        try:
            self._sock.send(message, zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        self._sock.close()


class StageRuntime:
    """What every stage process holds the same way while its ``run()`` lasts (see the module notes).

    ``control`` None: the stage runs without a supervisor (``flowmeter
    exporter``, tests): no control channel, no parent watch. Sockets made
    with ``socket()`` are closed, and the context ended, by ``close()``.
    """

    def __init__(self, name: str, role: str, control: str | None, *, reload: bool = False,
                 stop: StopFlag | None = None) -> None:
        self.name, self.role = name, role
        self.stop = stop if stop is not None else StopFlag(reload, supervised=control is not None).install()
        self.ctx = zmq.Context()
        self._sockets: list[tuple[zmq.Socket, int | None]] = []
        self.control = ControlChannel(self.ctx, control, name) if control else None
        self._parent = ParentWatch() if control else None

    def socket(self, kind: int, *, bind: str | None = None, connect: str | None = None,
               send_hwm: int | None = None, receive_hwm: int | None = None, linger_ms: int | None = None,
               close_linger_ms: int | None = None) -> zmq.Socket:
        """A socket of this process, options set before it binds or connects; ``close_linger_ms`` at close."""
        sock = self.ctx.socket(kind)
        for option, value in ((zmq.SNDHWM, send_hwm), (zmq.RCVHWM, receive_hwm), (zmq.LINGER, linger_ms)):
            if value is not None:
                sock.setsockopt(option, value)
        if bind:
            sock.bind(bind)
        if connect:
            sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)
            sock.connect(connect)
        self._sockets.append((sock, close_linger_ms))
        return sock

    def orphaned(self, now: float) -> bool:
        """True (and a stop asked) once the supervisor has been gone for ``ORPHAN_GRACE_S``."""
        if self._parent is not None and self._parent.expired(now):
            self.stop.set()
            return True
        return False

    def progress(self, counters: Callable[[], RoleCounters], now: float | None = None, urgent: bool = False) -> None:
        if self.control is not None:
            self.control.progress(counters, now, urgent)

    def final(self, counters: RoleCounters) -> None:
        if self.control is not None:
            self.control.final(counters)

    def error(self, message: str) -> None:
        """An error for the operator: to the supervisor, or logged when there is none."""
        if self.control is not None:
            self.control.error(self.role, message)
        else:
            logging.getLogger(f"{LOGGER}.{self.role}").error("%s", message)

    def close(self) -> None:
        for sock, linger in self._sockets:
            sock.close(linger)
        if self.control is not None:
            self.control.close()
        self.ctx.term()
        self.stop.restore()

    def __enter__(self) -> StageRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
