"""``flowmeter replay`` of the shipped capture to a Dtls/ collector (openssl s_server) and a File/ one:
the same records at both, decoded by ipfixDump, as many as the replay says it sent."""
from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
from pathlib import Path

from tests.support.collectors import free_udp_port, ipfix_file_messages, ipfixdump_records
from tests.support.dtls_server import NAME, SServer, make_pki

CAPTURE = Path(__file__).resolve().parents[2] / "flowmeter" / "data" / "demo.pcap"
KEYS = ("sourceIPv4Address", "destinationIPv4Address", "sourceIPv6Address", "destinationIPv6Address",
        "sourceTransportPort", "destinationTransportPort", "protocolIdentifier", "packetDeltaCount",
        "octetDeltaCount", "flowStartMilliseconds", "flowEndMilliseconds")


def _flows(path: Path) -> collections.Counter:
    return collections.Counter(tuple(r.get(k, "") for k in KEYS) for r in ipfixdump_records(path)
                               if "packetDeltaCount" in r)


def test_replay_to_a_dtls_collector_equals_the_file_collector(tmp_path):
    pki = make_pki(tmp_path / "pki")
    server = SServer(pki, tmp_path, free_udp_port())
    try:
        out = tmp_path / "out.ipfix"
        profile = tmp_path / "profile.json"
        profile.write_text(json.dumps({"FlowMetadata": {"StatisticsIntervalSeconds": 0, "IpFixCollectors": [
            {"Address": f"Dtls/127.0.0.1:{server.port}", "CaFile": str(pki / "ca.pem"), "ServerName": NAME},
            f"File/{out}"]}}))
        r = subprocess.run([sys.executable, "-m", "flowmeter.cli", "replay", str(CAPTURE), "--profile", str(profile)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        sent = re.search(rf"collector Dtls/127\.0\.0\.1:{server.port}: (\d+) records \((\d+) packets\) sent in "
                         r"(\d+) messages; 0 records", r.stdout + r.stderr)
        assert sent, r.stdout + r.stderr
        data = server.received(out.stat().st_size)
    finally:
        server.stop()
    assert len(data) == out.stat().st_size  # s_server's output: the messages, nothing else
    flows = _flows(server.data)
    assert sum(flows.values()) == int(sent[1]) > 0
    assert sum(int(k[KEYS.index("packetDeltaCount")]) * n for k, n in flows.items()) == int(sent[2])
    assert flows == _flows(out)
    assert ipfix_file_messages(server.data)[0] == ("T", 0, 0)
