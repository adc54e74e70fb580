"""The supervisor's warm-up loads every compiled kernel version a child will call.

Children are forked after the warm-up; a kernel version they need and the
supervisor did not load is read from numba's cache at the first batch (time
lost), or compiled, which a process that gave up root (``User``) cannot do:
its cache belongs to root. So the data plane run after the warm-up must not
add a single version to any kernel.
"""
from __future__ import annotations

import numpy as np

from flowmeter import warmup
from flowmeter.capture import decode, shard
from flowmeter.capture import process as capture
from flowmeter.capture.process import Capture, CaptureSettings
from flowmeter.capture.sources import pcapfile
from flowmeter.ipc.batchring import BatchRing
from tests.support.pcapwrite import ethernet_ipv4_tcp, ethernet_ipv6_udp, write_pcap
from workers import expiry, flowrows, flowtable, records
from workers.process import Worker, WorkerSettings


def _versions() -> dict[str, int]:
    out = {}
    for module in (decode, pcapfile, shard, flowrows, expiry, flowtable, records, capture):
        for name in dir(module):
            kernel = getattr(module, name)
            if hasattr(kernel, "signatures") and hasattr(kernel, "py_func"):
                out[f"{module.__name__}.{name}"] = len(kernel.signatures)
    return out


def test_replay_after_warm_up_needs_no_other_kernel_version(tmp_path):
    warmup.load_kernels()
    before = _versions()
    path = tmp_path / "mix.pcap"
    frames = [ethernet_ipv4_tcp("10.0.0.1", "10.0.0.2", 1000 + i, 80) for i in range(50)]
    frames += [ethernet_ipv6_udp("2001:db8::1", "2001:db8::2", 53, 2000 + i) for i in range(50)]
    write_pcap(path, [(1_700_000_000_000_000_000 + i * 1000, f) for i, f in enumerate(frames)])
    sent = []
    cap = Capture(CaptureSettings(index=0, files=(str(path),), local_networks=("10.0.0.0/8",)), 2,
                  lambda w, frames: sent.append((w, frames)))
    cap.meter_file(str(path))
    one = tmp_path / "one.pcap"  # a batch of one row: its columns are another array type
    write_pcap(one, [(1_700_000_001_000_000_000, frames[0])])
    cap.meter_file(str(one))
    out = []
    for w in range(2):
        worker = Worker(WorkerSettings(index=w, max_flows=1000, idle_timeout_ns=10**9, interval_ns=0, domain=1,
                                       producers=1), out.append)
        for to, message in sent:
            if to == w:
                worker.handle([message[0], bytearray(np.ascontiguousarray(message[1]).tobytes())])  # as a zmq frame: writable
        worker.finish()
    assert cap.counters.packets == 101 and out
    # The running pipeline's path: rows through a batch ring's shared slots instead of frames.
    ring = BatchRing(2, rows=64)
    sent.clear()
    cap = Capture(CaptureSettings(index=0, local_networks=("10.0.0.0/8",)), 2,
                  lambda w, frames: sent.append((w, frames)), ring)
    cap.meter_file(str(path))
    workers = [Worker(WorkerSettings(index=w, max_flows=1000, idle_timeout_ns=10**9, interval_ns=0, domain=1,
                                     producers=1), out.append, {cap.name: ring}) for w in range(2)]
    for to, message in sent:
        workers[to].handle(message)
    assert sum(w.table.counters.packets for w in workers) == 100
    after = _versions()
    assert after == before, {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
    assert np.all(np.array(list(before.values())) >= 0)
