"""Every shared capture replayed into a real nfcapd equals tshark's ground truth.

For each capture in ``../shared/pcaps`` and 1, 2 and 4 workers:
``flowmeter replay`` exports to nfcapd on loopback; nfdump's records,
summed per unidirectional truth key (ip version, addresses, protocol,
ports, ICMP type/code), must equal the truth's packets and layer-3 bytes
exactly, and their first/last times the truth's to the millisecond.
"""
from __future__ import annotations

import csv
import ipaddress
import json
import subprocess
import sys
from collections import defaultdict
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from tests.support.collectors import Nfcapd

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "pcaps"
CAPTURES = sorted(p for p in SHARED.glob("*") if p.suffix in (".pcap", ".pcapng"))
UNREADABLE = {"libpcap__pcap-invalid-version-1"}  # truth: unreadable=1, no rows
# Captures whose truth holds a row no exporter can form a key for; everything else is checked.
EXPECTED_DIFFERENCES = {
    "tcpdump__ipv6_invalid_length": "the snap length cuts the IPv6 header inside the destination address: "
                                    "tshark keys the frame with an empty destination, flowmeter counts it "
                                    "as truncated before the IP header",
}


def truth(name: str) -> tuple[dict, dict, int]:
    """Flow rows by key, file counters, and packets of rows without both addresses."""
    flows, files, keyless = {}, {}, 0
    with open(SHARED / "truth" / f"{name}.csv") as f:
        for row in csv.DictReader(f):
            if row["record"] == "file":
                files[row["src"]] = (int(row["packets"]), int(row["l3_bytes"] or 0))
                continue
            if not row["src"] or not row["dst"]:
                keyless += int(row["packets"])
                continue
            key = (int(row["ipver"]), str(ipaddress.ip_address(row["src"])), str(ipaddress.ip_address(row["dst"])),
                   int(row["proto"]), int(row["sport"]), int(row["dport"]),
                   int(row["icmp_type"]) if row["icmp_type"] else None,
                   int(row["icmp_code"]) if row["icmp_code"] else None)
            flows[key] = [int(row["packets"]), int(row["l3_bytes"]),
                          int(Decimal(row["first_ts"]) * 1000), int(Decimal(row["last_ts"]) * 1000)]
    return flows, files, keyless


def _ms(text: str) -> int:
    t = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=timezone.utc)
    return round(t.timestamp() * 1000)


def from_nfdump(rows: list[dict]) -> dict:
    out: dict = defaultdict(lambda: [0, 0, None, None])
    for r in rows:
        v6 = "src6_addr" in r
        proto = r["proto"]
        icmp = proto in (1, 58)
        key = (6 if v6 else 4, str(ipaddress.ip_address(r["src6_addr"] if v6 else r["src4_addr"])),
               str(ipaddress.ip_address(r["dst6_addr"] if v6 else r["dst4_addr"])), proto,
               0 if icmp else r.get("src_port", 0), 0 if icmp else r.get("dst_port", 0),
               r["icmp_type"] if icmp else None, r["icmp_code"] if icmp else None)
        acc = out[key]
        acc[0] += r["in_packets"]
        acc[1] += r["in_bytes"]
        first, last = _ms(r["first"]), _ms(r["last"])
        acc[2] = first if acc[2] is None else min(acc[2], first)
        acc[3] = last if acc[3] is None else max(acc[3], last)
    return dict(out)


def replay(capture: Path, workers: int, tmp: Path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    nf = Nfcapd(tmp / "nfcapd")
    profile = tmp / "profile.json"
    profile.write_text(json.dumps({"FlowMetadata": {"IpFixCollectors": [nf.collector],
                                                    "StatisticsIntervalSeconds": 0}}))
    try:
        r = subprocess.run([sys.executable, "-m", "flowmeter.cli", "replay", str(capture), "--profile", str(profile),
                            "--workers", str(workers)], capture_output=True, text=True, timeout=120, cwd=ROOT)
        return r, nf.records()
    finally:
        nf.stop()


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.stem)
def test_replay_into_nfcapd_equals_tshark_truth(capture, workers, tmp_path):
    result, rows = replay(capture, workers, tmp_path)
    if capture.stem in UNREADABLE:
        assert result.returncode == 1
        assert rows == []
        assert "flowmeter:" in result.stderr and capture.name in result.stderr
        return
    assert result.returncode == 0, result.stderr
    want, files, keyless = truth(capture.stem)
    assert bool(keyless) == (capture.stem in EXPECTED_DIFFERENCES)
    got = from_nfdump(rows)
    assert {k: v[:2] for k, v in got.items()} == {k: v[:2] for k, v in want.items()}
    for key, (_, _, first, last) in want.items():
        assert got[key][2] == first and got[key][3] == last, key
    # every IP frame of the file was metered, every other one counted as not metered
    ip_frames = files["ipv4"][0] + files["ipv6"][0] - keyless
    assert sum(v[0] for v in got.values()) == ip_frames
    assert f"{files['frames'][0]:,} frames, {ip_frames:,} packets metered" in result.stderr
    if keyless:
        assert f"truncated before the IP header {keyless:,}" in result.stderr
