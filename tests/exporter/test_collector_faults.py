"""Output faults are one collector's problem: a full or failing disk, a file that cannot be opened,
a rotated file, a collector whose queue is full."""
from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import zmq

from exporter import exporting, process, transport
from exporter.exporting import ExportingProcess, ExportSettings
from exporter.template import default_registry
from exporter.transport import CollectorAddress
from flowmeter.ipc.schema import EndOfStream, records_message
from tests.support.collectors import UdpSink, ipfix_file_messages, ipfixdump_records, ipfixdump_warnings, tmpfs
from tests.support.synthetic import synthetic_records

RECORD_LEN = {t.template_id: t.record_length for t in default_registry()}
TCP = "ipv4_tcp"
TCP4 = default_registry()[TCP]
PER = (1452 - 20) // TCP4.record_length  # ipv4_tcp records in a full message
MSG = 20 + PER * TCP4.record_length  # its octets
# the message of the flow templates: header, one template set holding them all
TEMPLATES_MSG = 16 + 4 + sum(len(t.encoded) for t in default_registry() if not t.is_options)


def file_messages(path: Path) -> list[tuple[str, int, int]]:
    return ipfix_file_messages(path, RECORD_LEN)


def file_collector(path: Path) -> CollectorAddress:
    return CollectorAddress("file", path=str(path))


class ScriptedOs:
    """``os`` as exporter/transport.py sees it, with faults scripted for its next writes and truncates.

    ``writes``: per ``os.write`` call, None (as the kernel does), ``("part", k)`` (only the first
    k octets written) or an errno (raised). ``truncates``: per ``os.ftruncate``, None or an errno.
    """

    def __init__(self) -> None:
        self.writes: list = []
        self.truncates: list[int | None] = []

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        step = self.writes.pop(0) if self.writes else None
        if isinstance(step, tuple):
            return os.write(fd, memoryview(data)[:step[1]])
        if step is not None:
            raise OSError(step, os.strerror(step))
        return os.write(fd, data)

    def ftruncate(self, fd, length):
        code = self.truncates.pop(0) if self.truncates else None
        if code is not None:
            raise OSError(code, os.strerror(code))
        return os.ftruncate(fd, length)


@pytest.fixture
def faulty_os(monkeypatch) -> ScriptedOs:
    fake = ScriptedOs()
    monkeypatch.setattr(transport, "os", fake)
    return fake


def _file_exporter(path: Path, *more: CollectorAddress, **kw) -> ExportingProcess:
    settings = ExportSettings(collectors=(file_collector(path), *more), stats_interval_s=0, refresh_s=3600,
                              refresh_messages=0, **kw)
    return ExportingProcess(settings)


# --- torn writes ----------------------------------------------------------------------------------

def test_a_partial_write_is_cut_back_to_the_last_whole_message(tmp_path, faulty_os):
    path = tmp_path / "out.ipfix"
    exp = _file_exporter(path)
    t = exp.registry[TCP]
    exp.export(t, synthetic_records(TCP, PER * 3, seed=1), 1, now=100.0)  # templates + 3 messages
    size = path.stat().st_size
    # the next batch: the open message takes one message's worth and goes in one write, the 9 full
    # messages after it in another, of which 1.5 fit before the disk is full
    faulty_os.writes += [None, ("part", int(1.5 * MSG)), errno.ENOSPC]
    exp.export(t, synthetic_records(TCP, PER * 10, seed=2), 1, now=100.1)
    c = exp.sessions[0].counters
    assert path.stat().st_size == size + 2 * MSG  # the half message is gone
    assert c.not_sent_messages == c.errors["ENOSPC"] == 8 and c.not_sent_records == 8 * PER
    assert [k for k, _, _ in file_messages(path)] == ["T"] + ["D"] * 5
    assert ipfixdump_warnings(path) == []
    assert len(ipfixdump_records(path)) == 5 * PER == c.flow_records


def test_writing_resumes_after_a_full_disk_with_templates_first(tmp_path, faulty_os):
    path = tmp_path / "out.ipfix"
    exp = _file_exporter(path)
    t = exp.registry[TCP]
    exp.export(t, synthetic_records(TCP, PER, seed=1), 1, now=100.0)
    faulty_os.writes.append(errno.ENOSPC)
    exp.export(t, synthetic_records(TCP, PER * 4, seed=2), 1, now=100.1)  # fails: not tried again ...
    exp.export(t, synthetic_records(TCP, PER * 2, seed=3), 1, now=100.2)  # ... before FILE_RETRY_S
    assert faulty_os.writes == []  # one failed write, no second try within FILE_RETRY_S
    c = exp.sessions[0].counters
    lost = c.not_sent_records
    assert lost == 6 * PER and c.errors["ENOSPC"] == c.not_sent_messages
    exp.export(t, synthetic_records(TCP, PER * 2, seed=4), 1, now=100.1 + transport.FILE_RETRY_S)
    exp.close()
    kinds = [(k, seq) for k, seq, _ in file_messages(path)]
    # templates again before the data that follows the failure; the sequence number counts only what
    # was written, so the file has no gap for a reader to report
    assert kinds == [("T", 0), ("D", 0), ("T", PER), ("D", PER), ("D", 2 * PER)]
    assert ipfixdump_warnings(path) == []
    assert len(ipfixdump_records(path)) == 3 * PER == 9 * PER - lost


