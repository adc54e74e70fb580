"""Real collectors and dissectors for the tests: nfcapd/nfdump, tshark, ipfixDump, nfacctd.

Each helper starts the real program on loopback, waits until it is ready,
and stops it; readers turn the program's own output into plain dicts so
the tests compare values, not formats.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

UTC_ENV = {**os.environ, "TZ": "UTC"}

TCP_FLAG_LETTERS = "CEUAPRSF"  # nfdump's order: CWR ECE URG ACK PSH RST SYN FIN


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_bound(port: int, family=socket.AF_INET, host="127.0.0.1") -> bool:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _wait_bound(port: int, proc: subprocess.Popen, what: str, log: Path, family=socket.AF_INET,
                host="127.0.0.1", timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if _port_bound(port, family, host):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not bind port {port}: {log.read_text()[-2000:]}")


def _udp_sockets(port: int) -> list[list[str]]:
    """The /proc/net/udp{,6} rows (split in fields) of the UDP sockets bound to ``port``."""
    rows = []
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        rows += [f for f in (line.split() for line in lines) if int(f[1].rsplit(":", 1)[1], 16) == port]
    return rows


def wait_socket_drained(port: int, timeout_s: float = 10.0) -> None:
    """Wait until the UDP socket bound to ``port`` has read every datagram queued for it.

    /proc/net/udp{,6} show each socket's receive queue (octets not yet read
    by the program); a collector stopped before that is empty loses them.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sum(int(f[4].split(":")[1], 16) for f in _udp_sockets(port)) == 0:
            return
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen, signum: int, settle_s: float) -> None:
    """Give a running program ``settle_s`` to finish its work, then stop it with ``signum`` (or kill it)."""
    if proc.poll() is not None:
        return
    time.sleep(settle_s)
    proc.send_signal(signum)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def require(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        raise RuntimeError(f"missing programs {missing}: .ci/run installs them")


def udp_socket_drops(port: int) -> int:
    """Datagrams the kernel dropped for the UDP socket bound to ``port`` (full receive buffer and such).

    The last column of /proc/net/udp{,6}: the same events as ``Udp: RcvbufErrors``
    in /proc/net/snmp, for this socket only (other programs on the machine do
    not count).
    """
    return sum(int(f[-1]) for f in _udp_sockets(port))


def udp_rcvbuf_errors() -> int:
    """``Udp: RcvbufErrors`` of /proc/net/snmp: datagrams dropped for a full receive buffer, machine-wide."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")]
    names, values = lines[0], lines[1]
    return int(values[names.index("RcvbufErrors")])


class Nfcapd:
    """nfcapd on a loopback port, writing into ``directory``; ``records()`` reads it back via nfdump.

    ``receive_buffer`` is nfcapd's ``-B`` (8 MB by default, so that tests
    sending bursts lose nothing); None starts it as an operator would, with
    the kernel's default receive buffer (``net.core.rmem_default``).
    """

    def __init__(self, directory: Path, host: str = "127.0.0.1", receive_buffer: int | None = 8 << 20,
                 netns: str | None = None) -> None:
        require("nfcapd", "nfdump")
        self.netns = netns  # a network namespace made by the test (tests/support/netns.py) to run in
        self.directory = directory
        self.host = host
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.log = directory / "nfcapd.log"
        self.flows = directory / "flows"
        self.flows.mkdir(parents=True, exist_ok=True)
        for attempt in range(5):  # the free port may be taken by another program before nfcapd binds it
            self.port = free_udp_port()
            args = ["nfcapd", "-b", host, "-p", str(self.port), "-w", str(self.flows), "-t", "3600"]
            if receive_buffer is not None:
                args += ["-B", str(receive_buffer)]
            if self.family == socket.AF_INET6:
                args.append("-6")
            if netns is not None:
                args = ["ip", "netns", "exec", netns, *args]  # which execs nfcapd: the pid is nfcapd's
            self._fh = open(self.log, "w")
            self.proc = subprocess.Popen(args, stdout=self._fh, stderr=subprocess.STDOUT, env=UTC_ENV)
            try:
                with self._inside():
                    _wait_bound(self.port, self.proc, "nfcapd", self.log, self.family, host)
                return
            except RuntimeError:
                self._fh.close()
                if self.proc.poll() is None or attempt == 4:
                    raise

    @property
    def collector(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"Udp/{host}:{self.port}"

    def _inside(self):
        """This thread in nfcapd's network namespace (for its port and socket queue), if it has one."""
        if self.netns is None:
            return contextlib.nullcontext()
        from tests.support.netns import entered

        return entered(self.netns)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with self._inside():
                wait_socket_drained(self.port)  # the last datagrams are read first
        stop_process(self.proc, signal.SIGTERM, settle_s=0.3)
        self._fh.close()

    def records(self) -> list[dict]:
        """Flow records as nfdump prints them with ``-o json`` (times in UTC)."""
        self.stop()
        out = subprocess.run(["nfdump", "-R", str(self.flows), "-o", "json"], capture_output=True,
                             text=True, env=UTC_ENV, check=True).stdout
        if "No matching flows" in out:
            return []
        return [r for r in json.loads(out or "[]") if r.get("type") == "FLOW"]

    def flow_count(self) -> int:
        """Flow records stored, from ``nfdump -I`` (cheap where ``records()`` would print them all)."""
        self.stop()
        out = subprocess.run(["nfdump", "-R", str(self.flows), "-I"], capture_output=True, text=True,
                             env=UTC_ENV, check=True).stdout
        m = re.search(r"^Flows:\s*(\d+)", out, re.M)
        if m is None:
            raise RuntimeError(f"no flow count in nfdump -I output: {out[-2000:]}")
        return int(m.group(1))

    def log_text(self) -> str:
        return self.log.read_text()


