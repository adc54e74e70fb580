"""The metric families ``/metrics`` serves, built from a fixed set of counters (no pipeline runs)."""
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from flowmeter.ipc.counters import CaptureCounters, CollectorCounters, ExporterCounters, WorkerCounters
from flowmeter.metrics import MetricsServer, PipelineCollector, flowmeter_version
from flowmeter.recovery import Incident
from flowmeter.status import ChildInfo, PipelineReport, describe_runs

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Proc:
    pid: int
    exitcode: int | None = None


def report(children: list[ChildInfo], incidents=()) -> PipelineReport:
    r = PipelineReport(children, profile="p.json", sources=[], what="", workers=2, captures=1, err=io.StringIO(),
                       progress=False)
    r.files_of = {"capture-0": "pcap:a.pcap"}
    r.incidents = list(incidents)
    return r


def families(r: PipelineReport) -> dict[str, dict[tuple, float]]:
    """name -> {sorted labels: value} of every sample the collector yields."""
    out: dict[str, dict[tuple, float]] = {}
    for family in PipelineCollector(r).collect():
        for s in family.samples:
            if not s.name.endswith("_created"):
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


COLLECTOR = "udp/127.0.0.1:4739"


def pipeline() -> list[ChildInfo]:
    """A capture file, a live source whose capture process died once, two workers (one replaced), an exporter."""
    dead = os.getpid() + 10_000_000  # no such process: no CPU or memory sample for it
    return [
        ChildInfo("capture-0", "capture", Proc(dead, 0), CaptureCounters(
            frames=12, packets=10, octets=1000, other_direction=1, not_metered={"not IP": 1})),
        ChildInfo("capture-1", "capture", Proc(dead, -9), CaptureCounters(
            frames=5, packets=5, octets=500, source="afpacket:eth0",
            source_counters={"kernel packets": 6, "kernel drops": 0, "frames read": 6}), replaced=True),
        ChildInfo("capture-1", "capture", Proc(os.getpid()), CaptureCounters(
            frames=20, packets=20, octets=2000, source="afpacket:eth0",
            source_counters={"kernel packets": 30, "kernel drops": 2, "frames read": 27})),
        ChildInfo("worker-0", "worker", Proc(dead, -9), WorkerCounters(
            packets=8, packets_out=5, flows=3, records_out=2, end_reasons={"idle": 2}, active_flows=1),
            replaced=True),
        ChildInfo("worker-0", "worker", Proc(os.getpid()), WorkerCounters(
            packets=7, packets_out=7, flows=2, records_out=2, end_reasons={"idle": 1, "end_of_flow": 1},
            active_flows=4, evictions=1, given_up_packets=3)),
        ChildInfo("worker-1", "worker", Proc(os.getpid()), WorkerCounters(
            packets=12, packets_out=12, flows=4, records_out=4, end_reasons={"forced": 4}, active_flows=2,
            dropped={"bad batch": 1})),
        ChildInfo("exporter", "exporter", Proc(os.getpid()), ExporterCounters(
            records=8, packets=24, dropped={"stale": 1}, collectors={COLLECTOR: CollectorCounters(
                messages=5, octets=900, flow_records=7, packets=21, template_messages=2, not_sent_messages=1,
                not_sent_records=1, not_sent_packets=3, refused=1, errors={"ECONNREFUSED": 1})})),
    ]


def test_families_map_the_counters_faithfully() -> None:
    f = families(report(pipeline(), [Incident(1.0, "worker-0", "killed by signal 9", 1.5),
                                     Incident(2.0, "capture-1", "killed by signal 9", 2.5)]))
    src = (("source", "afpacket:eth0"),)
    pcap = (("source", "pcap:a.pcap"),)
    # a name's processes summed (a restart does not take a counter back); the source's own counts: latest
    assert f["flowmeter_source_packets_metered_total"] == {pcap: 10, src: 25}
    assert f["flowmeter_source_metered_bytes_total"] == {pcap: 1000, src: 2500}
    assert f["flowmeter_source_frames_not_metered_total"] == {
        (("cause", "not IP"), *pcap): 1, (("cause", "other direction"), *pcap): 1,
        (("cause", "other direction"), *src): 0}
    assert f["flowmeter_source_kernel_packets_total"] == {src: 30}
    assert f["flowmeter_source_kernel_drops_total"] == {src: 2}
    assert f["flowmeter_source_counts_total"] == {(("count", "frames read"), *src): 27}
    w0, w1 = (("worker", "worker-0"),), (("worker", "worker-1"),)
    assert f["flowmeter_worker_active_flows"] == {w0: 4, w1: 2}  # the current process's flows only
    assert f["flowmeter_worker_flows_total"] == {w0: 5, w1: 4}
    assert f["flowmeter_worker_evictions_total"] == {w0: 1, w1: 0}
    assert f["flowmeter_worker_records_total"] == {
        (("reason", "end_of_flow"), *w0): 1, (("reason", "idle"), *w0): 3, (("reason", "forced"), *w1): 4}
    assert f["flowmeter_worker_messages_dropped_total"] == {(("cause", "bad batch"), *w1): 1}
    assert f["flowmeter_exporter_batches_dropped_total"] == {(("cause", "stale"),): 1}
    c = (("collector", COLLECTOR),)
    for name, value in (("records_sent", 7), ("packets_sent", 21), ("messages_sent", 5), ("sent_bytes", 900),
                        ("template_messages_sent", 2), ("records_not_sent", 1), ("packets_not_sent", 3),
                        ("send_refused", 1)):
        assert f[f"flowmeter_collector_{name}_total"] == {c: value}, name
    assert f["flowmeter_collector_messages_not_sent_total"] == {(("cause", "ECONNREFUSED"), *c): 1}
    assert f["flowmeter_process_restarts_total"] == {(("role", "capture"),): 1, (("role", "worker"),): 1,
                                                     (("role", "exporter"),): 0}
    # capture-1: the source read 27 frames, its two processes took 25; worker-0: 3 given up + 3 held when killed
    assert f["flowmeter_lost_packets_total"] == {(("role", "capture"),): 2, (("role", "worker"),): 6}
    assert f["flowmeter_build_info"] == {(("version", flowmeter_version()),): 1}