def test_an_io_error_reopens_the_file_at_the_next_try(tmp_path, faulty_os):
    path = tmp_path / "out.ipfix"
    exp = _file_exporter(path)
    t = exp.registry[TCP]
    exp.export(t, synthetic_records(TCP, PER, seed=1), 1, now=100.0)
    faulty_os.writes.append(errno.EIO)
    exp.export(t, synthetic_records(TCP, PER, seed=2), 1, now=100.1)
    old = tmp_path / "failed.ipfix"
    path.rename(old)  # the file that failed is not written again: its path is opened anew
    exp.export(t, synthetic_records(TCP, PER, seed=3), 1, now=100.1 + transport.FILE_RETRY_S)
    exp.close()
    assert exp.sessions[0].counters.errors == {"EIO": 1}
    assert [k for k, _, _ in file_messages(old)] == ["T", "D"]
    assert [k for k, _, _ in file_messages(path)] == ["T", "D"]
    assert ipfixdump_warnings(path) == [] and len(ipfixdump_records(path)) == PER


def test_a_torn_message_that_cannot_be_cut_off_yet_holds_writing_back(tmp_path, faulty_os):
    path = tmp_path / "out.ipfix"
    exp = _file_exporter(path)
    t = exp.registry[TCP]
    exp.export(t, synthetic_records(TCP, PER, seed=1), 1, now=100.0)
    # EIO 700 octets into a message, and the cut fails too: nothing may be appended until it works
    faulty_os.writes += [("part", 700), errno.EIO]
    faulty_os.truncates += [errno.EIO, errno.EIO]
    exp.export(t, synthetic_records(TCP, PER * 2, seed=2), 1, now=100.1)
    assert path.stat().st_size == TEMPLATES_MSG + MSG + 700  # torn for now
    exp.export(t, synthetic_records(TCP, PER, seed=3), 1, now=101.2)  # the cut fails again: no write
    assert path.stat().st_size == TEMPLATES_MSG + MSG + 700
    exp.export(t, synthetic_records(TCP, PER, seed=4), 1, now=102.3)  # cut, then written
    exp.close()
    c = exp.sessions[0].counters
    assert c.errors == {"EIO": c.not_sent_messages} and c.not_sent_records == 3 * PER
    assert [k for k, _, _ in file_messages(path)] == ["T", "D", "T", "D"]
    assert ipfixdump_warnings(path) == []
    assert len(ipfixdump_records(path)) == 2 * PER


def test_a_full_device_never_raises_and_never_holds_up_the_udp_collector(tmp_path):
    sink = UdpSink()
    exp = ExportingProcess(ExportSettings(collectors=(file_collector(Path("/dev/full")), sink.address),
                                          stats_interval_s=1))
    t = exp.registry[TCP]
    for i in range(20):
        exp.export(t, synthetic_records(TCP, 100, seed=i), 1)
        exp.tick()
    exp.send_statistics()
    exp.close()  # flush and close must not raise either
    full, udp = exp.totals()["collectors"].values()
    assert sink.flow_records() == 2000 == udp["flow_records"]
    assert full["flow_records"] == 0 and full["not_sent_records"] >= 2000
    assert full["errors"] == {"ENOSPC": full["not_sent_messages"]}
    assert "No space left on device" in full["last_error"]


# --- files that cannot be opened, reload, rotation ------------------------------------------------

