"""The exporting process: message sizes, sequence numbers, templates, failing collectors."""
from __future__ import annotations

import socket

import numpy as np
import pytest

from exporter.exporting import STATS_DOMAIN, ExportingProcess, ExportSettings
from exporter.ie import IE
from exporter.message import HEADER, SET_HEADER
from exporter.template import TemplateRegistry, default_registry
from collectors import UdpSink
from flowmeter.synthetic import FLOW_TEMPLATE_NAMES, synthetic_records


Sink = UdpSink


def parse(msg: bytes) -> dict:
    """Header fields and (set id, record count) per set, counting by the set's template length."""
    version, length, export_time, seq, domain = HEADER.unpack_from(msg)
    off, sets = 16, []
    while off < length:
        sid, slen = SET_HEADER.unpack_from(msg, off)
        sets.append((sid, slen))
        off += slen
    assert off == length == len(msg)
    return {"version": version, "seq": seq, "domain": domain, "sets": sets}


RECORD_LEN = {t.template_id: t.record_length for t in default_registry()}


def data_records(msg: dict) -> int:
    return sum((slen - 4) // RECORD_LEN[sid] for sid, slen in msg["sets"] if sid >= 256)


def test_message_never_exceeds_mtu_and_sequence_counts_data_records():
    sink = Sink()
    exp = ExportingProcess(ExportSettings(collectors=(sink.address,), max_message=600,
                                          stats_interval_s=0, refresh_messages=0))
    sent = 0
    for i, name in enumerate(FLOW_TEMPLATE_NAMES):
        recs = synthetic_records(name, 400, seed=i)
        exp.export(exp.registry[name], recs, 5)
        sent += len(recs)
    exp.flush()
    msgs = [parse(m) for m in sink.messages()]
    assert all(m["version"] == 10 for m in msgs)
    assert max(len(m) for m in sink.messages() or [b""]) <= 600
    # RFC 7011 §3.1: each header holds the data records sent before it
    expected = 0
    for m in msgs:
        assert m["domain"] == 5
        assert m["seq"] == expected
        expected += data_records(m)
    assert expected == sent
    # templates came first, in a message of their own
    assert all(sid == 2 for sid, _ in msgs[0]["sets"])


def test_each_message_fits_the_size_limit():
    sink = Sink()
    for size in (256, 512, 1452, 9000):
        exp = ExportingProcess(ExportSettings(collectors=(sink.address,), max_message=size, stats_interval_s=0))
        for i, name in enumerate(FLOW_TEMPLATE_NAMES):
            exp.export(exp.registry[name], synthetic_records(name, 300, seed=i), 1)
        exp.flush()
        raw = sink.messages()
        assert raw and all(len(m) <= size for m in raw)
        # every message but the last of a run is filled to within one record of the limit
        assert sum(data_records(parse(m)) for m in raw) == 300 * len(FLOW_TEMPLATE_NAMES)


def test_template_refresh_by_message_count_and_time():
    sink = Sink()
    exp = ExportingProcess(ExportSettings(collectors=(sink.address,), max_message=512,
                                          refresh_messages=10, refresh_s=30, stats_interval_s=0))
    t = exp.registry["ipv4_udp"]
    now = 1000.0
    for i in range(50):
        exp.export(t, synthetic_records("ipv4_udp", 9, seed=i), 1, now)  # one message each
        exp.flush(now)
    exp.tick(now)  # the 10 messages since the last refresh make it due now
    msgs = [parse(m) for m in sink.messages()]
    kinds = ["T" if all(sid == 2 for sid, _ in m["sets"]) else "D" for m in msgs]
    # first templates, then again after every 10 data messages
    assert "".join(kinds) == ("T" + "D" * 10) * 5 + "T"
    # by time: nothing sent for a while, then tick() after the period re-sends
    exp.tick(now + 29.0)
    assert sink.messages() == []
    exp.tick(now + 30.5)
    again = [parse(m) for m in sink.messages()]
    assert len(again) == 1 and all(sid == 2 for sid, _ in again[0]["sets"])


def test_template_only_message_does_not_advance_sequence():
    sink = Sink()
    exp = ExportingProcess(ExportSettings(collectors=(sink.address,), refresh_messages=1, stats_interval_s=0))
    t = exp.registry["ipv6_tcp"]
    exp.export(t, synthetic_records("ipv6_tcp", 3), 1)
    exp.flush()
    exp.export(t, synthetic_records("ipv6_tcp", 2), 1)
    exp.flush()
    seqs = [(parse(m)["seq"], data_records(parse(m))) for m in sink.messages()]
    assert seqs == [(0, 0), (0, 3), (3, 0), (3, 2)]


def test_down_collector_is_counted_and_never_blocks_the_others():
    up = Sink()
    down_port = Sink()
    down = down_port.address
    down_port.sock.close()  # nothing listens: ICMP port unreachable -> ECONNREFUSED
    exp = ExportingProcess(ExportSettings(collectors=(down, up.address), max_message=1452, stats_interval_s=0))
    total = 0
    for i in range(20):
        recs = synthetic_records("ipv4_tcp", 100, seed=i)
        exp.export(exp.registry["ipv4_tcp"], recs, 1)
        exp.flush()
        total += len(recs)
    got = [parse(m) for m in up.messages()]
    assert sum(data_records(m) for m in got) == total
    totals = exp.totals()["collectors"]
    assert totals[str(down)]["errors"].get("ECONNREFUSED", 0) > 0
    assert totals[str(down)]["not_sent_records"] > 0
    assert totals[str(up.address)]["not_sent_records"] == 0
    # the down session's sequence number advanced only by what actually left
    s_down = exp.sessions[0]
    assert s_down.domain(1).sequence == s_down.counters.data_records % 2**32


def test_collector_that_comes_back_gets_templates_again():
    probe = Sink()
    addr = probe.address
    probe.sock.close()
    exp = ExportingProcess(ExportSettings(collectors=(addr,), refresh_s=3600, refresh_messages=0,
                                          stats_interval_s=0))
    t = exp.registry["ipv4_udp"]
    for i in range(5):
        exp.export(t, synthetic_records("ipv4_udp", 30, seed=i), 1)
        exp.flush()
    back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    back.bind(("127.0.0.1", addr.port))
    back.settimeout(0.3)
    for i in range(3):
        exp.export(t, synthetic_records("ipv4_udp", 30, seed=i), 1)
        exp.flush()
    first = back.recv(70000)
    back.close()
    assert [sid for sid, _ in parse(first)["sets"]] == [2]


def test_statistics_record_goes_to_domain_zero_with_session_totals():
    sink = Sink()
    exp = ExportingProcess(ExportSettings(collectors=(sink.address,), stats_interval_s=60,
                                          exporting_process_id=42))
    exp.export(exp.registry["ipv4_tcp"], synthetic_records("ipv4_tcp", 10), 3)
    exp.flush()
    before = exp.sessions[0].counters
    sent_messages, sent_octets = before.messages, before.octets
    exp.send_statistics()
    msgs = sink.messages()
    stats = [m for m in msgs if parse(m)["domain"] == STATS_DOMAIN]
    assert [sid for sid, _ in parse(stats[0])["sets"]] == [3]  # options template first
    rec = stats[-1][16 + 4:]
    tmpl = exp.registry["exporter_stats"]
    values = np.frombuffer(rec, dtype=tmpl.wire_dtype)[0]
    assert values["exportingProcessId"] == 42
    assert values["exportedFlowRecordTotalCount"] == 10
    # totals exclude the message that carries them; the options template message counts
    assert values["exportedMessageTotalCount"] == sent_messages + 1
    assert values["exportedOctetTotalCount"] == sent_octets + len(stats[0])


def test_changed_layout_gets_a_new_template_id_never_a_reused_one():
    reg = TemplateRegistry()
    a = reg.define("x", (IE["sourceIPv4Address"], IE["packetDeltaCount"]))
    same = reg.define("x", (IE["sourceIPv4Address"], IE["packetDeltaCount"]))
    b = reg.define("x", (IE["sourceIPv4Address"], IE["octetDeltaCount"]))
    c = reg.define("x", (IE["sourceIPv4Address"], IE["packetDeltaCount"]))
    assert same is a
    assert len({a.template_id, b.template_id, c.template_id}) == 3
    assert reg.retired == (a, b)


def test_reload_resends_templates_at_once_and_keeps_sequence():
    sink = Sink()
    settings = ExportSettings(collectors=(sink.address,), refresh_s=3600, refresh_messages=0, stats_interval_s=0)
    exp = ExportingProcess(settings)
    t = exp.registry["ipv4_tcp"]
    exp.export(t, synthetic_records("ipv4_tcp", 5), 1)
    exp.flush()
    sink.messages()
    exp.reload(settings)
    exp.export(t, synthetic_records("ipv4_tcp", 5), 1)
    exp.flush()
    msgs = [parse(m) for m in sink.messages()]
    assert [m["sets"][0][0] for m in msgs] == [2, 256]
    assert [m["seq"] for m in msgs] == [5, 5]


def test_records_with_the_wrong_dtype_are_refused():
    exp = ExportingProcess(ExportSettings(collectors=(), stats_interval_s=0))
    with pytest.raises(ValueError, match="dtype"):
        exp.export(exp.registry["ipv4_tcp"], synthetic_records("ipv4_udp", 2), 1)
