"""Benchmark: live capture, flowmeter run against softflowd, on frames tcpreplay sends across a veth pair.

    .venv/bin/python bench/bench_live.py                          # 1M packets, 3 alternating runs (about 2 min)
    .venv/bin/python bench/bench_live.py --packets 100k --runs 1 --only flowmeter
    .venv/bin/python bench/bench_live.py --pps top,100k,200k      # also fixed rates: the highest with no kernel drop

Needs root, iproute2, ethtool, tcpreplay, softflowd (and softflowctl) and
nfdump (nfcapd); ``.ci/run`` installs them all.

Two network namespaces, A and B, joined by a veth pair ``va`` (in A) -- ``vb``
(in B), segmentation offloads off and IPv6 off, so that the link carries
nothing but the frames replayed into it. A deterministic capture made by
``tests.support.traffic`` (Ethernet, snap length 128; cached in ``bench/.data``
as by ``bench_replay.py``) is sent into ``vb`` by ``tcpreplay`` in B, at top
speed or at a fixed rate (``--pps``); every frame arrives at ``va`` as
ingress, addressed to a MAC that is not va's, which AF_PACKET sees all the
same (the IP stack of A drops it afterwards).

Every run starts one meter on ``va`` in A, exporting IPFIX to its own nfcapd
in A on loopback (the kernel's default receive buffer, as an operator starts
it), replays the capture, waits until the meter's processes are idle, reads
the meter's own counters and stops it:

- ``flowmeter run`` with ``Sources: ["afpacket:va"]`` and every ``--fanout``
  (capture processes sharing the interface), ``--workers`` shard workers
  (0: flowmeter's default). Its counters are the summary lines it prints at
  a stop: packets metered, kernel packets and drops of the ring, frames
  read. Stopped with SIGTERM: it drains, every flow is exported.
- ``softflowd -i va -n 127.0.0.1:PORT -v 10 -d`` (foreground), its other
  settings as shipped. Its counters come from ``softflowctl statistics``:
  packets processed, and libpcap's packets received and dropped (the same
  PACKET_STATISTICS counters of the kernel). Stopped with ``softflowctl
  shutdown``, which exports every flow (in the foreground softflowd installs
  no SIGTERM handler: a signal would lose every cached flow).

The tools run in alternation (the second run reverses the first run's
order); the table shows medians of ``--runs`` runs (drops: the largest).
``unread`` is what the kernel delivered to the meter's ring that the meter
never read (kernel packets - kernel drops - frames read); ``exact`` says
whether the records nfcapd stored, summed per flow key, equal the
generator's truth (every packet crosses va in one direction, so the
truth's unidirectional flows apply as they are). CPU seconds are the whole
process tree's (psutil): during the replay (from just before it to idle
after it) and from start to exit.

Exit status 1 if a run failed (a tool exited with an error or printed no
counters), or flowmeter metered every packet sent and its records still did
not match the truth. Losses are measurements, not failures.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import ClassVar

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))  # tests.support

import bench_replay as replay  # noqa: E402
from tests.support.collectors import require, udp_socket_drops, wait_socket_drained  # noqa: E402
from tests.support.netns import Namespaces, available, entered  # noqa: E402

IF_A, IF_B = "va", "vb"
TOOLS = ("flowmeter", "softflowd")
START_TIMEOUT_S = 120      # a meter that has not opened its source by then has failed
WARM_TIMEOUT_S = 900       # the first start after an install compiles flowmeter's kernels
STOP_TIMEOUT_S = 180       # a stop drains and exports every cached flow
IDLE_WINDOW_S = 0.5        # the meter is idle when its tree used less than
IDLE_CPU_S = 0.01          # this much CPU in the last IDLE_WINDOW_S
IDLE_TIMEOUT_S = 120
log = replay.log


# ---------------------------------------------------------------- options

def rate_list(text: str) -> list[int | None]:
    """``top,100k,250000``: None for tcpreplay's top speed, else packets per second."""
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip()
        if part.lower() in ("top", "topspeed"):
            out.append(None)
        else:
            out += replay.size_list(part)
    if not out:
        raise argparse.ArgumentTypeError("no rate given")
    return out


