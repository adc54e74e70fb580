"""Fuzz targets: each parser of outside input, wrapped as ``one(data) -> digest``.

A target takes arbitrary octets, feeds them to one parser the way the
product does, checks the parser's contract (it never raises; what it
returns stays inside the input; errors are one line) and returns a digest
of everything the parser produced. A broken contract raises, which the
fuzzer records as a crash. The digest lets the same input be replayed
through the pure-Python kernels (``NUMBA_DISABLE_JIT=1``: what atheris
instruments and what bounds-checks every read) and through the compiled
kernels (which do not bounds-check): both must give the same digest.

=========  ==================================================================
``decode``  ``decode_batch`` + ``nflog_prefixes`` (flowmeter/capture/decode.py)
            on records of any supported link type; each record is decoded
            twice, once followed by 0x00 octets and once by 0xFF octets: a
            read past the record's captured end shows as two different rows;
            every row must equal the decoder's plain-Python twin's
            (tests/capture/test_decode.py)
``pcap``    ``CaptureFile`` (pcapfile.py) on the octets as a pcap/pcapng file,
            held in memory and read from a file in small blocks (both must
            yield the same records), then every batch decoded
``nflog``   ``walk_netlink_messages`` (sources/nflog.py) on one netlink
            datagram, then its records decoded as LINKTYPE_NFLOG
``feed``    ``FeedDecoder.decode`` (sources/feedmessage.py) on one message;
            "unexpected error" (a bug, by its own definition) is a crash
``ipfix``   ``Decoder`` (exporter/decoder.py) on a stream of messages, every
            record printed by ``flowmeter collect``'s ``record_line`` and
            ``record_json`` (exporter/collect.py); data sets decoded with
            numpy and record by record must print the same
=========  ==================================================================

Flowmeter is imported inside ``load()`` only, so that the runner can import
it under atheris's instrumentation.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

SHARED_PCAPS = Path(__file__).resolve().parents[3] / "shared" / "pcaps"
INSTRUMENTED = ("flowmeter", "exporter")  # what atheris instruments


class ContractError(AssertionError):
    """A parser broke its contract on some input (the fuzzer counts it as a crash)."""


def check(condition: bool, what: str) -> None:
    if not condition:
        raise ContractError(what)


def _digest(*parts: object) -> str:
    import numpy as np
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.generic):  # a kernel's number: a numpy scalar as Python, an int compiled
            part = part.item()
        if hasattr(part, "tobytes"):
            part = part.tobytes()
        elif not isinstance(part, bytes):
            part = repr(part).encode()
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()[:24]


def capture_files() -> list[Path]:
    """The public captures of ../shared/pcaps (seeds), if that directory is there."""
    if not SHARED_PCAPS.is_dir():
        return []
    return sorted(p for p in SHARED_PCAPS.iterdir() if p.suffix in (".pcap", ".pcapng"))


# --- decode ---------------------------------------------------------------------------

GAP = 16  # octets between two records of a decode batch


def _decode_linktypes() -> tuple[int, ...]:
    from flowmeter.capture.decode import SUPPORTED_LINKTYPES
    return tuple(SUPPORTED_LINKTYPES) + (147,)  # and one it does not support


def encode_records(records: list[tuple[int, int, bytes]], extra: int = 0) -> bytes:
    """The decode target's input: (link type, direction, frame) records."""
    types = _decode_linktypes()
    out = bytearray()
    for linktype, direction, frame in records:
        index = types.index(linktype) if linktype in types else len(types) - 1
        frame = frame[:0xFFFF]
        out += struct.pack("!BBH", index, (direction & 3) | (extra << 2), len(frame)) + frame
    return bytes(out)


