"""Counters cross the process boundary as typed values: round trip, strict checks, sums per role."""
from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowmeter.ipc.counters import (BY_ROLE, CaptureCounters, CollectorCounters, CountersError, ExporterCounters,
                                    WorkerCounters, from_wire, merge, to_wire)
from flowmeter.ipc.schema import VERSION, ErrorReport, Report, SchemaError, parse_control


def _exporter() -> ExporterCounters:
    return ExporterCounters(batches=3, records=70, gaps=1, dropped={"bad header": 2},
                            collectors={"Udp/192.0.2.1:4739": CollectorCounters(messages=5, flow_records=70,
                                                                                 export_rate=15000.0,
                                                                                 segmented_sends=True,
                                                                                 errors={"refused": 1},
                                                                                 last_error="refused")},
                            cpu_s=0.25)


@pytest.mark.parametrize("value", [
    CaptureCounters(frames=10, packets=8, octets=800, other_direction=1, not_metered={"not IP": 1},
                    source="afpacket:eth0", source_counters={"kernel drops": 0}, cpu_s=0.5),
    WorkerCounters(packets=8, flows=2, records_out=2, end_reasons={"idle": 2}, active_peak=2, dropped={}),
    _exporter(),
])
def test_every_role_survives_the_control_channel_as_the_same_value(value):
    report = parse_control(Report("child-0", value, final=True).pack())
    assert report == Report("child-0", value, final=True)
    assert report.role == value.ROLE and type(report.counters) is type(value)


def test_an_error_report_carries_its_line():
    assert parse_control(ErrorReport("capture-1", "capture", "x.pcap: truncated").pack()) == \
        ErrorReport("capture-1", "capture", "x.pcap: truncated")


@pytest.mark.parametrize("counters, why", [
    ({"frames": "ten"}, "CaptureCounters.frames: 'ten' is not a whole number"),
    ({"frames": True}, "CaptureCounters.frames: True is not a whole number"),
    ({"cpu_s": None}, "CaptureCounters.cpu_s: None is not a number"),
    ({"not_metered": {"not IP": 1.5}}, "not a whole number"),
    ({"not_metered": [1]}, "CaptureCounters.not_metered: not a map of names"),
    ({"not metered: not IP": 3}, "unknown field 'not metered: not IP'"),  # a prose key is no field
    ({"source": 7}, "CaptureCounters.source: 7 is not text"),
])
def test_a_counters_map_that_is_not_the_roles_value_is_refused(counters, why):
    frame = msgpack.packb({"kind": "stats", "v": VERSION, "sender": "capture-0", "role": "capture",
                           "counters": counters})
    with pytest.raises(SchemaError, match=why.replace("(", r"\(").replace(")", r"\)")):
        parse_control(frame)


@pytest.mark.parametrize("frame", [
    b"\xc1", msgpack.packb([1]), msgpack.packb({"kind": "stats", "v": VERSION - 1, "sender": "w", "role": "worker"}),
    msgpack.packb({"kind": "stats", "v": VERSION, "sender": "w", "role": "spy", "counters": {}}),
    msgpack.packb({"kind": "error", "v": VERSION, "sender": "w", "role": "worker", "message": 3}),
    msgpack.packb({"kind": "stats", "v": VERSION, "sender": 5, "role": "worker", "counters": {}}),
    b"\x00" * 70000,
])
def test_hostile_control_messages_are_schema_errors(frame):
    with pytest.raises(SchemaError):
        parse_control(frame)


def test_nested_collector_counters_are_checked_too():
    with pytest.raises(CountersError, match="CollectorCounters.segmented_sends"):
        from_wire(ExporterCounters, {"collectors": {"c": {"segmented_sends": 1}}})


def test_merge_adds_numbers_and_maps_and_keeps_text():
    a = CaptureCounters(frames=1, not_metered={"not IP": 1}, source="afpacket:eth0", cpu_s=0.5)
    b = CaptureCounters(frames=2, not_metered={"not IP": 2, "own export": 3}, cpu_s=0.25)
    assert merge([a, b]) == CaptureCounters(frames=3, not_metered={"not IP": 3, "own export": 3},
                                            source="afpacket:eth0", cpu_s=0.75)
    with pytest.raises(TypeError):
        merge([a, WorkerCounters()])


@given(st.lists(st.builds(WorkerCounters, packets=st.integers(0, 2**40), flows=st.integers(0, 2**30),
                          end_reasons=st.dictionaries(st.sampled_from(["idle", "forced"]), st.integers(0, 99))),
                min_size=1, max_size=8))
def test_merged_worker_counters_are_the_sums_and_survive_the_wire(values):
    total = merge(values)
    assert total.packets == sum(v.packets for v in values) and total.flows == sum(v.flows for v in values)
    for reason in ("idle", "forced"):
        assert total.end_reasons.get(reason, 0) == sum(v.end_reasons.get(reason, 0) for v in values)
    assert from_wire(WorkerCounters, msgpack.unpackb(msgpack.packb(to_wire(total)))) == total


def test_every_role_has_its_value():
    assert set(BY_ROLE) == {"capture", "worker", "exporter"}