def rate_name(pps: int | None) -> str:
    return "top" if pps is None else replay.short(pps)


def fanout_list(text: str) -> list[int]:
    out = replay.int_list(text)
    if not all(n <= 16 for n in out):
        raise argparse.ArgumentTypeError(f"{text!r}: Fanout is 1 to 16")
    return out


# ---------------------------------------------------------------- the link

def make_lab(ns: Namespaces) -> tuple[str, str]:
    """Namespaces A and B joined by va -- vb: up, offloads off, IPv6 off, no addresses (nothing of their own sent)."""
    a, b = ns.add("a"), ns.add("b")
    r = subprocess.run(["ip", "link", "add", IF_A, "netns", a, "type", "veth", "peer", "name", IF_B, "netns", b],
                       capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"ip link add {IF_A} type veth: {r.stderr.strip()}")
    for name, ifname in ((a, IF_A), (b, IF_B)):
        ns.run(name, "sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1")
        ns.run(name, "ethtool", "-K", ifname, "tso", "off", "gso", "off", "gro", "off")
        ns.run(name, "ip", "link", "set", ifname, "up")
    ns.wait_up(a, IF_A)
    ns.wait_up(b, IF_B)
    return a, b


def link_stats(ns: Namespaces, name: str, ifname: str) -> dict:
    """The interface's rx/tx counters (``ip -s -j link``) as seen in its namespace."""
    out = ns.run(name, "ip", "-s", "-j", "link", "show", "dev", ifname).stdout
    s = json.loads(out)[0]["stats64"]
    return {"rx_packets": s["rx"]["packets"], "rx_dropped": s["rx"]["dropped"],
            "tx_packets": s["tx"]["packets"], "tx_dropped": s["tx"]["dropped"]}


# ---------------------------------------------------------------- processes

_started: list[subprocess.Popen] = []  # every process this run started, stopped at the end whatever happens


def tree_cpu(root: psutil.Process) -> float:
    """User + system seconds of ``root`` and every descendant, living or already reaped by its parent."""
    try:
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def wait_idle(root: psutil.Process) -> float:
    """Wait until the tree's CPU time stops growing (the meter has read what came); seconds waited."""
    started = time.monotonic()
    samples: list[tuple[float, float]] = []
    while time.monotonic() - started < IDLE_TIMEOUT_S:
        now = time.monotonic()
        samples.append((now, tree_cpu(root)))
        old = [s for s in samples if now - s[0] >= IDLE_WINDOW_S]
        if old and samples[-1][1] - old[-1][1] < IDLE_CPU_S:
            break
        time.sleep(0.1)
    return time.monotonic() - started


