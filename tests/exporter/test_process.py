"""The exporter process: the ZeroMQ contract, hostile feed messages, draining on stop."""
from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
import time

import msgpack
import pytest
import zmq

from exporter import process
from exporter.exporting import ExportSettings
from exporter.message import HEADER
from exporter.template import default_registry
from flowmeter.ipc.lifecycle import StopFlag
from flowmeter.ipc.schema import (
    VERSION,
    EndOfStream,
    Report,
    parse_control,
    records_message,
)
from tests.support.collectors import UdpSink
from tests.support.synthetic import synthetic_records


def Sink():
    return UdpSink(timeout_s=0.5)


def _run(settings, endpoint, producers=None, **handover):
    """The exporter's entry as the supervisor calls it, on one records endpoint and no control channel."""
    return process.run(process.ExporterSettings(settings, producers), process.ExporterEndpoints(endpoint),
                       process.ExporterHandover(**handover))


def _start_thread(settings, endpoint, producers=None):
    """The exporter in a thread, its final counters read from a control channel as the supervisor reads them."""
    stop = StopFlag()
    result = {}
    control = f"{endpoint}-control"
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.bind(control)

    def target():
        process.run(process.ExporterSettings(settings, producers), process.ExporterEndpoints(endpoint, control),
                    process.ExporterHandover(stop=stop))
        while pull.poll(2000):
            report = parse_control(pull.recv())
            if isinstance(report, Report) and report.final:
                result["stats"] = report.counters
                break
        pull.close(0)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, stop, result


def test_hostile_feed_messages_are_counted_and_dropped(tmp_path):
    sink = Sink()
    endpoint = f"ipc://{tmp_path}/export"
    settings = ExportSettings(collectors=(sink.address,), stats_interval_s=0)
    t, stop, result = _start_thread(settings, endpoint, producers=1)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(endpoint)
    good = synthetic_records("ipv4_tcp", 7)
    hdr = lambda **kw: msgpack.packb({"kind": "records", "v": VERSION, "sender": "w", "seq": 0, "count": 7,
                                      "template": "ipv4_tcp", "domain": 1,
                                      "dtype": str(good.dtype.descr), **kw})
    hostile = [
        [b"\xc1\xff not msgpack"],                                  # bad header
        [msgpack.packb([1, 2, 3])],                                 # bad header (not a map)
        [hdr(v=99), good.tobytes()],                                # bad header (version)
        [hdr(kind="bogus"), good.tobytes()],                        # bad header (kind)
        [hdr(count="seven"), good.tobytes()],                       # bad header (type)
        [b"\x00" * 5000],                                           # bad header (too long)
        [hdr(template="ipv9_tcp"), good.tobytes()],                 # unknown template
        [hdr(template="exporter_stats"), good.tobytes()],           # unknown template (not a flow one)
        [hdr(), good.tobytes()[:-1]],                               # bad payload (size)
        [hdr(count=8), good.tobytes()],                             # bad payload (count)
        [hdr(dtype="[('x', '<u8')]"), good.tobytes()],              # bad payload (dtype)
        [hdr()],                                                    # bad frame count
        [hdr(), good.tobytes(), b"extra"],                          # bad frame count
        [msgpack.packb({"kind": "packets", "v": VERSION, "sender": "w", "seq": 0, "count": 0,
                        "clock_ns": 5, "slot": -1}), b""],              # unexpected kind
    ]
    for frames in hostile:
        push.send_multipart(frames)
    push.send_multipart(records_message("w", 1, "ipv4_tcp", 1, good), copy=False)
    push.send(EndOfStream("w", 2).pack())
    t.join(20)
    push.close()
    ctx.term()
    assert not t.is_alive()
    stats = result["stats"]
    assert stats.dropped == {"bad header": 6, "unknown template": 2, "bad payload": 3, "bad frame count": 2,
                             "unexpected kind": 1}
    assert stats.records == 7
    assert sink.flow_records() == 7


def _exporter_child(settings, endpoint):
    _run(settings, endpoint)


def test_sigterm_exports_every_batch_already_received(tmp_path):
    sink = Sink()
    endpoint = f"ipc://{tmp_path}/export"
    settings = ExportSettings(collectors=(sink.address,), stats_interval_s=0)
    child = multiprocessing.get_context("fork").Process(target=_exporter_child, args=(settings, endpoint))
    child.start()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    push.connect(endpoint)
    total = 0
    for i in range(200):
        recs = synthetic_records("ipv6_udp", 50, seed=i)
        push.send_multipart(records_message("w", i, "ipv6_udp", 1, recs), copy=False)
        total += len(recs)
    push.close()  # linger: everything is handed to the exporter's socket
    ctx.term()
    os.kill(child.pid, signal.SIGTERM)  # no end-of-stream: the signal alone must drain
    child.join(20)
    assert child.exitcode == 0
    assert sink.flow_records() == total


def test_exporting_off_still_drains_and_exits(tmp_path):
    endpoint = f"ipc://{tmp_path}/export"
    t, stop, result = _start_thread(ExportSettings(collectors=(), stats_interval_s=0), endpoint, producers=1)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(endpoint)
    push.send_multipart(records_message("w", 0, "ipv4_other", 1, synthetic_records("ipv4_other", 3)), copy=False)
    push.send(EndOfStream("w", 1).pack())
    t.join(10)
    push.close()
    ctx.term()
    assert not t.is_alive() and result["stats"].records == 3


