"""Capture file readers: every public capture against tshark, damaged files, fuzzing.

Two independent references: tshark (what Wireshark reads from each file)
and ``twin_read``, a plain-Python twin of the numba record walkers, run on
the same bytes (every shared capture, every truncation of small ones,
garbage, hypothesis-mutated captures).
"""
from __future__ import annotations

import os
import random
import re
import shutil
import struct
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowmeter.capture.sources.pcapfile import (MAX_CAPLEN, CaptureError, CaptureFile, RecordBatch, open_capture,
                                                pcapng_time_ns)
from flowmeter.capture.decode import decode_batch
from flowmeter.ipc.packets import DIR_EGRESS, DIR_INGRESS, DIR_UNKNOWN, PACKET_DTYPE, ST_OK
from tests.support.pcapwrite import ethernet_ipv4_udp, ethernet_ipv6_tcp, ipv4, udp, write_pcap

SHARED = Path(__file__).resolve().parents[3] / "shared" / "pcaps"
CAPTURES = sorted(p for p in SHARED.glob("*") if p.suffix in (".pcap", ".pcapng", ".cap"))
needs_shared = pytest.mark.skipif(not CAPTURES, reason=f"no shared captures in {SHARED}")
needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
T0 = 1_700_000_000_000_000_000

# --- helpers ---------------------------------------------------------------------------


def tshark_frames(path: Path, *extra: str) -> tuple[int, list[list[str]]]:
    """tshark's return code and, per frame, time (ns), caplen, len (+ extra fields)."""
    args = ["tshark", "-n", "-r", str(path), "-T", "fields", "-E", "separator=/t",
            "-e", "frame.time_epoch", "-e", "frame.cap_len", "-e", "frame.len"]
    for field in extra:
        args += ["-e", field]
    run = subprocess.run(args, capture_output=True, text=True, timeout=120)
    return run.returncode, [line.split("\t") for line in run.stdout.splitlines()]


def epoch_ns(text: str) -> int | None:
    return int(Decimal(text) * 10**9) if text else None


def read_all(capture: CaptureFile, max_packets: int = 65536) -> dict[str, np.ndarray]:
    batches = list(capture.batches(max_packets))
    names = ("offset", "caplen", "origlen", "ts_ns", "linktype", "ifindex", "direction")
    if not batches:
        return {n: np.array([], dtype=np.uint64) for n in names}
    return {n: np.concatenate([getattr(b, n) for b in batches]) for n in names}


def records(capture: CaptureFile, max_packets: int = 65536) -> list[tuple[int, ...]]:
    cols = read_all(capture, max_packets)
    return list(zip(*(cols[n].tolist() for n in ("offset", "caplen", "origlen", "ts_ns", "linktype",
                                                   "ifindex", "direction"))))