def reap(proc: subprocess.Popen, timeout: float) -> tuple[int, float]:
    """Wait for ``proc`` (killing its process group after ``timeout``): exit code and CPU seconds of it and every
    descendant it waited for (``wait4``)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            log(f"{proc.args[0]} (pid {proc.pid}) did not stop within {timeout:.0f} s; killed")
            kill_group(proc)
            pid, status, rusage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, rusage.ru_utime + rusage.ru_stime


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to ``proc`` and, if it leads a process group of its own (a session of its own), to that group."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass


def stop_all() -> None:
    for proc in _started:
        if proc.poll() is None:
            kill_group(proc)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
    _started.clear()


class Flowmeter:
    """``flowmeter run`` on va in namespace ``name``; ``stop()`` drains it and returns its counters."""

    tool = "flowmeter"
    SOURCE_LINE = re.compile(
        r"(capture-\d+) afpacket:" + IF_A + r": ([\d,]+) packets metered \([\d,]+/s\), not metered ([\d,]+), "
        r"kernel packets ([\d,]+), kernel drops ([\d,]+), kernel freezes ([\d,]+), frames read ([\d,]+), "
        r"interface errors ([\d,]+)")

    def __init__(self, name: str, run_dir: Path, collector: str | None, fanout: int, workers: int,
                 timeout: float = START_TIMEOUT_S) -> None:
        settings = {"Sources": [f"afpacket:{IF_A}"], "Fanout": fanout, "StatisticsIntervalSeconds": 0,
                    "IpFixCollectors": [collector] if collector else []}
        if workers:
            settings["Workers"] = workers
        profile = run_dir / "profile.json"
        profile.write_text(json.dumps({"FlowMetadata": settings}))
        self.fanout = fanout
        self.lines: list[str] = []
        with entered(name):
            self.proc = subprocess.Popen([sys.executable, "-m", "flowmeter.cli", "run", "--profile", str(profile)],
                                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         start_new_session=True)
        _started.append(self.proc)
        self.root = psutil.Process(self.proc.pid)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        try:
            while sum(f"afpacket:{IF_A} open" in line for line in self.lines) < fanout:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("flowmeter run did not open its source:\n" + "".join(self.lines)[-3000:])
                time.sleep(0.05)
        except BaseException:
            kill_group(self.proc)
            self._reader.join(5)
            raise

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGTERM)  # the supervisor alone: it drains its children itself
        code, cpu = reap(self.proc, STOP_TIMEOUT_S)
        self._reader.join(10)
        out = "".join(self.lines)
        last: dict[str, tuple] = {}
        for m in self.SOURCE_LINE.finditer(out):  # the 10-second lines and then the summary's: the last counts
            last[m.group(1)] = tuple(int(g.replace(",", "")) for g in m.groups()[1:])
        r = {"code": code, "cpu_total_s": cpu, "log": out[-4000:]}
        if code != 0 or len(last) != self.fanout:
            r["error"] = f"exit {code}, {len(last)} of {self.fanout} capture line(s)"
            return r
        metered, not_metered, kpackets, kdrops, _freezes, read, _errors = (sum(v) for v in zip(*last.values()))
        r.update(metered=metered, not_metered=not_metered, kernel_packets=kpackets, kernel_drops=kdrops,
                 unread=kpackets - kdrops - read)
        return r


class Softflowd:
    """``softflowd -i va`` in namespace ``name``, foreground, with a control socket; ``stop()`` returns its counters."""

    tool = "softflowd"
    FIELDS: ClassVar[dict[str, str]] = {"processed": r"Packets processed: (\d+)", "too_short": r"Ignored packets: \d+ \(\d+ non-IP, (\d+) too short",
              "non_ip": r"Ignored packets: \d+ \((\d+) non-IP", "received": r"Packets received by libpcap: (\d+)",
              "dropped": r"Packets dropped by libpcap: (\d+)", "if_dropped": r"Packets dropped by interface: (\d+)"}

    def __init__(self, ns: Namespaces, name: str, run_dir: Path, port: int) -> None:
        self.ctl = run_dir / "softflowd.ctl"
        self.log = run_dir / "softflowd.log"
        self._fh = open(self.log, "w")
        self.proc = ns.popen(name, "softflowd", "-i", IF_A, "-n", f"127.0.0.1:{port}", "-v", "10", "-d",
                             "-c", str(self.ctl), "-p", str(run_dir / "softflowd.pid"),
                             stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True)
        _started.append(self.proc)
        self.root = psutil.Process(self.proc.pid)  # ip netns exec execs softflowd: the same process
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:  # the control socket is made after the capture is open
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"softflowd did not start: {self.log.read_text()[-2000:]}")
                if self.ctl.exists() and self._ctl("statistics", check=False).returncode == 0:
                    break
                time.sleep(0.05)
        except BaseException:
            kill_group(self.proc)
            self._fh.close()
            raise

    def _ctl(self, word: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["softflowctl", "-c", str(self.ctl), word], capture_output=True, text=True,
                              timeout=30, check=check)

    def counters(self) -> dict:
        text = self._ctl("statistics").stdout
        out = {}
        for key, pattern in self.FIELDS.items():
            m = re.search(pattern, text)
            out[key] = int(m.group(1)) if m else None
        return out

    def stop(self) -> dict:
        r: dict = {}
        try:
            c = self.counters()
            r["softflowd"] = c
            self._ctl("shutdown")  # expires and exports every flow, then exits
        except (subprocess.SubprocessError, OSError) as exc:
            r["error"] = f"softflowctl: {exc}"
            c = None
        r["code"], r["cpu_total_s"] = reap(self.proc, STOP_TIMEOUT_S)
        self._fh.close()
        r["log"] = self.log.read_text()[-4000:]
        if c is None or None in (c["processed"], c["received"], c["dropped"]):
            r.setdefault("error", "no counters from softflowctl statistics")
            return r
        # after a shutdown from the control socket softflowd 1.1.0 exits with 1 ("Shutting down on user request")
        if r["code"] not in (0, 1) or (r["code"] == 1 and "Shutting down on user request" not in r["log"]):
            r["error"] = f"exit {r['code']}"
        r.update(metered=c["processed"] - (c["too_short"] or 0), not_metered=(c["non_ip"] or 0) + (c["too_short"] or 0),
                 kernel_packets=c["received"], kernel_drops=c["dropped"],
                 unread=c["received"] - c["dropped"] - c["processed"] - (c["non_ip"] or 0))
        return r


# ---------------------------------------------------------------- one run

TCPREPLAY = {"sent": r"Actual: (\d+) packets", "bytes": r"Actual: \d+ packets \((\d+) bytes\)",
             "seconds": r"sent in ([\d.]+) seconds", "pps": r"Rated: .*?([\d.]+) pps", "failed": r"Failed packets:\s+(\d+)"}


def tcpreplay(ns: Namespaces, name: str, pcap: Path, pps: int | None, packets: int) -> dict:
    """Send the capture into vb; tcpreplay's own report: packets sent, seconds, rate, failures."""
    cmd = ["tcpreplay", "--topspeed" if pps is None else f"--pps={pps}", "-i", IF_B, str(pcap)]
    timeout = 600 + (packets / pps if pps else 0) * 2
    started = time.perf_counter()
    r = ns.run(name, *cmd, check=False, timeout=timeout)
    wall = time.perf_counter() - started
    text = r.stdout + r.stderr
    out: dict = {"wall_s": wall, "code": r.returncode}
    for key, pattern in TCPREPLAY.items():
        m = re.search(pattern, text)
        out[key] = (float(m.group(1)) if key in ("seconds", "pps") else int(m.group(1))) if m else None
    if r.returncode or out["sent"] is None:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {text.strip()[-2000:]}")
    return out


