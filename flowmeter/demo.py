"""``flowmeter demo``: the exporter end to end with nothing to configure.

It starts the real exporter process (the same ``exporter.process.run`` the
pipeline uses) on a private ipc endpoint, a collector on a free loopback
port, pushes synthetic flow records of every template through ZeroMQ as a
worker would, and prints what the collector decoded.

``export_batches`` is the producer half on its own: tests and benchmarks
use it to drive the exporter process with any batches.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from typing import Iterable, TextIO

import numpy.typing as npt
import zmq

from exporter.exporting import ExportSettings
from exporter.transport import CollectorAddress
from .schema import EndOfStream, records_message
from .synthetic import FLOW_TEMPLATE_NAMES, synthetic_records

SENDER = "demo"


def _exporter_main(settings: ExportSettings, endpoint: str, producers: int) -> None:
    from exporter.process import run

    run(settings, endpoint, producers)


def export_batches(settings: ExportSettings, batches: Iterable[tuple[str, int, npt.NDArray]],
                   timeout_s: float = 60.0, sender: str = SENDER) -> int:
    """Run the exporter process and push ``(template name, domain, records)`` batches into it.

    Returns the exporter's exit code once it has drained (it stops by
    itself after our end-of-stream).
    """
    rundir = tempfile.mkdtemp(prefix="flowmeter-")  # mode 0700: only we can reach the socket
    endpoint = f"ipc://{rundir}/export"
    ctx_mp = multiprocessing.get_context("fork")
    proc = ctx_mp.Process(target=_exporter_main, args=(settings, endpoint, 1), name="flowmeter-exporter")
    proc.start()
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, int(timeout_s * 1000))
        push.setsockopt(zmq.SNDHWM, 1000)
        push.connect(endpoint)
        seq = 0
        for name, domain, records in batches:
            push.send_multipart(records_message(sender, seq, name, domain, records), copy=False)
            seq += 1
        push.send(EndOfStream(sender, seq).pack())
        push.close()
        proc.join(timeout_s)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
            raise TimeoutError(f"exporter did not finish within {timeout_s} s")
        return proc.exitcode
    finally:
        ctx.term()
        shutil.rmtree(rundir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(n_records: int, out: TextIO = sys.stdout) -> int:
    """Export ``n_records`` synthetic flows to a loopback collector and print them; exit code."""
    from exporter.collect import collect

    port = _free_port()
    per = max(1, n_records // len(FLOW_TEMPLATE_NAMES))
    base_ms = int(time.time() * 1000) - 120_000
    batches = []
    total = 0
    for i, name in enumerate(FLOW_TEMPLATE_NAMES):
        k = per if i < len(FLOW_TEMPLATE_NAMES) - 1 else max(1, n_records - per * i)
        batches.append((name, 1, synthetic_records(name, k, seed=i, base_ms=base_ms)))
        total += k
    settings = ExportSettings(collectors=(CollectorAddress("udp", "127.0.0.1", port),),
                              stats_interval_s=0)
    out.write(f"flowmeter demo: exporting {total} synthetic flow records of {len(batches)} templates "
              f"to a collector on udp/127.0.0.1:{port}\n")
    out.flush()
    stop = threading.Event()
    result = {}
    ready = threading.Event()

    def _collector():
        result["stats"] = collect(f"udp/127.0.0.1:{port}", False, out, count=total, duration=30.0,
                                  stop=stop, ready=ready.set)

    t = threading.Thread(target=_collector, name="demo-collector", daemon=True)
    t.start()
    ready.wait(10)
    code = export_batches(settings, batches)
    t.join(10)
    stop.set()
    t.join(2)
    stats = result.get("stats")
    received = stats.records if stats else 0
    out.write(f"flowmeter demo: exporter exit code {code}; collector decoded {received} of {total} records\n")
    return 0 if code == 0 and received == total else 1