def nfdump_flags(text: str) -> int:
    """nfdump's flag string (e.g. ``...AP.SF``) as a tcpControlBits value."""
    bits = 0
    for i, ch in enumerate(text[-8:]):
        if ch != ".":
            bits |= 0x80 >> i
    return bits


def ipfixdump_records(path: Path) -> list[dict]:
    """Data records as ``ipfixDump --data`` prints them: one dict per record, fields by name.

    ``_tid`` is the record's template id; an options record also has ``_scope``, the names of its
    scope fields (ipfixDump marks them ``(S)``) in order. A variable-length string shows as
    ``(len: N) TEXT``."""
    require("ipfixDump")
    out = subprocess.run(["ipfixDump", "--in", str(path), "--data"], capture_output=True, text=True,
                         env=UTC_ENV, check=True).stdout
    records: list[dict] = []
    cur: dict | None = None
    for line in out.splitlines():
        if line.startswith("--- data record"):
            cur = {}
            records.append(cur)
        elif line.startswith("---"):
            cur = None
        elif cur is not None:
            m = re.match(r"\s*count:\s*\d+\s+tid:\s*(\d+)", line)
            if m:
                cur["_tid"] = int(m.group(1))
                continue
            m = re.match(r"\s*\((\d+)\)\s*(\(S\)\s*)?(\w+)\s*:\s*(.*)$", line)
            if m:
                cur[m.group(3)] = m.group(4).strip()
                if m.group(2):
                    cur.setdefault("_scope", []).append(m.group(3))
    return records


