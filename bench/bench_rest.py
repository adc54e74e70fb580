"""Benchmark: flowmeter's fixed costs, the memory of an idle ``flowmeter run`` and the wall time of a tiny replay.

    .venv/bin/python bench/bench_rest.py                    # both, on lo, 5 runs (about 1 min); needs root
    .venv/bin/python bench/bench_rest.py --only replay      # no root needed
    .venv/bin/python bench/bench_rest.py --workers 1,2,4    # the cost of each further worker

**rest**: ``flowmeter run`` with one live source (``afpacket:IFACE``, default
``lo``), ``--workers N`` and default settings otherwise, exporting to a UDP
socket this script owns, is started and left alone until its process tree
is complete (the supervisor and its N + 2 children) and idle (under 10 ms of
CPU in half a second, after the first second). Then every process's
``/proc/PID/smaps_rollup`` is read: PSS (proportional set size: a page
shared by k processes counts 1/k in each, so the sum over the tree is the
memory the run holds), RSS, and the part of the PSS that is the afpacket
ring (the mappings of the packet socket, from ``/proc/PID/smaps``): kernel
memory the ring's size sets, mapped into the capture process (and the
supervisor, which opened the socket). The run is then stopped with SIGTERM.
With softflowd installed, ``softflowd -i IFACE -n 127.0.0.1:PORT -v 10 -d``
is measured the same way, for reference.

**replay**: ``flowmeter replay flowmeter/data/demo.pcap`` (600 packets) to a
``File/`` collector in a temporary directory, wall time from start to exit,
alternating with ``python3 -c "import numpy"`` (the interpreter with numpy,
the floor of any numpy program's start); one unmeasured run first, so that
numba's kernel cache and the bytecode are warm. Medians of ``--runs`` runs,
wall and CPU seconds (user + system of every process of the command).

Progress goes to stderr, the tables (markdown) to stdout; ``--json PATH``
also writes every figure. Exit status 1 when a run failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEMO = ROOT / "flowmeter" / "data" / "demo.pcap"
START_TIMEOUT_S = 300  # the first start after an install compiles the kernels
IDLE_CPU_S = 0.01  # a tree is idle when it used less CPU than this ...
IDLE_WINDOW_S = 0.5  # ... in this long
SETTLE_S = 1.0  # and not before this long after it was complete
FIELDS = ("pss", "ring", "rss", "private")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def flowmeter() -> list[str]:
    return [sys.executable, "-m", "flowmeter.cli"]


def write_bytecode() -> None:
    """What installing a package does: flowmeter's modules compiled once, not at every start."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", "flowmeter", "workers", "exporter"], cwd=ROOT,
                   stdout=subprocess.DEVNULL, check=False)


# ---------------------------------------------------------------- memory at rest

def rollup(pid: int) -> dict[str, int]:
    """The kB lines of /proc/PID/smaps_rollup (Rss, Pss, Private_Dirty, ...) in octets."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            m = re.match(r"(\w+):\s+(\d+) kB", line)
            if m:
                out[m.group(1)] = int(m.group(2)) * 1024
    return out


def socket_pss(pid: int) -> int:
    """PSS of the process's mappings of sockets (an afpacket ring), in octets."""
    total, in_socket = 0, False
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                in_socket = "socket:" in line or line.rstrip().endswith("[socket]") or "packet" in line
            elif in_socket and first == "Pss:":
                total += int(line.split()[1]) * 1024
    return total


def tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def wait_idle(root: psutil.Process, processes: int, proc: subprocess.Popen) -> list[psutil.Process]:
    """The tree once it has ``processes`` processes and is idle; raises if the command ends first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    complete_since = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} before it was idle")
        procs = tree(root)
        if len(procs) < processes:
            complete_since = None
            time.sleep(0.1)
            continue
        complete_since = complete_since or time.monotonic()
        before = cpu_s(procs)
        time.sleep(IDLE_WINDOW_S)
        if time.monotonic() - complete_since >= SETTLE_S and cpu_s(procs) - before < IDLE_CPU_S:
            return procs
    raise RuntimeError(f"not idle with {processes} processes within {START_TIMEOUT_S} s")


def measure_tree(cmd: list[str], processes: int, env: dict | None = None) -> list[dict]:
    """Start ``cmd``, wait until idle, read every process's memory, stop it (SIGTERM)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    try:
        procs = wait_idle(psutil.Process(proc.pid), processes, proc)
        rows = []
        for p in procs:
            r = rollup(p.pid)
            rows.append({"pid": p.pid, "name": p.name(), "pss": r.get("Pss", 0), "rss": r.get("Rss", 0),
                         "private": r.get("Private_Clean", 0) + r.get("Private_Dirty", 0),
                         "ring": socket_pss(p.pid)})
        return rows
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log(proc.stderr.read()[-2000:])
        raise
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def section_rest(args, tmp: Path, results: dict) -> None:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the collector: datagrams are received, not read
    sink.bind(("127.0.0.1", 0))
    port = sink.getsockname()[1]
    profile = tmp / "run.json"
    profile.write_text(json.dumps({"FlowMetadata": {"Sources": [f"afpacket:{args.iface}"],
                                                    "IpFixCollectors": [f"Udp/127.0.0.1:{port}"]}}))
    env = {**os.environ, "RUNTIME_DIRECTORY": str(tmp)}  # this run's status file apart from any other run's
    log("rest: one unmeasured start (loads, or the first time compiles, the kernels)")
    measure_tree(flowmeter() + ["run", "--profile", str(profile), "--workers", "1"], 4, env)
    results["rest"] = {}
    for workers in args.workers:
        runs = []
        for i in range(args.mem_runs):
            log(f"rest: flowmeter run, {workers} worker(s), run {i + 1}/{args.mem_runs}")
            runs.append(measure_tree(flowmeter() + ["run", "--profile", str(profile), "--workers", str(workers)],
                                     3 + workers, env))
        results["rest"][workers] = runs
    if shutil.which("softflowd"):
        log("rest: softflowd")
        results["softflowd"] = measure_tree(["softflowd", "-i", args.iface, "-n", f"127.0.0.1:{port}", "-v", "10",
                                             "-d", "-c", str(tmp / "sf.ctl")], 1)
    sink.close()