def parse_records(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(link type, direction, original length, frame) of each record of the decode input."""
    types = _decode_linktypes()
    out, p = [], 0
    while len(data) - p >= 4 and len(out) < 64:
        index, flags, length = struct.unpack_from("!BBH", data, p)
        frame = data[p + 4:p + 4 + length]
        out.append((types[index % len(types)], flags & 3, len(frame) + (flags >> 2) * 37, frame))
        p += 4 + length
    return out


def _batch(records: list[tuple[int, int, int, bytes]], fill: int):
    import numpy as np

    from flowmeter.capture.sources import RecordBatch, read_only
    buf = bytearray()
    offsets = []
    for _lt, _d, _orig, frame in records:
        offsets.append(len(buf))
        buf += frame + bytes([fill]) * GAP
    n = len(records)
    return RecordBatch(read_only(np.frombuffer(bytes(buf) or b"\0", np.uint8)), np.array(offsets, np.uint64),
                       np.array([len(r[3]) for r in records], np.uint32),
                       np.array([r[2] for r in records], np.uint32),
                       np.arange(n, dtype=np.uint64) * np.uint64(1000) + np.uint64(1_700_000_000 * 10**9),
                       np.array([r[0] for r in records], np.uint16), np.full(n, 3, np.uint32),
                       np.array([r[1] for r in records], np.uint8))


def decoded(batch) -> tuple:
    """Decode a batch and check what the decoder promises about its output; (rows, status, info)."""
    import numpy as np

    from flowmeter.capture.decode import KNOWN_STATUSES, FragmentMemory, decode_batch, nflog_prefixes
    from flowmeter.ipc.packets import PACKET_DTYPE
    n = len(batch)
    rows, status = np.empty(n, PACKET_DTYPE), np.empty(n, np.uint8)
    info = decode_batch(batch, rows, status, FragmentMemory(64))
    check(bool(np.isin(status, KNOWN_STATUSES).all()), f"unknown status in {status}")
    check(int(info.status_counts.sum()) == n, "status counts do not add up")
    has = info.nflog_prefix_length >= 0
    start = info.nflog_prefix_offset[has].astype(np.int64)
    end = start + info.nflog_prefix_length[has]
    rec_start = batch.offset[has].astype(np.int64)
    rec_end = rec_start + batch.caplen[has]
    check(bool(((start >= rec_start) & (end <= rec_end)).all()), "NFLOG prefix outside its record")
    prefixes = nflog_prefixes(batch, info)
    check(sum(len(v) for v in prefixes.values()) == int(has.sum()), "nflog_prefixes lost rows")
    return rows, status, info, sorted(prefixes)


def decode_one(data: bytes) -> str:
    records = parse_records(data)
    if not records:
        return "empty"
    batch = _batch(records, 0x00)
    a = decoded(batch)
    b = decoded(_batch(records, 0xFF))
    check(a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes(),
          "a record decodes differently with other octets after it: a read past its captured end")
    from tests.capture.test_decode import assert_kernel_matches_twin
    assert_kernel_matches_twin(batch)  # and like the decoder's plain-Python twin, field by field
    return _digest(a[0], a[1], a[2].nflog_prefix_length, a[2].nflog_hook, a[3])


def decode_seeds() -> Iterator[bytes]:
    from flowmeter.capture.sources.pcapfile import CaptureFile
    from tests.capture.test_decode import edge_cases
    cases = edge_cases()
    for at in range(0, len(cases), 3):
        yield encode_records([(linktype, 0, frame) for _name, linktype, frame, _orig in cases[at:at + 3]])
    for path in capture_files():
        try:
            capture = CaptureFile.from_bytes(path.read_bytes(), path.name)
        except ValueError:
            continue
        records = []
        for batch in capture.batches():
            for i in range(len(batch)):
                records.append((int(batch.linktype[i]), int(batch.direction[i]), batch.frame(i)))
        for at in range(0, min(len(records), 64), 4):
            yield encode_records(records[at:at + 4])


# --- pcap -----------------------------------------------------------------------------

PCAP_BATCH = 7  # packets per batch: batch boundaries land inside the files


def _read_capture(capture) -> tuple:
    import numpy as np
    cols = {k: [] for k in ("offset", "caplen", "origlen", "ts_ns", "linktype", "ifindex", "direction")}
    frames = []
    for batch in capture.batches(PCAP_BATCH):
        n = len(batch)
        check(1 <= n <= PCAP_BATCH, f"a batch of {n} records")
        end = batch.offset.astype(np.int64) + batch.caplen
        check(bool((end <= len(batch.buf)).all()), "a record runs past the end of its buffer")
        for k in cols:
            cols[k].append(getattr(batch, k))
        frames.extend(batch.frame(i) for i in range(n))
        decoded(batch)
    check(capture.complete == (capture.error is None), "complete and error disagree")
    if capture.error is not None:
        check("\n" not in capture.error and capture.error.startswith(capture.path + ": "),
              f"not one line naming the file: {capture.error!r}")
    merged = {k: np.concatenate(v) if v else np.empty(0) for k, v in cols.items()}
    return (merged["caplen"], merged["origlen"], merged["ts_ns"], merged["linktype"], merged["ifindex"],
            merged["direction"], b"".join(frames), capture.error, capture.complete, capture.packets_read,
            capture.bytes_read)


_TMP = None


def _read_named(open_capture: Callable, name: str) -> tuple:
    """What ``_read_capture`` gives, or the CaptureError, with the file's name replaced by NAME."""
    from flowmeter.capture.sources.pcapfile import CaptureError
    try:
        capture = open_capture()
    except CaptureError as exc:
        check("\n" not in str(exc) and str(exc).startswith(name + ": "), f"not one line naming the file: {exc}")
        return ("CaptureError", str(exc).replace(name, "NAME", 1))
    with capture:
        got = _read_capture(capture)
    return got[:7] + (None if got[7] is None else got[7].replace(name, "NAME", 1),) + got[8:]


def pcap_one(data: bytes) -> str:
    global _TMP
    from flowmeter.capture.sources.pcapfile import CaptureFile
    in_memory = _read_named(lambda: CaptureFile.from_bytes(data, "fuzz.pcap"), "fuzz.pcap")
    # the same octets read from a file, in blocks small enough to cut records and blocks
    if _TMP is None:
        _TMP = tempfile.mkdtemp(prefix="flowmeter-fuzz-")
        atexit.register(shutil.rmtree, _TMP, True)
    path = os.path.join(_TMP, "fuzz.pcap")
    with open(path, "wb") as f:
        f.write(data)
    block = 64 + (data[-1] if data else 0) * 8
    from_file = _read_named(lambda: CaptureFile(path, block_octets=block), path)
    check(_digest(*in_memory) == _digest(*from_file),
          f"read from a file in {block}-octet blocks differs from the same octets in memory: "
          f"{in_memory[-5:]} {from_file[-5:]}")
    return _digest(*in_memory)


def pcap_seeds() -> Iterator[bytes]:
    for path in capture_files():
        data = path.read_bytes()
        yield data[:8192]  # a seed stays small; the fuzzer grows what it needs


# --- nflog ----------------------------------------------------------------------------

NFLOG_CAPACITY = 32


def nflog_one(data: bytes) -> str:
    import numpy as np

    from flowmeter.capture.sources import Columns, read_only
    from flowmeter.capture.sources.nflog import LINKTYPE_NFLOG, walk_netlink_messages
    if not data:
        return "empty"
    big = bool(data[0] & 1)
    buf = np.frombuffer(data, np.uint8)
    cols = Columns(NFLOG_CAPACITY)
    next_seq = np.full(1, -1, np.int64)
    start = 1
    n, malformed, errors, lost = walk_netlink_messages(buf, start, len(data), big, 123_456_789, 0, cols.offset,
                                                       cols.caplen, cols.origlen, cols.ts_ns, next_seq)
    check(0 <= n <= NFLOG_CAPACITY, f"{n} records for a capacity of {NFLOG_CAPACITY}")
    check(malformed >= 0 and errors >= 0 and lost >= 0, "a negative count")
    end = cols.offset[:n].astype(np.int64) + cols.caplen[:n]
    check(bool(((cols.offset[:n] >= start) & (end <= len(data))).all()), "a record outside the datagram")
    cols.linktype[:n] = LINKTYPE_NFLOG
    cols.ifindex[:n] = 0
    cols.direction[:n] = 0
    batch = cols.batch(read_only(buf), n, 0)
    rows, status, info, prefixes = decoded(batch)
    return _digest(n, malformed, errors, lost, next_seq, cols.offset[:n], cols.caplen[:n], cols.ts_ns[:n], rows,
                   status, prefixes)


def nflog_seeds() -> Iterator[bytes]:
    from flowmeter.capture.sources.pcapfile import CaptureFile
    path = SHARED_PCAPS / "tcpdump__nflog.pcap"
    if not path.exists():
        return
    frames = []
    for batch in CaptureFile.from_bytes(path.read_bytes(), path.name).batches():
        frames.extend(batch.frame(i) for i in range(len(batch)))
    for at in range(0, len(frames), 3):
        datagram = b"".join(struct.pack("<IHHII", 16 + len(f), 0x0400, 2, at, 0) + f + b"\0" * (-len(f) % 4)
                            for f in frames[at:at + 3])
        datagram += struct.pack("<IHHII", 20, 2, 0, 0, 0) + struct.pack("<i", -105)  # NLMSG_ERROR ENOBUFS
        datagram += struct.pack("<IHHII", 16, 3, 2, 0, 0)  # NLMSG_DONE
        yield b"\0" + datagram


# --- feed -----------------------------------------------------------------------------

_FEED_KEYS = ("t", "dir", "verdict", "reason", "peer", "ip", "len", "src", "dst", "proto", "sport", "dport", "tos",
              "tcp_flags", "icmp_type", "icmp_code", "v", "frames", "agent", "x")


def _value(fdp, depth: int):
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind == 0:
        return fdp.ConsumeIntInRange(0, 300)
    if kind == 1:
        return fdp.ConsumeIntInRange(-(1 << 63), (1 << 64) - 1) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(-1, 1)
    if kind == 2:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 48))
    if kind == 3:
        return ["in", "out", "forward", "drop", "AclDrop", "deny x", ""][fdp.ConsumeIntInRange(0, 6)]
    if kind == 4:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 150))
    if kind == 5:
        return None
    if kind == 6:
        return fdp.ConsumeBool()
    if kind == 7:
        return fdp.ConsumeRegularFloat()
    if kind == 8 and depth < 3:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if depth < 3:
        return {_FEED_KEYS[fdp.ConsumeIntInRange(0, len(_FEED_KEYS) - 1)]: _value(fdp, depth + 1)
                for _ in range(fdp.ConsumeIntInRange(0, 8))}
    return 0


