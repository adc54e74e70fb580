"""Output faults against real parts: a File/ collector on a tmpfs that fills up while nfcapd gets every
record; a collector black-holed by nftables in a network namespace, paced by a low ExportRate, while
nfcapd keeps its pace.

The exporter is the real process (``exporter.process.run``) forked by the test, fed record batches over
ZeroMQ as the workers would, and reporting its counters on a control channel as to the supervisor.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
import zmq

from exporter import exporting, process
from exporter.exporting import ExportSettings
from exporter.template import STATS_NAME, default_registry
from exporter.transport import FILE_RETRY_S, CollectorAddress
from flowmeter.ipc.counters import ExporterCounters
from flowmeter.ipc.schema import EndOfStream, Report, parse_control, records_message
from tests.support.collectors import (Nfcapd, ipfix_file_messages, ipfixdump_records, ipfixdump_warnings,
                                      require, tmpfs)
from tests.support.netns import Namespaces, available, entered
from tests.support.synthetic import synthetic_records

# How long the black-holed collector is behind (the scenario is 60 s; CI runs a short one).
BLACKHOLE_SECONDS = float(os.environ.get("FLOWMETER_BLACKHOLE_SECONDS", "12"))
TEMPLATES = default_registry()
STATS_TID = TEMPLATES[STATS_NAME].template_id


def _exporter_main(settings: ExportSettings, endpoint: str, control: str) -> None:
    process.run(process.ExporterSettings(settings, 1), process.ExporterEndpoints(endpoint, control))


class ExporterRun:
    """The exporter process fed by this test, its progress and final counters read from its control channel."""

    def __init__(self, tmp_path: Path, settings: ExportSettings) -> None:
        self.endpoint, control = f"ipc://{tmp_path}/export", f"ipc://{tmp_path}/control"
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.PULL)
        self.control.bind(control)
        self.proc = multiprocessing.get_context("fork").Process(target=_exporter_main,
                                                                args=(settings, self.endpoint, control))
        self.proc.start()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 30_000)
        self.push.connect(self.endpoint)
        self.seq = 0
        self.sent = 0  # records pushed
        self.last: ExporterCounters | None = None
        self.reports: list[ExporterCounters] = []

    def send(self, name: str, records) -> None:
        self.push.send_multipart(records_message("test", self.seq, name, 1, records), copy=False)
        self.seq += 1
        self.sent += len(records)

    def poll(self, timeout_ms: int = 0) -> ExporterCounters | None:
        """The newest counters the exporter reported (None if none came)."""
        while self.control.poll(timeout_ms):
            report = parse_control(self.control.recv())
            if isinstance(report, Report):
                self.last = report.counters
                self.reports.append(report.counters)
                if report.final:
                    return self.last
            timeout_ms = 0
        return self.last

    def wait_until(self, done, timeout_s: float = 20.0) -> ExporterCounters:
        """Counters once ``done(counters)`` holds, as the progress reports (twice a second) tell."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            c = self.poll(200)
            if c is not None and done(c):
                return c
        raise TimeoutError(f"exporter counters never got there: {self.last}")

    def finish(self, timeout_s: float = 60.0) -> ExporterCounters:
        """End of stream; the final counters once the exporter has drained and exited 0."""
        self.push.send(EndOfStream("test", self.seq).pack())
        self.proc.join(timeout_s)
        assert self.proc.exitcode == 0, f"exporter exit {self.proc.exitcode}"
        final = None
        while self.control.poll(2000):
            report = parse_control(self.control.recv())
            if isinstance(report, Report) and report.final:
                final = report.counters
                break
        assert final is not None, "no final counters"
        return final

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.push.close(0)
        self.control.close(0)
        self.ctx.term()


def test_a_disk_that_fills_up_loses_only_that_files_records_and_writing_resumes(tmp_path, request):
    require("ipfixDump", "nfcapd")
    nfcapd = Nfcapd(tmp_path / "nfcapd")
    request.addfinalizer(nfcapd.stop)  # a no-op once flow_count() has stopped it
    with tmpfs(tmp_path / "disk", "256k") as disk:
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * (64 << 10))  # freed later: room again
        path = disk / "flows.ipfix"
        settings = ExportSettings(collectors=(CollectorAddress("file", path=str(path)),
                                              CollectorAddress("udp", "127.0.0.1", nfcapd.port)),
                                  stats_interval_s=3600)  # one statistics record, at the end
        run = ExporterRun(tmp_path, settings)
        try:
            # 1. about 600 KB of messages for 192 KB of room: the disk fills up in the middle
            for i in range(400):
                run.send("ipv4_tcp", synthetic_records("ipv4_tcp", 26, seed=i))
            phase1 = run.sent
            run.wait_until(lambda c: c.records == phase1)
            full = os.statvfs(disk)
            assert full.f_bavail == 0
            on_disk = path.stat().st_size
            # 2. room again: after the file's retry period, new records are written (templates first)
            ballast.unlink()
            time.sleep(FILE_RETRY_S + 0.3)
            for i in range(10):
                run.send("ipv6_udp", synthetic_records("ipv6_udp", 20, seed=1000 + i))
            final = run.finish()
        finally:
            run.close()
        file_c = final.collectors[f"File/{path}"]
        udp_c = final.collectors[nfcapd.collector]
        messages = ipfix_file_messages(path)  # never a torn message, every one whole
        warnings = ipfixdump_warnings(path)
        records = ipfixdump_records(path)
        assert path.stat().st_size > on_disk
    # the UDP collector got every record
    assert nfcapd.flow_count() == run.sent == udp_c.flow_records == phase1 + 200
    assert udp_c.not_sent_records == 0
    # every message of the file decodes (libfixbuf: no torn message, no set without its template, no
    # sequence gap), and what is not in it is counted not sent, exactly, with its cause
    assert warnings == []
    flows = [r for r in records if r["_tid"] != STATS_TID]
    stats = [r for r in records if r["_tid"] == STATS_TID]
    assert len(flows) == file_c.flow_records
    assert file_c.not_sent_records == run.sent - len(flows) > 0
    assert file_c.errors == {"ENOSPC": file_c.not_sent_messages}
    assert "No space left on device" in file_c.last_error
    # written again once there was room: every record of phase 2, after templates again
    assert sum(r["_tid"] == TEMPLATES["ipv6_udp"].template_id for r in flows) == 200
    kinds = "".join(k for k, _, _ in messages)
    assert kinds.count("T") >= 3  # domain 1 at the start and after the failure, domain 0 for statistics
    # the file's own statistics record says the same
    assert len(stats) == 1 and int(stats[0]["notSentFlowTotalCount"]) == run.sent - len(flows)
    print(f"\nfile: {len(flows)} of {run.sent} records written, {file_c.not_sent_records} not sent "
          f"({file_c.errors}); {len(messages)} messages; nfcapd: {run.sent}")