def one_run(ns: Namespaces, a: str, b: str, tool: str, fanout: int, pps: int | None, pcap: Path, truth: tuple,
            packets: int, workers: int, run_dir: Path) -> dict:
    """A meter on va, the capture replayed into vb, the meter stopped; what was sent, seen, metered and exported."""
    run_dir.mkdir(parents=True)
    with entered(a):
        nf = replay.start_nfcapd(run_dir / "nfcapd")
    _started.append(nf.proc)
    r: dict = {"tool": tool, "fanout": fanout if tool == "flowmeter" else None, "pps": pps}
    meter = None
    try:
        if tool == "flowmeter":
            meter = Flowmeter(a, run_dir, nf.collector, fanout, workers)
        else:
            meter = Softflowd(ns, a, run_dir, nf.port)
        va0, vb0 = link_stats(ns, a, IF_A), link_stats(ns, b, IF_B)
        cpu0 = tree_cpu(meter.root)
        rep = tcpreplay(ns, b, pcap, pps, packets)
        r["idle_wait_s"] = wait_idle(meter.root)
        r["cpu_s"] = tree_cpu(meter.root) - cpu0
        va1, vb1 = link_stats(ns, a, IF_A), link_stats(ns, b, IF_B)
        stopping = time.perf_counter()
        r.update(meter.stop())
        r["stop_s"] = time.perf_counter() - stopping
    finally:
        if meter is not None and meter.proc.poll() is None:
            kill_group(meter.proc)
        with entered(a):  # /proc/net/udp of namespace A
            if nf.proc.poll() is None:
                wait_socket_drained(nf.port)
            r["nfcapd_drops"] = udp_socket_drops(nf.port)
            nf.stop()
    r.update(sent=rep["sent"], sent_bytes=rep["bytes"], replay_s=rep["seconds"], replay_pps=rep["pps"],
             replay_failed=rep["failed"], at_va=va1["rx_packets"] - va0["rx_packets"],
             link_dropped=(va1["rx_dropped"] - va0["rx_dropped"]) + (vb1["tx_dropped"] - vb0["tx_dropped"]))
    sums = replay.nfdump_sums(nf.flows)
    r["records"] = sums[2]
    r["exact"] = sums[0] == truth[0] and sums[1] == truth[1]
    r["exported_packets"] = sum(sums[0].values())
    metered = r.get("metered")
    r["all_metered"] = metered == r["sent"]
    r["metered_per_s"] = metered / rep["seconds"] if metered is not None and rep["seconds"] else None
    return r