def _exporter_child_with_reload(settings, endpoint, reloaded):
    _run(settings, endpoint, reload=lambda: reloaded)


def test_sighup_reload_adds_a_collector_and_sends_templates_at_once(tmp_path):
    first, second = Sink(), Sink()
    endpoint = f"ipc://{tmp_path}/export"
    before = ExportSettings(collectors=(first.address,), stats_interval_s=0, refresh_s=3600, refresh_messages=0)
    after = ExportSettings(collectors=(first.address, second.address), stats_interval_s=0, refresh_s=3600,
                           refresh_messages=0)
    child = multiprocessing.get_context("fork").Process(target=_exporter_child_with_reload,
                                                        args=(before, endpoint, after))
    child.start()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    push.connect(endpoint)
    push.send_multipart(records_message("w", 0, "ipv4_tcp", 1, synthetic_records("ipv4_tcp", 10)), copy=False)
    time.sleep(0.5)
    os.kill(child.pid, signal.SIGHUP)
    time.sleep(0.5)
    # templates went out again at once, before any new data, with the sequence number kept
    first.sock.settimeout(1.0)
    msgs = []
    while True:
        try:
            msgs.append(first.sock.recv(70000))
        except socket.timeout:
            break
    heads = [(HEADER.unpack_from(m)[3], int.from_bytes(m[16:18], "big")) for m in msgs]
    tcp = default_registry()["ipv4_tcp"].template_id
    try:
        assert heads == [(0, 2), (0, tcp), (10, 2)]
    except AssertionError:
        child.kill()  # not left waiting for a stop that never comes
        raise
    push.send_multipart(records_message("w", 1, "ipv4_tcp", 1, synthetic_records("ipv4_tcp", 5)), copy=False)
    push.close()
    ctx.term()
    time.sleep(0.5)
    os.kill(child.pid, signal.SIGTERM)
    child.join(20)
    assert child.exitcode == 0
    assert first.flow_records() == 5
    assert second.flow_records() == 5


def _push_all(endpoint, batches):
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    push.setsockopt(zmq.SNDHWM, 1)  # past the exporter's RECEIVE_HWM, only its reading lets us go on
    push.connect(endpoint)
    for i, (name, recs) in enumerate(batches):
        push.send_multipart(records_message("w", i, name, 1, recs), copy=False)
    push.close()  # linger: everything is handed to the exporter's socket
    ctx.term()


def _exporter_child_until_end(settings, endpoint):
    _run(settings, endpoint, producers=1)


@pytest.mark.usefixtures("sink_elsewhere")  # paced by ExportRate, not by the sink's queue
def test_paced_exporter_keeps_receiving_and_sends_everything_before_exit(tmp_path, monkeypatch):
    sink = Sink()
    endpoint = f"ipc://{tmp_path}/export"
    rate, n = 1000, 1000
    # the forked exporter holds at most 10 batches unread: the producer gets on only as it reads
    monkeypatch.setattr(process, "RECEIVE_HWM", 10)
    settings = ExportSettings(collectors=(sink.address,), stats_interval_s=0, export_rate=rate, export_burst=16)
    child = multiprocessing.get_context("fork").Process(target=_exporter_child_until_end, args=(settings, endpoint))
    child.start()
    batches = [synthetic_records("ipv6_udp", 18, seed=i) for i in range(n)]  # one message each
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 1)
    push.connect(endpoint)
    t0 = time.monotonic()
    for i, recs in enumerate(batches):
        push.send_multipart(records_message("w", i, "ipv6_udp", 1, recs), copy=False)
    handed = time.monotonic() - t0
    push.send(EndOfStream("w", n).pack())
    child.join(20)  # ZeroMQ drops what a peer that goes away has not read: stay until the exporter is done
    took = time.monotonic() - t0
    push.close(0)
    ctx.term()
    assert child.exitcode == 0
    # the batches were taken while their messages waited for the pace, then all were sent before exit
    assert handed < 0.5 * (n - 16) / rate, (handed, took)
    assert took >= (n - 16) / rate
    assert sink.flow_records() == n * 18


@pytest.mark.usefixtures("sink_elsewhere")  # paced by ExportRate, not by the sink's queue
def test_second_sigterm_during_a_paced_drain_exits_at_once(tmp_path):
    sink = Sink()
    endpoint = f"ipc://{tmp_path}/export"
    settings = ExportSettings(collectors=(sink.address,), stats_interval_s=0, export_rate=100, export_burst=16)
    child = multiprocessing.get_context("fork").Process(target=_exporter_child, args=(settings, endpoint))
    child.start()
    _push_all(endpoint, [("ipv4_tcp", synthetic_records("ipv4_tcp", 26 * 500, seed=1))])  # 5 s at 100/s
    os.kill(child.pid, signal.SIGTERM)
    time.sleep(0.5)
    t0 = time.monotonic()
    os.kill(child.pid, signal.SIGTERM)
    child.join(20)
    assert child.exitcode == 0
    assert time.monotonic() - t0 < 1.0
    assert 0 < sink.flow_records() < 26 * 500