# pcapng blocks, for hand-made files
def block(o: str, btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    return struct.pack(o + "II", btype, 12 + len(body)) + body + struct.pack(o + "I", 12 + len(body))


def option(o: str, code: int, value: bytes) -> bytes:
    return struct.pack(o + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def shb(o: str, major: int = 1) -> bytes:
    return block(o, 0x0A0D0D0A, struct.pack(o + "IHHq", 0x1A2B3C4D, major, 0, -1))


def idb(o: str, linktype: int = 1, snaplen: int = 0, *options: bytes) -> bytes:
    opts = b"".join(options) + (struct.pack(o + "HH", 0, 0) if options else b"")
    return block(o, 1, struct.pack(o + "HHI", linktype, 0, snaplen) + opts)


def epb(o: str, iface: int, ts: int, data: bytes, origlen: int | None = None, flags: int | None = None) -> bytes:
    opts = option(o, 2, struct.pack(o + "I", flags)) + struct.pack(o + "HH", 0, 0) if flags is not None else b""
    return block(o, 6, struct.pack(o + "IIIII", iface, ts >> 32, ts & 0xFFFFFFFF, len(data),
                                   len(data) if origlen is None else origlen)
                 + data + b"\0" * (-len(data) % 4) + opts)


def pb(o: str, iface: int, ts: int, data: bytes, flags: int | None = None) -> bytes:
    opts = option(o, 2, struct.pack(o + "I", flags)) if flags is not None else b""
    return block(o, 2, struct.pack(o + "HHIIII", iface, 0, ts >> 32, ts & 0xFFFFFFFF, len(data), len(data))
                 + data + b"\0" * (-len(data) % 4) + opts)


def spb(o: str, data: bytes, origlen: int | None = None) -> bytes:
    return block(o, 3, struct.pack(o + "I", len(data) if origlen is None else origlen) + data)


# --- the plain-Python twin of the walkers -------------------------------------------------


def twin_read(data: bytes) -> tuple[list[tuple[int, ...]], bool, int]:
    """(records, complete, bytes_read) the way the kernels should walk ``data``.

    Raises ValueError where ``open_capture`` must raise CaptureError.
    """
    magic = data[:4]
    pcap = {b"\xd4\xc3\xb2\xa1": ("<", 1000), b"\xa1\xb2\xc3\xd4": (">", 1000),
            b"\x4d\x3c\xb2\xa1": ("<", 1), b"\xa1\xb2\x3c\x4d": (">", 1)}
    out: list[tuple[int, ...]] = []
    if magic in pcap:
        o, mult = pcap[magic]
        if len(data) < 24:
            raise ValueError("short header")
        major, minor = struct.unpack_from(o + "HH", data, 4)
        if not ((major == 2 and minor <= 4) or (major, minor) == (543, 0)):
            raise ValueError("version")
        linktype = struct.unpack_from(o + "I", data, 20)[0] & 0xFFFF
        p = 24
        while True:
            if p == len(data):
                return out, True, p
            if len(data) - p < 16:
                return out, False, p
            sec, frac, incl, orig = struct.unpack_from(o + "IIII", data, p)
            if incl > MAX_CAPLEN or len(data) - p - 16 < incl:
                return out, False, p
            out.append((p + 16, incl, orig, (sec * 10**9 + frac * mult) % 2**64, linktype, 1, DIR_UNKNOWN))
            p += 16 + incl
    if magic != b"\x0a\x0d\x0d\x0a":
        raise ValueError("magic")

    def section(p: int) -> tuple[str, int] | None:
        if len(data) - p < 28:
            return None
        o = {b"\x4d\x3c\x2b\x1a": "<", b"\x1a\x2b\x3c\x4d": ">"}.get(data[p + 8:p + 12])
        if o is None:
            return None
        length = struct.unpack_from(o + "I", data, p + 4)[0]
        if (struct.unpack_from(o + "H", data, p + 12)[0] != 1 or length < 28 or length % 4
                or length > len(data) - p or struct.unpack_from(o + "I", data, p + length - 4)[0] != length):
            return None
        return o, length

    first = section(0)
    if first is None:
        raise ValueError("section header")
    o, length = first
    p, ifs, last_ts = length, [], 0
    if_first = 1  # interface numbers run on across sections
    while True:
        if p == len(data):
            return out, True, p
        if len(data) - p < 12:
            return out, False, p
        btype = struct.unpack_from(o + "I", data, p)[0]
        if btype == 0x0A0D0D0A:
            nxt = section(p)
            if nxt is None:
                return out, False, p
            o, length = nxt
            p, ifs, if_first = p + length, [], if_first + len(ifs)
            continue
        blen = struct.unpack_from(o + "I", data, p + 4)[0]
        if blen < 12 or blen % 4 or blen > len(data) - p or struct.unpack_from(o + "I", data, p + blen - 4)[0] != blen:
            return out, False, p
        body_end = p + blen - 4
        if btype == 1:
            if blen < 20:
                return out, False, p
            linktype, _, snaplen = struct.unpack_from(o + "HHI", data, p + 8)
            units, binary, offset = 10**6, False, 0
            q = p + 16
            while body_end - q >= 4:
                code, olen = struct.unpack_from(o + "HH", data, q)
                if code == 0 or olen > body_end - q - 4:
                    break
                if code == 9 and olen >= 1:
                    r = data[q + 4]
                    if (r & 0x80 and (r & 0x7F) > 63) or (not r & 0x80 and r > 18):
                        return out, False, p
                    units, binary = (2 ** (r & 0x7F), True) if r & 0x80 else (10**r, False)
                elif code == 14 and olen == 8:
                    offset = struct.unpack_from(o + "q", data, q + 4)[0] * 10**9
                q += 4 + ((olen + 3) & ~3)
            ifs.append((linktype, snaplen, units, offset))
        elif btype in (2, 6):
            if blen < 32:
                return out, False, p
            iface = struct.unpack_from(o + ("I" if btype == 6 else "H"), data, p + 8)[0]
            high, low, incl, orig = struct.unpack_from(o + "IIII", data, p + 12)
            if incl > MAX_CAPLEN or incl > body_end - (p + 28) or iface >= len(ifs):
                return out, False, p
            linktype, _, units, offset = ifs[iface]
            last_ts = ((((high << 32) | low) * 10**9) // units + offset) % 2**64
            direction, q = DIR_UNKNOWN, p + 28 + ((incl + 3) & ~3)
            while body_end - q >= 4:
                code, olen = struct.unpack_from(o + "HH", data, q)
                if code == 0:
                    break
                if code == 2 and olen == 4 and body_end - q >= 8:
                    bits = struct.unpack_from(o + "I", data, q + 4)[0] & 3
                    direction = {1: DIR_INGRESS, 2: DIR_EGRESS}.get(bits, DIR_UNKNOWN)
                    break
                q += 4 + ((olen + 3) & ~3)
            out.append((p + 28, incl, orig, last_ts, linktype, if_first + iface, direction))
        elif btype == 3:
            if blen < 16 or not ifs:
                return out, False, p
            orig = struct.unpack_from(o + "I", data, p + 8)[0]
            incl = min(orig, body_end - (p + 12))
            if ifs[0][1] > 0:
                incl = min(incl, ifs[0][1])
            if incl > MAX_CAPLEN:
                return out, False, p
            out.append((p + 12, incl, orig, last_ts, ifs[0][0], if_first, DIR_UNKNOWN))
        p += blen


def assert_same_as_twin(data: bytes, max_packets: int = 65536) -> CaptureFile | None:
    """Open ``data`` with the reader and the twin; both must agree on everything."""
    try:
        expected = twin_read(data)
    except ValueError:
        with pytest.raises(CaptureError):
            CaptureFile.from_bytes(data, "fuzz.pcap")
        return None
    capture = CaptureFile.from_bytes(data, "fuzz.pcap")
    got = records(capture, max_packets)
    assert (got, capture.complete, capture.bytes_read) == expected
    assert capture.packets_read == len(got)
    assert (capture.error is None) == capture.complete
    if capture.error:
        assert capture.error.startswith("fuzz.pcap: ") and "\n" not in capture.error
    return capture


# --- every public capture ------------------------------------------------------------------


@needs_shared
@needs_tshark
@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_every_shared_capture_reads_as_tshark_reads_it(path):
    rc, frames = tshark_frames(path)
    if rc != 0 and not frames:  # tshark cannot read it: neither may we
        with pytest.raises(CaptureError, match=path.name):
            open_capture(path)
        return
    capture = open_capture(path)
    cols = read_all(capture, max_packets=7)  # small batches: the walk resumes many times
    expected = [(epoch_ns(f[0]), int(f[1]), int(f[2])) for f in frames]
    got = list(zip(cols["ts_ns"].tolist(), cols["caplen"].tolist(), cols["origlen"].tolist()))
    assert got == expected
    assert capture.complete == (rc == 0) and capture.packets_read == len(expected)
    assert capture.bytes_read == capture.size or not capture.complete


@needs_shared
@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_every_shared_capture_walks_as_the_python_twin(path):
    assert_same_as_twin(path.read_bytes(), max_packets=5)


@needs_shared
@needs_tshark
@pytest.mark.parametrize("path", [p for p in CAPTURES if p.read_bytes()[:4] == b"\x0a\x0d\x0d\x0a"],
                         ids=lambda p: p.name)
def test_pcapng_interfaces_link_types_and_directions_match_tshark(path):
    _, frames = tshark_frames(path, "frame.interface_id", "frame.packet_flags_direction",
                              "frame.encap_type")
    cols = read_all(open_capture(path))
    assert cols["ifindex"].tolist() == [int(f[3]) + 1 for f in frames]
    to_dir = {1: DIR_INGRESS, 2: DIR_EGRESS}
    assert cols["direction"].tolist() == [to_dir.get(int(f[4] or "0", 16) & 3, DIR_UNKNOWN) for f in frames]
    assert set(cols["linktype"].tolist()) == {1}  # all Ethernet (wiretap encapsulation 1)
    assert {f[5] for f in frames} == {"1"}


@needs_shared
def test_directions_of_the_epb_flags_capture():
    cols = read_all(open_capture(SHARED / "nfstream__mpeg.pcap"))
    assert set(cols["direction"].tolist()) == {DIR_INGRESS, DIR_EGRESS}


@needs_shared
def test_pcap_with_invalid_version_is_rejected():
    path = SHARED / "libpcap__pcap-invalid-version-1.pcap"
    with pytest.raises(CaptureError) as err:
        open_capture(path)
    message = str(err.value)
    assert message.startswith(str(path)) and "version 1.4" in message and "\n" not in message


# --- headers that cannot be read ------------------------------------------------------------

GOOD_PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)


@pytest.mark.parametrize("data, cause", [
    (b"", "empty file"),
    (b"\xd4\xc3", "magic d4c3"),
    (b"hello world, not a capture", "not a pcap or pcapng file"),
    (GOOD_PCAP_HEADER[:20], "header cut off"),
    (struct.pack("<IHHiIII", 0xA1B2C3D4, 3, 0, 0, 0, 65535, 1), "version 3.0"),
    (struct.pack(">IHHiIII", 0xA1B2C3D4, 2, 5, 0, 0, 65535, 1), "version 2.5"),
    (shb("<")[:20], "cut off"),
    (shb("<").replace(b"\x4d\x3c\x2b\x1a", b"\x4d\x3c\x2b\x1b"), "byte-order magic"),
    (shb(">", major=2), "version 2.0"),
    (shb("<")[:-4] + b"\0\0\0\0", "trailing block length"),
], ids=["empty", "two-octets", "text", "short-pcap", "pcap-3.0", "pcap-2.5", "short-shb", "bom",
        "pcapng-2.0", "shb-trailer"])
def test_unusable_headers_raise_capture_error(tmp_path, data, cause):
    path = tmp_path / "bad.cap"
    path.write_bytes(data)
    with pytest.raises(CaptureError) as err:
        open_capture(path)
    assert str(err.value).startswith(f"{path}: ") and cause in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_directory_raise_capture_error(tmp_path):
    with pytest.raises(CaptureError, match="no-such.pcap: cannot read"):
        open_capture(tmp_path / "no-such.pcap")
    with pytest.raises(CaptureError, match="cannot read"):
        open_capture(tmp_path)
    assert issubclass(CaptureError, ValueError)


def test_pcap_with_dg_ux_version_543_is_read():
    data = struct.pack("<IHHiIII", 0xA1B2C3D4, 543, 0, 0, 0, 65535, 1)
    assert CaptureFile.from_bytes(data).format == "pcap"


# --- synthetic files ------------------------------------------------------------------------


def some_frames(n: int = 20) -> list[tuple[int, bytes, int]]:
    rng = random.Random(5)
    out = []
    for i in range(n):
        frame = ethernet_ipv4_udp("10.0.0.1", "10.0.0.2", 1000 + i, 53, bytes(rng.randrange(0, 120)))
        out.append((T0 + i * 1_234_567 + rng.randrange(10**6), frame, len(frame) + rng.choice([0, 0, 7])))
    return out


@pytest.mark.parametrize("byte_order", ["<", ">"])
@pytest.mark.parametrize("nanosecond", [False, True])
def test_written_pcap_reads_back_exactly(tmp_path, byte_order, nanosecond):
    path = tmp_path / "w.pcap"
    packets = some_frames()
    write_pcap(path, packets, linktype=228 if byte_order == ">" else 1, byte_order=byte_order,
               nanosecond=nanosecond)
    with open_capture(path) as capture:
        got = records(capture, max_packets=3)
        assert capture.complete and capture.error is None and capture.bytes_read == capture.size
        assert capture.size == os.path.getsize(path) and capture.packets_read == len(packets)
    offset = 24
    for (ts, frame, origlen), row in zip(packets, got):
        want_ts = ts if nanosecond else ts // 1000 * 1000
        # interface 1: the file's one
        assert row == (offset + 16, len(frame), origlen, want_ts, 228 if byte_order == ">" else 1, 1, DIR_UNKNOWN)
        offset += 16 + len(frame)
    batch = next(CaptureFile(path).batches(1))
    assert isinstance(batch, RecordBatch) and batch.frame(0) == packets[0][1]


@needs_tshark
@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_written_pcap_times_agree_with_tshark(tmp_path, byte_order):
    path = tmp_path / "w.pcap"
    write_pcap(path, some_frames(), byte_order=byte_order, nanosecond=True)
    _, frames = tshark_frames(path)
    cols = read_all(open_capture(path))
    assert cols["ts_ns"].tolist() == [epoch_ns(f[0]) for f in frames]


def test_batches_respect_max_packets_and_resume(tmp_path):
    path = tmp_path / "w.pcap"
    write_pcap(path, some_frames(50))
    whole = records(open_capture(path))
    for size in (1, 2, 7, 49, 50, 51, 10_000):
        capture = open_capture(path)
        batches = list(capture.batches(size))
        assert all(1 <= len(b) <= size for b in batches)
        assert [b.first_packet for b in batches] == list(range(0, 50, size))[:len(batches)]
        assert records(open_capture(path), size) == whole
    capture = open_capture(path)
    first = next(capture.batches(10))
    rest = list(capture.batches(100))  # a second call continues where the first stopped
    assert len(first) + sum(map(len, rest)) == 50 and rest[0].first_packet == 10
    with pytest.raises(ValueError):
        next(open_capture(path).batches(0))


def test_reused_batches_share_their_arrays_and_hold_the_same_records(tmp_path):
    path = tmp_path / "w.pcap"
    write_pcap(path, some_frames(50))
    whole = records(open_capture(path))
    got, arrays = [], set()
    for batch in open_capture(path).batches(8, reuse=True):
        arrays.add(batch.offset.base.ctypes.data if batch.offset.base is not None else batch.offset.ctypes.data)
        got += list(zip(*(getattr(batch, n).tolist() for n in ("offset", "caplen", "origlen", "ts_ns", "linktype",
                                                                "ifindex", "direction"))))
    assert got == whole and len(arrays) == 1


def test_pcapng_sections_resolutions_offsets_flags_and_block_types():
    frame = ethernet_ipv4_udp("10.0.0.1", "10.0.0.2", 1, 2)
    raw = frame[14:]
    le, be = "<", ">"
    data = (shb(le)
            + idb(le, 1, 0, option(le, 9, bytes([0x80 | 20])))  # 2**-20 s
            + idb(le, 1, 0, option(le, 9, bytes([9])), option(le, 14, struct.pack("<q", 100)))  # ns, +100 s
            + idb(le, 1, 0, option(le, 9, bytes([0x80 | 40])))  # 2**-40 s: exact, no overflow
            + idb(le, 1, 0, option(le, 9, bytes([12])))  # ps
            + block(le, 0x0BAD, b"custom block, skipped")
            + epb(le, 0, (1_700_000_000 << 20) + 12345, frame, flags=1)
            + epb(le, 1, 1_700_000_000 * 10**9 + 5, frame, origlen=1500, flags=2)
            + block(le, 5, b"\0" * 16)  # interface statistics: skipped
            + epb(le, 2, (1_000_000 << 40) + 999_999, frame, flags=3)
            + epb(le, 3, 1_000_000 * 10**12 + 123_456_789, frame)
            + spb(le, frame)  # no time stamp: the previous packet's
            + shb(be)  # a new section, other byte order: interface ids restart, numbers run on
            + idb(be, 101, 30)
            + epb(be, 0, 1_700_000_001 * 10**6 + 7, raw)
            + spb(be, raw)  # cut to the interface's snaplen 30
            + pb(be, 0, 1_700_000_002 * 10**6, raw, flags=2))
    capture = CaptureFile.from_bytes(data)
    got = records(capture, max_packets=2)
    assert capture.complete and capture.format == "pcapng" and capture.linktype == 1
    ts = [r[3] for r in got]
    assert ts == [1_700_000_000 * 10**9 + 12345 * 10**9 // 2**20,
                  1_700_000_100 * 10**9 + 5,
                  1_000_000 * 10**9 + 999_999 * 10**9 // 2**40,
                  1_000_000 * 10**9 + 123_456,
                  1_000_000 * 10**9 + 123_456,
                  1_700_000_001_000_007_000, 1_700_000_001_000_007_000, 1_700_000_002_000_000_000]
    assert [r[4] for r in got] == [1] * 5 + [101] * 3
    assert [r[5] for r in got] == [1, 2, 3, 4, 1, 5, 5, 5]  # section 2's interface 0 is the file's 5th
    assert [r[6] for r in got] == [DIR_INGRESS, DIR_EGRESS, DIR_UNKNOWN, DIR_UNKNOWN, DIR_UNKNOWN,
                                   DIR_UNKNOWN, DIR_UNKNOWN, DIR_EGRESS]
    assert [(r[1], r[2]) for r in got] == [(42, 42), (42, 1500), (42, 42), (42, 42), (42, 42),
                                           (28, 28), (28, 28), (28, 28)]
    assert twin_read(data) == (got, True, len(data))


def test_pcapng_interfaces_and_flags_become_ingress_and_egress_interfaces():
    """Interface i of the file (across sections) is i + 1, on the side the EPB flags say; no flags: ingress."""
    frame = ethernet_ipv4_udp("10.0.0.1", "10.0.0.2", 1, 2)
    le, be = "<", ">"
    data = (shb(le) + idb(le, 1, 0) + idb(le, 1, 0) + idb(le, 1, 0)
            + epb(le, 0, 1, frame, flags=1)  # inbound on interface 0
            + epb(le, 1, 2, frame, flags=2)  # outbound on interface 1
            + epb(le, 2, 3, frame)  # no flags
            + epb(le, 2, 4, frame, flags=3)  # direction bits 3: invalid, unknown
            + spb(le, frame)  # SPB: interface 0
            + shb(be) + idb(be, 1, 0) + idb(be, 1, 0)
            + epb(be, 1, 5, frame, flags=2)  # interface 1 of section 2: the file's 5th, outbound
            + pb(be, 0, 6, frame, flags=1))  # interface 0 of section 2: the 4th, inbound
    rows = []
    for batch in CaptureFile.from_bytes(data).batches():
        out, status = np.empty(len(batch), PACKET_DTYPE), np.empty(len(batch), np.uint8)
        decode_batch(batch, out, status)
        assert (status == ST_OK).all()
        rows += [(int(r["ingress_if"]), int(r["egress_if"])) for r in out]
    assert rows == [(1, 0), (0, 2), (3, 0), (3, 0), (1, 0), (0, 5), (4, 0)]


@needs_tshark
def test_pcapng_times_agree_with_tshark(tmp_path):
    frame = ethernet_ipv6_tcp("2001:db8::1", "2001:db8::2", 1, 2)
    o = ">"
    data = (shb(o) + idb(o, 1, 0, option(o, 9, bytes([0x80 | 32])), option(o, 14, struct.pack(">q", -5)))
            + idb(o, 1, 0, option(o, 9, bytes([3])))
            + b"".join(epb(o, i % 2, (1_600_000_000 + i) * (2**32 if i % 2 == 0 else 1000) + i * 7919, frame)
                       for i in range(20)))
    path = tmp_path / "t.pcapng"
    path.write_bytes(data)
    _, frames = tshark_frames(path)
    assert read_all(open_capture(path))["ts_ns"].tolist() == [epoch_ns(f[0]) for f in frames]


@given(high=st.integers(0, 2**32 - 1), low=st.integers(0, 2**32 - 1),
       resolution=st.one_of(st.integers(0, 18).map(lambda e: (10**e, -1)),
                            st.integers(0, 63).map(lambda k: (1, k))),
       offset_s=st.integers(-2**40, 2**40))
@settings(max_examples=300, deadline=None)
def test_pcapng_time_kernel_matches_exact_arithmetic(high, low, resolution, offset_s):
    units, binary = resolution
    per_second = 2**binary if binary >= 0 else units
    offset_ns = offset_s * 10**9
    exact = ((((high << 32) | low) * 10**9) // per_second + offset_ns) % 2**64
    got = pcapng_time_ns(high, low, units, binary, np.uint64(offset_ns % 2**64))
    assert int(got) == exact


# --- damaged files -------------------------------------------------------------------------


def damaged_inputs(tmp_path: Path) -> dict[str, bytes]:
    """Small captures whose every truncation is tested: pcap µs, pcap ns BE, pcapng (options, 2 sections)."""
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    write_pcap(a, [(ts, f, o) for ts, f, o in some_frames(6)])
    write_pcap(b, [(ts, f) for ts, f, _ in some_frames(4)], byte_order=">", nanosecond=True)
    frame = ethernet_ipv4_udp("10.0.0.1", "10.0.0.2", 1, 2, b"abc")
    ng = (shb("<") + idb("<", 1, 0, option("<", 9, bytes([9])))
          + epb("<", 0, T0, frame, flags=1) + spb("<", frame) + shb(">") + idb(">", 1, 64)
          + pb(">", 0, 1234, frame, flags=2) + epb(">", 0, 99, frame))
    return {"pcap": a.read_bytes(), "pcap-ns-be": b.read_bytes(), "pcapng": ng}


@pytest.mark.parametrize("kind", ["pcap", "pcap-ns-be", "pcapng"])
def test_truncated_at_every_offset_yields_the_readable_prefix(tmp_path, kind):
    data = damaged_inputs(tmp_path)[kind]
    full = records(CaptureFile.from_bytes(data))
    for cut in range(len(data)):
        capture = assert_same_as_twin(data[:cut], max_packets=3)
        if capture is None:  # the file header itself is cut
            assert cut < 28
            continue
        got = records(CaptureFile.from_bytes(data[:cut]))
        assert got == full[:len(got)]
        whole = [r for r in full if r[0] + r[1] <= cut]
        assert len(got) in (len(whole), len(whole) - 1)  # a pcapng options tail may be cut too


def test_truncation_message_names_file_offset_packet_and_sizes(tmp_path):
    path = tmp_path / "trace.pcap"
    frames = [(T0 + i, ethernet_ipv4_udp("10.0.0.1", "10.0.0.2", i, 2, b"x" * 1472)) for i in range(3)]
    write_pcap(path, frames)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    capture = open_capture(path)
    batches = list(capture.batches())
    assert sum(map(len, batches)) == 2 and capture.packets_read == 2 and not capture.complete
    record_at = 24 + 2 * (16 + 1514)
    assert capture.bytes_read == record_at
    assert capture.error == (f"{path}: truncated record at offset {record_at} (packet 3): "
                             f"{len(data) - 100 - record_at} octets left, record needs 1530")
    path.write_bytes(data[:record_at + 10])
    capture = open_capture(path)
    list(capture.batches())
    assert capture.error == (f"{path}: truncated record header at offset {record_at} (packet 3): "
                             "10 octets left, record header needs 16")


def test_absurd_caplen_stops_the_walk():
    data = bytearray(GOOD_PCAP_HEADER + struct.pack("<IIII", 1, 0, 4, 4) + b"abcd"
                     + struct.pack("<IIII", 2, 0, MAX_CAPLEN + 1, 70000) + b"\0" * (MAX_CAPLEN + 1))
    capture = CaptureFile.from_bytes(bytes(data), "big.pcap")
    assert len(records(capture)) == 1 and not capture.complete
    assert capture.error == f"big.pcap: bad record at offset 44 (packet 2): caplen {MAX_CAPLEN + 1} exceeds {MAX_CAPLEN}"
    struct.pack_into("<I", data, 44 + 8, MAX_CAPLEN)  # the biggest sane one is read
    capture = CaptureFile.from_bytes(bytes(data[:-1]))
    assert len(records(capture)) == 2 and capture.complete


def caplen_beyond_block(o: str, frame: bytes) -> bytes:
    damaged = bytearray(epb(o, 0, 1, frame))
    struct.pack_into(o + "I", damaged, 20, 400)
    return bytes(damaged)


@pytest.mark.parametrize("damage, cause", [
    (lambda o, f: struct.pack(o + "II", 6, 30) + bytes(18) + struct.pack(o + "I", 30), "inconsistent lengths"),
    (lambda o, f: epb(o, 0, 1, f)[:-4] + struct.pack(o + "I", 999), "inconsistent lengths"),
    (caplen_beyond_block, "inconsistent lengths"),
    (lambda o, f: block(o, 6, bytes(8)), "inconsistent lengths"),  # too short for an EPB
    (lambda o, f: epb(o, 5, 1, f), "undefined interface"),
    (lambda o, f: idb(o, 1, 0, option(o, 9, bytes([40]))), "if_tsresol"),
    (lambda o, f: block(o, 1, bytes(4)), "interface description block"),
    (lambda o, f: shb(o, major=7), "version 7.0"),
], ids=["length-not-4n", "trailer", "caplen", "short-epb", "interface", "tsresol", "short-idb", "shb-version"])
@pytest.mark.parametrize("o", ["<", ">"])
def test_inconsistent_pcapng_blocks_stop_the_walk(o, damage, cause):
    frame = ethernet_ipv4_udp("10.0.0.1", "10.0.0.2", 1, 2)
    good = shb(o) + idb(o) + epb(o, 0, 10, frame)
    data = good + damage(o, frame) + epb(o, 0, 11, frame)
    capture = assert_same_as_twin(data)
    assert capture.packets_read == 1 and not capture.complete and capture.bytes_read == len(good)
    assert cause in capture.error and f"offset {len(good)}" in capture.error and "(packet 2)" in capture.error


@pytest.mark.parametrize("seed", range(20))
def test_random_garbage_after_a_valid_header_never_raises(seed):
    rng = random.Random(seed)
    garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000)))
    frame = ethernet_ipv4_udp("10.0.0.1", "10.0.0.2", 1, 2)
    one_record = GOOD_PCAP_HEADER + struct.pack("<IIII", 0, 0, len(frame), len(frame)) + frame
    for head, whole_records in ((GOOD_PCAP_HEADER, 0), (one_record, 1), (shb("<") + idb("<"), 0),
                                (shb(">") + idb(">") + epb(">", 0, 1, frame), 1)):
        capture = assert_same_as_twin(head + garbage)
        assert capture is not None and capture.packets_read >= whole_records