def test_reload_with_a_file_that_cannot_be_opened_counts_it_and_keeps_the_others(tmp_path):
    sink = UdpSink()
    base = ExportSettings(collectors=(sink.address,), stats_interval_s=0, refresh_s=3600, refresh_messages=0)
    exp = ExportingProcess(base)
    t = exp.registry[TCP]
    exp.export(t, synthetic_records(TCP, 10, seed=1), 1)
    missing = tmp_path / "later" / "out.ipfix"
    with tmpfs(tmp_path / "ro", "64k", read_only=True) as ro:
        unwritable = ro / "out.ipfix"
        notes = exp.reload(ExportSettings(collectors=(sink.address, file_collector(missing),
                                                      file_collector(unwritable)),
                                          stats_interval_s=0, refresh_s=3600, refresh_messages=0))
        assert notes == [
            f"collector File/{missing}: cannot open: No such file or directory; its records are counted as "
            f"not sent and the file is tried again every 1 s",
            f"collector File/{unwritable}: cannot open: Read-only file system; its records are counted as "
            f"not sent and the file is tried again every 1 s"]
        now = time.monotonic()
        exp.export(t, synthetic_records(TCP, PER * 3, seed=2), 1, now=now)
        exp.flush(now)
        c = {s.name: s.counters for s in exp.sessions}
        assert c[f"File/{missing}"].errors == {"ENOENT": c[f"File/{missing}"].not_sent_messages}
        assert c[f"File/{unwritable}"].errors == {"EROFS": c[f"File/{unwritable}"].not_sent_messages}
        assert c[f"File/{missing}"].not_sent_records == c[f"File/{unwritable}"].not_sent_records == PER * 3
        # the directory appears: the file is opened at the next try, templates first
        missing.parent.mkdir()
        later = now + transport.FILE_RETRY_S
        exp.export(t, synthetic_records(TCP, 7, seed=3), 1, now=later)
        exp.flush(later)
        exp.close()
    assert sink.flow_records() == 10 + PER * 3 + 7
    assert [k for k, _, _ in file_messages(missing)] == ["T", "D"]
    assert ipfixdump_warnings(missing) == [] and len(ipfixdump_records(missing)) == 7


def test_a_file_that_cannot_be_opened_at_start_is_counted_not_fatal(tmp_path):
    sink = UdpSink()
    missing = tmp_path / "gone" / "out.ipfix"
    exp = ExportingProcess(ExportSettings(collectors=(file_collector(missing), sink.address), stats_interval_s=0))
    assert exp.unopened() == [f"collector File/{missing}: cannot open: No such file or directory; its records "
                              f"are counted as not sent and the file is tried again every 1 s"]
    exp.export(exp.registry[TCP], synthetic_records(TCP, 100), 1)
    exp.close()
    assert sink.flow_records() == 100
    assert exp.sessions[0].counters.not_sent_records == 100


def test_every_reload_reopens_the_file_and_the_new_one_decodes_alone(tmp_path):
    path = tmp_path / "out.ipfix"
    exp = _file_exporter(path)
    t = exp.registry[TCP]
    exp.export(t, synthetic_records(TCP, 50, seed=1), 1)
    exp.export(t, synthetic_records(TCP, 30, seed=2), 1)  # still in the open message
    rotated = tmp_path / "out.ipfix.1"
    path.rename(rotated)  # logrotate's mv, then SIGHUP
    assert exp.reload() == []
    exp.export(t, synthetic_records(TCP, 20, seed=3), 1)
    exp.close()
    # what came before the reload is in the old file, all of it; the new file starts with templates
    assert len(ipfixdump_records(rotated)) == 80 and ipfixdump_warnings(rotated) == []
    assert file_messages(path)[0][0] == "T"
    assert ipfixdump_warnings(path) == [] and len(ipfixdump_records(path)) == 20


def _exporter_child(settings, endpoint, reloaded):
    from flowmeter.ipc.logs import setup_logging

    setup_logging("exporter")
    process.run(process.ExporterSettings(settings, 1), process.ExporterEndpoints(endpoint),
                process.ExporterHandover(reload=lambda: reloaded))


def test_sighup_adding_an_unwritable_file_does_not_stop_the_exporter(tmp_path, capfd):
    sink = UdpSink(timeout_s=0.5)
    endpoint = f"ipc://{tmp_path}/export"
    with tmpfs(tmp_path / "ro", "64k", read_only=True) as ro:
        before = ExportSettings(collectors=(sink.address,), stats_interval_s=0)
        after = ExportSettings(collectors=(sink.address, file_collector(ro / "flows.ipfix")), stats_interval_s=0)
        child = multiprocessing.get_context("fork").Process(target=_exporter_child, args=(before, endpoint, after))
        child.start()
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 5000)
        push.connect(endpoint)
        push.send_multipart(records_message("w", 0, TCP, 1, synthetic_records(TCP, 10)), copy=False)
        time.sleep(0.5)
        os.kill(child.pid, signal.SIGHUP)
        time.sleep(0.5)
        push.send_multipart(records_message("w", 1, TCP, 1, synthetic_records(TCP, 500, seed=2)), copy=False)
        push.send(EndOfStream("w", 2).pack())
        push.close()
        child.join(20)
        ctx.term()
    assert child.exitcode == 0
    assert sink.flow_records() == 510
    err = capfd.readouterr().err
    assert f"collector File/{ro}/flows.ipfix: cannot open: Read-only file system; its records are counted " \
           "as not sent and the file is tried again every 1 s" in err
    assert "EROFS" in err  # the final report names the cause of what was not sent


