"""The replay benchmark runs end to end on small captures: a smoke test, never a timed one.

``bench/bench_replay.py`` is run as a user runs it, on a 10k-packet capture
(one run, 1 worker, 1 and 2 capture processes), header frames and full-size
frames, the 1-packet start-up capture and a 2,000-flow memory/flush capture,
with real tcpdump, nfcapd and softflowd. It must exit 0 (every run
finished, flowmeter and softflowd with room for every flow matched the
truth), and its tables must say so: the floor (tcpdump) measured, every
meter's replay row exact with no drop at its collector, the ratios printed.
No figure is compared with a limit.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.collectors import require

ROOT = Path(__file__).resolve().parents[2]
REPLAY_TOOLS = {("tcpdump", None), ("softflowd-default", None), ("softflowd-exact", None), ("flowmeter", 1),
                ("flowmeter", 2)}


def markdown_tables(stdout: str) -> list[list[list[str]]]:
    """The markdown tables of the output, each a list of rows (head first, the rule left out)."""
    tables, current = [], None
    for line in stdout.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = []
                tables.append(current)
            if not all(set(c) <= {"-", ":"} for c in cells):
                current.append(cells)
        else:
            current = None
    return tables


def check_replay(results: dict, stdout: str, frames: str) -> None:
    replay = {(r["tool"], r["captures"]): r for r in results["replay"]}
    assert set(replay) == REPLAY_TOOLS
    assert all(r["packets"] == 10_000 and r["frames"] == frames and r["failed_runs"] == 0 for r in replay.values())
    floor = replay[("tcpdump", None)]
    assert floor["wall_s"] > 0 and floor["exact"] is None and floor["records"] is None
    meters = [r for key, r in replay.items() if key[0] != "tcpdump"]
    assert all(r["exact"] and r["drops"] == 0 and r["records"] >= r["flows"] for r in meters), meters
    assert replay[("softflowd-exact", None)]["max_flows"] > replay[("softflowd-exact", None)]["flows"]
    assert replay[("softflowd-default", None)]["max_flows"] == 8192

    # the printed tables say the same: one row per tool, then flowmeter's ratios to the three others
    tables = markdown_tables(stdout)
    assert len(tables) == 2, stdout
    main, ratios = tables
    col = {name: i for i, name in enumerate(main[0])}
    labels = [r[0] for r in main[1:]]
    assert labels[0] == "tcpdump -r -w /dev/null (floor)" and labels[1].startswith("softflowd -m 8192 (default")
    assert labels[2].endswith("(exact)") and labels[3:] == ["flowmeter workers 1 captures 1",
                                                            "flowmeter workers 1 captures 2"]
    assert main[1][col["exact"]] == "-" and all(r[col["exact"]] == "yes" for r in main[2:])
    assert all(r[col["drops"]] == "0" for r in main[2:])
    assert ratios[0] == ["workers", "captures", "wall / floor", "cpu / floor", "wall / softflowd exact",
                         "cpu / softflowd exact", "wall / softflowd default", "cpu / softflowd default"]
    assert [r[:2] for r in ratios[1:]] == [["1", "1"], ["1", "2"]]
    assert all(cell.endswith("x") for r in ratios[1:] for cell in r[2:]), ratios


def run_bench(tmp_path: Path, *options: str) -> tuple[dict, str]:
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_replay.py"), "--packets", "10k", "--runs", "1",
                          "--workers", "1", "--captures", "1,2", "--flows", "2000", "--data", str(tmp_path / "data"),
                          "--json", str(out), *options], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    results = json.loads(out.read_text())
    assert results["ok"]
    return results, run.stdout


def test_bench_replay_small_run_finishes_and_matches_the_truth(tmp_path):
    require("nfcapd", "nfdump", "softflowd", "tcpdump")
    results, stdout = run_bench(tmp_path)
    replay_part = stdout[:stdout.index("flowmeter CPU by stage")]
    check_replay(results, replay_part, "headers")

    startup = {r["tool"]: r for r in results["startup"]}
    assert startup["flowmeter"]["first_record_s"] is not None
    assert 0 < startup["flowmeter"]["first_record_s"] <= startup["flowmeter"]["wall_s"]

    memory = {r["tool"]: r for r in results["memory"]}
    assert memory["flowmeter"]["exact"] and memory["flowmeter"]["records"] == 2000
    assert memory["flowmeter"]["drops"] == 0

    for table in ("replay, header captures", "flowmeter's ratios", "flowmeter CPU by stage", "start-up:", "memory:",
                  "flush:"):
        assert any(line.startswith(table) for line in stdout.splitlines()), table


def test_bench_replay_full_size_frames(tmp_path):
    require("nfcapd", "nfdump", "softflowd", "tcpdump")
    results, stdout = run_bench(tmp_path, "--frames", "full")
    assert set(results) >= {"replay"} and "startup" not in results and "memory" not in results
    check_replay(results, stdout, "full")
    # the frames are whole: the capture holds every octet of every frame (record headers aside)
    capture = next((tmp_path / "data").glob("traffic-10000-*-full.pcap"))
    assert capture.stat().st_size > 10_000 * (16 + 14 + 20 + 100)
    title = "replay, full-size captures (every frame whole): 10,000 packets"
    assert any(line.startswith(title) for line in stdout.splitlines())
