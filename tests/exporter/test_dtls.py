"""Dtls/ collectors against a real, independent DTLS endpoint: OpenSSL's ``s_server -dtls1_2``.

A throwaway CA and a server certificate are made with the ``openssl`` command in tmp_path; s_server
writes the application data it decrypts to its standard output (``-quiet``: nothing else), which is
therefore an RFC 5655 file of exactly the IPFIX messages it received, read back with ``ipfixDump``.
"""
from __future__ import annotations

import collections
import ipaddress
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest

from exporter import dtls
from exporter.exporting import EXPORT_RATE, ExportingProcess, ExportSettings
from exporter.transport import CollectorAddress
from flowmeter.config import ConfigError, load_profile
from tests.support.collectors import free_udp_port, ipfix_file_messages, ipfixdump_records
from tests.support.dtls_server import SServer, make_pki
from tests.support.synthetic import synthetic_records

@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def s_server(pki, tmp_path):
    servers: list[SServer] = []

    def start(port: int | None = None, name: str = "s_server") -> SServer:
        servers.append(SServer(pki, tmp_path, port or free_udp_port(), name))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def _collector(pki: Path, port: int, **kw) -> CollectorAddress:
    settings = {"ca_file": str(pki / "ca.pem"), **kw}
    return CollectorAddress("dtls", "127.0.0.1", port, **settings)


def _exporter(*collectors: CollectorAddress) -> ExportingProcess:
    """Paced as a profile's exporter is (ExportRate's default): a collector on this host by its socket's
    receive queue, which s_server reads slower than loopback fills it."""
    return ExportingProcess(ExportSettings(collectors=collectors, stats_interval_s=0, refresh_s=3600,
                                           refresh_messages=0, export_rate=EXPORT_RATE))


def _wait(exp: ExportingProcess, until, timeout_s: float = 10.0) -> None:
    """Turn the exporter's wheel (as its process loop does) until ``until()``."""
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, "timed out"
        exp.tick()
        time.sleep(0.005)


def _five_tuples(records) -> collections.Counter:
    keys = ("sourceIPv4Address", "destinationIPv4Address", "sourceTransportPort", "destinationTransportPort",
            "protocolIdentifier")
    return collections.Counter(tuple(str(r[k]) for k in keys) for r in records)


def _sent_tuples(batch) -> collections.Counter:
    def v4(value) -> str:
        return str(ipaddress.IPv4Address(int(value)))
    return collections.Counter(
        (v4(r["sourceIPv4Address"]), v4(r["destinationIPv4Address"]), str(int(r["sourceTransportPort"])),
         str(int(r["destinationTransportPort"])), str(int(r["protocolIdentifier"])))
        for r in batch)


def _check_exact(data_file: Path, batch) -> None:
    """ipfixDump's records of ``data_file`` are ``batch``'s, no more, no less."""
    got = [r for r in ipfixdump_records(data_file) if "sourceIPv4Address" in r]
    assert len(got) == len(batch)
    assert sum(int(r["packetDeltaCount"]) for r in got) == int(batch["packetDeltaCount"].sum())
    assert sum(int(r["octetDeltaCount"]) for r in got) == int(batch["octetDeltaCount"].sum())
    assert _five_tuples(got) == _sent_tuples(batch)


def test_records_reach_s_server_exactly_templates_first(pki, s_server, tmp_path):
    server = s_server()
    exp = _exporter(_collector(pki, server.port))
    template = exp.registry["ipv4_tcp"]
    batch = synthetic_records("ipv4_tcp", 3000, seed=7)
    exp.export(template, batch, 1)
    exp.close()
    c = exp.sessions[0].counters
    assert c.not_sent_messages == 0 and c.flow_records == 3000
    assert exp.sessions[0].transport.association == 1
    data = server.received(c.octets)
    # s_server's output is exactly the IPFIX messages, nothing of its own
    assert len(data) == c.octets
    messages = ipfix_file_messages(server.data)
    assert messages[0] == ("T", 0, 0)  # templates first, sequence numbers from 0
    assert [m[0] for m in messages[1:]] == ["D"] * (len(messages) - 1)
    assert sum(m[2] for m in messages) == 3000
    _check_exact(server.data, batch)


def test_each_message_fits_one_record_in_one_datagram(pki, s_server):
    server = s_server()
    t = dtls.DtlsTransport(_collector(pki, server.port))
    deadline = time.monotonic() + 10
    while not t.progress(time.monotonic()) or not t.up:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    # loopback's MTU: the record's largest plaintext caps it; a 1500 path: what AES-GCM leaves
    assert t.path_budget() == dtls.MAX_PLAINTEXT
    t._conn.set_ciphertext_mtu(1472)
    assert t._conn.get_cleartext_mtu() == 1472 - 13 - 8 - 16  # header, explicit nonce, tag (GCM)
    t.close()


def _one_line(caplog, what: str) -> str:
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert what in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("settings, why", [
    ({"ca_file": "other-ca.pem"}, "not signed by a CA of CaFile"),
    ({"server_name": "elsewhere.test"}, "ServerName 'elsewhere.test' is not a name of the collector's certificate"),
], ids=["wrong-ca", "wrong-name"])
def test_a_collector_that_does_not_verify_is_refused_counted_and_retried_with_backoff(
        pki, s_server, caplog, settings, why):
    caplog.set_level(logging.INFO, "flowmeter.exporter")
    server = s_server()
    if "ca_file" in settings:
        settings = {"ca_file": str(pki / settings["ca_file"])}
    a = _collector(pki, server.port, **settings)
    exp = _exporter(a)
    s = exp.sessions[0]
    _wait(exp, lambda: not s.transport.handshaking)
    line = _one_line(caplog, why)
    assert line.startswith(f"collector {a}: certificate refused: ")
    exp.export(exp.registry["ipv4_tcp"], synthetic_records("ipv4_tcp", 500, seed=3), 1)
    exp.flush()
    assert s.counters.messages == 0 and s.counters.not_sent_records == 500
    assert set(s.counters.errors) == {dtls.CERTIFICATE}
    # retried, not in a tight loop: after 1 s, then 2 s later (3.5 s of turning: 3 tries in all)
    start = time.monotonic()
    while time.monotonic() - start < 3.5:
        exp.tick()
        time.sleep(0.005)
    assert s.transport._failures == 3
    _one_line(caplog, why)  # the same trouble again: no more lines
    exp.close()
    assert server.data.read_bytes() == b""