def feed_message(data: bytes) -> bytes:
    """The feed target's message: the octets after the first as they are (first octet even), or
    (odd) a msgpack map of frames built from them, most keys and values of the right kinds."""
    if not data or not data[0] & 1:
        return data[1:]
    import atheris
    import msgpack
    fdp = atheris.FuzzedDataProvider(data[1:])
    frames = []
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        frame = {}
        for _ in range(fdp.ConsumeIntInRange(0, 10)):
            key = _FEED_KEYS[fdp.ConsumeIntInRange(0, 15)]
            frame[key] = _value(fdp, 1)
        frames.append(frame)
    message = {"v": 1 if fdp.ConsumeProbability() < 0.9 else _value(fdp, 2), "frames": frames}
    if fdp.ConsumeBool():
        message["agent"] = _value(fdp, 2)
    return msgpack.packb(message, use_bin_type=True)


def feed_one(data: bytes) -> str:
    from flowmeter.capture.sources.feedmessage import UNEXPECTED, FeedDecoder
    lines: list[str] = []
    decoder = FeedDecoder(log=lines.append, clock=lambda: 0.0, max_message=1 << 16)
    rows = decoder.decode(feed_message(data))
    counts = decoder.counters()
    check(not counts.get(f"dropped messages: {UNEXPECTED}"), f"the feed decoder failed: {lines}")
    check(all("\n" not in line for line in lines), "a log line of more than one line")
    return _digest(None if rows is None else rows, sorted(counts.items()))