def show_rest(results: dict) -> None:
    mb = 1 << 20
    print("\n### Memory at rest: idle `flowmeter run`, one afpacket source (PSS, MB; median of the runs)\n")
    print("| workers | process | PSS | of it the ring | RSS | private |")
    print("|---|---|---|---|---|---|")
    totals = {}
    for workers, runs in results["rest"].items():
        classes: list[str] = []
        sums = []  # per run: class -> (count, {field: octets})
        for run in runs:
            per: dict[str, list] = {}
            for i, row in enumerate(run):
                name = "supervisor" if i == 0 else re.sub(r"-\d+$", "", row["name"])
                if name not in classes:
                    classes.append(name)
                entry = per.setdefault(name, [0, dict.fromkeys(FIELDS, 0)])
                entry[0] += 1
                for k in FIELDS:
                    entry[1][k] += row[k]
            sums.append(per)
        for name in classes:
            count = max(s[name][0] for s in sums if name in s)
            med = {k: statistics.median(s[name][1][k] / mb for s in sums if name in s) for k in FIELDS}
            label = f"{name} ×{count}" if count > 1 else name
            print(f"| {workers} | {label} | {med['pss']:.1f} | {med['ring']:.1f} | {med['rss']:.1f} | "
                  f"{med['private']:.1f} |")
        totals[workers] = statistics.median(sum(r["pss"] for r in run) / mb for run in runs)
        ring = statistics.median(sum(r["ring"] for r in run) / mb for run in runs)
        print(f"| {workers} | **tree** | **{totals[workers]:.1f}** | {ring:.1f} | | |")
    if len(totals) > 1:
        ws = sorted(totals)
        per = (totals[ws[-1]] - totals[ws[0]]) / (ws[-1] - ws[0])
        print(f"\neach further worker: {per:.1f} MB PSS ({ws[0]} → {ws[-1]} workers)")
    if "softflowd" in results:
        sf = results["softflowd"][0]
        print(f"\nsoftflowd -i: {sf['pss'] / mb:.1f} MB PSS ({sf['ring'] / mb:.1f} MB of it its ring)")


# ---------------------------------------------------------------- start-up

def wall(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and every process it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    took = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}: exit {proc.returncode}: {proc.stderr[-1000:]}")
    return took, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def section_replay(args, tmp: Path, results: dict) -> None:
    profile = tmp / "file.json"
    out = tmp / "out.ipfix"
    profile.write_text(json.dumps({"FlowMetadata": {"IpFixCollectors": [f"File/{out}"]}}))
    replay = flowmeter() + ["replay", str(DEMO), "--profile", str(profile)]
    numpy = [sys.executable, "-c", "import numpy"]
    log("replay: one unmeasured run")
    wall(replay)
    flow, floor = [], []
    for i in range(args.runs):
        log(f"replay: run {i + 1}/{args.runs}")
        for cmd, into in ((replay, flow), (numpy, floor)) if i % 2 == 0 else ((numpy, floor), (replay, flow)):
            into.append(wall(cmd))
            out.unlink(missing_ok=True)
    results["replay"] = {"flowmeter": flow, "numpy": floor}


def show_replay(results: dict) -> None:
    r = results["replay"]
    print("\n### Start-up: `flowmeter replay` of demo.pcap (600 packets), wall seconds\n")
    print("| command | wall median | min | max | CPU s median |")
    print("|---|---|---|---|---|")
    for name, label in (("flowmeter", "flowmeter replay demo.pcap"), ("numpy", 'python3 -c "import numpy"')):
        v = [w for w, _cpu in r[name]]
        cpu = statistics.median(c for _w, c in r[name])
        print(f"| {label} | {statistics.median(v):.3f} | {min(v):.3f} | {max(v):.3f} | {cpu:.3f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="rest,replay", help="sections: rest, replay")
    ap.add_argument("--runs", type=int, default=5, help="replay runs (medians)")
    ap.add_argument("--mem-runs", type=int, default=3, help="idle runs per worker count (medians)")
    ap.add_argument("--workers", default="1,2", help="worker counts of the rest section")
    ap.add_argument("--iface", default="lo", help="the afpacket source's interface")
    ap.add_argument("--json", type=Path, help="also write every figure as JSON")
    args = ap.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    only = set(args.only.split(","))
    write_bytecode()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-rest-") as d:
        tmp = Path(d)
        os.chmod(tmp, 0o755)
        try:
            if "replay" in only:
                section_replay(args, tmp, results)
            if "rest" in only:
                section_rest(args, tmp, results)
        except RuntimeError as exc:
            log(f"bench_rest: {exc}")
            return 1
    if "replay" in results:
        show_replay(results)
    if "rest" in results:
        show_rest(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
