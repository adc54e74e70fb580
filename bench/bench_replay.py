"""Benchmark: flowmeter replay against the floor and softflowd on the same captures, each meter into a real nfcapd.

    .venv/bin/python bench/bench_replay.py --frames headers   # header captures: every table (10-20 min)
    .venv/bin/python bench/bench_replay.py --frames full      # full-size captures: the replay tables (about 10 min)
    .venv/bin/python bench/bench_replay.py --packets 100k --runs 1 --workers 1 --captures 1

Deterministic captures and their ground truth are generated once with
``tests.support.traffic`` and cached in ``bench/.data/`` (file names carry a
digest of the generator, so a changed generator makes new files): header
captures (snap length 128) or, with ``--frames full``, every frame whole.
Every measured command runs alone, its whole process tree watched: wall
time, CPU time (user + system of every process, from ``wait4``), peak RSS
(the sum over the tree, sampled every 20 ms). Each meter exports into its own
nfcapd on loopback and nfdump's records summed per flow key must equal the
truth, packets and bytes. In the replay tables that nfcapd's socket gets a
forced receive buffer (``--collector-buffer-mb``, 256 MiB), so that a burst
at the end of a file is not lost on the way; the memory and flush tables
keep nfcapd as an operator starts it (kernel default buffer, no ``-B``).
``drops`` is what the kernel dropped for that nfcapd's socket
(/proc/net/udp); the flush table also gives ``Udp RcvbufErrors`` of
/proc/net/snmp before and after, which counts the whole machine.

Sections (``--only`` picks some; with ``--frames full`` only replay runs by
default, the others do not depend on the frames):

replay    for each capture size (``--packets``, default 1M,5M), in alternating
          order over ``--runs`` runs (default 3), medians: the floor
          (``tcpdump -r FILE -w /dev/null``), softflowd at its default
          (``-m 8192``: it ends flows early), softflowd with ``-m`` above the
          flow count (every flow held: checked against the truth like
          flowmeter), and flowmeter with every ``--workers`` x ``--captures``
          configuration; then flowmeter's wall and CPU as ratios to the three.
          With C capture processes the capture is generated as C files, split
          by a symmetric hash of the conversation (as the members of an
          AF_PACKET fanout group would each see it), and replayed with
          ``flowmeter replay F-0.pcap .. F-(C-1).pcap --captures C``. A last
          table splits flowmeter's CPU by stage (capture, worker, exporter,
          from ``flowmeter replay --stats``; ``rest``: the supervisor,
          start-up and compile).
startup   a 1-packet capture: time from process start to the first IPFIX
          data record arriving at a UDP socket of the benchmark's own, and
          the total run time, so process start and kernel loading costs show.
memory    ``--flows`` (default 1,000,000) distinct flows all active at the end
          of the capture, ``flowmeter replay --workers 1``: flow-table octets
          per flow held (``table_bytes / active_peak``) and peak RSS;
          softflowd (``-m`` big enough to hold them) on the same capture; and
          for both, RSS above the tool's own 1-packet run, per flow.
flush     the same runs seen as an export test: every flow is still cached when
          the capture ends, so all of them are exported in one burst to a
          default nfcapd; records received, drops, and the time from the end
          of the capture (last capture process gone) to the end of the export
          (exporter process gone).

Read ratios, not absolute figures: these machines are shared and noisy;
the ratio of two tools measured in alternation on the same input is what
carries over. Exit status 1 if a run failed or flowmeter's or
softflowd-exact's records did not match the truth; ``--json PATH`` also writes every result as JSON.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / ".data"
sys.path.insert(0, str(ROOT))  # tests.support: the generator and collectors the tests use too

from tests.support.collectors import Nfcapd, udp_rcvbuf_errors, udp_socket_drops, wait_socket_drained  # noqa: E402

GENERATOR = hashlib.sha1((ROOT / "tests" / "support" / "traffic.py").read_bytes()).hexdigest()[:8]
SECTIONS = ("replay", "startup", "memory", "flush")
RUN_TIMEOUT_S = 3600
STAGES = ("capture", "worker", "exporter")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- captures

def size_list(text: str) -> list[int]:
    """``1M,5M,20M`` / ``100k`` / ``1000000`` as numbers."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", part)
        if not m:
            raise argparse.ArgumentTypeError(f"{part!r} is not a count such as 100000, 100k or 5M")
        out.append(int(m.group(1)) * {"": 1, "k": 1000, "m": 1_000_000}[m.group(2).lower()])
    if not all(n > 0 for n in out):
        raise argparse.ArgumentTypeError(f"{text!r}: every count must be at least 1")
    return out


def int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(1 <= n <= 64 for n in out):
        raise argparse.ArgumentTypeError(f"{text!r}: every number must be between 1 and 64")
    return out


