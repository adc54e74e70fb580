"""Options records that describe the export: sampling and interface names (``exporter/options.py``).

libfixbuf's ipfixDump reads the IPFIX file the exporter writes and is the
judge of scope, values and order; the project's decoder checks what goes
to a UDP collector on a template refresh.
"""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np

from exporter.decoder import Decoder
from exporter.exporting import ExportingProcess, ExportSettings
from exporter.options import DESCRIPTION_OCTETS, NAME_OCTETS, InterfaceSpec, Interfaces, interface_record, varlen
from exporter.template import INTERFACES_NAME, SAMPLING_NAME, default_registry
from exporter.transport import CollectorAddress
from tests.support.collectors import UdpSink, ipfixdump_records, ipfixdump_warnings
from tests.support.synthetic import synthetic_records

REG = default_registry()
SAMPLING_TID = REG[SAMPLING_NAME].template_id
INTERFACES_TID = REG[INTERFACES_NAME].template_id
SPECS = (InterfaceSpec(1, "wan0", "uplink"), InterfaceSpec(2, "lan0", "d" * DESCRIPTION_OCTETS),
         InterfaceSpec(3, "wg0", "", export_index=1003))


def _records(n: int, ingress: list[int], egress: list[int], seed: int = 0) -> np.ndarray:
    r = synthetic_records("ipv4_tcp", n, seed=seed)
    r["ingressInterface"] = np.resize(ingress, n)
    r["egressInterface"] = np.resize(egress, n)
    return r


def _export_to_file(path: Path, batches, **settings) -> None:
    exp = ExportingProcess(ExportSettings(collectors=(CollectorAddress("file", path=str(path), **settings.pop(
        "collector", {})),), stats_interval_s=0, options_records=True, **settings))
    for domain, records in batches:
        exp.export(exp.registry["ipv4_tcp"], records, domain)
    exp.close()


def _string(value: str) -> str:
    """ipfixDump's ``(len: N) TEXT`` of a variable-length string, without the length."""
    return value.split(") ", 1)[1] if ") " in value else ""


def test_sampling_and_interface_names_follow_the_templates_and_come_before_their_data(tmp_path):
    path = tmp_path / "out.ipfix"
    _export_to_file(path, [(7, _records(40, [1, 2], [3, 0]))], interfaces=SPECS)
    assert ipfixdump_warnings(path) == []  # every set has its template, sequence numbers without a gap
    records = ipfixdump_records(path)
    kinds = [r["_tid"] for r in records]
    sampling = [r for r in records if r["_tid"] == SAMPLING_TID]
    assert len(sampling) == 1 and sampling[0]["_scope"] == ["observationDomainId"]
    assert {k: sampling[0][k] for k in ("observationDomainId", "selectorAlgorithm", "samplingPacketInterval",
                                         "samplingPacketSpace")} == {
        "observationDomainId": "7", "selectorAlgorithm": "1", "samplingPacketInterval": "1",
        "samplingPacketSpace": "0"}
    names = {int(r["ingressInterface"]): (_string(r["interfaceName"]), _string(r["interfaceDescription"]))
             for r in records if r["_tid"] == INTERFACES_TID}
    assert all(r["_scope"] == ["ingressInterface"] for r in records if r["_tid"] == INTERFACES_TID)
    # 3 is exported as 1003 in its name record and in every flow record; 0 ("none") has no record
    assert names == {1: ("wan0", "uplink"), 2: ("lan0", "d" * DESCRIPTION_OCTETS), 1003: ("wg0", "")}
    flows = [r for r in records if "packetDeltaCount" in r]
    assert len(flows) == 40
    assert {r["egressInterface"] for r in flows} == {"1003", "0"}
    # order: sampling, then the names, then the flows that carry them
    first_flow = next(i for i, r in enumerate(records) if "packetDeltaCount" in r)
    assert set(kinds[:first_flow]) == {SAMPLING_TID, INTERFACES_TID}


def test_an_interface_met_later_gets_its_record_before_its_first_flow(tmp_path):
    path = tmp_path / "out.ipfix"
    specs = (*SPECS, InterfaceSpec(9, "peer-berlin", "overlay peer"))
    _export_to_file(path, [(7, _records(10, [1], [0])), (7, _records(10, [9], [0], seed=1))], interfaces=specs)
    records = ipfixdump_records(path)
    named = [i for i, r in enumerate(records) if r["_tid"] == INTERFACES_TID and r["ingressInterface"] == "9"]
    first = next(i for i, r in enumerate(records) if r.get("ingressInterface") == "9" and "packetDeltaCount" in r)
    assert len(named) == 1 and named[0] < first
    assert _string(records[named[0]]["interfaceName"]) == "peer-berlin"
    assert ipfixdump_warnings(path) == []


def test_a_collector_with_its_own_domain_gets_the_sampling_record_scoped_by_it(tmp_path):
    path = tmp_path / "out.ipfix"
    _export_to_file(path, [(7, _records(5, [1], [0]))], collector={"domain": 42})
    sampling = [r for r in ipfixdump_records(path) if r["_tid"] == SAMPLING_TID]
    assert [r["observationDomainId"] for r in sampling] == ["42"]


