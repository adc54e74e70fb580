"""``flowmeter demo``: the whole product end to end, with nothing to configure.

It replays a small capture shipped inside the package (made by
``flowmeter.traffic``) through the real multiprocess pipeline (capture,
shard workers, exporter) to a collector it starts on a free loopback port,
and prints the flow records that collector decoded.

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
from pathlib import Path
from typing import Iterable, TextIO

import numpy.typing as npt
import zmq

from exporter.exporting import ExportSettings
from .schema import EndOfStream, records_message

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


DEMO_CAPTURE = Path(__file__).with_name("data") / "demo.pcap"
DEMO_LOCAL_NETWORKS = ["10.0.0.0/8", "2001:db8:1::/48"]  # the generator's local side


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(workers: int = 2, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Replay the shipped capture through the whole pipeline to a loopback collector; exit code."""
    from exporter.collect import collect

    from .config import parse_profile
    from .supervisor import Supervisor

    port = _free_port()
    profile = parse_profile({"FlowMetadata": {
        "IpFixCollectors": [f"Udp/127.0.0.1:{port}"], "StatisticsIntervalSeconds": 0,
        "LocalNetworks": DEMO_LOCAL_NETWORKS}}, "<demo>")
    out.write(f"flowmeter demo: replaying {DEMO_CAPTURE.name} (shipped with flowmeter) through capture, "
              f"{workers} workers and the exporter, to a collector on udp/127.0.0.1:{port}\n")
    out.flush()
    stop = threading.Event()
    ready = threading.Event()
    result = {}

    def _collector():
        result["stats"] = collect(f"udp/127.0.0.1:{port}", False, out, stop=stop, ready=ready.set,
                                  err=open(os.devnull, "w"))

    t = threading.Thread(target=_collector, name="demo-collector", daemon=True)
    t.start()
    ready.wait(10)
    sup = Supervisor(profile, (str(DEMO_CAPTURE),), workers, err=err, progress=False)
    code = sup.run()
    time.sleep(0.5)  # the last datagrams reach the collector
    stop.set()
    t.join(5)
    exported = sup.totals()["worker"].get("records_out", 0)
    received = result["stats"].records if "stats" in result else 0
    out.write("\n" + sup.summary() + "\n")
    out.write(f"flowmeter demo: the collector decoded {received} of {exported} exported flow records\n")
    return 0 if code == 0 and received == exported > 0 else 1
