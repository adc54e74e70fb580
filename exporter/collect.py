"""``flowmeter collect``: a small IPFIX collecting process for checks and debugging.

It receives IPFIX messages over UDP (RFC 7011 §10.3: one message per
datagram; templates and sequence numbers are kept per exporter address and
port, the UDP transport session seen from this side) or reads an IPFIX file
(RFC 5655: messages one after the other), decodes them with
``exporter.decoder.Decoder`` and prints every data record:

* ``json_out``: one JSON object per line: ``exporter`` ("host:port", or the
  file name), ``domain``, ``template``, ``sequence``, ``options``, then the
  fields by element name;
* otherwise one readable line per record. Flow records (addresses and
  protocolIdentifier present) get a compact aligned line::

      2024-05-01T12:00:00.123 2024-05-01T12:00:05.456 TCP    192.0.2.1:40000 -> 198.51.100.2:443    10 pkts   1500 B  ...AP.S. in  idle
      ... ingressInterface=3

  any other record: ``domain template  field=value field=value ...``.

At the end one summary line goes to ``err``. The command-line wrapper lives
in ``flowmeter/cli.py``; this module holds the logic.
"""
from __future__ import annotations

import ipaddress
import json
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import TextIO

from .decoder import DecodedRecord, Decoder, DecoderStats, Value, describe_source
from .transport import CollectorAddress

RCVBUF_BYTES = 8 << 20  # a burst of records must not overflow the socket buffer
POLL_S = 0.2  # socket timeout: how quickly stop / duration are noticed
MAX_DATAGRAM = 65535


def listen_text(spec: CollectorAddress) -> str:
    """The ``--listen`` form of an address: ``udp/HOST:PORT`` or ``file/PATH``."""
    if spec.kind == "file":
        return f"file/{spec.path}"
    return f"udp/{describe_source((spec.host, spec.port))}"


def parse_listen(listen: str) -> CollectorAddress:
    """``udp/HOST:PORT`` (IPv4, name, or ``[IPv6]``) or ``file/PATH``; ValueError with one line otherwise."""
    bad = ValueError(f'--listen: "{listen}" is not udp/HOST:PORT or file/PATH')
    kind, sep, rest = listen.partition("/")
    kind = kind.lower()
    if not sep or not rest:
        raise bad
    if kind == "file":
        return CollectorAddress("file", path=rest)
    if kind != "udp":
        raise bad
    if rest.startswith("["):
        host, close, port_text = rest[1:].partition("]")
        if not close or not port_text.startswith(":"):
            raise bad
        port_text = port_text[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f'--listen: "{listen}": "{host}" is not an IPv6 address') from None
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon or not host or ":" in host:
            raise bad
        if all(ch.isdigit() or ch == "." for ch in host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f'--listen: "{listen}": "{host}" is not an IPv4 address') from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f'--listen: "{listen}": port "{port_text}" is not 0-65535')
    return CollectorAddress("udp", host=host, port=int(port_text))


# --- output ----------------------------------------------------------------

_PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP", 33: "DCCP", 47: "GRE", 50: "ESP", 51: "AH",
              58: "ICMPv6", 132: "SCTP", 136: "UDPLite"}
_END_REASONS = {1: "idle", 2: "active", 3: "end", 4: "forced", 5: "no-resources"}  # IANA flowEndReason
_DIRECTIONS = {0: "in", 1: "out"}  # IANA flowDirection
_FORWARDING = {1: "fwd", 2: "drop", 3: "consumed"}  # forwardingStatus bits 7-6 (RFC 7270)
_TCP_FLAGS = "CEUAPRSF"  # tcpControlBits 0x80 .. 0x01 (RFC 9565)
_ADDRESS_PAIRS = (("sourceIPv4Address", "destinationIPv4Address"), ("sourceIPv6Address", "destinationIPv6Address"))
_TIMES = (("flowStartMilliseconds", "flowEndMilliseconds", 1e-3), ("flowStartSeconds", "flowEndSeconds", 1.0),
          ("flowStartMicroseconds", "flowEndMicroseconds", 1.0), ("flowStartNanoseconds", "flowEndNanoseconds", 1.0))
_ICMP_FIELDS = ("icmpTypeCodeIPv4", "icmpTypeCodeIPv6", "icmpTypeIPv4", "icmpCodeIPv4", "icmpTypeIPv6", "icmpCodeIPv6")
_SHOWN = {"protocolIdentifier", "sourceTransportPort", "destinationTransportPort", "packetDeltaCount",
          "octetDeltaCount", "packetTotalCount", "octetTotalCount", "tcpControlBits", "flowDirection",
          "flowEndReason", "forwardingStatus", *_ICMP_FIELDS,
          *(n for pair in _ADDRESS_PAIRS for n in pair), *(n for t in _TIMES for n in t[:2])}