# --- one collector's full queue ---------------------------------------------------------------------

@pytest.mark.usefixtures("sink_elsewhere")
def test_a_full_queue_drops_its_own_oldest_and_holds_nobody_else_back(monkeypatch):
    monkeypatch.setattr(exporting, "QUEUE_SECONDS", 1.0)
    slow, fast = UdpSink(), UdpSink()
    exp = ExportingProcess(ExportSettings(collectors=(slow.address, fast.address), stats_interval_s=0,
                                          refresh_messages=0, export_rate=100_000, export_burst=64))
    exp.sessions[0].set_pace(20, 1)  # 20 messages a second: 20 queued is full
    t = exp.registry[TCP]
    total = 0
    for i in range(100):
        exp.export(t, synthetic_records(TCP, PER * 2, seed=i), 1)
        total += PER * 2
        assert not exp.backlogged()  # the fast one keeps up: input is never held back ...
        assert exp.sessions[0].queued <= 20  # ... and the slow one stays at its limit
        exp.pump()
    assert exp.drain()
    s, f = (x.counters for x in exp.sessions)
    assert fast.flow_records() == total == f.flow_records and f.not_sent_records == 0
    # the slow one gave up its oldest: what it sent is the newest, plus what went before it filled up
    assert s.not_sent_records + s.flow_records == total and s.flow_records < total // 4
    assert s.errors == {"queue full": s.not_sent_messages}
    assert slow.flow_records() == s.flow_records


@pytest.mark.usefixtures("sink_elsewhere")
def test_input_is_held_back_only_while_every_queue_is_full(monkeypatch):
    monkeypatch.setattr(exporting, "QUEUE_SECONDS", 1.0)
    a, b = UdpSink(), UdpSink()
    exp = ExportingProcess(ExportSettings(collectors=(a.address, b.address), stats_interval_s=0,
                                          refresh_messages=0, export_rate=20, export_burst=1))
    t = exp.registry[TCP]
    exp.export(t, synthetic_records(TCP, PER * 30, seed=1), 1)
    assert exp.backlogged()  # nobody keeps up: the producers wait, nothing is dropped
    assert [s.queued for s in exp.sessions] == [30, 30]
    assert all(s.counters.not_sent_messages == 0 for s in exp.sessions)
    exp.sessions[1].set_pace(0, 1)  # b is unpaced now: it sends everything at once
    exp.pump()
    assert not exp.backlogged()
    exp.export(t, synthetic_records(TCP, PER, seed=2), 1)
    assert exp.sessions[0].queued == 20  # a is back at its limit: its oldest given up
    assert exp.sessions[0].counters.errors == {"queue full": 11}
    assert not exp.drain(stop=lambda: True)


# --- where and how a File/ output is opened -------------------------------------------------------

def test_a_symlink_at_a_file_path_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious")
    path = tmp_path / "out.ipfix"
    path.symlink_to(target)
    exp = _file_exporter(path)
    (line,) = exp.unopened()
    assert line == (f"collector File/{path}: cannot open: the path is a symbolic link, refused (O_NOFOLLOW); "
                    f"its records are counted as not sent and the file is tried again every 1 s")
    exp.export(exp.registry[TCP], synthetic_records(TCP, PER * 2, seed=1), 1, now=100.0)
    exp.close()
    c = exp.sessions[0].counters
    assert c.messages == 0 and c.not_sent_records == PER * 2 and set(c.errors) == {"ELOOP"}
    assert target.read_bytes() == b"precious" and path.is_symlink()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000])
def test_a_new_file_is_made_mode_0640_whatever_the_umask(tmp_path, umask):
    path = tmp_path / "out.ipfix"
    old = os.umask(umask)
    try:
        exp = _file_exporter(path)
    finally:
        os.umask(old)
    exp.export(exp.registry[TCP], synthetic_records(TCP, PER, seed=1), 1, now=100.0)
    exp.close()
    assert path.stat().st_mode & 0o7777 == 0o640
    assert len(ipfixdump_records(path)) == PER


def test_an_existing_file_keeps_its_mode(tmp_path):
    path = tmp_path / "out.ipfix"
    path.write_bytes(b"")
    path.chmod(0o600)
    exp = _file_exporter(path)
    exp.export(exp.registry[TCP], synthetic_records(TCP, PER, seed=1), 1, now=100.0)
    exp.close()
    assert path.stat().st_mode & 0o7777 == 0o600 and path.stat().st_size > 0
