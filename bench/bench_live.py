"""Benchmark: live capture, flowmeter run against softflowd -i, on frames trafgen sends across a veth pair.

    .venv/bin/python bench/bench_live.py                          # 1k and 100k flows, 3 alternating runs (about 10 min)
    .venv/bin/python bench/bench_live.py --flows 1k --runs 1 --only flowmeter
    .venv/bin/python bench/bench_live.py --rates top,200k,400k    # also fixed offered rates

Needs root, iproute2, ethtool, trafgen (Debian's netsniff-ng), taskset,
softflowd (and softflowctl) and nfdump (nfcapd); ``.ci/run`` installs them all.

Two network namespaces, A and B, joined by a veth pair ``va`` (in A) -- ``vb``
(in B), segmentation offloads off and IPv6 off, so that the link carries
nothing but the frames sent into it. ``trafgen`` in B, pinned to CPU 0
(``taskset -c 0``, one sending process), sends ``--packets`` UDP frames
(60 octets) into ``vb``: F flows (``--flows``, 1k and 100k), the source
address counting through F values and starting again, so F flows are active
at once and each gets packets / F of them. Frames are addressed to a MAC
that is not va's: AF_PACKET sees them all the same, A's IP stack drops them
at once. Top speed (trafgen's own: as fast as one core pushes frames
through its ring and, a veth having no NIC, delivers them to va's listeners
too) or a fixed rate (``--rates``: trafgen ``--rate Npps``).

Every run starts one meter on ``va`` in A, pinned to the other core
(``taskset -c 1``: every process of it), exporting IPFIX to its own nfcapd
in A on loopback (its socket's receive buffer forced to 256 MiB, as in the
replay benchmark, so that the records are the meter's); reads the meter's
tree CPU (``/proc/PID/stat`` of every process, with children it reaped)
just before the traffic and again once the meter is idle after it, so that
start-up and the final flush are left out; reads the meter's own counters
and stops it:

- ``flowmeter run`` with ``Sources: ["afpacket:va"]`` and every ``--fanout``,
  ``--workers`` (0: flowmeter's default). Counters: its summary lines
  (packets metered, kernel packets and drops of the ring, frames read).
  Stopped with SIGTERM: it drains, every flow is exported.
- ``softflowd -i va -n 127.0.0.1:PORT -v 10 -d`` (foreground), at its
  default ``-m 8192`` and with ``-m`` above the flow count. Counters from
  ``softflowctl statistics`` (packets processed; libpcap's received and
  dropped, the kernel's PACKET_STATISTICS). Stopped with ``softflowctl
  shutdown``, which exports every flow.

Drop onset: for each meter and flow count whose top-speed runs saw kernel
drops, the offered rate is halved and bisected (``--onset-steps`` single
runs) to the rate where drops begin; with none at top speed, none begin
below the sender's top rate.

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
from collections import Counter
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
SENDER_CPU, METER_CPU = 0, 1
START_TIMEOUT_S = 120      # a meter that has not opened its source by then has failed
WARM_TIMEOUT_S = 900       # the first start after an install compiles flowmeter's kernels
STOP_TIMEOUT_S = 180       # a stop drains and exports every cached flow
IDLE_WINDOW_S = 0.5        # the meter is idle when its tree used less than
IDLE_CPU_S = 0.01          # this much CPU in the last IDLE_WINDOW_S
IDLE_TIMEOUT_S = 120
COLLECTOR_BUFFER = 256 << 20
FRAME_LEN = 60             # Ethernet 14 + IPv4 20 + UDP 8 + 18 octets: the shortest frame without padding
L3_LEN = FRAME_LEN - 14
SRC_BASE = 0x0A000001      # 10.0.0.1: the flows' source addresses count up from here
DST, SPORT, DPORT = "198.51.100.1", 40000, 53
SOFTFLOWD_DEFAULT_FLOWS = replay.SOFTFLOWD_DEFAULT_FLOWS
log = replay.log


# ---------------------------------------------------------------- options

def rate_list(text: str) -> list[int | None]:
    """``top,100k,250000``: None for trafgen's top speed, else packets per second."""
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