def short(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def prune_stale() -> None:
    """Remove cached captures made by another version of the generator."""
    stale = [p for p in DATA.glob("*") if p.name.startswith(("traffic-", "concurrent-")) and GENERATOR not in p.name]
    for p in stale:
        p.unlink()
    if stale:
        log(f"removed {len(stale)} cached file(s) of an older generator from {DATA}")


FRAMES = ("headers", "full")
FULL_SNAPLEN = 65535  # more than the longest generated frame (1,494 octets): every frame whole
# capture octets per packet, rounded up, for the free-space check: record header + captured frame
BYTES_PER_PACKET = {"headers": 130, "full": 340}
ROOM_MARGIN = 2 << 30  # left free on the cache's file system after the captures are written


def capture_stem(kind: str, n: int, seed: int, frames: str = "headers") -> str:
    return f"{kind}-{n}-{seed}-{GENERATOR}" + ("-full" if frames == "full" else "")


def capture(kind: str, n: int, seed: int, split: int = 1, frames: str = "headers") -> tuple[list[Path], Path]:
    """The capture files and truth CSV of ``kind`` (traffic: n packets; concurrent: n flows); made once.

    ``frames``: ``headers`` keeps at most 128 octets of a frame (the
    generator's default snap length), ``full`` every frame whole.
    """
    stem = capture_stem(kind, n, seed, frames)
    truth = DATA / f"{stem}.csv"
    out = DATA / (f"{stem}.pcap" if split == 1 else f"{stem}-split{split}.pcap")
    files = [out] if split == 1 else [DATA / f"{stem}-split{split}-{i}.pcap" for i in range(split)]
    done = out.with_suffix(".done")
    if done.exists() and truth.exists():
        return files, truth
    cmd = [sys.executable, "-m", "tests.support.traffic", str(out), "--seed", str(seed),
           "--packets" if kind == "traffic" else "--concurrent-flows", str(n)]
    if frames == "full":
        cmd += ["--snaplen", str(FULL_SNAPLEN)]
    if split > 1:
        cmd += ["--split", str(split)]
    part = truth.with_suffix(".csv.part")
    if not truth.exists():
        cmd += ["--truth", str(part)]
    log(f"generating {out.name} ...")
    subprocess.run(cmd, check=True, cwd=ROOT)
    if part.exists():
        part.rename(truth)
    done.touch()
    return files, truth


def check_room(sizes: list[int], frames: str, splits: set[int], seed: int) -> None:
    """Refuse (one line, before anything is written) when the captures still to make would not fit in DATA.

    ``splits``: the capture-process counts; the single file (1) is always
    needed, the floor and softflowd read it.
    """
    need = 0
    for n in sizes:
        stem = capture_stem("traffic", n, seed, frames)
        for split in splits | {1}:
            done = DATA / (f"{stem}.done" if split == 1 else f"{stem}-split{split}.done")
            if not done.exists():
                need += n * BYTES_PER_PACKET[frames]
    free = shutil.disk_usage(DATA).free
    if need and free - need < ROOM_MARGIN:
        raise SystemExit(f"bench_replay: the {frames} captures to generate take about {need / 2**30:.1f} GiB and "
                         f"{DATA} has {free / 2**30:.1f} GiB free (at least {ROOM_MARGIN / 2**30:.0f} GiB must "
                         f"stay free): choose smaller --packets or another --data")
    if need:
        log(f"generating about {need / 2**30:.1f} GiB of {frames} captures in {DATA} "
            f"({free / 2**30:.1f} GiB free)")


def load_truth(path: Path) -> tuple[Counter, Counter]:
    """Truth packets and octets per (src, dst, proto, sport, dport), as ``nfdump_sums`` keys them."""
    packets, octets = Counter(), Counter()
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            key = (r["src"], r["dst"], int(r["proto"]), int(r["sport"]), int(r["dport"]))
            packets[key] += int(r["packets"])
            octets[key] += int(r["l3_bytes"])
    return packets, octets


def nfdump_sums(flows: Path) -> tuple[Counter, Counter, int]:
    """nfdump's records summed per (src, dst, proto, sport, dport): packets, octets, and the record count.

    Streams ``nfdump -o csv`` (plain numbers, full addresses), so a million
    records cost seconds and little memory. Protocol names are turned back
    into numbers, IPv6 addresses into ``ipaddress`` text, and ICMP rows get
    ports 0, as in the truth (nfdump puts type and code in the destination
    port).
    """
    packets, octets = Counter(), Counter()
    records = 0
    v6_text: dict[str, str] = {}
    proc = subprocess.Popen(["nfdump", "-R", str(flows), "-N", "-o", "csv"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TZ": "UTC"})
    col = None
    for line in proc.stdout:
        fields = line.rstrip("\n").split(",")
        if col is None:
            if fields[0] == "ts":
                col = {name: i for i, name in enumerate(fields)}
                sa, da, pr, sp, dp, ipkt, ibyt = (col[k] for k in ("sa", "da", "pr", "sp", "dp", "ipkt", "ibyt"))
            continue
        if len(fields) < len(col):
            continue  # the summary after the records
        src, dst = fields[sa], fields[da]
        if ":" in src:
            src = v6_text.get(src) or v6_text.setdefault(src, str(ipaddress.ip_address(src)))
            dst = v6_text.get(dst) or v6_text.setdefault(dst, str(ipaddress.ip_address(dst)))
        name = fields[pr].strip()
        proto = PROTO_NUMBERS.get(name) or int(name)
        icmp = proto in (1, 58)
        key = (src, dst, proto, 0 if icmp else int(fields[sp]), 0 if icmp else int(fields[dp]))
        packets[key] += int(fields[ipkt])
        octets[key] += int(fields[ibyt])
        records += 1
    err = proc.stderr.read()
    if proc.wait() != 0 and records == 0 and "No matching flows" not in err:
        raise RuntimeError(f"nfdump -R {flows} failed: {err.strip()[-500:]}")
    return packets, octets, records


PROTO_NUMBERS = {"ICMP": 1, "TCP": 6, "UDP": 17, "GRE": 47, "ESP": 50, "ICMP6": 58}


# ---------------------------------------------------------------- measuring

def peak_rss(pid: int) -> int:
    """The process's own peak RSS since it started its program (VmHWM), 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(cmd: list[str], watch: tuple[str, ...] = ()) -> dict:
    """Run ``cmd``: wall time, CPU time of the whole tree, peak RSS of the tree.

    CPU comes from ``wait4``, which includes every descendant that was
    waited for (all of them, for a clean exit). Peak RSS is the larger of
    the tree's summed RSS, sampled every 20 ms (every 2 ms in the first
    0.2 s, for short runs), and the largest single process's own peak
    (VmHWM), which catches a one-process tool between samples. (``wait4``'s
    ``ru_maxrss`` cannot serve: a child started from this process inherits
    this process's peak.) ``watch``: process names (prefixes) whose last
    sighting is reported in ``seen`` (seconds after the start), e.g. when the
    capture processes were last alive.
    """
    err = tempfile.TemporaryFile(mode="w+")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, start_new_session=True)
    root = psutil.Process(proc.pid)
    peak, hwm, seen = 0, 0, {}
    status = rusage = None
    try:
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now = time.perf_counter()
            if now - started > RUN_TIMEOUT_S:
                log(f"{cmd[0]}: still running after {RUN_TIMEOUT_S} s; killed")
                os.killpg(proc.pid, signal.SIGKILL)
                time.sleep(0.1)
                continue
            try:
                tree = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            rss = 0
            for p in tree:
                try:
                    rss += p.memory_info().rss
                    hwm = max(hwm, peak_rss(p.pid))
                    if watch:
                        name = p.name()
                        for w in watch:
                            if name.startswith(w):
                                seen[w] = now - started
                except psutil.NoSuchProcess:
                    pass
            peak = max(peak, rss)
            time.sleep(0.002 if now - started < 0.2 else 0.02)
    except BaseException:  # Ctrl-C: the command runs in a session of its own, so stop it here
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    err.seek(0)
    return {"wall": wall, "cpu": rusage.ru_utime + rusage.ru_stime, "rss": max(peak, hwm),
            "code": proc.returncode, "stderr": err.read(), "seen": seen, "started": started}


def flowmeter_cmd(files: list[Path], profile: Path, workers: int, captures: int, stats: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "flowmeter.cli", "replay", *map(str, files), "--profile", str(profile),
           "--workers", str(workers)]
    if captures > 1:
        cmd += ["--captures", str(captures)]
    if stats is not None:
        cmd += ["--stats", str(stats)]
    return cmd


def softflowd_cmd(capture_file: Path, port: int, tmp: Path, max_flows: int | None = None) -> list[str]:
    # no -c: softflowd 1.1.0 -r with its control socket elsewhere than the default never exits
    cmd = ["softflowd", "-r", str(capture_file), "-n", f"127.0.0.1:{port}", "-v", "10", "-p", str(tmp / "sf.pid")]
    if max_flows:
        cmd += ["-m", str(max_flows)]
    return cmd


def write_profile(path: Path, collector: str, **settings) -> Path:
    path.write_text(json.dumps({"FlowMetadata": {"IpFixCollectors": [collector], "StatisticsIntervalSeconds": 0,
                                                 **settings}}))
    return path


def start_nfcapd(directory: Path) -> Nfcapd:
    """A default nfcapd (kernel default receive buffer); again on a new port if another program took its port."""
    for attempt in range(5):
        try:
            return Nfcapd(directory, receive_buffer=None)
        except RuntimeError as exc:
            if "already in use" not in str(exc) or attempt == 4:
                raise
    raise AssertionError("unreachable")


SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>: SO_RCVBUF past net.core.rmem_max, for CAP_NET_ADMIN
SYS_PIDFD_GETFD = 438  # the same number on every architecture


def force_receive_buffer(pid: int, port: int, size: int) -> int:
    """Give the UDP socket process ``pid`` bound to ``port`` a receive buffer of ``size`` octets; return what the
    kernel set (twice the size: it counts its bookkeeping too).

    nfcapd's own ``-B`` uses SO_RCVBUF, which the kernel caps at
    net.core.rmem_max (a machine-wide setting). Instead the socket is
    borrowed from the running nfcapd (``pidfd_getfd``: the same socket, a
    new descriptor) and given SO_RCVBUFFORCE, which root may set beyond it.
    Nothing else of the machine changes.
    """
    import ctypes

    inodes = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        for f in (line.split() for line in Path(table).read_text().splitlines()[1:]):
            if int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f[9])
    fd = next((int(link.name) for link in Path(f"/proc/{pid}/fd").iterdir()
               if os.readlink(link) in {f"socket:[{i}]" for i in inodes}), None)
    if fd is None:
        raise RuntimeError(f"no socket of process {pid} is bound to UDP port {port}")
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        borrowed = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if borrowed < 0:
            raise OSError(ctypes.get_errno(), f"pidfd_getfd of nfcapd's socket: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(pidfd)
    sock = socket.socket(fileno=borrowed)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    finally:
        sock.close()  # our descriptor only: nfcapd's stays open


def metered_run(tool: str, files: list[Path], truth: tuple[Counter, Counter], tmp: Path, workers: int = 1,
                captures: int = 1, max_flows: int | None = None, receive_buffer: int | None = None) -> dict:
    """One run of ``tool`` on ``files`` into its own nfcapd (``receive_buffer``: its socket's, forced; None: the
    kernel's default): measurement, records, drops, exactness."""
    run_dir = Path(tempfile.mkdtemp(dir=tmp))
    nf = start_nfcapd(run_dir / "nfcapd")
    if receive_buffer:
        force_receive_buffer(nf.proc.pid, nf.port, receive_buffer)
    stats = run_dir / "stats.json"
    try:
        before = udp_rcvbuf_errors()
        if tool == "flowmeter":
            extra = {"MaxFlows": max_flows} if max_flows else {}
            profile = write_profile(run_dir / "profile.json", nf.collector, **extra)
            m = measure(flowmeter_cmd(files, profile, workers, captures, stats),
                        watch=("fm-capture", "fm-exporter"))
        else:
            m = measure(softflowd_cmd(files[0], nf.port, run_dir, max_flows))
        wait_socket_drained(nf.port)
        m["drops"] = udp_socket_drops(nf.port)
        m["rcvbuf_errors"] = udp_rcvbuf_errors() - before
    finally:
        nf.stop()
    packets, octets, m["records"] = nfdump_sums(nf.flows)
    m["exact"] = packets == truth[0] and octets == truth[1]
    m["flows_truth"] = len(truth[0])
    m["tool"], m["workers"], m["captures"] = tool, workers, captures
    try:
        m["stats"] = json.loads(stats.read_text()) if stats.exists() else {}
    except ValueError:
        m["stats"] = {}
    seen = m["seen"]
    m["flush"] = seen["fm-exporter"] - seen["fm-capture"] if {"fm-capture", "fm-exporter"} <= seen.keys() else None
    return m


class FirstRecord(threading.Thread):
    """A UDP socket of our own: when did the first IPFIX data set (set ID >= 256) arrive?"""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.first: float | None = None
        self.stopping = False

    @staticmethod
    def has_data_set(msg: bytes) -> bool:
        if len(msg) < 16 or int.from_bytes(msg[0:2], "big") != 10:
            return False
        length = min(len(msg), int.from_bytes(msg[2:4], "big"))
        off = 16
        while off + 4 <= length:
            set_id, set_len = int.from_bytes(msg[off:off + 2], "big"), int.from_bytes(msg[off + 2:off + 4], "big")
            if set_id >= 256 and set_len > 4:
                return True
            if set_len < 4:
                return False
            off += set_len
        return False

    def run(self) -> None:
        while not self.stopping:
            try:
                msg = self.sock.recv(70000)
            except socket.timeout:
                continue
            if self.first is None and self.has_data_set(msg):
                self.first = time.perf_counter()

    def stop(self) -> None:
        self.stopping = True
        self.join()
        self.sock.close()


def startup_run(tool: str, one: Path, tmp: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(dir=tmp))
    sink = FirstRecord()
    sink.start()
    try:
        if tool == "flowmeter":
            profile = write_profile(run_dir / "profile.json", f"Udp/127.0.0.1:{sink.port}")
            m = measure(flowmeter_cmd([one], profile, 1, 1, None))
        else:
            m = measure(softflowd_cmd(one, sink.port, run_dir))
        time.sleep(0.1)  # a datagram sent just before exit
    finally:
        sink.stop()
    m["tool"] = tool
    m["first"] = None if sink.first is None else sink.first - m["started"]
    return m


# ---------------------------------------------------------------- reporting

def med(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def failed(r: dict, what: str) -> bool:
    if r["code"] != 0:
        log(f"{what}: {r['tool']} exited with {r['code']}: {r['stderr'].strip()[-500:]}")
        return True
    return False


def stage_cpu(r: dict) -> dict:
    s = r.get("stats") or {}
    return {st: (s.get(st) or {}).get("cpu_s") for st in STAGES}


# ---------------------------------------------------------------- sections

SOFTFLOWD_DEFAULT_FLOWS = 8192  # softflowd's -m when none is given


def floor_run(capture_file: Path) -> dict:
    """The machine's floor: ``tcpdump -r FILE -w /dev/null`` reads every record and writes it back out."""
    m = measure(["tcpdump", "-r", str(capture_file), "-w", "/dev/null"])
    m.update(tool="tcpdump", records=None, drops=None, exact=None, stats={})
    return m


def replay_label(tool: str, w: int | None, c: int | None, max_flows: int | None) -> str:
    if tool == "tcpdump":
        return "tcpdump -r -w /dev/null (floor)"
    if tool == "softflowd-default":
        return f"softflowd -m {SOFTFLOWD_DEFAULT_FLOWS} (default: evicts, no exact flows)"
    if tool == "softflowd-exact":
        return f"softflowd -m {max_flows:,} (exact)"
    return f"flowmeter workers {w} captures {c}"


def markdown(head: list[str], body: list[list[str]], left: int = 1) -> None:
    """A markdown table: the first ``left`` columns left-aligned, the others right-aligned."""
    table = [head, *body]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for n, row in enumerate(table):
        print("| " + " | ".join(c.ljust(w) if i < left else c.rjust(w)
                                for i, (c, w) in enumerate(zip(row, widths))) + " |")
        if n == 0:
            rule = ("-" * (w + 2) if i < left else "-" * (w + 1) + ":" for i, w in enumerate(widths))
            print("|" + "|".join(rule) + "|")


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def section_replay(args, tmp: Path, results: dict) -> bool:
    ok = True
    configs = [(w, c) for c in args.captures for w in args.workers]
    rows = []
    check_room(args.packets, args.frames, set(args.captures), args.seed)
    buffer = args.collector_buffer_mb << 20
    for n in args.packets:
        whole, truth_csv = capture("traffic", n, args.seed, 1, args.frames)
        files = {c: capture("traffic", n, args.seed, c, args.frames)[0] for c in sorted(set(args.captures))}
        truth = load_truth(truth_csv)
        flows = len(truth[0])
        exact_flows = flows + flows // 10 + 64  # softflowd -m above the flow count: it never evicts
        size = sum(f.stat().st_size for f in whole)
        plan = [("tcpdump", None, None), ("softflowd-default", None, None), ("softflowd-exact", None, None)] + \
               [("flowmeter", w, c) for w, c in configs]
        runs: dict[tuple, list[dict]] = {p: [] for p in plan}
        for i in range(args.runs):
            for tool, w, c in plan if i % 2 == 0 else plan[::-1]:
                if tool == "tcpdump":
                    r = floor_run(whole[0])
                elif tool == "flowmeter":
                    r = metered_run(tool, files[c], truth, tmp, w, c, receive_buffer=buffer)
                else:
                    r = metered_run("softflowd", whole, truth, tmp, receive_buffer=buffer,
                                    max_flows=exact_flows if tool == "softflowd-exact" else None)
                r["tool"] = tool
                bad = failed(r, f"{short(n)} run {i + 1}")
                if tool in ("flowmeter", "softflowd-exact") and not bad and not r["exact"]:
                    log(f"{short(n)} run {i + 1}: {replay_label(tool, w, c, exact_flows)}: the records do not "
                        f"match the truth")
                    ok = False
                ok &= not bad
                runs[(tool, w, c)].append(r)
                log(f"{short(n)} {args.frames} run {i + 1}/{args.runs} {replay_label(tool, w, c, exact_flows)}: "
                    f"{n / r['wall']:,.0f} packets/s, wall {r['wall']:.2f} s, cpu {r['cpu']:.2f} s"
                    + ("" if tool == "tcpdump" else f", {r['records']:,} records, drops {r['drops']}, "
                       f"{'exact' if r['exact'] else 'NOT exact'}"))
        for (tool, w, c), rs in runs.items():
            wall = med(r["wall"] for r in rs)
            cpu = med(r["cpu"] for r in rs)
            measured = tool != "tcpdump"
            rows.append({"packets": n, "flows": flows, "frames": args.frames, "capture_bytes": size, "tool": tool,
                         "label": replay_label(tool, w, c, exact_flows),
                         "workers": w, "captures": c,
                         "max_flows": exact_flows if tool == "softflowd-exact" else
                         SOFTFLOWD_DEFAULT_FLOWS if tool == "softflowd-default" else None,
                         "packets_per_s": n / wall, "wall_s": wall,
                         "cpu_s": cpu, "cpu_ns_per_packet": cpu / n * 1e9, "rss_mb": med(r["rss"] for r in rs) / 2**20,
                         "records": med(r["records"] for r in rs) if measured else None,
                         "drops": max(r["drops"] for r in rs) if measured else None,
                         "exact": all(r["exact"] and r["code"] == 0 for r in rs) if measured else None,
                         "failed_runs": sum(r["code"] != 0 for r in rs),
                         "stages": {st: med(stage_cpu(r)[st] for r in rs) for st in STAGES},
                         "table_bytes": med((r["stats"].get("worker") or {}).get("table_bytes") for r in rs),
                         "active_peak": med((r["stats"].get("worker") or {}).get("active_peak") for r in rs)})
    results["replay"] = rows
    what = {"headers": "header captures (snap length 128)",
            "full": "full-size captures (every frame whole)"}[args.frames]
    for n in args.packets:
        these = [r for r in rows if r["packets"] == n]
        first = these[0]
        print(f"\nreplay, {what}: {n:,} packets, {first['flows']:,} flows, {first['capture_bytes'] / 2**20:,.0f} MB; "
              f"medians of {args.runs} alternating run(s); each meter into its own nfcapd, receive buffer "
              f"{f'{args.collector_buffer_mb} MiB' if args.collector_buffer_mb else 'the kernel default'}\n")
        body = []
        for r in these:
            body.append([r["label"], f"{r['packets_per_s']:,.0f}", f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}",
                         f"{r['cpu_ns_per_packet']:.0f}", f"{r['rss_mb']:.0f}", fmt(r["records"], ",.0f", 0),
                         "-" if r["records"] is None else f"{r['records'] / r['flows']:.2f}", fmt(r["drops"], "d", 0),
                         "-" if r["exact"] is None else "yes" if r["exact"] else "no"])
        markdown(["tool", "packets/s", "wall s", "cpu s", "cpu ns/pkt", "peak RSS MB", "records", "records/flow",
                  "drops", "exact"], body)
        print(f"\nfloor: the cost of reading the capture and nothing else; softflowd -m {SOFTFLOWD_DEFAULT_FLOWS}: "
              f"with more flows active than that it ends the oldest early (records/flow above 1), so its records "
              f"are not the capture's flows, even where their sums match; -m above the flow count holds every flow "
              f"as flowmeter does (MaxFlows 1M). exact: nfdump's records summed per flow key equal the truth. "
              f"drops: datagrams lost at that meter's nfcapd socket")
        by_tool = {r["tool"]: r for r in these if r["tool"] != "flowmeter"}
        floor, exact, default = (by_tool.get(t) for t in ("tcpdump", "softflowd-exact", "softflowd-default"))
        print(f"\nflowmeter's ratios, {n:,} packets ({args.frames}): its wall and CPU seconds divided by the other "
              f"tool's, same capture, same runs (1.00x: as fast; 2.00x: twice the time)\n")
        body = []
        for r in these:
            if r["tool"] != "flowmeter":
                continue
            body.append([str(r["workers"]), str(r["captures"]),
                         ratio(r["wall_s"], floor["wall_s"]), ratio(r["cpu_s"], floor["cpu_s"]),
                         ratio(r["wall_s"], exact["wall_s"]), ratio(r["cpu_s"], exact["cpu_s"]),
                         ratio(r["wall_s"], default["wall_s"]), ratio(r["cpu_s"], default["cpu_s"])])
        markdown(["workers", "captures", "wall / floor", "cpu / floor", "wall / softflowd exact",
                  "cpu / softflowd exact", "wall / softflowd default", "cpu / softflowd default"], body, left=0)
    print(f"\nflowmeter CPU by stage, {args.frames} (flowmeter replay --stats): seconds (share of the process tree's "
          "CPU); rest = supervisor, start-up, compile; stages ns/pkt = the stages' CPU per packet, without start-up; "
          "medians")
    print(f"{'packets':>10} {'workers':>7} {'captures':>8} " + " ".join(f"{st:>16}" for st in STAGES + ("rest",))
          + f" {'stages ns/pkt':>13} {'table MB':>9} {'active peak':>11}")
    for r in rows:
        if r["tool"] != "flowmeter":
            continue
        cells = []
        known = [v for v in r["stages"].values() if v is not None]
        rest = r["cpu_s"] - sum(known) if known else None
        for v in [*r["stages"].values(), rest]:
            cell = "-" if v is None else f"{v:.2f} ({100 * v / r['cpu_s']:.0f}%)"
            cells.append(f"{cell:>16}")
        tb = None if r["table_bytes"] is None else r["table_bytes"] / 2**20
        per_packet = sum(known) / r["packets"] * 1e9 if known else None
        print(f"{r['packets']:>10,} {r['workers']:>7} {r['captures']:>8} {' '.join(cells)} "
              f"{fmt(per_packet, '.0f', 13)} {fmt(tb, '.1f', 9)} {fmt(r['active_peak'], ',.0f', 11)}")
    return ok


def section_startup(args, tmp: Path, results: dict) -> bool:
    ok = True
    one, _ = capture("traffic", 1, args.seed)
    runs: dict[str, list[dict]] = {"flowmeter": [], "softflowd": []}
    for i in range(args.runs):
        for tool in ("flowmeter", "softflowd") if i % 2 == 0 else ("softflowd", "flowmeter"):
            r = startup_run(tool, one[0], tmp)
            if failed(r, f"start-up run {i + 1}"):
                ok = False
            elif r["first"] is None:
                log(f"start-up run {i + 1}: {tool}: no data record arrived")
                ok &= tool != "flowmeter"
            runs[tool].append(r)
            log(f"start-up run {i + 1}/{args.runs} {tool}: first record {fmt(r['first'], '.3f', 0)} s, "
                f"total {r['wall']:.3f} s")
    rows = [{"tool": tool, "first_record_s": med(r["first"] for r in rs), "wall_s": med(r["wall"] for r in rs),
             "cpu_s": med(r["cpu"] for r in rs), "rss_mb": med(r["rss"] for r in rs) / 2**20}
            for tool, rs in runs.items()]
    results["startup"] = rows
    print(f"\nstart-up: a 1-packet capture, medians of {args.runs} run(s); first record = process start to the "
          f"first IPFIX data set at a UDP socket")
    print(f"{'tool':<10} {'first record s':>14} {'total wall s':>12} {'cpu s':>7} {'peak RSS MB':>11}")
    for r in rows:
        print(f"{r['tool']:<10} {fmt(r['first_record_s'], '.3f', 14)} {r['wall_s']:>12.3f} {r['cpu_s']:>7.2f} "
              f"{r['rss_mb']:>11.1f}")
    print("peak RSS of a process that lives a few ms is what the sampler saw of it: a lower bound")
    return ok


def section_memory(args, tmp: Path, results: dict, show_memory: bool, show_flush: bool) -> bool:
    ok = True
    n = args.flows
    files, truth_csv = capture("concurrent", n, args.seed)
    one, _ = capture("traffic", 1, args.seed)
    truth = load_truth(truth_csv)
    one_truth = load_truth(capture("traffic", 1, args.seed)[1])
    max_flows = max(64, n + n // 100)  # room for every flow; more would inflate the table octets per flow
    runs: dict[str, list[dict]] = {"flowmeter": [], "softflowd": []}
    base: dict[str, list[dict]] = {"flowmeter": [], "softflowd": []}
    for i in range(args.runs):
        for tool in ("flowmeter", "softflowd") if i % 2 == 0 else ("softflowd", "flowmeter"):
            b = metered_run(tool, one, one_truth, tmp, 1, 1)  # the tool as it starts, default settings
            r = metered_run(tool, files, truth, tmp, 1, 1, max_flows)
            bad = failed(b, f"memory run {i + 1} (1 packet)") | failed(r, f"memory run {i + 1}")
            if tool == "flowmeter" and (bad or not r["exact"]):
                ok = False
            ok &= not bad
            base[tool].append(b)
            runs[tool].append(r)
            log(f"memory run {i + 1}/{args.runs} {tool}: peak RSS {r['rss'] / 2**20:,.0f} MB "
                f"(1 packet: {b['rss'] / 2**20:,.0f} MB), {r['records']:,} records, drops {r['drops']}, "
                f"flush {fmt(r['flush'], '.2f', 0)} s, {'exact' if r['exact'] else 'NOT exact'}")
    rows = []
    for tool, rs in runs.items():
        worker = [(r["stats"].get("worker") or {}) for r in rs]
        table, peak = med(w.get("table_bytes") for w in worker), med(w.get("active_peak") for w in worker)
        evicted = med((w.get("end_reasons") or {}).get("lack_of_resources") for w in worker)
        rss, rss1 = med(r["rss"] for r in rs), med(b["rss"] for b in base[tool])
        rows.append({"tool": tool, "flows": n, "max_flows": max_flows, "active_peak": peak, "evicted": evicted,
                     "table_bytes": table,
                     "table_bytes_per_flow": table / peak if table and peak else None,
                     "rss_mb": rss / 2**20, "rss_1packet_mb": rss1 / 2**20, "rss_bytes_per_flow": (rss - rss1) / n,
                     "wall_s": med(r["wall"] for r in rs), "records": med(r["records"] for r in rs),
                     "drops": max(r["drops"] for r in rs), "rcvbuf_errors": max(r["rcvbuf_errors"] for r in rs),
                     "flush_s": med(r["flush"] for r in rs),
                     "exact": all(r["exact"] and r["code"] == 0 for r in rs)})
    results["memory"] = rows
    if show_memory:
        print(f"\nmemory: {n:,} flows all active at the end of the capture, 1 worker, MaxFlows {max_flows:,} "
              f"(softflowd -m {max_flows:,}); medians of {args.runs} run(s)")
        print(f"{'tool':<10} {'flows held':>10} {'evicted':>8} {'table B/flow':>12} {'peak RSS MB':>11} "
              f"{'1-pkt RSS MB':>12} {'RSS B/flow':>10} {'wall s':>7} {'exact':>6}")
        for r in rows:
            print(f"{r['tool']:<10} {fmt(r['active_peak'], ',.0f', 10)} {fmt(r['evicted'], ',.0f', 8)} "
                  f"{fmt(r['table_bytes_per_flow'], '.1f', 12)} "
                  f"{r['rss_mb']:>11.0f} {r['rss_1packet_mb']:>12.0f} {r['rss_bytes_per_flow']:>10.0f} "
                  f"{r['wall_s']:>7.2f} {'yes' if r['exact'] else 'NO':>6}")
        print("table B/flow: flowmeter's flow-table arrays / most flows held at once (--stats); evicted: flows "
              "ended early for want of room; RSS B/flow: peak RSS of the whole tree above the same tool's "
              "1-packet run (default settings), per flow")
    if show_flush:
        print(f"\nflush: {n:,} flows cached at the end of the capture, exported at once to a default nfcapd "
              f"(receive buffer {Path('/proc/sys/net/core/rmem_default').read_text().strip()} octets); "
              f"medians of {args.runs} run(s)")
        print(f"{'tool':<10} {'records':>9} {'socket drops':>12} {'RcvbufErrors +':>14} {'flush s':>8} "
              f"{'records/s':>10} {'exact':>6}")
        for r in rows:
            rate = r["records"] / r["flush_s"] if r["flush_s"] else None
            print(f"{r['tool']:<10} {r['records']:>9,.0f} {r['drops']:>12} {r['rcvbuf_errors']:>14} "
                  f"{fmt(r['flush_s'], '.2f', 8)} {fmt(rate, ',.0f', 10)} {'yes' if r['exact'] else 'NO':>6}")
        print("flush s: from the last capture process gone to the exporter gone (flowmeter only); "
              "RcvbufErrors +: the whole machine's count, before and after the run")
    return ok


def write_bytecode() -> None:
    """Compile flowmeter's modules to bytecode once, as installing a package does.

    An editable install run with ``PYTHONDONTWRITEBYTECODE`` set (some
    containers and CI images set it) would otherwise compile every module of
    its own at every start: about 40 ms that an installed flowmeter never pays.
    """
    import compileall

    for package in ("flowmeter", "workers", "exporter"):
        compileall.compile_dir(str(ROOT / package), quiet=1)


def main(argv: list[str] | None = None) -> int:
    global DATA
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--packets", type=size_list, default=size_list("1M,5M"),
                    help="capture sizes for the replay table, e.g. 1M,5M,20M (default 1M,5M)")
    ap.add_argument("--runs", type=int, default=3, help="alternating runs per measurement; medians (default 3)")
    ap.add_argument("--workers", type=int_list, default=[1, 2, 4], help="flowmeter shard workers (default 1,2,4)")
    ap.add_argument("--captures", type=int_list, default=[1, 2],
                    help="flowmeter capture processes (default 1,2); C > 1 replays C split files")
    ap.add_argument("--flows", type=size_list, default=[1_000_000],
                    help="concurrent flows of the memory and flush runs (default 1M)")
    ap.add_argument("--collector-buffer-mb", type=int, default=256, metavar="MB",
                    help="receive buffer of each meter's nfcapd in the replay tables, in MiB, forced past "
                         "net.core.rmem_max, so that no record is lost on the way (default 256; 0: the kernel's "
                         "default, as nfcapd starts without -B)")
    ap.add_argument("--frames", choices=FRAMES, default="headers",
                    help="replay captures of headers (snap length 128) or of full frames (default headers)")
    ap.add_argument("--only", help=f"sections to run (default: with --frames headers all of {','.join(SECTIONS)}; "
                                   f"with --frames full replay, the only one that depends on the frames)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write every result here as JSON")
    ap.add_argument("--data", type=Path, default=DATA, help=f"where captures are cached (default {DATA})")
    args = ap.parse_args(argv)
    if args.only is None:
        args.only = ",".join(SECTIONS) if args.frames == "headers" else "replay"
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        ap.error(f"--only: {unknown[0]} is not a section; sections are {', '.join(SECTIONS)}")
    if args.runs < 1:
        ap.error(f"--runs: {args.runs} is not a positive number of runs")
    if not 0 <= args.collector_buffer_mb <= 4096:
        ap.error(f"--collector-buffer-mb: {args.collector_buffer_mb} is not 0 to 4096")
    if len(args.flows) != 1:
        ap.error("--flows: one number of flows")
    args.flows = args.flows[0]
    DATA = args.data.resolve()
    DATA.mkdir(parents=True, exist_ok=True)
    prune_stale()
    results: dict = {"generator": GENERATOR, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                       for k, v in vars(args).items()}}
    ok = True
    write_bytecode()
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        # Not measured: the first run after an install or a code change compiles flowmeter's kernels.
        warm = startup_run("flowmeter", capture("traffic", 1, args.seed)[0][0], Path(tmp))
        log(f"warm-up: flowmeter replay of 1 packet: {warm['wall']:.2f} s (exit {warm['code']})")
        if "replay" in only:
            ok &= section_replay(args, Path(tmp), results)
        if "startup" in only:
            ok &= section_startup(args, Path(tmp), results)
        if "memory" in only or "flush" in only:
            ok &= section_memory(args, Path(tmp), results, "memory" in only, "flush" in only)
    results["ok"] = ok
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not ok:
        log("bench_replay: a run failed or a meter's records did not match the truth (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