# ---------------------------------------------------------------- reporting

def med(values) -> float | None:
    return replay.med(values)


def worst(values) -> int | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def cell(value, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def summarise(runs: list[dict], packets: int, flows: int) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["pps"] or 0, r["tool"], r["fanout"] or 0), []).append(r)
    rows = []
    for (_, tool, _), rs in sorted(groups.items(), key=lambda kv: kv[0]):
        good = [r for r in rs if "error" not in r]
        rows.append({
            "tool": tool, "fanout": rs[0]["fanout"], "pps": rs[0]["pps"], "packets": packets, "flows": flows,
            "runs": len(rs), "failed_runs": len(rs) - len(good),
            "sent": med(r.get("sent") for r in rs), "replay_pps": med(r.get("replay_pps") for r in rs),
            "replay_s": med(r.get("replay_s") for r in rs), "at_va": med(r.get("at_va") for r in rs),
            "link_dropped": worst(r.get("link_dropped") for r in rs),
            "metered": med(r.get("metered") for r in good), "kernel_drops": worst(r.get("kernel_drops") for r in good),
            "unread": worst(r.get("unread") for r in good),
            "metered_per_s": med(r.get("metered_per_s") for r in good),
            "cpu_s": med(r.get("cpu_s") for r in good), "cpu_total_s": med(r.get("cpu_total_s") for r in good),
            "records": med(r.get("records") for r in good), "nfcapd_drops": worst(r.get("nfcapd_drops") for r in rs),
            "all_metered": bool(good) and len(good) == len(rs) and all(r["all_metered"] for r in good),
            "exact": bool(good) and len(good) == len(rs) and all(r["exact"] for r in good),
        })
    return rows


def no_kernel_drops(row: dict) -> bool:
    return row["failed_runs"] == 0 and row["kernel_drops"] == 0