@pytest.fixture
def namespaces():
    why = available()
    if why:
        pytest.fail(why)
    require("nft", "nfcapd")
    with Namespaces() as ns:
        yield ns


BLACKHOLE = ("10.231.0.1/24", "10.231.0.2", 4739)


def test_a_black_holed_slow_collector_gives_up_its_own_oldest_while_nfcapd_keeps_its_pace(
        tmp_path, namespaces, monkeypatch, request):
    ns = namespaces
    here, there = ns.add("exp"), ns.add("hole")
    ns.veth(here, "fmexp0", BLACKHOLE[0], "fd31::1/64", there, "fmhole0", f"{BLACKHOLE[1]}/24", "fd31::2/64")
    # the collector's host is up (it answers ARP) but every export datagram to it vanishes: no ICMP error
    ns.run(there, "nft", "-f", "-", input="table inet fmblackhole {\n chain input {\n"
                                          "  type filter hook input priority 0;\n"
                                          f"  udp dport {BLACKHOLE[2]} drop\n }}\n}}\n")
    nfcapd = Nfcapd(tmp_path / "nfcapd", netns=here)  # on the exporter's loopback: paced by its queue
    request.addfinalizer(nfcapd.stop)  # before the namespaces go (finalizers run first)
    rate, queue_s = 50, 2.0  # the remote collector's pace; its queue holds queue_s of it
    monkeypatch.setattr(exporting, "QUEUE_SECONDS", queue_s)  # the forked exporter inherits it
    limit = int(rate * queue_s)
    settings = ExportSettings(collectors=(CollectorAddress("udp", BLACKHOLE[1], BLACKHOLE[2]),
                                          CollectorAddress("udp", "127.0.0.1", nfcapd.port)),
                              stats_interval_s=0, export_rate=rate, export_burst=8)
    with entered(here):
        run = ExporterRun(tmp_path, settings)  # forked in the namespace: its sockets are there
    hole_name, local_name = f"Udp/{BLACKHOLE[1]}:{BLACKHOLE[2]}", nfcapd.collector
    try:
        # 20 batches a second of 10 messages each: four times what the black hole is paced at
        t0 = time.monotonic()
        behind = []
        for i in range(int(BLACKHOLE_SECONDS * 20)):
            run.send("ipv4_tcp", synthetic_records("ipv4_tcp", 260, seed=i))
            c = run.poll()
            if c is not None and local_name in c.collectors and i >= 20:
                # nfcapd keeps its pace: never more than 2 s of input behind (reports come every 0.5 s)
                behind.append(run.sent - c.collectors[local_name].flow_records)
            time.sleep(max(0.0, t0 + (i + 1) / 20 - time.monotonic()))
        sent = run.sent
        c = run.wait_until(lambda c: c.collectors[local_name].flow_records == sent, timeout_s=5)
        queued_peak = max(r.collectors[hole_name].queued_messages for r in run.reports if hole_name in r.collectors)
        final = run.finish(timeout_s=queue_s + 20)
        took = time.monotonic() - t0
    finally:
        run.close()
    hole, local = final.collectors[hole_name], final.collectors[local_name]
    assert nfcapd.flow_count() == sent == local.flow_records and local.not_sent_records == 0
    assert max(behind) <= 40 * 260, behind
    # the black hole got what its pace allowed, the newest at the end; the rest is counted not sent
    assert hole.flow_records + hole.not_sent_records == sent
    assert hole.errors == {"queue full": hole.not_sent_messages}
    assert hole.messages <= 8 + rate * took + 1
    assert hole.not_sent_records > sent // 2
    # memory stays bounded: its queue never held more than its limit (and one batch on its way)
    assert queued_peak <= limit + 10
    # nothing held the input back: the run ended a drain of the black hole's queue after the input did
    assert took < BLACKHOLE_SECONDS + queue_s + 5
    print(f"\n{BLACKHOLE_SECONDS:g} s: nfcapd {local.flow_records} of {sent} records; black hole "
          f"{hole.flow_records} sent in {hole.messages} messages, {hole.not_sent_records} not sent "
          f"({hole.errors}), queue peak {queued_peak} (limit {limit}); took {took:.1f} s")