def test_cpu_and_memory_are_read_for_running_processes_only() -> None:
    f = families(report(pipeline()))
    names = {dict(k)["process"] for k in f["flowmeter_process_resident_memory_bytes"]}
    assert names == {"supervisor", "capture-1", "worker-0", "worker-1", "exporter"}  # this test's pid stands in
    assert all(v > 1 << 20 for v in f["flowmeter_process_resident_memory_bytes"].values())
    assert set(f["flowmeter_process_cpu_seconds_total"]) == set(f["flowmeter_process_resident_memory_bytes"])


def test_no_counters_yet_still_passes_promtool() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(report([])))
    text = generate_latest(registry).decode()
    assert "flowmeter_build_info" in text
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), lint


def test_a_port_in_use_is_one_line_and_exit_1(tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        profile = tmp_path / "p.json"
        profile.write_text('{"FlowMetadata": {"MetricsAddress": "127.0.0.1:%d"}}' % port)
        pcap = ROOT / "flowmeter" / "data"
        capture = next(pcap.glob("*.pcap"))
        done = subprocess.run([sys.executable, "-m", "flowmeter.cli", "replay", "-p", str(profile), str(capture)],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"flowmeter: MetricsAddress: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_the_server_serves_ipv6_and_closes(tmp_path) -> None:
    server = MetricsServer(report(pipeline()), "::1", 0)
    port = server.httpd.server_address[1]
    server.start()
    try:
        import urllib.request

        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5) as r:
            assert b'flowmeter_source_kernel_drops_total{source="afpacket:eth0"} 2.0' in r.read()
    finally:
        server.close()
    with pytest.raises(OSError):
        socket.create_connection(("::1", port), timeout=1)


def test_status_shows_current_rates_and_each_process_cpu_and_rss() -> None:
    doc = {"pid": 42, "profile": "p.json", "uptime_s": 30, "sources": ["afpacket:eth0"], "lines": [],
           "rates": {"afpacket:eth0": 1234.4}, "interval_s": 1.0,
           "processes": {"supervisor": {"cpu_s": 1.5, "rss": 50 << 20}, "worker-0": {"cpu_s": 0.25, "rss": 3 << 20}},
           "children": {"worker-0": {"role": "worker", "pid": 43, "alive": True, "counters": {"packets": 9,
                                                                                           "records_out": 2}}}}
    assert describe_runs([doc]).splitlines() == [
        "pid 42, profile p.json, up 30 s, sources: afpacket:eth0",
        "  afpacket:eth0: 1,234 packets/s over the last 1 s",
        "  supervisor: pid 42, CPU 1.50 s, RSS 50.0 MiB",
        "  worker-0: pid 43, running, 9 packets, 2 records, CPU 0.25 s, RSS 3.0 MiB"]


def test_the_status_file_rate_is_over_the_last_interval(tmp_path) -> None:
    import json

    children = pipeline()
    r = report(children)
    r.started = 100.0
    r.write_status(str(tmp_path), 101.0)
    children[2].counters.packets += 50  # capture-1: 50 more in the next 2 s
    r.write_status(str(tmp_path), 103.0)
    doc = json.loads((tmp_path / "status.json").read_text())
    assert doc["rates"] == {"afpacket:eth0": 25.0, "pcap:a.pcap": 0.0} and doc["interval_s"] == 2.0
    assert doc["processes"]["supervisor"]["rss"] > 1 << 20
