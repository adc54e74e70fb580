"""``flowmeter demo``: the whole product end to end, with nothing to configure.

It replays a small capture shipped inside the package (made by
``tests/support/traffic.py``) through the real multiprocess pipeline (capture,
shard workers, exporter) to a collector it starts on a free loopback port,
and prints the flow records that collector decoded.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

DEMO_CAPTURE = Path(__file__).with_name("data") / "demo.pcap"
DEMO_LOCAL_NETWORKS = ["10.0.0.0/8", "2001:db8:1::/48"]  # the generator's local side


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(supervisor: type, workers: int = 2, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Replay the shipped capture through the whole pipeline to a loopback collector; exit code.

    ``supervisor`` is ``flowmeter.supervisor.Supervisor`` (the command line hands it over: only it
    imports the supervisor).
    """
    from exporter.collect import collect

    from .config import parse_profile

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
    sup = supervisor(profile, (str(DEMO_CAPTURE),), workers, err=err, progress=False)
    code = sup.run()
    time.sleep(0.5)  # the last datagrams reach the collector
    stop.set()
    t.join(5)
    exported = sup.report.totals()["worker"].records_out
    stats = result.get("stats")
    received = stats.records - stats.options_records if stats else 0  # flow records (not sampling, names)
    out.write("\n" + sup.report.summary() + "\n")
    out.write(f"flowmeter demo: the collector decoded {received} of {exported} exported flow records\n")
    return 0 if code == 0 and received == exported > 0 else 1