def ipfix_file_messages(path: Path, record_length: dict[int, int] | None = None) -> list[tuple[str, int, int]]:
    """(kind, sequence number, data records) of every message of an IPFIX file, in order: kind "T" for
    a message of templates only, "D" for one with data. The file must end where its last message ends
    (AssertionError naming the offset of a torn one). ``record_length``: by template ID (our registry's)."""
    import struct

    if record_length is None:
        from exporter.template import default_registry

        record_length = {t.template_id: t.record_length for t in default_registry()}
    data = path.read_bytes()
    out, off = [], 0
    while off < len(data):
        assert off + 16 <= len(data), f"torn message header at offset {off} of {path}"
        _, length, _, seq, _ = struct.unpack_from("!HHIII", data, off)
        assert length >= 16 and off + length <= len(data), f"torn message at offset {off} of {path}"
        pos, records, kind = off + 16, 0, "T"
        while pos < off + length:
            sid, slen = struct.unpack_from("!HH", data, pos)
            if sid >= 256:
                kind, records = "D", records + (slen - 4) // record_length[sid]
            pos += slen
        out.append((kind, seq, records))
        off += length
    return out


def ipfixdump_warnings(path: Path) -> list[str]:
    """What ``ipfixDump`` complains of while reading the file: torn messages, sets without their
    template, sequence numbers out of order ([] for a file every message of which decodes)."""
    require("ipfixDump")
    r = subprocess.run(["ipfixDump", "--in", str(path), "--data"], capture_output=True, text=True, env=UTC_ENV)
    return [line.strip() for line in r.stderr.splitlines() if line.strip()] + (
        [f"exit {r.returncode}"] if r.returncode else [])


@contextlib.contextmanager
def tmpfs(directory: Path, size: str = "256k", read_only: bool = False):
    """A tmpfs of ``size`` mounted on ``directory`` (made if missing) for the block; needs root.

    Where a ``File/`` collector meets a full disk (or, read-only, a directory it cannot write).
    """
    directory.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0755" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], check=True,
                   capture_output=True, text=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