# ---------------------------------------------------------------- the traffic

def trafgen_config(flows: int) -> str:
    """One UDP frame whose source address counts through ``flows`` values (trafgen's ``dinc``), then again."""
    return ("{ eth(da=02:00:00:00:00:01, sa=02:00:00:00:00:02), "
            f"ipv4(sa=10.0.0.1, sa=dinc({SRC_BASE}, {SRC_BASE + flows - 1}), da={DST}, ttl=64), "
            f"udp(sp={SPORT}, dp={DPORT}), fill(0, {FRAME_LEN - 42}) }}\n")


def truth(flows: int, packets: int) -> tuple[Counter, Counter]:
    """Packets and layer-3 octets per flow key, as ``replay.nfdump_sums`` keys them: packets / flows each."""
    each = packets // flows
    keys = [(f"10.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}", DST, 17, SPORT, DPORT)
            for a in range(SRC_BASE, SRC_BASE + flows)]
    return Counter(dict.fromkeys(keys, each)), Counter(dict.fromkeys(keys, each * L3_LEN))


TRAFGEN = {"sent": r"(\d+) packets outgoing", "bytes": r"(\d+) bytes outgoing",
           "time": r"(\d+) sec, (\d+) usec on CPU"}


def trafgen(ns: Namespaces, name: str, config: Path, packets: int, pps: int | None) -> dict:
    """Send ``packets`` frames into vb from CPU 0; trafgen's own report: packets sent, seconds, rate.

    ``--no-sock-mem`` and ``--notouch-irq``: trafgen would otherwise
    change machine-wide socket memory limits and interrupt affinities.
    """
    cmd = ["taskset", "-c", str(SENDER_CPU), "trafgen", "-i", str(config), "-o", IF_B, "--cpus", "1",
           "-n", str(packets), "--no-sock-mem", "--notouch-irq"]
    if pps is not None:
        cmd += ["--rate", f"{pps}pps"]
    timeout = 300 + (packets / pps if pps else 0) * 2
    started = time.perf_counter()
    r = ns.run(name, *cmd, check=False, timeout=timeout)
    wall = time.perf_counter() - started
    text = r.stdout + r.stderr
    sent, octets, took = (re.search(TRAFGEN[k], text) for k in ("sent", "bytes", "time"))
    if r.returncode or sent is None:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {text.strip()[-2000:]}")
    seconds = int(took.group(1)) + int(took.group(2)) / 1e6 if took else wall
    return {"sent": int(sent.group(1)), "bytes": int(octets.group(1)) if octets else None, "seconds": seconds,
            "pps": int(sent.group(1)) / seconds if seconds else None, "wall_s": wall}


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
    """``flowmeter run`` on va in namespace ``name``, pinned to METER_CPU; ``stop()`` drains it, returns counters."""

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
        with entered(name):  # taskset execs the interpreter: the pid is flowmeter's, its children inherit the CPU
            self.proc = subprocess.Popen(["taskset", "-c", str(METER_CPU), sys.executable, "-m", "flowmeter.cli",
                                          "run", "--profile", str(profile)],
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
    """``softflowd -i va`` in namespace ``name``, foreground, pinned to METER_CPU, with a control socket;
    ``stop()`` returns its counters."""

    tool = "softflowd"
    FIELDS: ClassVar[dict[str, str]] = {
        "processed": r"Packets processed: (\d+)", "too_short": r"Ignored packets: \d+ \(\d+ non-IP, (\d+) too short",
        "non_ip": r"Ignored packets: \d+ \((\d+) non-IP", "received": r"Packets received by libpcap: (\d+)",
        "dropped": r"Packets dropped by libpcap: (\d+)", "if_dropped": r"Packets dropped by interface: (\d+)"}

    def __init__(self, ns: Namespaces, name: str, run_dir: Path, port: int, max_flows: int | None) -> None:
        self.ctl = run_dir / "softflowd.ctl"
        self.log = run_dir / "softflowd.log"
        self._fh = open(self.log, "w")
        extra = ["-m", str(max_flows)] if max_flows else []
        self.proc = ns.popen(name, "taskset", "-c", str(METER_CPU), "softflowd", "-i", IF_A,
                             "-n", f"127.0.0.1:{port}", "-v", "10", "-d", *extra,
                             "-c", str(self.ctl), "-p", str(run_dir / "softflowd.pid"),
                             stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True)
        _started.append(self.proc)
        self.root = psutil.Process(self.proc.pid)  # ip netns exec and taskset exec softflowd: the same process
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

def meter_name(tool: str, setting: int | str, flows: int) -> str:
    if tool == "flowmeter":
        return f"flowmeter Fanout {setting}"
    return f"softflowd -m {SOFTFLOWD_DEFAULT_FLOWS} (default)" if setting == "default" else \
        f"softflowd -m {softflowd_exact_flows(flows):,}"


def softflowd_exact_flows(flows: int) -> int:
    return flows + flows // 10 + 64  # above the flow count: it never evicts


def one_run(ns: Namespaces, a: str, b: str, tool: str, setting: int | str, flows: int, packets: int,
            pps: int | None, config: Path, want: tuple, workers: int, run_dir: Path) -> dict:
    """A meter on va, the traffic sent into vb, the meter stopped; what was sent, seen, metered and exported."""
    run_dir.mkdir(parents=True)
    with entered(a):
        nf = replay.start_nfcapd(run_dir / "nfcapd")
        replay.force_receive_buffer(nf.proc.pid, nf.port, COLLECTOR_BUFFER)
    _started.append(nf.proc)
    r: dict = {"tool": tool, "setting": setting, "flows": flows, "pps": pps}
    meter = None
    try:
        if tool == "flowmeter":
            meter = Flowmeter(a, run_dir, nf.collector, setting, workers)
        else:
            meter = Softflowd(ns, a, run_dir, nf.port, None if setting == "default" else softflowd_exact_flows(flows))
        va0, vb0 = link_stats(ns, a, IF_A), link_stats(ns, b, IF_B)
        cpu0 = tree_cpu(meter.root)
        sent = trafgen(ns, b, config, packets, pps)
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
    r.update(sent=sent["sent"], sent_bytes=sent["bytes"], send_s=sent["seconds"], send_pps=sent["pps"],
             at_va=va1["rx_packets"] - va0["rx_packets"],
             link_dropped=(va1["rx_dropped"] - va0["rx_dropped"]) + (vb1["tx_dropped"] - vb0["tx_dropped"]))
    sums = replay.nfdump_sums(nf.flows)
    r["records"] = sums[2]
    r["exact"] = sums[0] == want[0] and sums[1] == want[1]
    r["exported_packets"] = sum(sums[0].values())
    metered = r.get("metered")
    r["all_metered"] = metered == r["sent"]
    r["cpu_ns_per_packet"] = r["cpu_s"] / metered * 1e9 if metered else None
    return r


# ---------------------------------------------------------------- reporting

def med(values) -> float | None:
    return replay.med(values)


def worst(values) -> int | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def cell(value, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def summarise(runs: list[dict], packets: dict[int, int]) -> list[dict]:
    """One row per flow count, tool, setting and rate: medians (drops, unread: the largest)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r.get("onset"):
            continue
        groups.setdefault((r["flows"], r["pps"] or 0, r["tool"], str(r["setting"])), []).append(r)
    rows = []
    for (flows, _, tool, _), rs in sorted(groups.items(), key=lambda kv: kv[0]):
        good = [r for r in rs if "error" not in r]
        rows.append({
            "flows": flows, "packets": packets[flows], "tool": tool, "setting": rs[0]["setting"],
            "meter": meter_name(tool, rs[0]["setting"], flows), "pps": rs[0]["pps"],
            "runs": len(rs), "failed_runs": len(rs) - len(good),
            "sent": med(r.get("sent") for r in rs), "send_pps": med(r.get("send_pps") for r in rs),
            "send_s": med(r.get("send_s") for r in rs), "at_va": med(r.get("at_va") for r in rs),
            "link_dropped": worst(r.get("link_dropped") for r in rs),
            "metered": med(r.get("metered") for r in good), "kernel_drops": worst(r.get("kernel_drops") for r in good),
            "unread": worst(r.get("unread") for r in good),
            "cpu_s": med(r.get("cpu_s") for r in good),
            "cpu_ns_per_packet": med(r.get("cpu_ns_per_packet") for r in good),
            "cpu_total_s": med(r.get("cpu_total_s") for r in good),
            "records": med(r.get("records") for r in good), "nfcapd_drops": worst(r.get("nfcapd_drops") for r in rs),
            "all_metered": bool(good) and len(good) == len(rs) and all(r["all_metered"] for r in good),
            "exact": bool(good) and len(good) == len(rs) and all(r["exact"] for r in good),
        })
    return rows


def print_tables(rows: list[dict], onsets: list[dict], args) -> None:
    for flows in args.flows:
        these = [r for r in rows if r["flows"] == flows]
        if not these:
            continue
        print(f"\nlive capture, {flows:,} flows: {these[0]['packets']:,} packets ({FRAME_LEN}-octet UDP frames, "
              f"{these[0]['packets'] // flows:,} a flow) sent by trafgen on CPU {SENDER_CPU} into {IF_B}, metered on "
              f"{IF_A} by a meter pinned to CPU {METER_CPU}; medians of {args.runs} alternating run(s), drops and "
              f"unread the largest\n")
        body = []
        for r in these:
            body.append([r["meter"], rate_name(r["pps"]), cell(r["sent"]), cell(r["send_pps"]), cell(r["at_va"]),
                         cell(r["metered"]), cell(r["kernel_drops"]), cell(r["unread"]), cell(r["cpu_s"], ".2f"),
                         cell(r["cpu_ns_per_packet"]), cell(r["cpu_total_s"], ".2f"), cell(r["records"]),
                         cell(r["nfcapd_drops"]), "yes" if r["all_metered"] else "no", "yes" if r["exact"] else "no"])
        replay.markdown(["meter", "rate", "sent", "sent pps", f"at {IF_A}", "metered", "kernel drops", "unread",
                         "cpu s", "cpu ns/pkt", "cpu s total", "records", "nfcapd drops", "all metered", "exact"],
                        body, left=2)
        if any(r["link_dropped"] for r in these):
            print(f"\nframes lost on the veth link itself ({IF_B} tx / {IF_A} rx dropped), largest: "
                  + ", ".join(f"{r['meter']} {rate_name(r['pps'])}: {r['link_dropped']:,}" for r in these
                              if r["link_dropped"]))
    print(f"\nsent, sent pps: trafgen's own report (its send loop's seconds); at {IF_A}: frames the interface "
          f"received; metered: flowmeter's packets metered, softflowd's packets processed; kernel drops: frames the "
          f"kernel could not put in the meter's ring; unread: frames put in the ring that the meter never read; "
          f"cpu s: the meter's process tree (/proc/PID/stat) from just before the traffic until it was idle again, "
          f"cpu ns/pkt: that per packet metered; cpu s total: from its start to its exit (wait4); exact: nfdump's "
          f"records summed per flow key equal packets and octets sent")
    if onsets:
        print("\ndrop onset (offered rate: trafgen's achieved packets/s; one run per rate tried):\n")
        body = [[o["meter"], f"{o['flows']:,}", cell(o["clean_pps"]), cell(o["drop_pps"]), o["tried"]]
                for o in onsets]
        replay.markdown(["meter", "flows", "highest rate without drops", "lowest rate with drops",
                         "rates tried (kernel drops)"], body)


# ---------------------------------------------------------------- main

def run_label(r: dict) -> str:
    return f"{r['flows']:,} flows {rate_name(r['pps'])} {meter_name(r['tool'], r['setting'], r['flows'])}"


def measure_one(ns, a, b, tool, setting, flows, packets, pps, config, want, args, run_dir) -> dict:
    try:
        r = one_run(ns, a, b, tool, setting, flows, packets, pps, config, want, args.workers, run_dir)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        r = {"tool": tool, "setting": setting, "flows": flows, "pps": pps, "error": str(exc),
             "all_metered": False, "exact": False}
    if "error" in r:
        log(f"{run_label(r)}: FAILED: {r['error']}\n{r.get('log', '')[-1500:]}")
    else:
        log(f"{run_label(r)}: sent {r['sent']:,} at {cell(r['send_pps'])} pps, at {IF_A} {r['at_va']:,}, "
            f"metered {r['metered']:,}, kernel drops {r['kernel_drops']:,}, unread {r['unread']:,}, "
            f"cpu {r['cpu_s']:.2f} s ({cell(r['cpu_ns_per_packet'])} ns/pkt), {r['records']:,} records, "
            f"nfcapd drops {r['nfcapd_drops']}, {'exact' if r['exact'] else 'NOT exact'}; send {r['send_s']:.1f} s, "
            f"idle after {r['idle_wait_s']:.1f} s, stop {r['stop_s']:.1f} s")
    return r


def find_onset(ns, a, b, tool, setting, flows, packets, top_pps, config, want, args, work) -> dict:
    """Bisect trafgen's --rate below top speed to where kernel drops begin, ``--onset-steps`` single runs."""
    clean, dropping = None, top_pps
    tried = []
    for step in range(args.onset_steps):
        rate = int((dropping + (clean or 0)) / 2) if clean else int(dropping / 2)
        rate = max(1000, rate // 1000 * 1000)
        r = measure_one(ns, a, b, tool, setting, flows, packets, rate, config, want, args,
                        work / f"onset-{flows}-{tool}{setting}-{step}")
        r["onset"] = True
        if "error" in r:
            break
        tried.append(f"{rate_name(rate)} ({r['kernel_drops']:,})")
        achieved = r["send_pps"] or rate
        if r["kernel_drops"]:
            dropping = achieved
        else:
            clean = achieved
    return {"tool": tool, "setting": setting, "flows": flows, "meter": meter_name(tool, setting, flows),
            "clean_pps": clean, "drop_pps": dropping, "tried": ", ".join(["top (dropped)"] + tried)}


def measure_all(ns: Namespaces, args, only: list[str], work: Path, runs: list[dict], onsets: list[dict],
                packets: dict[int, int]) -> bool:
    """The link, a flowmeter warm-up, then every flow count x rate x run x meter in alternating order, then the
    drop onsets; False if a run failed."""
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
    plan = [("flowmeter", f) for f in args.fanout if "flowmeter" in only] + \
           ([("softflowd", "default"), ("softflowd", "exact")] if "softflowd" in only else [])
    for flows in args.flows:
        config = work / f"trafgen-{flows}.cfg"
        config.write_text(trafgen_config(flows))
        want = truth(flows, packets[flows])
        for pps in args.rates:
            for i in range(args.runs):
                for tool, setting in plan if i % 2 == 0 else plan[::-1]:
                    r = measure_one(ns, a, b, tool, setting, flows, packets[flows], pps, config, want, args,
                                    work / f"{flows}-{rate_name(pps)}-{i + 1}-{tool}{setting}")
                    runs.append(r)
                    if "error" in r:
                        ok = False
                    elif tool == "flowmeter" and r["all_metered"] and not r["exact"]:
                        ok = False
                        log(f"{run_label(r)}: every packet metered but the records do not match the truth")
        if None not in args.rates or not args.onset_steps:
            continue
        for tool, setting in plan:
            top = [r for r in runs if r["flows"] == flows and r["pps"] is None and r["tool"] == tool
                   and r["setting"] == setting and "error" not in r]
            if not top:
                continue
            if worst(r["kernel_drops"] for r in top):  # from the slowest top-speed run that dropped
                onsets.append(find_onset(ns, a, b, tool, setting, flows, packets[flows],
                                         min(r["send_pps"] for r in top if r["kernel_drops"]), config, want, args,
                                         work))
            else:  # no drop at the sender's top speed: they begin above it, if anywhere
                onsets.append({"tool": tool, "setting": setting, "flows": flows,
                               "meter": meter_name(tool, setting, flows), "clean_pps": med(r["send_pps"] for r in top),
                               "drop_pps": None, "tried": "top (0)"})
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--flows", type=replay.size_list, default=[1000, 100_000],
                    help="flows active at once, one table each, e.g. 1k,100k (default 1k,100k)")
    ap.add_argument("--packets", type=replay.size_list, default=[2_000_000],
                    help="frames sent per run, rounded up to a multiple of the flows (default 2M)")
    ap.add_argument("--runs", type=int, default=3, help="alternating runs per measurement; medians (default 3)")
    ap.add_argument("--rates", type=rate_list, default=[None],
                    help="offered rates: top (trafgen's top speed) and/or packets per second, e.g. top,200k "
                         "(default top)")
    ap.add_argument("--onset-steps", type=int, default=4,
                    help="single runs bisecting the rate where kernel drops begin, for each meter that dropped at "
                         "top speed (default 4; 0: none)")
    ap.add_argument("--fanout", type=fanout_list, default=[1, 2], help="flowmeter Fanout values (default 1,2)")
    ap.add_argument("--workers", type=int, default=0, help="flowmeter Workers (default 0: flowmeter's own choice)")
    ap.add_argument("--only", default=",".join(TOOLS), help="tools to run: flowmeter, softflowd (default both)")
    ap.add_argument("--json", type=Path, help="also write every run and the tables' rows here as JSON")
    ap.add_argument("--keep", action="store_true",
                    help="keep the working directory (profiles, logs, nfcapd files) and print where it is")
    args = ap.parse_args(argv)
    only = [t.strip() for t in args.only.split(",") if t.strip()]
    if not only or any(t not in TOOLS for t in only):
        ap.error(f"--only: {args.only!r}: tools are {', '.join(TOOLS)}")
    if len(args.packets) != 1:
        ap.error("--packets: one number of frames")
    if any(f > 1 << 24 for f in args.flows):
        ap.error("--flows: at most 16,777,216 flows (source addresses in 10.0.0.0/8)")
    if args.runs < 1:
        ap.error(f"--runs: {args.runs} is not a positive number of runs")
    if not 0 <= args.onset_steps <= 20:
        ap.error(f"--onset-steps: {args.onset_steps} is not 0 to 20")
    if not 0 <= args.workers <= 64:
        ap.error(f"--workers: {args.workers} is not 0 to 64")
    cpus = os.sched_getaffinity(0)
    if not {SENDER_CPU, METER_CPU} <= cpus:
        ap.error(f"needs CPUs {SENDER_CPU} and {METER_CPU} (the sender's and the meter's); this process may use "
                 f"{sorted(cpus)}")
    why = available()
    if why:
        ap.error(why)
    try:
        require("trafgen", "taskset", "ethtool", "nfcapd", "nfdump",
                *(("softflowd", "softflowctl") if "softflowd" in only else ()))
    except RuntimeError as exc:
        ap.error(str(exc))
    packets = {f: -(-args.packets[0] // f) * f for f in args.flows}

    def interrupted(signum, frame):  # a stop signal cleans up like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    work = Path(tempfile.mkdtemp(prefix="bench-live-"))
    runs: list[dict] = []
    onsets: list[dict] = []
    try:
        with Namespaces() as ns:
            try:
                ok = measure_all(ns, args, only, work, runs, onsets, packets)
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
    rows = summarise(runs, packets)
    print_tables(rows, onsets, args)
    if args.json:
        args.json.write_text(json.dumps({"ok": ok, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                            for k, v in vars(args).items()},
                                         "rows": rows, "onsets": onsets,
                                         "runs": [{k: v for k, v in r.items() if k != "log"} for r in runs]},
                                        indent=1))
    if not ok:
        log("bench_live: a run failed (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
