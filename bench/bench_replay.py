"""Benchmark: flowmeter replay against softflowd on the same capture, each into a real nfcapd.

    python bench/bench_replay.py [--packets 1000000] [--runs 3] [--workers N]

A deterministic capture and its ground truth are generated once
(``flowmeter.traffic``, cached beside this file in ``.data/``); then
``flowmeter replay`` and ``softflowd -r`` meter it in alternation, each into
its own nfcapd on loopback. Per tool it prints medians over the runs of:
packets/s (capture packets / wall time of the whole command), wall time,
CPU time (user + system, all processes), peak RSS of the whole process
tree, records received by nfcapd, collector drops (``Udp RcvbufErrors`` in
/proc/net/snmp, before and after), and whether the per-flow packets and
bytes nfdump shows equal the truth. The result is the ratio of the two
rates in the same run, not the absolute figures: these machines are
shared and noisy.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from collectors import Nfcapd, nfdump_totals  # noqa: E402


def rcvbuf_errors() -> int:
    lines = Path("/proc/net/snmp").read_text().splitlines()
    names, values = [line.split()[1:] for line in lines if line.startswith("Udp:")][:2]
    return int(dict(zip(names, values))["RcvbufErrors"])


def measure(cmd: list[str], env=None) -> dict:
    """Run ``cmd``; wall and CPU time, peak RSS summed over its process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    root = psutil.Process(proc.pid)
    peak = 0
    cpu: dict[int, float] = {}
    while proc.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
            rss = 0
            for p in tree:
                try:
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    cpu[p.pid] = t.user + t.system
                except psutil.NoSuchProcess:
                    pass
            peak = max(peak, rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.02)
    err = proc.stderr.read()
    wall = time.perf_counter() - t0
    return {"wall": wall, "cpu": sum(cpu.values()), "rss": peak, "code": proc.returncode, "stderr": err}


def load_truth(path: Path) -> tuple[Counter, Counter]:
    packets, octets = Counter(), Counter()
    with open(path) as fh:
        for r in csv.DictReader(fh):
            key = (r["src"], r["dst"], int(r["proto"]), int(r["sport"]), int(r["dport"]))
            packets[key] += int(r["packets"])
            octets[key] += int(r["l3_bytes"])
    return packets, octets


def one_run(tool: str, capture: Path, truth: tuple[Counter, Counter], workers: int | None, tmp: Path) -> dict:
    nf = Nfcapd(Path(tempfile.mkdtemp(dir=tmp)))
    before = rcvbuf_errors()
    if tool == "flowmeter":
        profile = tmp / "profile.json"
        profile.write_text(json.dumps({"FlowMetadata": {"IpFixCollectors": [nf.collector],
                                                        "StatisticsIntervalSeconds": 0}}))
        cmd = [sys.executable, "-m", "flowmeter.cli", "replay", str(capture), "--profile", str(profile)]
        if workers:
            cmd += ["--workers", str(workers)]
    else:
        cmd = ["softflowd", "-r", str(capture), "-n", f"127.0.0.1:{nf.port}", "-v", "10"]
    m = measure(cmd)
    rows = nf.records()
    m["drops"] = rcvbuf_errors() - before
    m["records"] = len(rows)
    got = nfdump_totals(rows)
    m["exact"] = got[0] == truth[0] and got[1] == truth[1]
    return m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    data = HERE / ".data"
    data.mkdir(exist_ok=True)
    capture = data / f"traffic-{args.packets}-{args.seed}.pcap"
    truth_csv = capture.with_suffix(".csv")
    if not capture.exists() or not truth_csv.exists():
        print(f"generating {capture.name} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "flowmeter.traffic", str(capture), "--packets", str(args.packets),
                        "--seed", str(args.seed), "--truth", str(truth_csv)], check=True, cwd=HERE.parent)
    truth = load_truth(truth_csv)
    results: dict[str, list[dict]] = {"flowmeter": [], "softflowd": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for tool in ("flowmeter", "softflowd") if i % 2 == 0 else ("softflowd", "flowmeter"):
                r = one_run(tool, capture, truth, args.workers, Path(tmp))
                if r["code"] != 0:
                    print(f"{tool} failed ({r['code']}): {r['stderr'][-500:]}", file=sys.stderr)
                results[tool].append(r)
                print(f"run {i + 1} {tool}: {args.packets / r['wall']:,.0f} packets/s", file=sys.stderr)
    print(f"capture: {capture.name}, {args.packets:,} packets, {sum(1 for _ in truth[0]):,} flow keys; "
          f"medians of {args.runs} alternating runs")
    print(f"{'tool':<10} {'packets/s':>12} {'wall s':>8} {'cpu s':>8} {'peak RSS MB':>12} {'records':>9} "
          f"{'drops':>7} {'exact':>6}")
    med = {}
    for tool, rs in results.items():
        w = statistics.median(r["wall"] for r in rs)
        med[tool] = args.packets / w
        print(f"{tool:<10} {med[tool]:>12,.0f} {w:>8.2f} {statistics.median(r['cpu'] for r in rs):>8.2f} "
              f"{statistics.median(r['rss'] for r in rs) / 2**20:>12.0f} "
              f"{statistics.median(r['records'] for r in rs):>9,.0f} {max(r['drops'] for r in rs):>7} "
              f"{'yes' if all(r['exact'] for r in rs) else 'NO':>6}")
    print(f"ratio flowmeter/softflowd packets/s: {med['flowmeter'] / med['softflowd']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