class TsharkCapture:
    """tshark capturing UDP to ``port`` on loopback into a pcap file."""

    def __init__(self, directory: Path, *ports: int) -> None:
        require("tshark")
        self.ports = ports
        tag = "-".join(map(str, ports))
        self.pcap = directory / f"capture-{tag}.pcap"
        self.log = directory / f"tshark-{tag}.log"
        self._fh = open(self.log, "w")
        bpf = " or ".join(f"udp dst port {p}" for p in ports)
        self.proc = subprocess.Popen(
            ["tshark", "-i", "lo", "-f", bpf, "-w", str(self.pcap), "-q"],
            stdout=self._fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tshark exited: {self.log.read_text()}")
            if "Capturing on" in self.log.read_text():
                time.sleep(0.3)
                return
            time.sleep(0.05)
        raise RuntimeError(f"tshark did not start: {self.log.read_text()}")

    def stop(self) -> Path:
        stop_process(self.proc, signal.SIGINT, settle_s=0.5)  # the last packets are captured first
        self._fh.close()
        return self.pcap


def tshark_fields(pcap: Path, port: int | tuple[int, ...], fields: list[str],
                  display_filter: str = "cflow") -> list[list[str]]:
    """``tshark -T fields`` output for the capture, decoding ``port`` (or ports) as IPFIX (cflow)."""
    args = ["tshark", "-r", str(pcap), "-Y", display_filter,
            "-T", "fields", "-E", "separator=\t", "-E", "occurrence=a", "-E", "aggregator=,"]
    for p in (port,) if isinstance(port, int) else port:
        args += ["-d", f"udp.port=={p},cflow"]
    for f in fields:
        args += ["-e", f]
    out = subprocess.run(args, capture_output=True, text=True, env=UTC_ENV, check=True).stdout
    return [line.split("\t") for line in out.splitlines()]


class Nfacctd:
    """pmacct's nfacctd on a loopback port, printing every flow as JSON lines."""

    PRIMITIVES = "src_host, dst_host, src_port, dst_port, proto, tcpflags, tos, timestamp_start, timestamp_end"

    def __init__(self, directory: Path, renormalize: bool = False, primitives: str = PRIMITIVES) -> None:
        """``renormalize``: counters scaled by the sampling rate learnt from the exporter's options
        records (``nfacctd_renormalize``); ``primitives``: the aggregation keys printed."""
        require("nfacctd")
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_udp_port()
        self.output = directory / "nfacctd.json"
        self.log = directory / "nfacctd.log"
        conf = directory / "nfacctd.conf"
        conf.write_text(
            "daemonize: false\n"
            "nfacctd_ip: 127.0.0.1\n"
            f"nfacctd_port: {self.port}\n"
            "plugins: print[out]\n"
            f"aggregate[out]: {primitives}\n"
            "print_output[out]: json\n"
            f"print_output_file[out]: {self.output}\n"
            "print_output_file_append[out]: true\n"
            "print_refresh_time[out]: 1\n"
            "timestamps_secs: false\n"
            f"nfacctd_renormalize: {'true' if renormalize else 'false'}\n"
            f"logfile: {self.log}\n")
        self._fh = open(directory / "nfacctd.stdout", "w")
        self.proc = subprocess.Popen(["nfacctd", "-f", str(conf)], stdout=self._fh, stderr=subprocess.STDOUT,
                                     env=UTC_ENV)
        try:
            _wait_bound(self.port, self.proc, "nfacctd", directory / "nfacctd.stdout")
        except RuntimeError as exc:  # nfacctd says why in its log file, not on stdout
            log = self.log.read_text()[-2000:] if self.log.exists() else "(no log file)"
            raise RuntimeError(f"{exc}\nnfacctd.log: {log}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            wait_socket_drained(self.port)
        stop_process(self.proc, signal.SIGTERM, settle_s=2.5)  # two print refreshes: every record written
        self._fh.close()

    def records(self) -> list[dict]:
        self.stop()
        if not self.output.exists():
            return []
        return [json.loads(line) for line in self.output.read_text().splitlines() if line.strip()]


class UdpSink:
    """A UDP socket on loopback that keeps every datagram (a bare collector for exporter tests);
    ``host`` "::1" for IPv6. Made inside a network namespace, it is that namespace's loopback."""

    def __init__(self, timeout_s: float = 0.3, host: str = "127.0.0.1") -> None:
        from exporter.transport import CollectorAddress

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.sock.bind((host, 0))
        self.sock.settimeout(timeout_s)
        self.port = self.sock.getsockname()[1]
        self.address = CollectorAddress("udp", host, self.port)

    def messages(self) -> list[bytes]:
        """Every datagram received until the socket stays quiet for the timeout."""
        out = []
        while True:
            try:
                out.append(self.sock.recv(70000))
            except socket.timeout:
                return out

    def flow_records(self) -> int:
        """Data records of our flow templates in the datagrams received (statistics domain 0 aside)."""
        from exporter.template import default_registry

        record_len = {t.template_id: t.record_length for t in default_registry()}
        n = 0
        for msg in self.messages():
            length, domain = int.from_bytes(msg[2:4], "big"), int.from_bytes(msg[12:16], "big")
            off = 16
            while off < length:
                sid, slen = int.from_bytes(msg[off:off + 2], "big"), int.from_bytes(msg[off + 2:off + 4], "big")
                if sid >= 256 and domain != 0:
                    n += (slen - 4) // record_len[sid]
                off += slen
        return n


def nfdump_totals(rows: list[dict]) -> tuple[dict, dict]:
    """nfdump JSON flow rows summed per (src, dst, proto, sport, dport): packets, octets.

    Addresses are normalised with ``ipaddress``; ICMP rows have ports 0.
    """
    import ipaddress
    from collections import Counter

    packets, octets = Counter(), Counter()
    for row in rows:
        v6 = "src6_addr" in row
        icmp = row["proto"] in (1, 58)
        key = (str(ipaddress.ip_address(row["src6_addr"] if v6 else row["src4_addr"])),
               str(ipaddress.ip_address(row["dst6_addr"] if v6 else row["dst4_addr"])), row["proto"],
               0 if icmp else row.get("src_port", 0), 0 if icmp else row.get("dst_port", 0))
        packets[key] += row["in_packets"]
        octets[key] += row["in_bytes"]
    return packets, octets
