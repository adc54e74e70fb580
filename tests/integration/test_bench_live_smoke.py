"""The live-capture benchmark runs end to end on a tiny capture: a smoke test, never a timed one.

``bench/bench_live.py`` is run as a user runs it (root, network namespaces,
tcpreplay into a veth pair), on a 2,000-packet capture, one run, flowmeter
with Fanout 1 and 2 and softflowd. It must exit 0 (every run finished), and
flowmeter must have metered every packet tcpreplay sent, with no kernel
drop, and exported exactly the truth; the table must be printed and say the
same. softflowd's figures are only required to be there: it may leave the
last, partly filled ring block unread (see bench/README.md). No figure is
compared with a limit.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.collectors import require
from tests.support.netns import available

ROOT = Path(__file__).resolve().parents[2]


def test_bench_live_small_run_finishes_and_meters_every_packet(tmp_path):
    why = available()
    assert not why, why
    require("tcpreplay", "ethtool", "nfcapd", "nfdump", "softflowd", "softflowctl")
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_live.py"), "--packets", "2000", "--runs", "1",
                          "--data", str(tmp_path / "data"), "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    results = json.loads(out.read_text())
    assert results["ok"]

    rows = {(r["tool"], r["fanout"]): r for r in results["rows"]}
    assert set(rows) == {("flowmeter", 1), ("flowmeter", 2), ("softflowd", None)}
    for fanout in (1, 2):
        r = rows[("flowmeter", fanout)]
        assert r["sent"] == 2000 and r["at_va"] == 2000, r
        assert r["metered"] == r["sent"] and r["all_metered"], r
        assert r["kernel_drops"] == 0 and r["unread"] == 0, r
        assert r["exact"] and r["records"] >= r["flows"], r
    soft = rows[("softflowd", None)]
    assert soft["sent"] == 2000 and soft["metered"] is not None and soft["kernel_drops"] is not None

    # the markdown table says the same
    lines = run.stdout.splitlines()
    assert any(line.startswith("live capture: 2,000 packets") for line in lines)
    table = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    head, body = table[0], table[1:]
    assert head[:4] == ["tool", "fanout", "rate", "sent"]
    col = {name: i for i, name in enumerate(head)}
    flowmeter = [r for r in body if r[0] == "flowmeter"]
    assert [r[col["fanout"]] for r in flowmeter] == ["1", "2"]
    for r in flowmeter:
        assert r[col["sent"]] == r[col["metered"]] == "2,000"
        assert r[col["kernel drops"]] == "0" and r[col["all metered"]] == "yes" and r[col["exact"]] == "yes"
    assert [r[0] for r in body].count("softflowd") == 1
