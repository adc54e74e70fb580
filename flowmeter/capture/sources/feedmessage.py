"""The datapath feed's messages: schema version 1, checked frame by frame into packet rows.

``FeedDecoder.decode(octets)`` turns one message of an overlay agent into
``PACKET_DTYPE`` rows, or counts why it cannot (docs/feed.md is the
contract; ``flowmeter.feed`` is the socket that receives the messages).
It holds no socket, so every rule is testable and fuzzable alone.

Memory: msgpack turns one octet into a whole object (``0x80`` is an empty
map, some 64 octets of Python), so an unchecked 1 MiB message can become a
million maps (measured: 73 MiB traced, 169 MiB of resident growth) before
the frame count is even looked at. The unpacker is therefore told what a
legal message can hold: an array of at most ``max_frames`` entries, maps of
at most ``MAX_KEYS`` keys, strings of at most ``MAX_STR_OCTETS``, bin of at
most ``MAX_BIN_OCTETS``, no ext, and at most ``max_frames + CONTAINER_SLACK``
maps and arrays in all (counted by its hooks as each one is built, so an
excess stops the unpacking at once). A hostile message then costs about
what a legal message of 4096 frames of ``MAX_KEYS`` keys costs.

Clock: an agent's ``t`` is its own clock. With ``max_skew_ns`` (the profile's
``FeedClockSkewSeconds``), a frame further than that ahead of or behind this
host's clock is metered at this host's clock instead (counted ``frames with
clock skew``; the largest skew is in the rate-limited log line): meter time
only moves forward, and one frame from the far future would end every flow.
Without it (the decoder alone), a frame more than ``AHEAD_NS`` ahead is
dropped (``t in the future``).
"""
from __future__ import annotations

import logging
import re
import struct
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from flowmeter.capture.decode import LINKTYPE_RAW, FragmentMemory, decode_batch
from flowmeter.capture.direction import DirectionPolicy
from flowmeter.capture.sources import RecordBatch
from flowmeter.ipc.packets import (DROP_REASONS, DIR_EGRESS, DIR_INGRESS, FORWARDED, FWD_DROPPED_ACL_DENY, PACKET_DTYPE,
                                   ST_MALFORMED, ST_OK, ST_TRUNCATED)
from flowmeter.ipc.schema import SchemaError

__all__ = ["FeedDecoder", "RateLimitedLog", "VERSION"]

VERSION = 1
MAX_MESSAGE = 1 << 20  # octets of one message, by default
MAX_FRAMES = 4096  # frames in one message, by default
TRANSPORT_SLACK = 65536  # ZMQ_MAXMSGSIZE = max_message + this: a bit over is counted, far over refused
QUEUE_OCTETS = 64 << 20  # ZMQ_RCVHWM is chosen so that a full queue of the largest messages stays under this
MAX_AGENT = 64  # characters of "agent"
MAX_REASON = 128  # characters of "reason" (NFLOG's prefix limit)
LOG_INTERVAL_S = 10.0
AHEAD_NS = 60 * 1_000_000_000  # without max_skew_ns, "t" may run this far ahead of this host's clock, no further
MAX_SKEW_S = 5.0  # FeedClockSkewSeconds by default: further off this host's clock, "t" is clamped to it
MAX_KEYS = 32  # keys of one map: a frame has at most 16 known ones, the rest are ignored
MAX_STR_OCTETS = 512  # a str: "reason" is at most 128 characters of at most 4 octets
MAX_BIN_OCTETS = 65535  # a bin: "ip" is at most one IP packet
CONTAINER_SLACK = 16  # maps and arrays beyond the frames: the message itself, a few unknown values
MAX_AGENTS_REMEMBERED = 16

U16, U32, U64 = 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF
DIRECTIONS = {"in": DIR_INGRESS, "out": DIR_EGRESS}  # ReceivedFromPeer, SendingToPeer
PORT_PROTOCOLS = frozenset((6, 17, 33, 132, 136))  # TCP, UDP, DCCP, SCTP, UDP-Lite: as the decoder
ICMP_PROTOCOL = {4: 1, 16: 58}  # by address length: ICMP with IPv4, ICMPv6 with IPv6
FRAME_KEYS = frozenset(("t", "dir", "verdict", "reason", "peer", "ip", "len", "src", "dst", "proto",
                        "sport", "dport", "tos", "tcp_flags", "icmp_type", "icmp_code"))
