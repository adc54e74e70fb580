"""flowmeter run as pid 1, as in a container: its children are not orphans.

A child asks the kernel for a signal when its supervisor dies and checks
it was not dead already; a container's entrypoint is pid 1 in its pid
namespace, and a check against "1" (the usual reaper) took that for the
supervisor's death: every child stopped within a fraction of a second.
``unshare --pid --fork`` makes the supervisor pid 1 of a new namespace here.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.collectors import Nfcapd, require
from tests.support.pcapwrite import ethernet_ipv4_udp, write_pcap

ROOT = Path(__file__).resolve().parents[2]
PACKETS = 300


def test_a_supervisor_that_is_pid_1_keeps_its_children_and_meters_everything(tmp_path):
    require("unshare")
    cap = tmp_path / "few.pcap"
    write_pcap(cap, [(1_700_000_000 + i * 0.01, ethernet_ipv4_udp("10.0.0.1", "192.0.2.1", 1000 + i % 30, 53, b"x" * 40))
                     for i in range(PACKETS)])
    nf = Nfcapd(tmp_path / "nfcapd")
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"FlowMetadata": {"IpFixCollectors": [nf.collector], "Sources": [f"pcap:{cap}"],
                                                    "StatisticsIntervalSeconds": 0}}))
    try:
        r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
                            "import os, sys; assert os.getpid() == 1, os.getpid(); "
                            "sys.argv = ['flowmeter', 'run', '--profile', sys.argv[1]]; "
                            "from flowmeter.cli import main; main()", str(profile)],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
        rows = nf.records()
    finally:
        nf.stop()
    assert r.returncode == 0, r.stderr
    assert f"{PACKETS} packets metered" in r.stderr, r.stderr
    assert sum(row["in_packets"] for row in rows) == PACKETS
