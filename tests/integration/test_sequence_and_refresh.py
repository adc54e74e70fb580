"""Sequence numbers, message sizes, template refresh and export pacing, as seen by tshark and nfcapd."""
from __future__ import annotations

import time
from collections import Counter, defaultdict

import pytest

from exporter.exporting import EXPORT_BURST, ExportSettings
from exporter.transport import CollectorAddress
from flowmeter.config import parse_profile
from tests.support.collectors import (Nfcapd, TsharkCapture, tshark_fields, udp_rcvbuf_errors, udp_socket_drops,
                                      wait_socket_drained)
from tests.support.producer import export_batches
from tests.support.synthetic import FLOW_TEMPLATE_NAMES, synthetic_records

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
        max_message=MAX_MESSAGE, refresh_s=600, refresh_messages=50, stats_interval_s=60,
        segmented_sends=False)  # tshark on lo would see each segmented send as one packet
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


def _nfdump_rows(rows: list[dict]) -> Counter:
    return Counter((r.get("src4_addr") or r.get("src6_addr"), r.get("dst4_addr") or r.get("dst6_addr"),
                    r["proto"], r.get("src_port", 0), r.get("dst_port", 0), r["in_packets"], r["in_bytes"],
                    r["first"], r["last"]) for r in rows)


def test_big_batches_and_single_record_batches_reach_nfcapd_alike(tmp_path):
    """A big batch goes out as runs of full messages built at once, in segmented sends; nfcapd sees no difference."""
    batches = [(name, 5, synthetic_records(name, n, seed=i))
               for i, (name, n) in enumerate((("ipv6_tcp", 2500), ("ipv4_udp", 2500), ("ipv4_icmp", 1000)))]
    whole, single = Nfcapd(tmp_path / "whole"), Nfcapd(tmp_path / "single")
    try:
        for collector, feed in ((whole, batches),
                                (single, [(n, d, recs[i:i + 1]) for n, d, recs in batches for i in range(len(recs))])):
            settings = ExportSettings(collectors=(CollectorAddress("udp", "127.0.0.1", collector.port),),
                                      refresh_messages=40, stats_interval_s=60)
            assert export_batches(settings, feed) == 0
        got_whole, got_single = whole.records(), single.records()
    finally:
        whole.stop()
        single.stop()
    assert len(got_whole) == len(got_single) == 6000
    assert _nfdump_rows(got_whole) == _nfdump_rows(got_single)
    for log in (whole.log_text(), single.log_text()):
        assert "Sequence Errors: 0" in log and "Bad Packets: 0" in log, log


PACED_RECORDS = 460_000


@pytest.mark.parametrize("paced_by", ["receive queue", "export rate"])
def test_paced_export_into_a_default_nfcapd_loses_nothing(tmp_path, request, paced_by):
    """nfcapd with the kernel's default receive buffer (no -B) gets every record of a burst of 460,000.

    Unpaced, the same burst loses most of its datagrams in nfcapd's socket
    (the kernel counts them in ``Udp: RcvbufErrors``). A collector on this host
    is paced by the room left in its receive queue, so the time taken depends on
    nfcapd alone; a collector elsewhere (stood for here by not watching the
    queue) is paced by the profile's default ExportRate, which must suffice too.
    """
    if paced_by == "export rate":
        request.getfixturevalue("sink_elsewhere")
    nfcapd = Nfcapd(tmp_path / "default", receive_buffer=None)
    # nfcapd's sequence check is the loss detector here; it counts flow records only, so the options
    # records (sampling, interface names: counted in the sequence numbers, RFC 7011 §3.1) stay off
    settings = parse_profile({"FlowMetadata": {"IpFixCollectors": [nfcapd.collector],
                                               "OptionsRecords": False}}).export_settings()
    assert settings.export_rate > 0
    per_template = PACED_RECORDS // len(FLOW_TEMPLATE_NAMES)
    batches = []
    for i, name in enumerate(FLOW_TEMPLATE_NAMES):  # batches of thousands of one template, as workers send
        recs = synthetic_records(name, per_template, seed=i)
        batches += [(name, 1, recs[j:j + 10_000]) for j in range(0, per_template, 10_000)]
    try:
        drops, rcvbuf_errors = udp_socket_drops(nfcapd.port), udp_rcvbuf_errors()
        t0 = time.monotonic()
        assert export_batches(settings, batches) == 0  # the exporter is forked: it inherits the patch
        took = time.monotonic() - t0
        wait_socket_drained(nfcapd.port)
        drops = udp_socket_drops(nfcapd.port) - drops
        rcvbuf_errors = udp_rcvbuf_errors() - rcvbuf_errors
        stored = nfcapd.flow_count()
    finally:
        nfcapd.stop()
    # RcvbufErrors counts every socket of the machine; the collector's own counter is the one to judge
    assert drops == 0, f"nfcapd's socket dropped {drops} datagrams (Udp: RcvbufErrors grew by {rcvbuf_errors})"
    assert stored == PACED_RECORDS
    if paced_by == "export rate":
        messages = PACED_RECORDS // 27  # fewer records fit in a message than that: a lower bound
        assert took >= (messages - EXPORT_BURST) / settings.export_rate
    assert "Sequence Errors: 0" in nfcapd.log_text(), nfcapd.log_text()
