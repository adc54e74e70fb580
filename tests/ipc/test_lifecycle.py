"""The contract every stage process runs under, with real signals and real forks."""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time

import pytest
import zmq

from flowmeter.ipc import lifecycle
from flowmeter.ipc.counters import WorkerCounters
from flowmeter.ipc.lifecycle import CRASH_EXIT, StageRuntime, StopFlag, child_main
from flowmeter.ipc.schema import ErrorReport, Report, parse_control


def test_stop_signals_set_the_flag_and_sighup_reloads_only_where_asked():
    flag = StopFlag(reload=True).install()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGHUP)
        assert not flag and flag.take_reloads() == 2 and flag.take_reloads() == 0
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, not acted on: the process is still here
        assert flag and flag.stops == 1
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.stops == 2
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ignoring = StopFlag(reload=False).install()
    try:
        os.kill(os.getpid(), signal.SIGHUP)  # ignored where a stage does not reload: not fatal
        assert not ignoring and ignoring.take_reloads() == 0
    finally:
        ignoring.restore()


def test_a_supervised_stage_ignores_the_groups_signals_and_follows_its_supervisors():
    flag = StopFlag(reload=True, supervised=True).install()
    try:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # what systemd or Ctrl-C sends the group
            os.kill(os.getpid(), s)
        assert not flag and flag.take_reloads() == 0
        os.kill(os.getpid(), lifecycle.RELOAD_SIGNAL)
        assert flag.take_reloads() == 1
        os.kill(os.getpid(), lifecycle.STOP_SIGNAL)
        assert flag and not flag.at_once
        os.kill(os.getpid(), lifecycle.STOP_NOW_SIGNAL)
        assert flag.at_once
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _stop_sent_before_the_flag(path: str) -> int:
    """The supervisor's stop arrives before the stage has its StopFlag: it must wait for it, not be lost."""
    os.kill(os.getpid(), lifecycle.STOP_SIGNAL)
    os.kill(os.getpid(), signal.SIGTERM)  # the group's stop: ignored
    time.sleep(0.05)
    flag = StopFlag(supervised=True).install()
    with open(path, "w") as f:
        f.write(f"{flag.stops} {flag.at_once}")
    return 0


def test_a_stop_sent_while_the_child_starts_waits_for_its_stop_flag(tmp_path):
    out = tmp_path / "stops"
    proc = multiprocessing.get_context("fork").Process(target=child_main, args=(
        "worker-0", _stop_sent_before_the_flag, (str(out),)))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    assert out.read_text() == "1 False"


def _crash() -> int:
    raise RuntimeError("the table is on fire")


def _log_then_end(code: int) -> int:
    logging.getLogger("flowmeter.worker").warning("a warning for the operator")
    with open(f"/proc/{os.getpid()}/comm") as f:
        logging.getLogger("flowmeter.worker").info("named %s", f.read().strip())
    return code


def _fork(target, args, capfd):
    proc = multiprocessing.get_context("fork").Process(target=child_main, args=("worker-3", target, args))
    proc.start()
    proc.join(30)
    return proc.exitcode, capfd.readouterr().err


def test_a_child_ends_with_its_code_and_its_lines_name_it(capfd):
    code, err = _fork(_log_then_end, (5,), capfd)
    assert code == 5
    assert err.splitlines() == ["flowmeter: worker-3: a warning for the operator",
                                "flowmeter: worker-3: named fm-worker-3"]


def test_an_exception_in_a_child_is_one_line_and_the_crash_code(capfd):
    code, err = _fork(_crash, (), capfd)
    assert code == CRASH_EXIT
    assert err == "flowmeter: worker-3: RuntimeError: the table is on fire\n"


def _orphan(endpoint: str) -> None:
    """A child whose own child watches its parent; the middle one dies once the watch is made."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.read(r, 1)
        os._exit(0)
    watch = lifecycle.ParentWatch()
    os.write(w, b"x")
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(endpoint)
    t0 = time.monotonic()
    while not watch.expired(time.monotonic()) and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    push.send_string(f"{time.monotonic() - t0:.2f}")
    push.close(2000)
    ctx.term()
    os._exit(0)


@pytest.fixture
def pull(tmp_path):
    """(PULL socket, its endpoint): bound on a fresh ipc endpoint, as the supervisor's control socket."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    endpoint = f"ipc://{tmp_path}/pull"
    sock.bind(endpoint)
    yield sock, endpoint
    sock.close(0)
    ctx.term()


def test_a_child_whose_supervisor_died_ends_after_the_grace_period(pull, monkeypatch):
    monkeypatch.setattr(lifecycle, "ORPHAN_GRACE_S", 0.3)
    pull, endpoint = pull
    proc = multiprocessing.get_context("fork").Process(target=_orphan, args=(endpoint,))
    proc.start()
    proc.join(5)
    assert pull.poll(15000)
    assert 0.3 <= float(pull.recv_string()) < 5


def test_the_runtime_reports_to_its_supervisor_over_the_control_channel(pull, monkeypatch):
    monkeypatch.setattr(lifecycle, "PROGRESS_S", 0.0)
    pull, endpoint = pull
    with StageRuntime("worker-0", "worker", endpoint, stop=StopFlag()) as rt:
        rt.progress(lambda: WorkerCounters(packets=1))
        rt.error("worker-0: something to say")
        rt.final(WorkerCounters(packets=2))
        assert not rt.orphaned(time.monotonic())
    got = [parse_control(pull.recv()) for _ in range(3)]
    me = os.getpid()  # every message names the process: a restarted child's are not its predecessor's
    assert got == [Report("worker-0", WorkerCounters(packets=1), pid=me),
                   ErrorReport("worker-0", "worker", "worker-0: something to say", me),
                   Report("worker-0", WorkerCounters(packets=2), final=True, pid=me)]


def test_without_a_supervisor_an_error_is_logged(caplog):
    with StageRuntime("exporter", "exporter", None, stop=StopFlag()) as rt:
        with caplog.at_level(logging.ERROR, logger="flowmeter"):
            logging.getLogger("flowmeter").propagate = True
            try:
                rt.error("collector gone")
            finally:
                logging.getLogger("flowmeter").propagate = False
    assert [r.getMessage() for r in caplog.records] == ["collector gone"]
