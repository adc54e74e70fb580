"""The replay benchmark runs end to end on small captures: a smoke test, never a timed one.

``bench/bench_replay.py`` is run as a user runs it, on a 10k-packet capture
(one run, 1 worker, 1 and 2 capture processes), the 1-packet start-up
capture and a 2,000-flow memory/flush capture, with real nfcapd and
softflowd. It must exit 0 (every run finished, flowmeter matched the
truth), and its tables must say so: flowmeter's and softflowd's replay
rows exact, flowmeter with no drops. No figure is compared with a limit.

10k packets: softflowd sends every record at the end of the file in one
burst, about 30 datagrams here, which a default receive buffer holds even
if nfcapd is slow to read; at 100k it is 300 and some are dropped.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.collectors import require

ROOT = Path(__file__).resolve().parents[2]


def test_bench_replay_small_run_finishes_and_matches_the_truth(tmp_path):
    require("nfcapd", "nfdump", "softflowd")
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_replay.py"), "--packets", "10k", "--runs", "1",
                          "--workers", "1", "--captures", "1,2", "--flows", "2000", "--data", str(tmp_path / "data"),
                          "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    results = json.loads(out.read_text())
    assert results["ok"]

    replay = {(r["tool"], r["captures"]): r for r in results["replay"]}
    assert set(replay) == {("flowmeter", 1), ("flowmeter", 2), ("softflowd", None)}
    assert all(r["exact"] and r["packets"] == 10_000 for r in replay.values())
    assert all(r["drops"] == 0 and r["records"] >= r["flows"] for r in replay.values() if r["tool"] == "flowmeter")

    startup = {r["tool"]: r for r in results["startup"]}
    assert startup["flowmeter"]["first_record_s"] is not None
    assert 0 < startup["flowmeter"]["first_record_s"] <= startup["flowmeter"]["wall_s"]

    memory = {r["tool"]: r for r in results["memory"]}
    assert memory["flowmeter"]["exact"] and memory["flowmeter"]["records"] == 2000
    assert memory["flowmeter"]["drops"] == 0

    # the printed tables say the same
    rows = [line.split() for line in run.stdout.splitlines()]
    replay_rows = [r for r in rows if len(r) == 14 and r[0] == "10,000" and r[2] in ("flowmeter", "softflowd")]
    assert [(r[2], r[-1]) for r in replay_rows] == [("flowmeter", "yes"), ("flowmeter", "yes"), ("softflowd", "yes")]
    assert all(r[-2] == "0" for r in replay_rows if r[2] == "flowmeter")
    for table in ("replay:", "flowmeter CPU by stage", "start-up:", "memory:", "flush:"):
        assert any(line.startswith(table) for line in run.stdout.splitlines()), table