_REASON_NAMES = {name.lower(): code for name, code in DROP_REASONS.items()}
_REASON_CACHE = 256  # distinct reasons remembered; an agent sends a handful
_ROW = struct.Struct("<5Q3I3H6B")  # one PACKET_DTYPE row, field by field
assert _ROW.size == PACKET_DTYPE.itemsize
_TCP_ENDPOINT = re.compile(r"tcp://(?:\[[^\]]+\]|[^:/\[\]]+):(\d{1,5})")

# Why a whole message was dropped (counter "dropped messages: CAUSE") ...
MULTIPART = "multipart"
TOO_BIG = "too big"
TRUNCATED = "truncated msgpack"
NOT_MSGPACK = "not msgpack"
NOT_MAP = "not a map"
WRONG_VERSION = "wrong version"
NO_FRAMES = "no frames list"
TOO_MANY_FRAMES = "too many frames"
BAD_AGENT = "bad agent"
OVER_LIMITS = "over msgpack limits"
UNEXPECTED = "unexpected error"  # a bug of ours, never the sender's fault
# ... and why a single frame was (counter "dropped frames: CAUSE")
FRAME_NOT_MAP = "not a map"
BAD_T = "bad t"
FUTURE_T = "t in the future"
BAD_DIR = "bad dir"
BAD_VERDICT = "bad verdict"
BAD_REASON = "bad reason"
BAD_PEER = "bad peer"
BAD_IP = "bad ip"
TWO_FORMS = "ip and src/dst"
BAD_ADDRESS = "bad address"
BAD_PROTO = "bad proto"
BAD_LEN = "bad len"
BAD_PORT = "bad port"
BAD_OCTET = "bad tos, tcp_flags or icmp"
OTHER_PROTOCOL = "field of another protocol"
NOT_IP = "not an IP header"
CUT_SHORT = "IP header cut short"
UNKNOWN_KEYS = "unknown keys"  # not a drop: frames whose extra keys were ignored
CLOCK_SKEW = "clock skew"  # not a drop: frames metered at this host's clock (counter "frames with clock skew")

EXPLAIN = {
    MULTIPART: "a feed message is one ZeroMQ part",
    TOO_BIG: "longer than max_message octets",
    TRUNCATED: "the msgpack data end early",
    NOT_MSGPACK: "invalid msgpack, a str that is not UTF-8, a map key that is not a string, or octets after the map",
    NOT_MAP: "the message is not a msgpack map",
    WRONG_VERSION: f'"v" is not {VERSION}',
    NO_FRAMES: '"frames" is missing or not an array',
    TOO_MANY_FRAMES: '"frames" (or any other array) holds more than max_frames entries',
    BAD_AGENT: f'"agent" is not a string of at most {MAX_AGENT} characters',
    OVER_LIMITS: f"a map of more than {MAX_KEYS} keys, a str of more than {MAX_STR_OCTETS} octets, "
                 f"a bin of more than {MAX_BIN_OCTETS}, an ext, or more than "
                 f"max_frames + {CONTAINER_SLACK} maps and arrays in all",
    UNEXPECTED: "an error in flowmeter (please report it with the message)",
    BAD_T: '"t" is missing or not a time in ns since the UNIX epoch (0 to 2**64-1)',
    FUTURE_T: f'"t" is more than {AHEAD_NS // 1_000_000_000} s ahead of this host\'s clock (meter time only moves '
              f'forward: one such frame would end every flow at once)',
    BAD_DIR: '"dir" is missing or not "in" or "out"',
    BAD_VERDICT: '"verdict" is missing or not "forward" or "drop"',
    BAD_REASON: f'"reason" is not a string of at most {MAX_REASON} characters or a forwardingStatus 128-191',
    BAD_PEER: '"peer" is not an integer from 0 to 2**32-1',
    BAD_IP: '"ip" is not bin (msgpack binary)',
    TWO_FORMS: 'a frame has "ip" and also "src" or "dst"',
    BAD_ADDRESS: '"src" and "dst" must be bin of 4 (IPv4) or 16 (IPv6) octets, both alike',
    BAD_PROTO: '"proto" is missing or not an integer from 0 to 255',
    BAD_LEN: '"len" is missing (metadata form) or not an integer from 1 to 2**32-1',
    BAD_PORT: '"sport" or "dport" is not an integer from 0 to 65535',
    BAD_OCTET: '"tos", "tcp_flags", "icmp_type" or "icmp_code" is not an integer from 0 to 255',
    OTHER_PROTOCOL: "non-zero ports without TCP/UDP/SCTP/DCCP/UDP-Lite, tcp_flags without TCP "
                    "or icmp_type/code without ICMP (IPv4) / ICMPv6 (IPv6)",
    NOT_IP: '"ip" does not start with an IPv4 or IPv6 header',
    CUT_SHORT: '"ip" ends inside the IP header',
}
_DECODE_CAUSES = {ST_MALFORMED: NOT_IP, ST_TRUNCATED: CUT_SHORT}