def feed_seeds() -> Iterator[bytes]:
    from flowmeter.capture.frames import ipv4, ipv6, tcp, udp
    from flowmeter.capture.sources.feedclient import example_frames, header_frame, metadata_frame, pack_message
    t = 1_700_000_000 * 10**9
    yield b"\0" + pack_message(example_frames(6, drop_every=2, start_ns=t), agent="fuzz")
    yield b"\0" + pack_message([header_frame(ipv4("10.0.0.1", "10.0.0.2", 6, tcp(1, 2)), t=t, peer=4),
                                header_frame(ipv6("2001:db8::1", "2001:db8::2", 17, udp(3, 4)), t=t, dir="out",
                                             verdict="drop", reason="deny"),
                                metadata_frame("192.0.2.1", "192.0.2.2", 1, 84, t=t, icmp_type=8)])
    yield b"\0" + pack_message([])
    yield b"\x01" + bytes(range(64))


# --- ipfix ----------------------------------------------------------------------------


def ipfix_messages(data: bytes) -> Iterator[bytes] | bytes:
    """First octet even: the rest is an IPFIX stream as it is. Odd: messages framed by a 2-octet
    length each, whose own length field (octets 2-3) is set to the right value."""
    if not data or not data[0] & 1:
        return data[1:]

    def messages() -> Iterator[bytes]:
        p = 1
        while len(data) - p >= 2:
            (length,) = struct.unpack_from("!H", data, p)
            m = bytearray(data[p + 2:p + 2 + length])
            if len(m) >= 4:
                m[2:4] = struct.pack("!H", len(m))
            yield bytes(m)
            p += 2 + length
    return messages()