def print_table(rows: list[dict], args) -> None:
    flows = rows[0]["flows"] if rows else 0
    print(f"\nlive capture: {args.packets:,} packets ({flows:,} flows) sent by tcpreplay into {IF_B}, metered on "
          f"{IF_A}; medians of {args.runs} alternating run(s), drops and unread the largest; each tool into its own "
          f"default nfcapd\n")
    head = ["tool", "fanout", "rate", "sent", "tcpreplay pps", f"at {IF_A}", "metered", "kernel drops", "unread",
            "metered pps", "cpu s", "cpu ns/pkt", "cpu s total", "records", "nfcapd drops", "all metered", "exact"]
    table = [head]
    for r in rows:
        per_packet = r["cpu_s"] / r["metered"] * 1e9 if r["cpu_s"] is not None and r["metered"] else None
        table.append([r["tool"], "-" if r["fanout"] is None else str(r["fanout"]), rate_name(r["pps"]),
                      cell(r["sent"]), cell(r["replay_pps"]), cell(r["at_va"]), cell(r["metered"]),
                      cell(r["kernel_drops"]), cell(r["unread"]), cell(r["metered_per_s"]), cell(r["cpu_s"], ".2f"),
                      cell(per_packet), cell(r["cpu_total_s"], ".2f"), cell(r["records"]), cell(r["nfcapd_drops"]),
                      "yes" if r["all_metered"] else "NO", "yes" if r["exact"] else "NO"])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    right = set(range(3, len(head)))
    for n, row in enumerate(table):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print("| " + " | ".join(cells) + " |")
        if n == 0:
            print("|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                                 for i, w in enumerate(widths)) + "|")
    print(f"\nsent / tcpreplay pps: tcpreplay's own report; at {IF_A}: frames the interface received (its rx "
          f"counter); kernel drops: frames the kernel could not put in the meter's ring (flowmeter: its sources' "
          f"kernel drops; softflowd: libpcap's packets dropped); unread: frames the kernel delivered that the meter "
          f"never read; metered pps: metered / tcpreplay's seconds; cpu s: the meter's process tree from just before "
          f"the replay until it was idle again, cpu s total: from its start to its exit")
    if any(r["link_dropped"] for r in rows):
        print(f"frames lost on the veth link itself ({IF_B} tx / {IF_A} rx dropped), largest: "
              + ", ".join(f"{r['tool']} {rate_name(r['pps'])}: {r['link_dropped']:,}" for r in rows
                          if r["link_dropped"]))
    print("\nhighest rate with zero kernel drops in every run, of the rates tried (tcpreplay's achieved rate; "
          "all metered says whether every packet sent was also metered):")
    configs: dict[tuple, list[dict]] = {}
    for r in rows:
        configs.setdefault((r["tool"], r["fanout"]), []).append(r)
    for (tool, fanout), rs in configs.items():
        name = tool + (f" fanout {fanout}" if fanout else "")
        clean = [r for r in rs if no_kernel_drops(r) and r["replay_pps"]]
        if clean:
            best = max(clean, key=lambda r: r["replay_pps"])
            how = "--topspeed" if best["pps"] is None else f"--pps {best['pps']:,}"
            print(f"- {name}: {best['replay_pps']:,.0f} packets/s (tcpreplay {how}; all metered: "
                  f"{'yes' if best['all_metered'] else 'no'})")
        else:
            print(f"- {name}: none of {', '.join(rate_name(r['pps']) for r in rs)}")


# ---------------------------------------------------------------- main

def measure_all(ns: Namespaces, args, only: list[str], plan: list[tuple[str, int]], pcap: Path, truth: tuple,
                work: Path, runs: list[dict]) -> bool:
    """The link, a flowmeter warm-up, then every rate x run x tool in alternating order; False if a run failed."""
    ok = True
    started = time.perf_counter()
    a, b = make_lab(ns)
    log(f"namespaces {a} and {b} joined by {IF_A} -- {IF_B} in {time.perf_counter() - started:.1f} s")
    if "flowmeter" in only:  # not measured: loads (the first time: compiles) flowmeter's kernels
        started = time.perf_counter()
        (work / "warm-up").mkdir()
        warm = Flowmeter(a, work / "warm-up", None, 1, args.workers, timeout=WARM_TIMEOUT_S).stop()
        log(f"warm-up: flowmeter run started and stopped in {time.perf_counter() - started:.1f} s "
            f"(exit {warm['code']})")
    for pps in args.pps:
        for i in range(args.runs):
            for tool, fanout in plan if i % 2 == 0 else plan[::-1]:
                label = f"{rate_name(pps)} run {i + 1}/{args.runs} {tool}" + (
                    f" fanout {fanout}" if tool == "flowmeter" else "")
                run_dir = work / f"{rate_name(pps)}-{i + 1}-{tool}{fanout or ''}"
                try:
                    r = one_run(ns, a, b, tool, fanout, pps, pcap, truth, args.packets, args.workers, run_dir)
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    r = {"tool": tool, "fanout": fanout if tool == "flowmeter" else None, "pps": pps,
                         "error": str(exc), "all_metered": False, "exact": False}
                runs.append(r)
                if "error" in r:
                    ok = False
                    log(f"{label}: FAILED: {r['error']}\n{r.get('log', '')[-1500:]}")
                    continue
                if tool == "flowmeter" and r["all_metered"] and not r["exact"]:
                    ok = False
                    log(f"{label}: every packet metered but the records do not match the truth")
                log(f"{label}: sent {r['sent']:,} at {cell(r['replay_pps'])} pps, at {IF_A} {r['at_va']:,}, "
                    f"metered {r['metered']:,}, kernel drops {r['kernel_drops']:,}, unread {r['unread']:,}, "
                    f"cpu {r['cpu_s']:.2f} s, {r['records']:,} records, nfcapd drops {r['nfcapd_drops']}, "
                    f"{'exact' if r['exact'] else 'NOT exact'}; replay {r['replay_s']:.1f} s, "
                    f"idle after {r['idle_wait_s']:.1f} s, stop {r['stop_s']:.1f} s")
    return ok



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--packets", type=replay.size_list, default=[1_000_000],
                    help="packets of the generated capture, e.g. 100k or 1M (default 1M)")
    ap.add_argument("--runs", type=int, default=3, help="alternating runs per measurement; medians (default 3)")
    ap.add_argument("--pps", type=rate_list, default=[None],
                    help="tcpreplay rates: top (--topspeed) and/or packets per second, e.g. top,100k,200k (default top)")
    ap.add_argument("--fanout", type=fanout_list, default=[1, 2], help="flowmeter Fanout values (default 1,2)")
    ap.add_argument("--workers", type=int, default=0, help="flowmeter Workers (default 0: flowmeter's own choice)")
    ap.add_argument("--only", default=",".join(TOOLS), help="tools to run: flowmeter, softflowd (default both)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write every run and the table's rows here as JSON")
    ap.add_argument("--keep", action="store_true",
                    help="keep the working directory (profiles, logs, nfcapd files) and print where it is")
    ap.add_argument("--data", type=Path, default=replay.DATA, help=f"where captures are cached (default {replay.DATA})")
    args = ap.parse_args(argv)
    only = [t.strip() for t in args.only.split(",") if t.strip()]
    if not only or any(t not in TOOLS for t in only):
        ap.error(f"--only: {args.only!r}: tools are {', '.join(TOOLS)}")
    if len(args.packets) != 1:
        ap.error("--packets: one capture size")
    args.packets = args.packets[0]
    if args.runs < 1:
        ap.error(f"--runs: {args.runs} is not a positive number of runs")
    if not 0 <= args.workers <= 64:
        ap.error(f"--workers: {args.workers} is not 0 to 64")
    why = available()
    if why:
        ap.error(why)
    try:
        require("tcpreplay", "ethtool", "nfcapd", "nfdump",
                *(("softflowd", "softflowctl") if "softflowd" in only else ()))
    except RuntimeError as exc:
        ap.error(str(exc))

    replay.DATA = args.data.resolve()
    replay.DATA.mkdir(parents=True, exist_ok=True)
    replay.prune_stale()
    files, truth_csv = replay.capture("traffic", args.packets, args.seed)
    pcap = files[0]
    truth = replay.load_truth(truth_csv)
    plan = [("flowmeter", f) for f in args.fanout if "flowmeter" in only] + \
           ([("softflowd", 0)] if "softflowd" in only else [])

    def interrupted(signum, frame):  # a stop signal cleans up like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    work = Path(tempfile.mkdtemp(prefix="bench-live-"))
    runs: list[dict] = []
    try:
        with Namespaces() as ns:
            try:
                ok = measure_all(ns, args, only, plan, pcap, truth, work, runs)
            finally:
                stop_all()  # before the namespaces go
    except KeyboardInterrupt:
        log("interrupted: every process started was stopped and the namespaces removed")
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        log(f"bench_live: {exc}")
        return 1
    finally:
        stop_all()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if args.keep:
            log(f"working directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    flows = len(truth[0])
    rows = summarise(runs, args.packets, flows)
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps({"generator": replay.GENERATOR, "ok": ok,
                                         "args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()},
                                         "rows": rows, "runs": [{k: v for k, v in r.items() if k != "log"}
                                                                for r in runs]}, indent=1))
    if not ok:
        log("bench_live: a run failed (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
