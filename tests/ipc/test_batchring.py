"""Packet batches through a batch ring: the same flows as through payload frames, slots
reused only once released, bad slots counted, a stalled ring given up after a stop."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from exporter.template import FLOW_DTYPES
from flowmeter.capture import process as capture
from flowmeter.capture.process import Capture, CaptureSettings
from flowmeter.ipc import batchring
from flowmeter.ipc.batchring import BatchRing, RingStalled
from flowmeter.ipc.packets import PACKET_DTYPE
from flowmeter.ipc.schema import PacketsHeader, parse_header
from tests.support.pcapwrite import ethernet, ethernet_ipv4_tcp, ethernet_ipv6_udp, write_pcap
from workers.process import Worker, WorkerSettings

T0 = 1_700_000_000_000_000_000


def _capture_file(path, packets: int) -> None:
    """IPv4 TCP both ways (10/8 is inside), IPv6 UDP, and every 10th frame ARP (not metered)."""
    frames = []
    for i in range(packets):
        if i % 10 == 9:
            frames.append(ethernet(b"\0" * 28, 0x0806))
        elif i % 3 == 1:
            frames.append(ethernet_ipv4_tcp(f"10.0.{i % 7}.1", "192.0.2.9", 1000 + i % 11, 443))
        elif i % 3 == 2:
            frames.append(ethernet_ipv4_tcp("192.0.2.9", f"10.0.{i % 7}.1", 443, 1000 + i % 11))
        else:
            frames.append(ethernet_ipv6_udp("2001:db8::1", f"2001:db8::{i % 5 + 2:x}", 53, 4000 + i % 13))
    write_pcap(path, [(T0 + i * 1000, f) for i, f in enumerate(frames)])


def _records(out: list) -> dict:
    """(template, src, dst, ports...) -> (packets, octets) summed over the record batches sent."""
    got = {}
    for frames in out:
        header = parse_header(frames[0])
        if len(frames) < 2:
            continue
        batch = np.frombuffer(frames[1], dtype=FLOW_DTYPES[header.template])
        for r in batch:
            key = (header.template,) + tuple(r[n].tobytes() for n in batch.dtype.names
                                             if n not in ("packetDeltaCount", "octetDeltaCount"))
            p, o = got.get(key, (0, 0))
            got[key] = (p + int(r["packetDeltaCount"]), o + int(r["octetDeltaCount"]))
    return got


def _meter(path, workers: int, ring: BatchRing | None, batch: int, direction: str = "Both") -> tuple[dict, list]:
    sent = []
    cap = Capture(CaptureSettings(index=0, direction=direction, local_networks=("10.0.0.0/8",)), workers,
                  lambda w, frames: sent.append((w, [bytes(f) if isinstance(f, bytes) else bytearray(f)
                                                     for f in frames])), ring)
    out, dropped = [], []
    ws = [Worker(WorkerSettings(index=w, max_flows=1000, idle_timeout_ns=10**9, interval_ns=0, domain=1, producers=1),
                 out.append, {cap.name: ring} if ring is not None else None) for w in range(workers)]
    old = capture.BATCH_PACKETS
    capture.BATCH_PACKETS = batch  # batches of this many frames
    try:
        cap.meter_file(str(path))
    finally:
        capture.BATCH_PACKETS = old
    cap.end_of_stream()
    for w, frames in sent:  # each worker takes its messages in order, as from its socket
        ws[w].handle(frames)
    for worker in ws:
        worker.finish()
        dropped.append(worker.dropped)
    return _records(out), sent


@pytest.mark.parametrize("workers", [1, 2])  # one worker: decoded straight into the slot, compacted in place
@pytest.mark.parametrize("direction, metered", [("Both", 810), ("SendingToPeer", 270)])  # 90 ARP; 10/8 sends 270
def test_a_ring_meters_the_same_flows_as_payload_frames(tmp_path, workers, direction, metered):
    path = tmp_path / "mix.pcap"
    _capture_file(path, 900)
    framed, framed_sent = _meter(path, workers, None, 100, direction)
    ring = BatchRing(workers, rows=100, slots=16)  # the 9 batches of 100 fit: no wait for a worker
    ringed, ring_sent = _meter(path, workers, ring, 100, direction)
    assert ringed == framed and sum(p for p, _ in ringed.values()) == metered
    assert all(len(frames) == 2 for _, frames in framed_sent if isinstance(parse_header(frames[0]), PacketsHeader))
    headers = [parse_header(f[0]) for _, f in ring_sent]
    packets = [h for h in headers if isinstance(h, PacketsHeader)]
    assert len(packets) == workers * 9 and all(len(f) == 1 for _, f in ring_sent)  # headers only
    assert [h.slot for h in packets[::workers]] == [seq % 16 for seq in range(9)]
    assert list(ring.released) == [9] * workers  # every worker released every batch


def test_a_batch_larger_than_a_slot_is_cut_to_fit(tmp_path):
    path = tmp_path / "mix.pcap"
    _capture_file(path, 300)
    ring = BatchRing(1, rows=64, slots=8)
    ringed, sent = _meter(path, 1, ring, 300)  # one decoded batch of 300 rows: five slots
    assert sum(p for p, _ in ringed.values()) == 270  # 30 of the 300 frames are ARP
    counts = [parse_header(f[0]).count for _, f in sent if isinstance(parse_header(f[0]), PacketsHeader)]
    assert len(counts) == 5 and sum(counts) == 270 and max(counts) <= 64  # 64, 64, 64, 64, 44 frames


def test_the_capture_waits_for_a_slot_until_the_worker_releases_it():
    ring = BatchRing(2, rows=4, slots=2)
    assert ring.wait_free(0) == 0.0 and ring.wait_free(1) == 0.0  # the first two slots are free
    ring.release(0, 0)
    pid = os.fork()
    if pid == 0:  # the other worker, in another process: the mapping is shared
        time.sleep(0.2)
        ring.release(1, 0)
        os._exit(0)
    waited = ring.wait_free(2)  # batch 2 reuses batch 0's slot: both workers must have released it
    os.waitpid(pid, 0)
    assert waited >= 0.1 and list(ring.released) == [1, 1]


def test_rows_written_by_one_process_are_read_by_another():
    ring = BatchRing(1, rows=8, slots=2)
    pid = os.fork()
    if pid == 0:
        ring.slot(1)[0, :3]["src_lo"] = [7, 8, 9]
        os._exit(0)
    os.waitpid(pid, 0)
    assert list(ring.rows_of(1, 0, 3)["src_lo"]) == [7, 8, 9]


def test_a_stalled_ring_is_given_up_only_after_a_stop(monkeypatch):
    monkeypatch.setattr(batchring, "STALL_S", 0.2)
    ring = BatchRing(1, rows=4, slots=1)
    stopping = []
    t = time.monotonic()
    with pytest.raises(RingStalled, match="worker-0 took no batch"):
        ring.wait_free(1, stop=lambda: stopping.append(1) or len(stopping) > 20)
    assert time.monotonic() - t >= 0.2  # not before the stop plus STALL_S without a release


def test_a_worker_drops_headers_that_name_no_slot_of_its_ring_and_still_releases_them():
    ring = BatchRing(1, rows=4, slots=2)
    worker = Worker(WorkerSettings(index=0, max_flows=10, idle_timeout_ns=10**9, interval_ns=0, domain=1, producers=1),
                    lambda frames: None, {"capture-0": ring})
    worker.handle([PacketsHeader("capture-0", 0, 2, T0, slot=1).pack()])  # slot is not seq % slots
    worker.handle([PacketsHeader("capture-0", 1, 5, T0, slot=1).pack()])  # more rows than a slot holds
    worker.handle([PacketsHeader("capture-9", 2, 1, T0, slot=0).pack()])  # no such ring
    worker.handle([PacketsHeader("capture-0", 2, 1, T0, slot=0).pack(), b"payload"])  # a ring message has no payload
    assert worker.dropped == {"bad slot": 2, "unexpected message": 2}
    assert worker.table.counters.packets == 0
    assert ring.released[0] == 3  # every header of its ring released its slot, the capture never stalls
    ring.slots[1, 0, :1] = np.zeros(1, PACKET_DTYPE)
    ring.slots[1, 0, 0]["ip_version"] = 4
    worker.handle([PacketsHeader("capture-0", 3, 1, T0, slot=1).pack()])
    assert worker.table.counters.packets == 1 and ring.released[0] == 4


def test_batches_given_up_for_a_dead_worker_are_never_waited_for_nor_read_by_its_successor():
    ring = BatchRing(2, rows=4, slots=2)
    for seq in range(3):  # worker-1 died after batch 0: it never released batches 1 and 2
        ring.wrote(seq)
        ring.release(0, seq)
    ring.release(1, 0)
    assert ring.written == 3
    ring.give_up(1)  # the supervisor, before it starts worker-1 again
    assert ring.released[1] == 3
    assert ring.wait_free(3) == 0.0  # the capture does not wait for the batches it will never take
    successor = Worker(WorkerSettings(index=1, max_flows=10, idle_timeout_ns=10**9, interval_ns=0, domain=1,
                                      producers=1), lambda frames: None, {"capture-0": ring})
    # batch 2, still on its way, is not read: its slot may hold batch 4 already
    successor.handle([PacketsHeader("capture-0", 2, 1, T0, slot=0).pack()])
    assert successor.dropped == {"batches given up": 1}
    assert successor.table.counters.packets == 0
    ring.slots[1, 1, :1] = np.zeros(1, PACKET_DTYPE)
    ring.slots[1, 1, 0]["ip_version"] = 4
    successor.handle([PacketsHeader("capture-0", 3, 1, T0, slot=1).pack()])  # the next batch is metered
    assert successor.table.counters.packets == 1 and ring.released[1] == 4


def test_a_ring_is_made_for_its_workers():
    with pytest.raises(ValueError, match="between 1 and"):
        BatchRing(0, rows=4)
    with pytest.raises(ValueError, match="made for 2 workers, not 3"):
        Capture(CaptureSettings(index=0), 3, lambda w, f: None, BatchRing(2, rows=4))


def test_no_shared_memory_for_the_rings_is_one_clear_error_before_anything_starts(tmp_path, monkeypatch):
    from flowmeter.config import load_profile
    from flowmeter.supervisor import Supervisor

    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    path = tmp_path / "one.pcap"
    _capture_file(path, 3)
    profile = tmp_path / "p.json"
    profile.write_text('{"FlowMetadata": {}}')
    monkeypatch.setattr(batchring.mmap, "mmap", refuse)
    sup = Supervisor(load_profile(profile), (str(path),), 1)
    assert sup.run() == 1 and not sup.children
    assert sup.errors == ["cannot map the batch rings (1 x 32 MiB of shared memory): Cannot allocate memory"]