def test_a_collector_down_then_up_gets_a_new_association_templates_first(pki, s_server, caplog):
    caplog.set_level(logging.INFO, "flowmeter.exporter")
    port = free_udp_port()
    first = s_server(port, "first")
    exp = _exporter(_collector(pki, port))
    s = exp.sessions[0]
    tcp = exp.registry["ipv4_tcp"]
    exp.export(tcp, synthetic_records("ipv4_tcp", 1000, seed=1), 1)
    exp.flush()
    _wait(exp, lambda: not s.queue)  # messages wait for the handshake, then leave
    assert s.transport.association == 1 and s.counters.not_sent_messages == 0 and s.counters.flow_records == 1000
    sent_first = s.counters.octets
    assert len(first.received(sent_first)) == sent_first
    first.stop()
    # down: the kernel reports the ICMP port unreachable of the first datagram at the next send
    for seed in range(2, 5):
        exp.export(tcp, synthetic_records("ipv4_tcp", 300, seed=seed), 1)
        exp.flush()
    assert s.counters.errors.get("ECONNREFUSED", 0) > 0
    assert not s.transport.up
    down_lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(down_lines) == 1 and "ECONNREFUSED" not in down_lines[0] and "Connection refused" in down_lines[0]
    before = s.counters.octets
    second = s_server(port, "second")
    _wait(exp, lambda: s.transport.up)  # the backoff's wait, then a new handshake
    assert s.transport.association == 2
    batch = synthetic_records("ipv4_tcp", 2000, seed=9)
    exp.export(tcp, batch, 1)
    exp.close()
    assert len(second.received(s.counters.octets - before)) == s.counters.octets - before
    messages = ipfix_file_messages(second.data)
    assert messages[0] == ("T", 0, 0)  # the new association: templates first, sequence numbers from 0
    seq = 0
    for kind, number, records in messages:
        assert number == seq
        seq += records
    _check_exact(second.data, batch)


def test_a_dtls_collector_without_a_ca_file_is_one_line_at_check(pki, tmp_path):
    profile = tmp_path / "profile.json"

    def check(collector) -> str:
        profile.write_text(json.dumps({"FlowMetadata": {"IpFixCollectors": [collector]}}))
        with pytest.raises(ConfigError) as info:
            load_profile(profile)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert check("Dtls/127.0.0.1:4740") == (
        f'{profile}: IpFixCollectors[0]: "Dtls/127.0.0.1:4740" needs CaFile: write it as an object '
        '{"Address": "Dtls/127.0.0.1:4740", "CaFile": PEM}')
    assert check({"Address": "Dtls/127.0.0.1:4740"}).endswith(
        'IpFixCollectors[0].CaFile: "Dtls/127.0.0.1:4740" needs CaFile: the PEM CA certificates that verify '
        'the collector')
    assert check({"Address": "Dtls/127.0.0.1:4740", "CaFile": str(pki / "server.key")}).startswith(
        f"{profile}: IpFixCollectors[0].CaFile: CaFile '{pki / 'server.key'}' holds no usable PEM certificate")
    assert check({"Address": "Udp/127.0.0.1:4740", "CaFile": str(pki / "ca.pem")}).endswith(
        'IpFixCollectors[0].CaFile: applies to Dtls/ collectors only, not "Udp/127.0.0.1:4740"')
    # a good one: the host as written is the name checked, unless ServerName says another
    profile.write_text(json.dumps({"FlowMetadata": {"IpFixCollectors": [
        {"Address": "Dtls/localhost:4740", "CaFile": str(pki / "ca.pem")}]}}))
    (c,) = load_profile(profile).collectors
    assert (c.kind, c.host, c.port, c.server_name) == ("dtls", "127.0.0.1", 4740, "localhost")


def test_certificate_names_match_as_rfc_6125_says():
    names = ["*.example.net", "collector.test", "192.0.2.9"]
    assert dtls.name_matches("COLLECTOR.test.", names)
    assert dtls.name_matches("a.example.net", names)
    assert not dtls.name_matches("a.b.example.net", names)  # a wildcard is one label
    assert not dtls.name_matches("example.net", names)
    assert dtls.name_matches("192.0.2.9", names)
    assert not dtls.name_matches("192.0.2.10", names)
    assert not dtls.name_matches("collector.test.evil", names)


def test_records_are_cut_at_record_boundaries_into_datagrams():
    def record(n: int) -> bytes:
        return dtls.RECORD_HEADER.pack(22, 0xFEFD, 0, 0, 0, n) + bytes(n)
    flight = record(100) + record(200) + record(300)
    assert [len(d) for d in dtls._records(flight, 330)] == [113 + 213, 313]
    assert [len(d) for d in dtls._records(flight, 100)] == [113, 213, 313]  # a record never split
    assert np.array_equal(np.frombuffer(b"".join(dtls._records(flight, 330)), np.uint8),
                          np.frombuffer(flight, np.uint8))