class RateLimitedLog:
    """At most one line per cause per ``interval_s``; the next one says how many were held back."""

    def __init__(self, log: Callable[[str], Any], interval_s: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self._interval_s, self._clock = log, interval_s, clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, cause: str, line: str) -> bool:
        """Log ``line`` unless a line of ``cause`` was logged less than ``interval_s`` ago; True if logged."""
        now = self._clock()
        last = self._last.get(cause)
        if last is not None and now - last < self._interval_s:
            self._held[cause] = self._held.get(cause, 0) + 1
            return False
        self._last[cause] = now
        held = self._held.pop(cause, 0)
        self._log(line if not held else f"{line} (and {held} more like it in the last {now - last:.0f} s)")
        return True


class _TooManyContainers(Exception):
    """Raised by the unpacker's hooks: the message holds more maps and arrays than a legal one."""


class _ContainerBudget:
    """The unpacker's ``object_hook`` and ``list_hook``: counts maps and arrays as msgpack builds them
    and stops the unpacking at the first one over ``limit``."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def __call__(self, container: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise _TooManyContainers
        return container


class FeedDecoder:
    """Feed messages (one msgpack map each) to ``PACKET_DTYPE`` rows, counting what it drops.

    The socket-free half of ``FeedSource``: ``decode(data)`` never raises on
    what a sender can send; it returns the rows of the message's good frames
    (possibly none).
    """

    def __init__(self, *, drop_reasons=(), max_message: int = MAX_MESSAGE, max_frames: int = MAX_FRAMES,
                 log: Callable[[str], Any] | None = None, log_interval_s: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, name: str = "feed",
                 max_skew_ns: int | None = None, wall_clock: Callable[[], int] = time.time_ns) -> None:
        if not 64 <= max_message <= 1 << 30:
            raise ValueError(f"max_message {max_message} is not from 64 to {1 << 30} octets")
        if not 1 <= max_frames <= 1 << 20:
            raise ValueError(f"max_frames {max_frames} is not from 1 to {1 << 20}")
        self.name = name
        self.max_message, self.max_frames = max_message, max_frames
        self._policy = DirectionPolicy(drop_prefixes=drop_reasons)
        self._reason_codes: dict[str, int] = {}
        self._log = RateLimitedLog(log or logging.getLogger("flowmeter.feed").warning, log_interval_s, clock)
        self._agents: set[str] = set()
        self.max_skew_ns = max_skew_ns
        self._wall_clock = wall_clock
        self._now = 0  # this host's clock (ns) when the message being decoded arrived
        self._earliest_t, self._latest_t = 0, 0  # "t" outside these goes to _off_clock
        self._skewed = 0  # frames of the message being decoded clamped to this host's clock ...
        self._worst_skew_ns = 0  # ... and the largest skew since the last log line about it
        self._counts: dict[str, int] = {"messages": 0, "frames": 0}
        self._fragments = FragmentMemory()  # the agent's frames are one stream (ICMP fragments)

    def counters(self) -> dict[str, int]:
        """``messages`` received, ``frames`` turned into rows, ``dropped messages: CAUSE``,
        ``dropped frames: CAUSE``, ``frames with unknown keys`` (kept; the keys ignored) and
        ``frames with clock skew`` (kept, at this host's clock)."""
        return dict(self._counts)

    def _count(self, key: str, n: int = 1) -> None:
        self._counts[key] = self._counts.get(key, 0) + n

    def note(self, counter: str, cause: str | None = None, line: str = "") -> None:
        """Count an event of the socket (``counter``) and, with a ``cause``, log ``line`` (rate-limited)."""
        self._count(counter)
        if cause is not None:
            self._log(f"s:{cause}", line)

    def refuse(self, cause: str, detail: str = "") -> None:
        """Count a message that is not even decoded (``MULTIPART``, ``TOO_BIG``) and drop it."""
        self._count("messages")
        self._drop_message(cause, detail)

    def _drop_message(self, cause: str, detail: str = "") -> None:
        self._count(f"dropped messages: {cause}")
        self._log(f"m:{cause}", f"{self.name}: dropped a message: {cause} ({detail or EXPLAIN[cause]})")

    def _drop_frames(self, cause: str, n: int, agent: str | None) -> None:
        self._count(f"dropped frames: {cause}", n)
        sender = f" from agent {agent!r}" if agent else ""
        self._log(f"f:{cause}", f"{self.name}: dropped {'a frame' if n == 1 else f'{n} frames'}{sender}: "
                                f"{cause} ({EXPLAIN[cause]})")

    def decode(self, data: bytes | memoryview) -> npt.NDArray | None:
        """Rows (``PACKET_DTYPE``) of the good frames of one message, or None if it was dropped whole."""
        if len(data) > self.max_message:
            self.refuse(TOO_BIG, f"{len(data)} octets, at most {self.max_message}")
            return None
        self._count("messages")
        self._now = now = self._wall_clock()
        self._skewed = 0
        if self.max_skew_ns is None:
            self._earliest_t, self._latest_t = 0, now + AHEAD_NS
        else:
            self._earliest_t, self._latest_t = now - self.max_skew_ns, now + self.max_skew_ns
        try:
            message = self._unpack(data)
            agent, frames = self._check_message(message)
            return self._rows(agent, frames)
        except SchemaError as exc:
            self._drop_message(str(exc))
        except (ValueError, TypeError, KeyError, OverflowError, struct.error) as exc:
            self._drop_message(UNEXPECTED, f"{type(exc).__name__}: {exc}"[:200])
        return None

    def _unpack(self, data: bytes | memoryview) -> Any:
        """The message's msgpack value, unpacked within the limits of a legal message (module docstring)."""
        budget = _ContainerBudget(self.max_frames + CONTAINER_SLACK)
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=self.max_message,
                                    max_array_len=self.max_frames, max_map_len=MAX_KEYS,
                                    max_str_len=MAX_STR_OCTETS, max_bin_len=MAX_BIN_OCTETS, max_ext_len=0,
                                    object_hook=budget, list_hook=budget)
        unpacker.feed(data)
        try:
            message = unpacker.unpack()
        except msgpack.OutOfData:
            raise SchemaError(TRUNCATED) from None
        except _TooManyContainers:
            raise SchemaError(OVER_LIMITS) from None
        except ValueError as exc:  # msgpack says "N exceeds max_map_len(32)" (its limits are all ValueError)
            why = str(exc)
            raise SchemaError(TOO_MANY_FRAMES if "exceeds max_array_len" in why else
                              OVER_LIMITS if "exceeds max_" in why else NOT_MSGPACK) from None
        except Exception:  # hostile input raises many types: FormatError, StackError, UnicodeDecodeError, ...
            raise SchemaError(NOT_MSGPACK) from None
        if unpacker.tell() != len(data):
            raise SchemaError(NOT_MSGPACK)
        return message

    def _check_message(self, message: Any) -> tuple[str | None, list]:
        if type(message) is not dict:
            raise SchemaError(NOT_MAP)
        version = message.get("v")
        if type(version) is not int or version != VERSION:
            raise SchemaError(WRONG_VERSION)
        frames = message.get("frames")
        if type(frames) is not list:
            raise SchemaError(NO_FRAMES)
        if len(frames) > self.max_frames:
            raise SchemaError(TOO_MANY_FRAMES)
        agent = message.get("agent")
        if agent is not None and (type(agent) is not str or len(agent) > MAX_AGENT):
            raise SchemaError(BAD_AGENT)
        if agent is not None and agent not in self._agents and len(self._agents) < MAX_AGENTS_REMEMBERED:
            self._agents.add(agent)
            self._log(f"a:{agent}", f"{self.name}: first message from agent {agent!r}")
        return agent, frames

    def _rows(self, agent: str | None, frames: list) -> npt.NDArray:
        """Validate every frame, pack the good ones into rows, decode the header frames."""
        buf = bytearray(_ROW.size * len(frames))
        good = 0
        headers: list[bytes] = []  # "ip" of the header frames ...
        header_rows: list[int] = []  # ... and their row numbers
        dropped: dict[str, int] = {}
        unknown = 0
        for frame in frames:
            try:
                ip = self._pack_frame(frame, buf, good)
            except SchemaError as exc:
                cause = str(exc)
                dropped[cause] = dropped.get(cause, 0) + 1
                continue
            if ip is not None:
                headers.append(ip)
                header_rows.append(good)
            if not frame.keys() <= FRAME_KEYS:
                unknown += 1
                self._note_unknown(frame)
            good += 1
        rows = np.frombuffer(buf, PACKET_DTYPE, count=good)
        if headers:
            rows = self._decode_headers(rows, headers, np.array(header_rows, np.intp), dropped)
        for cause, n in dropped.items():
            self._drop_frames(cause, n, agent)
        if unknown:
            self._count(f"frames with {UNKNOWN_KEYS}", unknown)
        if self._skewed:
            self._note_skew(agent)
        self._count("frames", len(rows))
        return rows

    def _off_clock(self, t: int) -> int:
        """The time of a frame whose ``t`` lies outside [earliest, latest]: this host's clock, counted
        (``max_skew_ns``); without a bound, a ``t`` too far ahead drops the frame (``FUTURE_T``)."""
        if self.max_skew_ns is None:
            raise SchemaError(FUTURE_T)
        skew = t - self._now
        if abs(skew) > abs(self._worst_skew_ns):
            self._worst_skew_ns = skew
        self._skewed += 1
        return self._now

    def _note_skew(self, agent: str | None) -> None:
        n, self._skewed = self._skewed, 0
        self._count(f"frames with {CLOCK_SKEW}", n)
        worst = self._worst_skew_ns / 1e9
        sender = f" from agent {agent!r}" if agent else ""
        if self._log(CLOCK_SKEW, f"{self.name}: metered {'a frame' if n == 1 else f'{n} frames'}{sender} at this "
                                 f"host's clock: their time was up to {abs(worst):.3f} s "
                                 f"{'ahead of' if worst > 0 else 'behind'} it (more than "
                                 f"FeedClockSkewSeconds, {self.max_skew_ns / 1e9:g} s)"):
            self._worst_skew_ns = 0

    def _note_unknown(self, frame: dict) -> None:
        extra = sorted(repr(k)[:40] for k in frame.keys() - FRAME_KEYS)[:3]
        self._log(UNKNOWN_KEYS, f"{self.name}: ignored frame keys this version does not know: {', '.join(extra)}")

    def _decode_headers(self, rows: npt.NDArray, headers: list[bytes], at: npt.NDArray[np.intp],
                        dropped: dict[str, int]) -> npt.NDArray:
        """Decode the "ip" octets of the header frames (raw IP records) into their rows; drop
        the rows whose header is no IP header."""
        n = len(headers)
        caplen = np.fromiter(map(len, headers), np.uint32, n)
        offset = np.zeros(n, np.uint64)
        np.cumsum(caplen[:-1], out=offset[1:])
        given = rows["l3_bytes"][at]  # "len", or 0
        batch = RecordBatch(np.frombuffer(b"".join(headers), np.uint8), offset, caplen,
                            np.maximum(given, caplen), rows["ts_ns"][at], np.full(n, LINKTYPE_RAW, np.uint16),
                            np.zeros(n, np.uint32), rows["direction"][at])
        decoded = np.empty(n, PACKET_DTYPE)
        status = np.empty(n, np.uint8)
        decode_batch(batch, decoded, status, self._fragments)
        decoded["fwd_status"] = rows["fwd_status"][at]
        decoded["ingress_if"] = rows["ingress_if"][at]  # the peer, as _pack_frame placed it
        decoded["egress_if"] = rows["egress_if"][at]
        decoded["l3_bytes"] = np.where(given > 0, given, decoded["l3_bytes"])  # the agent's "len" wins
        rows[at] = decoded
        bad = status != ST_OK
        if not bad.any():
            return rows
        for code, count in zip(*np.unique(status[bad], return_counts=True)):
            cause = _DECODE_CAUSES.get(int(code), NOT_IP)  # raw IP: no other status can occur
            dropped[cause] = dropped.get(cause, 0) + int(count)
        keep = np.ones(len(rows), bool)
        keep[at[bad]] = False
        return rows[keep]

    def _pack_frame(self, f: Any, buf: bytearray, i: int) -> bytes | None:
        """Check one frame and pack its row at ``buf[i]``; its "ip" octets (header form) or None.
        ``SchemaError(cause)`` if it is bad.

        Every frame passes here, so the checks are written out (``type(x) is int`` also
        refuses bools) rather than calling a function per field: that costs a third more.
        """
        if type(f) is not dict:
            raise SchemaError(FRAME_NOT_MAP)
        get = f.get
        t = get("t")
        if type(t) is not int or not 0 <= t <= U64:
            raise SchemaError(BAD_T)
        if not self._earliest_t <= t <= self._latest_t:
            t = self._off_clock(t)
        d = get("dir")
        if type(d) is not str or d not in DIRECTIONS:
            raise SchemaError(BAD_DIR)
        verdict = get("verdict")
        if type(verdict) is str and verdict == "forward":
            fwd = FORWARDED
        elif type(verdict) is str and verdict == "drop":
            fwd = self.drop_status(get("reason"))
        else:
            raise SchemaError(BAD_VERDICT)
        peer = get("peer", 0)
        if type(peer) is not int or not 0 <= peer <= U32:
            raise SchemaError(BAD_PEER)
        # Each peer is an interface of its own: "in" came from it, "out" leaves to it (unless dropped).
        in_if, out_if = (peer, 0) if d == "in" else (0, peer if fwd == FORWARDED else 0)
        length = get("len")
        if length is not None and (type(length) is not int or not 0 < length <= U32):
            raise SchemaError(BAD_LEN)
        ip = get("ip")
        if ip is not None:
            if type(ip) is not bytes:
                raise SchemaError(BAD_IP)
            if "src" in f or "dst" in f:
                raise SchemaError(TWO_FORMS)
            _ROW.pack_into(buf, i * _ROW.size, t, 0, 0, 0, 0, length or 0, in_if, out_if, 0, 0, 0, 0, 0, 0, 0,
                           DIRECTIONS[d], fwd)
            return ip
        src, dst = get("src"), get("dst")
        if type(src) is not bytes or type(dst) is not bytes or len(src) != len(dst) or len(src) not in (4, 16):
            raise SchemaError(BAD_ADDRESS)
        proto = get("proto")
        if type(proto) is not int or not 0 <= proto <= 255:
            raise SchemaError(BAD_PROTO)
        if length is None:
            raise SchemaError(BAD_LEN)
        sport, dport = get("sport", 0), get("dport", 0)
        if type(sport) is not int or type(dport) is not int or not (0 <= sport <= U16 and 0 <= dport <= U16):
            raise SchemaError(BAD_PORT)
        tos, flags = get("tos", 0), get("tcp_flags", 0)
        icmp_type, icmp_code = get("icmp_type", 0), get("icmp_code", 0)
        if (type(tos) is not int or type(flags) is not int or type(icmp_type) is not int
                or type(icmp_code) is not int or not (0 <= tos <= 255 and 0 <= flags <= 255
                                                      and 0 <= icmp_type <= 255 and 0 <= icmp_code <= 255)):
            raise SchemaError(BAD_OCTET)
        if (((sport or dport) and proto not in PORT_PROTOCOLS) or (flags and proto != 6)
                or ((icmp_type or icmp_code) and proto != ICMP_PROTOCOL[len(src)])):
            raise SchemaError(OTHER_PROTOCOL)
        s, dd = int.from_bytes(src, "big"), int.from_bytes(dst, "big")
        _ROW.pack_into(buf, i * _ROW.size, t, s >> 64, s & U64, dd >> 64, dd & U64, length, in_if, out_if, sport,
                       dport,
                       (icmp_type << 8) | icmp_code, 4 if len(src) == 4 else 6, proto, flags, tos,
                       DIRECTIONS[d], fwd)
        return None

    def drop_status(self, reason: Any) -> int:
        """forwardingStatus of a dropped frame: a ``DropPrefixes`` prefix of its reason, else a
        reason named like a DropPrefixes value ("AclDrop", ...), else a number 128-191, else AclDeny."""
        if reason is None:
            return FWD_DROPPED_ACL_DENY
        if type(reason) is int and 128 <= reason <= 191:
            return reason
        if type(reason) is not str or len(reason) > MAX_REASON:
            raise SchemaError(BAD_REASON)
        code = self._reason_codes.get(reason)
        if code is None:
            code = (self._policy.drop_status(reason.encode(errors="replace"))
                    or _REASON_NAMES.get(reason.lower(), FWD_DROPPED_ACL_DENY))
            if len(self._reason_codes) >= _REASON_CACHE:
                self._reason_codes.clear()
            self._reason_codes[reason] = code
        return code