def mutations() -> st.SearchStrategy[bytes]:
    """Small real and hand-made captures with bytes flipped, cut, inserted or repeated."""
    frame = ipv4("10.0.0.1", "10.0.0.2", 17, udp(1, 2, b"abcdef"))
    seeds = [GOOD_PCAP_HEADER + b"".join(struct.pack("<IIII", i, i, len(frame), len(frame)) + frame for i in range(3)),
             shb("<") + idb("<", 101, 0, option("<", 9, bytes([0x86]))) + epb("<", 0, 5, frame, flags=2)
             + spb("<", frame) + pb("<", 0, 7, frame),
             shb(">") + idb(">", 228, 20) + epb(">", 0, 5, frame) + shb("<") + idb("<") + spb("<", frame)]
    for name in ("dnscap__sll2.pcap", "tcpdump__tcp-handshake-nano.pcap", "pcapplusplus__QinQ_802.1_AD.pcapng"):
        if (SHARED / name).exists():
            seeds.append((SHARED / name).read_bytes())

    @st.composite
    def mutated(draw) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 6))):
            op = draw(st.sampled_from(["flip", "set", "cut", "insert", "dup"]))
            i = draw(st.integers(0, max(0, len(data) - 1)))
            if op == "flip" and data:
                data[i] ^= 1 << draw(st.integers(0, 7))
            elif op == "set" and data:
                data[i] = draw(st.sampled_from([0, 1, 3, 4, 0x7F, 0x80, 0xFF]))
            elif op == "cut":
                del data[i:i + draw(st.integers(1, 64))]
            elif op == "insert":
                data[i:i] = draw(st.binary(min_size=1, max_size=16))
            elif op == "dup":
                data[i:i] = data[i:i + draw(st.integers(1, 64))]
        return bytes(data)

    return st.one_of(st.binary(max_size=200), mutated())