def _json_value(v: Value) -> Value | None:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # NaN / inf are not JSON
    return v


def record_json(record: DecodedRecord) -> str:
    """One JSON object: record context first, then the fields in template order."""
    obj: dict[str, object] = {
        "exporter": describe_source(record.source),
        "domain": record.domain,
        "template": record.template_id,
        "sequence": record.sequence,
        "options": record.is_options,
    }
    for k, v in record.fields.items():
        obj[k] = _json_value(v)
    return json.dumps(obj)


def _iso(value: Value | None, scale: float) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    try:
        t = datetime.fromtimestamp(value * scale, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return str(value)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def _endpoint(addr: Value, port: Value | None) -> str:
    if port is None:
        return str(addr)
    return f"[{addr}]:{port}" if ":" in str(addr) else f"{addr}:{port}"


def _tcp_flags(bits: Value | None) -> str:
    if not isinstance(bits, int):
        return ""
    return "".join(c if bits & (0x80 >> i) else "." for i, c in enumerate(_TCP_FLAGS))


def _icmp(f: dict[str, Value]) -> str | None:
    for name in ("icmpTypeCodeIPv4", "icmpTypeCodeIPv6"):
        v = f.get(name)
        if isinstance(v, int):
            return f"type {v >> 8}/{v & 0xFF}"
    for t, c in (("icmpTypeIPv4", "icmpCodeIPv4"), ("icmpTypeIPv6", "icmpCodeIPv6")):
        if t in f:
            return f"type {f[t]}/{f.get(c, '-')}"
    return None


def _plain(v: Value) -> str:
    s = str(v)
    return json.dumps(s) if isinstance(v, str) and (not s or any(ch.isspace() or ch == "=" for ch in s)) else s


def record_line(record: DecodedRecord) -> str:
    """One readable line: the compact flow line, or ``domain template  field=value ...``."""
    f = record.fields
    pair = next((p for p in _ADDRESS_PAIRS if p[0] in f and p[1] in f), None)
    if record.is_options or pair is None or "protocolIdentifier" not in f:
        return f"{record.domain} {record.template_id}  " + " ".join(f"{k}={_plain(v)}" for k, v in f.items())
    start, end = "-", "-"
    for start_name, end_name, scale in _TIMES:
        if start_name in f or end_name in f:
            start, end = _iso(f.get(start_name), scale), _iso(f.get(end_name), scale)
            break
    proto = f["protocolIdentifier"]
    proto_name = _PROTOCOLS.get(proto, str(proto)) if isinstance(proto, int) else str(proto)
    icmp = _icmp(f)
    src = _endpoint(f[pair[0]], f.get("sourceTransportPort"))
    dst = _endpoint(f[pair[1]], f.get("destinationTransportPort"))
    flow = f"{src} -> {dst}" + (f" {icmp}" if icmp else "")
    packets = f.get("packetDeltaCount", f.get("packetTotalCount", "-"))
    octets = f.get("octetDeltaCount", f.get("octetTotalCount", "-"))
    direction = _DIRECTIONS.get(f.get("flowDirection"), str(f.get("flowDirection", "-")))  # type: ignore[arg-type]
    reason = _END_REASONS.get(f.get("flowEndReason"), str(f.get("flowEndReason", "-")))  # type: ignore[arg-type]
    status = f.get("forwardingStatus")
    forwarding = _FORWARDING.get(status >> 6, "") if isinstance(status, int) else ""
    line = (f"{start:<23} {end:<23} {proto_name:<6} {flow:<47} {packets:>8} pkts {octets:>10} B "
            f"{_tcp_flags(f.get('tcpControlBits')):<8} {direction:<3} {reason:<6} {forwarding}").rstrip()
    rest = [f"{k}={_plain(v)}" for k, v in f.items() if k not in _SHOWN]
    return line + ("  " + " ".join(rest) if rest else "")


def summary_line(stats: DecoderStats) -> str:
    """The one-line summary written at the end."""
    line = (f"collect: {stats.messages} messages, {stats.records} records, "
            f"{stats.templates} templates, {stats.options_templates} options templates, "
            f"{stats.malformed} malformed, {stats.unknown_template} unknown-template sets, "
            f"{stats.sequence_gaps} sequence gaps, {stats.lost_records} lost records")
    if stats.last_error:
        line += f"; last error: {stats.last_error}"
    return line


# --- the collecting loop -----------------------------------------------------


class _Printer:
    """Writes records to ``out`` and tells when ``count`` has been reached."""

    def __init__(self, out: TextIO, json_out: bool, count: int | None) -> None:
        self.out = out
        self.format = record_json if json_out else record_line
        self.left = count if count else None  # None: no limit

    def write(self, records: Iterable[DecodedRecord]) -> bool:
        """Print records (at most the remaining count); True when the count is reached."""
        for r in records:
            if self.left is not None and self.left <= 0:
                break
            self.out.write(self.format(r) + "\n")
            if self.left is not None:
                self.left -= 1
        self.out.flush()  # a pipe reader sees each datagram's records at once
        return self.left is not None and self.left <= 0


def _bind(spec: CollectorAddress) -> socket.socket:
    infos = socket.getaddrinfo(spec.host, spec.port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
        except OSError:
            pass  # best effort: the kernel may cap it (net.core.rmem_max)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.settimeout(POLL_S)
    return sock


def collect(
    listen: str,
    json_out: bool,
    out: TextIO,
    count: int | None = None,
    duration: float | None = None,
    stop: threading.Event | None = None,
    err: TextIO = sys.stderr,
    ready: Callable[[], None] | None = None,
) -> DecoderStats:
    """Receive or read IPFIX, print every data record, return the decoder's counters.

    Stops after ``count`` records, after ``duration`` seconds, when ``stop``
    is set, on KeyboardInterrupt, or (``file/``) at the end of the file;
    ``count`` and ``duration`` of None or 0 mean no limit. ``ready()`` is
    called once datagrams can be received (or the file is open); the bound
    address (the real port when 0 was asked) is the first line on ``err``,
    ``collect: listening on udp/HOST:PORT``. Raises ValueError for a
    bad ``listen`` and OSError (with the address in the text) when the
    socket cannot be bound or the file cannot be opened.
    """
    spec = parse_listen(listen)
    if count is not None and count < 0:
        raise ValueError(f"--count: {count} is not 0 (no limit) or a positive number of records")
    if duration is not None and duration < 0:
        raise ValueError(f"--duration: {duration} is not 0 (no limit) or a positive number of seconds")
    decoder = Decoder()
    printer = _Printer(out, json_out, count)
    deadline = time.monotonic() + duration if duration else None

    def stopping() -> bool:
        return (stop is not None and stop.is_set()) or (deadline is not None and time.monotonic() >= deadline)

    try:
        if spec.kind == "file":
            _collect_file(spec, decoder, printer, stopping, ready)
        else:
            _collect_udp(spec, decoder, printer, stopping, err, ready)
    except KeyboardInterrupt:
        pass  # Ctrl-C is the normal way to end an open-ended collect
    err.write(summary_line(decoder.stats) + "\n")
    err.flush()
    return decoder.stats


def _collect_udp(spec: CollectorAddress, decoder: Decoder, printer: _Printer, stopping: Callable[[], bool],
                 err: TextIO, ready: Callable[[], None] | None) -> None:
    try:
        sock = _bind(spec)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {listen_text(spec)}: {exc.strerror or exc}") from None
    with sock:
        host, port = sock.getsockname()[:2]
        bound = f"udp/{describe_source((host, port))}"
        rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        note = "" if rcvbuf >= RCVBUF_BYTES else f" (receive buffer {rcvbuf >> 10} KiB; raise net.core.rmem_max for more)"
        err.write(f"collect: listening on {bound}{note}\n")
        err.flush()
        if ready is not None:
            ready()
        while not stopping():
            try:
                data, address = sock.recvfrom(MAX_DATAGRAM)
            except (socket.timeout, InterruptedError):
                continue
            # the UDP transport session, seen from here: exporter address and port
            if printer.write(decoder.decode(data, source=(address[0], address[1]))):
                return


def _collect_file(spec: CollectorAddress, decoder: Decoder, printer: _Printer, stopping: Callable[[], bool],
                  ready: Callable[[], None] | None) -> None:
    try:
        fh = open(spec.path, "rb")
    except OSError as exc:
        raise OSError(exc.errno, f"cannot read {listen_text(spec)}: {exc.strerror or exc}") from None
    with fh:
        if ready is not None:
            ready()
        for records in decoder.iter_stream(fh, source=spec.path):
            if printer.write(records) or stopping():
                return