def test_live_interfaces_are_named_by_the_kernel_and_the_profile_wins():
    kernel = Interfaces((), kernel=True)
    lo = socket.if_nametoindex("lo")
    assert kernel.seen(_records(3, [lo], [0])) == [interface_record(lo, "lo", "")]
    assert kernel.seen(_records(3, [lo], [0])) == []  # known now
    mapped = Interfaces((InterfaceSpec(lo, "", "the loopback"),), kernel=True)
    assert mapped.seen(_records(3, [lo], [0])) == [interface_record(lo, "lo", "the loopback")]
    replay = Interfaces((), kernel=False)  # a capture file's indexes are not this host's
    assert replay.seen(_records(3, [lo], [0])) == []


def test_every_index_of_a_batch_is_found_also_between_known_ones():
    ifs = Interfaces(tuple(InterfaceSpec(i, f"if{i}") for i in range(1, 9)))
    assert len(ifs.seen(_records(4, [1, 8], [0]))) == 2
    got = ifs.seen(_records(64, [1, 2, 5, 8], [7]))  # 2, 5 and 7 lie between 1 and 8, already known
    assert sorted(int.from_bytes(r[:4], "big") for r in got) == [2, 5, 7]


def test_renumbering_applies_each_mapping_once_never_a_chain():
    ifs = Interfaces((InterfaceSpec(1, export_index=2), InterfaceSpec(2, export_index=3)))
    r = _records(4, [1, 2, 3, 4], [2, 1, 0, 0])
    out = ifs.renumber(r)
    assert out["ingressInterface"].tolist() == [2, 3, 3, 4] and out["egressInterface"].tolist() == [3, 2, 0, 0]
    assert r["ingressInterface"].tolist() == [1, 2, 3, 4]  # the batch itself is left as it came


def test_variable_length_fields_and_names_cut_at_a_character():
    assert varlen(b"abc") == b"\x03abc"
    assert varlen(b"x" * 300)[:3] == b"\xff\x01\x2c" and len(varlen(b"x" * 300)) == 303
    long = "é" * NAME_OCTETS  # two octets each
    rec = interface_record(5, long, "")
    name = rec[5:5 + rec[4]].decode("utf-8")  # whole characters only
    assert name == "é" * (NAME_OCTETS // 2)


def test_the_options_go_again_with_every_template_refresh():
    sink = UdpSink()
    exp = ExportingProcess(ExportSettings(collectors=(sink.address,), stats_interval_s=0, refresh_s=3600,
                                          refresh_messages=3, options_records=True, interfaces=SPECS))
    for i in range(12):
        exp.export(exp.registry["ipv4_tcp"], _records(60, [1, 2], [0], seed=i), 1)  # 60 records: 2+ messages
    exp.flush()
    decoder = Decoder()
    records = [r for m in sink.messages() for r in decoder.decode(m)]
    assert decoder.stats.sequence_gaps == 0 and decoder.stats.malformed == 0
    refreshes = decoder.stats.templates // 8  # each refresh sends the 8 flow templates
    assert refreshes >= 3
    sampling = [r for r in records if r.template_id == SAMPLING_TID]
    names = [r for r in records if r.template_id == INTERFACES_TID]
    assert len(sampling) == refreshes  # one with every set of templates
    assert len(names) == 2 * refreshes  # both interfaces named again each time (the first batch met them)
    # the options messages do not count towards the refresh by messages: no refresh loop
    assert sum(1 for r in records if not r.is_options) == 12 * 60


def test_off_sends_neither_their_templates_nor_their_records(tmp_path):
    path = tmp_path / "out.ipfix"
    exp = ExportingProcess(ExportSettings(collectors=(CollectorAddress("file", path=str(path)),),
                                          stats_interval_s=0, interfaces=SPECS))  # options_records off
    exp.export(exp.registry["ipv4_tcp"], _records(5, [3], [0]), 1)
    exp.close()
    records = ipfixdump_records(path)
    assert {r["_tid"] for r in records} == {REG["ipv4_tcp"].template_id}
    assert {r["ingressInterface"] for r in records} == {"1003"}  # the profile's numbers still apply


def test_a_collector_that_is_down_counts_only_flow_records_as_not_sent():
    """notSentFlowTotalCount and the summary's "records not sent" are flow records: the sampling and name
    records that went down with them (tried again at every template send) are not counted there."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed from here on: every send is refused (ICMP port unreachable)
    exp = ExportingProcess(ExportSettings(collectors=(CollectorAddress("udp", "127.0.0.1", port),),
                                          stats_interval_s=0, options_records=True, interfaces=SPECS))
    for i in range(30):
        exp.export(exp.registry["ipv4_tcp"], _records(7, [1, 2, 3], [0], seed=i), 1)
        exp.flush()
    c = exp.sessions[0].counters
    exp.close()
    assert c.not_sent_messages > 30 and c.errors.get("ECONNREFUSED", 0) > 0
    assert c.flow_records + c.not_sent_records == 30 * 7  # each flow record once, sent or not


def test_a_reload_names_again_every_interface_met_so_far():
    ifs = Interfaces(SPECS)
    ifs.seen(_records(4, [1, 2], [0]))
    again = ifs.renamed((InterfaceSpec(1, "uplink"),), kernel=False)
    assert again.given == (((InterfaceSpec(1, "uplink"),)), False)
    assert again.all_records() == [interface_record(1, "uplink", "")]  # 2 has no name any more: no record
    assert again.seen(_records(4, [2], [0])) == []  # but it is known: not looked at again
