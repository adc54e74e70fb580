"""``/metrics`` of a real ``flowmeter run``: checked by ``promtool``, scraped by Debian's ``prometheus``,
and equal to what nfcapd received.

The run meters a known capture (``pcap:``) next to a ``feed:`` source no
agent sends to: the capture is read to its end, its flows end by
``IdleTimeout`` on the wall clock and reach nfcapd, and the feed keeps the
run up until the test has scraped it and sends SIGTERM.
"""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from tests.support import traffic
from tests.support.collectors import Nfcapd, require

ROOT = Path(__file__).resolve().parents[2]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of every sample in an exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def wait_for(what: str, check, timeout_s: float, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = check()
        except OSError:
            got = None
        if got:
            return got
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what}: not in {timeout_s:g} s (flowmeter exit {proc.poll()})")
        time.sleep(0.3)


def prometheus_query(port: int, query: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as r:
        doc = json.load(r)
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def test_flowmeter_run_serves_metrics_prometheus_scrapes_and_nfcapd_agrees(tmp_path):
    require("promtool", "prometheus", "nfcapd", "nfdump")
    t = traffic.generate(4000, seed=11)
    pcap = tmp_path / "known.pcap"
    traffic.write(str(pcap), t)
    nfcapd = Nfcapd(tmp_path / "nfcapd")
    port = free_tcp_port()
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"FlowMetadata": {
        "Sources": [f"pcap:{pcap}", f"feed:ipc://{tmp_path}/feed"], "IpFixCollectors": [nfcapd.collector],
        "MetricsAddress": f"127.0.0.1:{port}", "IdleTimeout": 1000, "StatisticsIntervalSeconds": 0,
        "OptionsRecords": False, "Workers": 2}}))
    proc = subprocess.Popen([sys.executable, "-m", "flowmeter.cli", "run", "--profile", str(profile)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    prom = None
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        sent = f'flowmeter_collector_packets_sent_total{{collector="{nfcapd.collector}"}}'
        # every packet of the capture metered and its flows ended (idle) and sent
        text = wait_for("every packet sent", lambda: (lambda m: m if samples(m).get(sent) == len(t) else None)(
            scrape(url)), 120, proc)
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), (lint, text)
        m = samples(text)
        source = f'source="pcap:{pcap}"'
        assert m[f"flowmeter_source_packets_metered_total{{{source}}}"] == len(t)
        assert m[f"flowmeter_source_metered_bytes_total{{{source}}}"] == int(traffic.l3_bytes(t).sum())
        assert m[f'flowmeter_source_packets_metered_total{{source="feed:ipc://{tmp_path}/feed"}}'] == 0
        records = m[f'flowmeter_collector_records_sent_total{{collector="{nfcapd.collector}"}}']
        made = sum(v for k, v in m.items() if k.startswith("flowmeter_worker_records_total"))
        assert records == made == sum(v for k, v in m.items() if k.startswith("flowmeter_worker_flows_total"))
        assert sum(v for k, v in m.items() if k.startswith("flowmeter_worker_active_flows")) == 0
        assert m[f'flowmeter_collector_packets_not_sent_total{{collector="{nfcapd.collector}"}}'] == 0
        assert m['flowmeter_process_restarts_total{role="worker"}'] == 0
        assert m['flowmeter_lost_packets_total{role="worker"}'] == 0
        for name, role in (("supervisor", "supervisor"), ("exporter", "exporter"), ("worker-0", "worker"),
                           ("capture-1", "capture")):
            assert m[f'flowmeter_process_resident_memory_bytes{{process="{name}",role="{role}"}}'] > 1 << 20
            assert f'flowmeter_process_cpu_seconds_total{{process="{name}",role="{role}"}}' in m
        assert any(k.startswith("flowmeter_build_info{version=") for k in m)

        # Debian's prometheus scrapes it every second and answers queries on what it stored
        prom_port = free_tcp_port()
        config = tmp_path / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n"
                          f"  - job_name: flowmeter\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
        with open(tmp_path / "prometheus.log", "w") as prom_log:  # the child keeps its own descriptor
            prom = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path}/tsdb",
                                     f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=prom_log,
                                    stderr=subprocess.STDOUT)
        up = wait_for('up{job="flowmeter"} == 1', lambda: [
            r for r in prometheus_query(prom_port, 'up{job="flowmeter"}') if r["value"][1] == "1"], 60, proc)
        assert up[0]["metric"]["instance"] == f"127.0.0.1:{port}"
        stored = wait_for("the packet counter", lambda: prometheus_query(
            prom_port, f'flowmeter_source_packets_metered_total{{source="pcap:{pcap}"}}'), 30, proc)
        assert float(stored[0]["value"][1]) == len(t)

        # flowmeter status: the same run, with its current rate and each process's CPU and RSS
        status = subprocess.run([sys.executable, "-m", "flowmeter.cli", "status", "--json"], capture_output=True,
                                text=True, cwd=ROOT, timeout=60)
        doc = next(d for d in json.loads(status.stdout) if d["pid"] == proc.pid)
        assert doc["rates"] == {f"pcap:{pcap}": 0.0, f"feed:ipc://{tmp_path}/feed": 0.0}  # read to its end
        assert set(doc["processes"]) == {"supervisor", "exporter", "worker-0", "worker-1", "capture-1"}
        assert all(u["rss"] > 1 << 20 and u["cpu_s"] >= 0 for u in doc["processes"].values())
        text = subprocess.run([sys.executable, "-m", "flowmeter.cli", "status"], capture_output=True, text=True,
                              cwd=ROOT, timeout=60).stdout
        assert re.search(rf"pcap:{re.escape(str(pcap))}: 0 packets/s over the last [0-9.]+ s", text), text
        assert re.search(r"  worker-0: pid \d+, running, [\d,]+ packets, [\d,]+ records, CPU [\d.]+ s, "
                         r"RSS [\d.,]+ MiB", text), text

        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        for p in (proc, prom):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    assert proc.returncode == 0, err
    rows = nfcapd.records()
    assert sum(r["in_packets"] for r in rows) == m[sent] == len(t)
    assert len(rows) == records
    assert re.search(rf"{len(t):,} packets metered", err)