def frame_messages(messages: list[bytes]) -> bytes:
    return b"\x01" + b"".join(struct.pack("!H", len(m)) + m for m in messages)


def _collected(data: bytes, numpy_min_records: int) -> tuple:
    """What ``flowmeter collect`` prints for the IPFIX input ``data``: record lines, JSON lines, summary."""
    from exporter.collect import record_json, record_line, summary_line
    from exporter.decoder import Decoder
    decoder = Decoder(numpy_min_records=numpy_min_records)
    source = ("192.0.2.1", 4739)
    what = ipfix_messages(data)
    batches = decoder.iter_stream(what, source) if isinstance(what, bytes) else (decoder.decode(m, source)
                                                                              for m in what)
    out = []
    for records in batches:
        for r in records:
            line = record_line(r)
            text = record_json(r)
            check("\n" not in line and "\n" not in text, "a record printed on more than one line")
            json.loads(text)
            out.append((line, text))
    summary = summary_line(decoder.stats)
    check("\n" not in summary, "a summary of more than one line")
    if decoder.stats.last_error is not None:
        check("\n" not in decoder.stats.last_error, "an error of more than one line")
    return out, summary


def ipfix_one(data: bytes) -> str:
    """Decoded twice: data sets of one or more records through the numpy path, and every one record
    by record; both must print the same."""
    by_numpy = _collected(data, 1)
    by_record = _collected(data, 1 << 30)
    check(by_numpy == by_record, "the numpy and the per-record decoding of data sets differ")
    return _digest(*by_numpy)


def ipfix_seeds() -> Iterator[bytes]:
    import numpy as np

    from exporter.message import Message, encode
    from exporter.template import default_registry
    reg = default_registry()
    m = Message(1452)
    for name in ("ipv4_tcp", "ipv6_udp", "ipv4_icmp"):
        t = reg[name] if name in reg else None
        if t is None:
            continue
        rec = t.empty(3)
        for field in rec.dtype.names:
            rec[field] = np.arange(3) + 1
        m.begin(7)
        m.add_templates(reg)
        m.add_records(t, encode(t, rec))
        first = bytes(m.finish(0, 1_700_000_010))
        m.begin(7)
        m.add_records(t, encode(t, rec))
        second = bytes(m.finish(3, 1_700_000_011))
        yield b"\0" + first + second
        yield frame_messages([first, second])
    try:
        from tests.exporter import test_decoder as examples
    except ImportError:
        return
    yield frame_messages([examples.WORKED_EXAMPLE, examples.data_only(1, 3)])
    for text, _ in examples.MALFORMED.values():
        yield frame_messages([examples.wire(text)])


# --- the table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    one: Callable[[bytes], str]
    seeds: Callable[[], Iterator[bytes]]


TARGETS = {t.name: t for t in (
    Target("decode", decode_one, decode_seeds),
    Target("pcap", pcap_one, pcap_seeds),
    Target("nflog", nflog_one, nflog_seeds),
    Target("feed", feed_one, feed_seeds),
    Target("ipfix", ipfix_one, ipfix_seeds),
)}
