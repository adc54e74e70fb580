"""Sequence numbers, message sizes and template refresh, as seen on the wire by tshark and nfcapd."""
from __future__ import annotations

import time
from collections import defaultdict

import pytest

from collectors import Nfcapd, TsharkCapture, tshark_fields
from exporter.exporting import ExportSettings
from exporter.transport import CollectorAddress
from flowmeter.demo import export_batches
from flowmeter.synthetic import FLOW_TEMPLATE_NAMES, synthetic_records

MAX_MESSAGE = 1200
RECORDS_PER_DOMAIN = 6000  # 12,000 records in all, hundreds of messages per collector


@pytest.fixture(scope="module")
def long_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("sequence")
    a, b = Nfcapd(d / "a"), Nfcapd(d / "b")
    cap = TsharkCapture(d, a.port, b.port)
    batches = []
    per_batch = 250
    for i in range(RECORDS_PER_DOMAIN // per_batch):
        for domain in (1, 2):
            name = FLOW_TEMPLATE_NAMES[(i + domain) % len(FLOW_TEMPLATE_NAMES)]
            batches.append((name, domain, synthetic_records(name, per_batch, seed=i * 2 + domain)))
    settings = ExportSettings(
        collectors=(CollectorAddress("udp", "127.0.0.1", a.port), CollectorAddress("udp", "127.0.0.1", b.port)),
        max_message=MAX_MESSAGE, refresh_s=600, refresh_messages=50, stats_interval_s=60)
    try:
        code = export_batches(settings, batches)
        pcap = cap.stop()
        yield {"code": code, "pcap": pcap, "ports": (a.port, b.port), "a": a.records(), "b": b.records(),
               "logs": (a.log_text(), b.log_text())}
    finally:
        cap.stop()
        a.stop()
        b.stop()


def test_sequence_numbers_count_data_records_per_collector_and_domain(long_export):
    rows = tshark_fields(long_export["pcap"], long_export["ports"],
                         ["udp.dstport", "cflow.od_id", "cflow.sequence", "cflow.flowset_id", "cflow.packets"])
    expected: dict[tuple[int, int], int] = defaultdict(int)
    messages: dict[tuple[int, int], int] = defaultdict(int)
    records: dict[tuple[int, int], int] = defaultdict(int)
    for port, od_id, seq, set_ids, packets in rows:
        key = (int(port), int(od_id))
        assert int(seq) == expected[key] % 2**32, f"collector port {port}, domain {od_id}"
        data_sets = [int(s) for s in set_ids.split(",") if int(s) >= 256]
        n = len(packets.split(",")) if packets else 0  # one packet count per flow record
        if key[1] == 0:
            n = len(data_sets)  # one statistics record per options data set
        expected[key] += n
        messages[key] += 1
        records[key] += n
    for port in long_export["ports"]:
        for domain in (1, 2):
            assert records[(port, domain)] == RECORDS_PER_DOMAIN
            assert messages[(port, domain)] > 50  # several messages, with refreshes between
        assert records[(port, 0)] == 1  # the final statistics record


def test_messages_never_exceed_the_maximum(long_export):
    rows = tshark_fields(long_export["pcap"], long_export["ports"], ["udp.length", "cflow.len"])
    assert len(rows) > 200
    for udp_len, ipfix_len in rows:
        assert int(udp_len) - 8 == int(ipfix_len) <= MAX_MESSAGE


def test_template_refresh_every_n_messages(long_export):
    rows = tshark_fields(long_export["pcap"], long_export["ports"][0], ["cflow.od_id", "cflow.flowset_id"],
                         display_filter="cflow.od_id == 1")
    since = None
    gaps = []
    for _, set_ids in rows:
        if all(int(s) == 2 for s in set_ids.split(",")):
            if since is not None:
                gaps.append(since)
            since = 0
        elif since is not None:
            since += 1
    assert gaps and all(g == 50 for g in gaps)


def test_both_collectors_get_every_record_without_sequence_errors(long_export):
    assert long_export["code"] == 0
    assert len(long_export["a"]) == len(long_export["b"]) == 2 * RECORDS_PER_DOMAIN
    for log in long_export["logs"]:
        assert "Sequence Errors: 0" in log and "Bad Packets: 0" in log, log


def test_template_refresh_by_time_is_observed_at_the_configured_interval(tmp_path):
    sink_collector = Nfcapd(tmp_path / "c")
    cap = TsharkCapture(tmp_path, sink_collector.port)
    settings = ExportSettings(collectors=(CollectorAddress("udp", "127.0.0.1", sink_collector.port),),
                              refresh_s=1.0, refresh_messages=0, stats_interval_s=0)

    def trickle():
        t_end = time.monotonic() + 3.6
        i = 0
        while time.monotonic() < t_end:
            yield "ipv4_udp", 1, synthetic_records("ipv4_udp", 5, seed=i)
            i += 1
            time.sleep(0.1)

    try:
        assert export_batches(settings, trickle()) == 0
        pcap = cap.stop()
    finally:
        cap.stop()
        sink_collector.stop()
    rows = tshark_fields(pcap, sink_collector.port, ["frame.time_epoch", "cflow.flowset_id"])
    template_times = [float(t) for t, sets in rows if all(int(s) == 2 for s in sets.split(","))]
    assert len(template_times) >= 3, rows
    intervals = [b - a for a, b in zip(template_times, template_times[1:])]
    assert all(0.95 <= i <= 1.4 for i in intervals), intervals