@given(data=mutations(), max_packets=st.integers(1, 8))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzzed_captures_never_raise_and_walk_like_the_twin(data, max_packets):
    assert_same_as_twin(data, max_packets)


def test_close_releases_the_mapping(tmp_path):
    path = tmp_path / "w.pcap"
    write_pcap(path, some_frames(3))
    with open_capture(path) as capture:
        batch = next(capture.batches())
    assert len(batch) == 3 and batch.frame(2)  # still readable: the batch keeps the mapping alive
    capture = open_capture(path)
    capture.close()
    capture.close()
    assert list(capture.batches()) == []


@pytest.mark.parametrize("preset", [None, "operator"])
def test_numba_cache_lands_in_a_writable_per_user_directory(tmp_path, preset):
    """Set before numba is imported: XDG_CACHE_HOME/flowmeter/numba, or the operator's NUMBA_CACHE_DIR."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    if preset:
        env["NUMBA_CACHE_DIR"] = str(tmp_path / preset)
    run = subprocess.run([sys.executable, "-c", "import flowmeter.capture.sources.pcapfile, numba; print(numba.config.CACHE_DIR)"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    want = tmp_path / preset if preset else tmp_path / "xdg" / "flowmeter" / "numba"
    assert run.stdout.strip() == str(want)
    assert preset or want.is_dir()


# --- reading in blocks; a file cut short while it is read -------------------------------


def udp_frames(n: int, payload: int = 100) -> list[tuple[int, bytes]]:
    return [(T0 + i * 1000, ethernet_ipv4_udp("10.0.0.1", "10.0.0.2", i & 0xFFFF, 53, bytes([i & 0xFF]) * payload))
            for i in range(n)]


@pytest.mark.parametrize("block_octets", [64, 100, 1000, 4096])
def test_small_read_blocks_yield_what_the_whole_file_yields(tmp_path, block_octets):
    sources = [p for p in CAPTURES if p.stat().st_size < 2 << 20][:12]
    path = tmp_path / "frames.pcap"
    write_pcap(path, udp_frames(300, 200))
    for name in [path, *sources]:
        data = Path(name).read_bytes()
        try:
            CaptureFile.from_bytes(data, str(name))
        except CaptureError as exc:
            with pytest.raises(CaptureError, match=re.escape(str(exc))):
                open_capture(name, block_octets=block_octets)
            continue
        for max_packets in (3, 65536):
            whole = CaptureFile.from_bytes(data, str(name))
            want = [(b.frame(i), int(b.ts_ns[i]), int(b.ifindex[i]))
                    for b in whole.batches(max_packets) for i in range(len(b))]
            capture = open_capture(name, block_octets=block_octets)
            batches = list(capture.batches(max_packets))  # not reused: each keeps its own buffer
            got = [(b.frame(i), int(b.ts_ns[i]), int(b.ifindex[i])) for b in batches for i in range(len(b))]
            assert got == want, name
            assert (capture.error, capture.complete, capture.bytes_read) == (whole.error, whole.complete,
                                                                             whole.bytes_read)


def test_a_file_cut_while_it_is_read_ends_with_one_line_after_what_was_read(tmp_path):
    path = tmp_path / "cut.pcap"
    frames = udp_frames(1000)
    write_pcap(path, frames)
    record = 16 + len(frames[0][1])
    capture = open_capture(path, block_octets=50 * record)
    batches = capture.batches(20, reuse=True)
    first = next(batches)
    assert [first.frame(i) for i in range(20)] == [f for _, f in frames[:20]]
    os.truncate(path, 24 + 130 * record + 7)  # another process cuts the file: 130 records and a bit stay
    got = 20 + sum(len(b) for b in batches)
    # the first block of 50 records was read before the cut, the rest of the file after it
    assert got == capture.packets_read == 130 and not capture.complete
    assert capture.error == (f"{path}: file shrank to {24 + 130 * record + 7} octets while being read; "
                             f"stopped at frame 131 (offset {24 + 130 * record})")


def test_a_file_cut_inside_the_first_block_is_read_as_it_was(tmp_path):
    """What a block read holds stays: the cut shows at the next read (here at the end)."""
    path = tmp_path / "cut.pcap"
    write_pcap(path, udp_frames(100))
    size = path.stat().st_size
    capture = open_capture(path)
    os.truncate(path, 1000)
    assert sum(len(b) for b in capture.batches()) == 100 and capture.complete and capture.bytes_read == size


def _open_by(pids: list[int], path: str) -> bool:
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                    return True
            except OSError:
                pass
    return False


def test_replay_of_a_capture_cut_by_another_process_exits_1_with_one_line(tmp_path):
    """A memory-mapped file cut short kills its reader with SIGBUS; read in blocks, the cut is one line."""
    import json
    import threading
    import time

    import psutil

    from tests.support.pcapwrite import write_pcap_template
    path = tmp_path / "big.pcap"
    n = 600_000
    template = ethernet_ipv4_udp("10.0.0.1", "10.0.0.2", 1000, 53, b"q" * 60)
    write_pcap_template(path, template, T0 + np.arange(n, dtype=np.uint64) * 1000,
                        {34: (">u2", np.arange(n) % 50_000)})
    size = path.stat().st_size
    cut_to = size // 7 + 3
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"FlowMetadata": {"IpFixCollectors": [f"File/{tmp_path / 'out.ipfix'}"],
                                                    "StatisticsIntervalSeconds": 0, "Workers": 1}}))
    proc = subprocess.Popen([sys.executable, "-m", "flowmeter.cli", "replay", str(path), "--profile", str(profile)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    cut = threading.Event()

    def cut_when_reading() -> None:
        """The other process: cut the file once a capture process has it open and has read a first
        block of it (at least 1 MiB more than it had read when the file was seen open), so that it
        knew the file's whole size before the cut; cut at open, the file would be one that was
        simply short from the start (its own one line: a truncated record)."""
        me = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        reader, before = None, 0
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if reader is None:
                    for pid in [proc.pid] + [c.pid for c in me.children(recursive=True)]:
                        if _open_by([pid], str(path)):
                            reader = psutil.Process(pid)
                            before = reader.io_counters().read_chars
                            break
                elif reader.io_counters().read_chars - before >= 1 << 20:
                    os.truncate(path, cut_to)
                    cut.set()
                    return
            except psutil.Error:
                return
            time.sleep(0.001)

    cutter = threading.Thread(target=cut_when_reading)
    cutter.start()
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        cutter.join()
    assert cut.is_set(), err
    assert proc.returncode == 1, (proc.returncode, err)  # not -7 (SIGBUS), nor any other death
    lines = [line for line in err.splitlines() if "shrank" in line]
    assert len(lines) == 1, err
    m = re.fullmatch(rf"flowmeter: {re.escape(str(path))}: file shrank to {cut_to} octets while being read; "
                     r"stopped at frame (\d+) \(offset (\d+)\)", lines[0])
    assert m, lines[0]
    record = 16 + len(template)
    frame, offset = int(m[1]), int(m[2])
    assert offset == 24 + (frame - 1) * record and offset <= size
    assert "Traceback" not in err and "SIGBUS" not in err
    assert f"{frame - 1:,} frames" in err  # every frame before it was metered


def test_a_read_error_past_the_header_ends_with_one_line_after_what_was_read(tmp_path, monkeypatch):
    import errno

    from flowmeter.capture.sources import pcapfile
    path = tmp_path / "eio.pcap"
    frames = udp_frames(1000)
    write_pcap(path, frames)
    record = 16 + len(frames[0][1])
    capture = open_capture(path, block_octets=50 * record)

    def failing_read(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(pcapfile.os, "preadv", failing_read)
    assert sum(len(b) for b in capture.batches()) == 49 and not capture.complete  # the first block's
    # the read that failed is the next block's, from where the first ended (inside record 50)
    assert capture.error == f"{path}: cannot read at offset {50 * record}: Input/output error"
    assert capture.bytes_read == 24 + 49 * record
