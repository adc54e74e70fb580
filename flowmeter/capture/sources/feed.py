"""The datapath feed: frames an overlay agent hands over ZeroMQ + msgpack.

An overlay agent (a VPN daemon that decrypts frames itself) knows more than
a capture can see: which way a frame went, whether its policy forwarded or
dropped it and why, and which peer it belongs to. ``FeedSource`` binds a
ZeroMQ PULL socket; the agent connects a PUSH socket and sends single-part
messages, each one msgpack map (schema version 1; docs/feed.md is the full
contract, with a worked example)::

    {"v": 1, "agent": "wgd/2.1", "frames": [frame, ...]}

    frame, header form:    {"t": ns, "dir": "in"|"out", "verdict": "forward"|"drop",
                            "reason": str, "peer": u32, "ip": bin, "len": u32}
    frame, metadata form:  {"t": ns, "dir": ..., "verdict": ..., "reason": ..., "peer": ...,
                            "src": bin 4|16, "dst": bin 4|16, "proto": u8, "len": u32,
                            "sport": u16, "dport": u16, "tos": u8, "tcp_flags": u8,
                            "icmp_type": u8, "icmp_code": u8}

``read`` yields ``PACKET_DTYPE`` rows (all valid): header frames are decoded
by ``decode.decode_batch`` as raw IP records (LINKTYPE_RAW), one call per
message; direction, forwardingStatus (verdict, reason through the
``DropPrefixes`` prefixes) and the interfaces come from the frame: each peer
is an interface of its own, ``ingress_if`` of what came from it ("in"),
``egress_if`` of what is sent to it ("out"; 0 when the frame was dropped).

Who may send (README, "Securing the feed"): a ``tcp://`` feed is a CurveZMQ
server (RFC 26/CURVEZMQ) and takes only agents whose public key is in its
allow-list. The allow-list is a ZAP handler (RFC 27/ZAP) of our own on the
source's context, answered inside ``read`` (no thread: the capture process
calls ``read`` at least every 0.1 s, and an agent's handshake waits for it),
so a refused agent is counted with the other counts (``refused agents:
unknown key``); a handshake that fails before ZAP is asked (an agent without
CURVE, or holding another server key) is seen on the socket's monitor
(``refused agents: failed handshake``). An ``ipc://`` socket file is made
under a umask of 0177 (nobody else can connect while it is being set up),
then given its group and mode (``FeedSocketGroup``, ``FeedSocketMode``); an
abstract ``ipc://@NAME``, which any local user can reach, only when
``FeedAbstractSocket`` allows it.

Nothing a sender does raises out of ``read``: a message of the wrong shape
is dropped whole, a bad frame alone; each is counted by cause
(``counters()``) and logged at most once per cause per ``log_interval_s``
with the number of others suppressed. The transport refuses messages far
over ``max_message`` (ZMQ_MAXMSGSIZE: the sender is disconnected and its
socket reconnects) and holds a bounded queue (ZMQ_RCVHWM).
"""

from __future__ import annotations

import errno
import grp
import os
import re
import socket
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import zmq
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from flowmeter.capture.sources import SourceError
from flowmeter.capture.sources.feedmessage import (  # noqa: F401  (the message rules, importable from here too)
    VERSION, MAX_MESSAGE, MAX_FRAMES, TRANSPORT_SLACK, QUEUE_OCTETS, MAX_AGENT, MAX_REASON, LOG_INTERVAL_S,
    AHEAD_NS, MAX_SKEW_S, MAX_KEYS, MAX_STR_OCTETS, MAX_BIN_OCTETS, CONTAINER_SLACK, OVER_LIMITS, CLOCK_SKEW,
    MAX_AGENTS_REMEMBERED, DIRECTIONS, PORT_PROTOCOLS, ICMP_PROTOCOL, FRAME_KEYS, MULTIPART,
    TOO_BIG, TRUNCATED, NOT_MSGPACK, NOT_MAP, WRONG_VERSION, NO_FRAMES, TOO_MANY_FRAMES, BAD_AGENT,
    UNEXPECTED, FRAME_NOT_MAP, BAD_T, FUTURE_T, BAD_DIR, BAD_VERDICT, BAD_REASON, BAD_PEER, BAD_IP, TWO_FORMS,
    BAD_ADDRESS, BAD_PROTO, BAD_LEN, BAD_PORT, BAD_OCTET, OTHER_PROTOCOL, NOT_IP, CUT_SHORT, UNKNOWN_KEYS,
    EXPLAIN, RateLimitedLog, FeedDecoder)
from flowmeter.capture.sources.feedmessage import _TCP_ENDPOINT

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks (RFC 27/ZAP), one per context
ZAP_DOMAIN = b"flowmeter-feed"
Z85_KEY_LENGTH = 40  # a CurveZMQ key (32 octets) in Z85 text
SOCKET_MODE = 0o600  # FeedSocketMode by default
UNKNOWN_KEY = "unknown key"  # counter "refused agents: unknown key"
FAILED_HANDSHAKE = "failed handshake"  # counter "refused agents: failed handshake"
_FAILED_HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
_KEY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
KEY_FILE_HEADER = "#   CurveZMQ certificate (ZPL), made by flowmeter keygen\n"


class FeedKeyError(ValueError):
    """A key file or key that cannot be used; the message is one line."""


@dataclass(frozen=True, slots=True)
class ServerKey:
    """``FeedServerKey``: the file's path and the key pair it holds (Z85)."""

    path: str
    public: bytes
    secret: bytes


@dataclass(frozen=True, slots=True)
class AllowedKeys:
    """``FeedAllowedKeys``: the entries as written and the agents' public keys they name (Z85)."""

    entries: tuple[str, ...]
    keys: frozenset[bytes]


@dataclass(frozen=True, slots=True)
class FeedSecurity:
    """What a feed's socket is allowed to take: the profile's feed settings, parsed."""

    server_key: ServerKey | None = None
    allowed: AllowedKeys | None = None
    socket_mode: int = SOCKET_MODE
    socket_group: str = ""  # a group name or number; "" = the process's own
    abstract: bool = False  # ipc://@NAME allowed

    @classmethod
    def of(cls, profile: Any) -> FeedSecurity:
        return cls(profile.feed_server_key, profile.feed_allowed_keys, profile.feed_socket_mode,
                   profile.feed_socket_group, profile.feed_abstract_socket)


def is_z85_key(text: str | bytes) -> bool:
    """True if ``text`` is a 40-character Z85 key (32 octets)."""
    try:
        return len(text) == Z85_KEY_LENGTH and len(z85.decode(text)) == 32
    except (ValueError, KeyError, TypeError, UnicodeError, IndexError):
        return False


def _read_key_file(path: str) -> tuple[bytes, bytes | None]:
    """(public, secret or None) of a ZPL certificate file as ``flowmeter keygen`` and zmq.auth write them."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise FeedKeyError(f"cannot read key file {path}: {exc.strerror or 'no such file'}") from None
    except (ValueError, UnicodeError):
        raise FeedKeyError(f"{path} is not a CurveZMQ certificate: no public-key line") from None
    for name, key in (("public", public), ("secret", secret)):
        if key is not None and not is_z85_key(key):
            raise FeedKeyError(f"{path}: its {name}-key is not a 40-character Z85 key")
    return public, secret


def load_server_key(path: str) -> ServerKey:
    """The server's key pair from its ``.key_secret`` file; ``FeedKeyError`` (one line) if unusable."""
    public, secret = _read_key_file(path)
    if secret is None:
        raise FeedKeyError(f"{path} holds a public key only; FeedServerKey is the .key_secret file")
    if zmq.curve_public(secret) != public:
        raise FeedKeyError(f"{path}: its public-key is not the secret-key's")
    if os.stat(path).st_mode & 0o007:
        raise FeedKeyError(f"{path} holds a secret key and other users may read it: chmod o-rwx it")
    return ServerKey(path, public, secret)


def load_allowed_keys(entries: Iterable[str]) -> AllowedKeys:
    """Agents' public keys: each entry a key file (``.key``), a directory of them, or a Z85 key."""
    entries = tuple(entries)
    keys: set[bytes] = set()
    for entry in entries:
        if os.path.isdir(entry):
            files = sorted(f for f in os.listdir(entry) if f.endswith(".key"))
            if not files:
                raise FeedKeyError(f"directory {entry} holds no .key file")
            keys.update(_read_key_file(os.path.join(entry, f))[0] for f in files)
        elif os.path.exists(entry) or os.sep in entry and not is_z85_key(entry):
            keys.add(_read_key_file(entry)[0])
        elif is_z85_key(entry):
            keys.add(entry.encode())
        else:
            raise FeedKeyError(f"{entry!r} is no key file, directory of .key files or 40-character Z85 key")
    return AllowedKeys(entries, frozenset(keys))


def write_key_pair(directory: str, name: str) -> tuple[str, str, bytes]:
    """Make a CurveZMQ key pair: ``NAME.key`` (public, mode 0644) and ``NAME.key_secret`` (both keys,
    0600) in ``directory``, ZPL certificates as zmq.auth reads them; (public path, secret path, public key).
    ``FileExistsError`` rather than overwrite a key."""
    if not _KEY_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a file name of letters, digits, '.', '_' and '-'")
    public, secret = zmq.curve_keypair()
    paths = os.path.join(directory, f"{name}.key"), os.path.join(directory, f"{name}.key_secret")
    for path in paths:
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "a key is there already; not overwritten", path)
    body = f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    secret_text = body + f'    secret-key = "{secret.decode()}"\n'
    for path, mode, text in ((paths[1], 0o600, secret_text), (paths[0], 0o644, body)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, mode)
            f.write(KEY_FILE_HEADER + text)
    return paths[0], paths[1], public


def socket_gid(group: str) -> int:
    """The group id of ``FeedSocketGroup`` (a name or a number); ``KeyError`` if there is none."""
    if group.isdigit():
        return int(group)
    return grp.getgrnam(group).gr_gid


def feed_refusal(endpoint: str, security: FeedSecurity) -> str | None:
    """Why the profile's settings do not allow a feed on ``endpoint``; None if they do."""
    if endpoint.startswith("tcp://") and (security.server_key is None or not security.allowed
                                          or not security.allowed.keys):
        return ("a tcp feed takes only agents holding CurveZMQ keys: set FeedServerKey and FeedAllowedKeys "
                "(flowmeter keygen makes them), or use ipc://PATH")
    if endpoint.startswith("ipc://@") and not security.abstract:
        return ("an abstract socket (ipc://@NAME) has no file permissions, so any local user can send to it: "
                "use ipc://PATH, or set FeedAbstractSocket to true")
    return None


def _check_endpoint(endpoint: str) -> str | None:
    """Why ``endpoint`` cannot be bound, found before ZeroMQ tries; None if it looks usable.

    libzmq replaces whatever is at an ipc path (it unlinks it, even a regular
    file) and so silently takes over a socket another process listens on;
    both are refused here.
    """
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if not path:
            return "no path after ipc://"
        if path.startswith("@"):  # Linux abstract name: the kernel refuses a taken one
            return None
        if len(path.encode()) > zmq.IPC_PATH_MAX_LEN:
            return f"the path is longer than {zmq.IPC_PATH_MAX_LEN} octets"
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return None
        except OSError as exc:
            return exc.strerror or str(exc)
        if not stat.S_ISSOCK(mode):
            return "the path exists and is not a socket"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                return None  # left behind by an earlier run: ZeroMQ replaces it
        return "address already in use (another process listens there)"
    if endpoint.startswith("tcp://"):
        m = _TCP_ENDPOINT.fullmatch(endpoint)
        if not m or not 1 <= int(m.group(1)) <= 65535:
            return "not tcp://HOST:PORT (an address or interface, a port from 1 to 65535)"
        return None
    return "not ipc://PATH or tcp://HOST:PORT"


class FeedSource:
    """The live source of a ``feed:ENDPOINT`` entry: a bound ZeroMQ PULL socket (see the module
    docstring and docs/feed.md). ``SourceError`` (one line) if the endpoint cannot be bound."""

    def __init__(self, endpoint: str, *, drop_reasons=(), max_message: int = MAX_MESSAGE,
                 max_frames: int = MAX_FRAMES, log: Callable[[str], Any] | None = None,
                 log_interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 max_skew_ns: int | None = None, security: FeedSecurity = FeedSecurity()) -> None:
        self.name = f"feed:{endpoint}"
        self.endpoint = endpoint
        self.security = security
        self._decoder = FeedDecoder(drop_reasons=drop_reasons, max_message=max_message, max_frames=max_frames,
                                    log=log, log_interval_s=log_interval_s, clock=clock, name=self.name,
                                    max_skew_ns=max_skew_ns)
        self.max_frames = max_frames
        why = _check_endpoint(endpoint) or feed_refusal(endpoint, security)
        gid = None
        if not why and security.socket_group and self._socket_file():
            try:
                gid = socket_gid(security.socket_group)
            except KeyError:
                why = f"FeedSocketGroup {security.socket_group!r} is no group of this system"
        if why:
            raise self._error(why)
        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.PULL)
        self._zap = self._monitor = None
        self._allowed = security.allowed.keys if security.allowed else frozenset()
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message + TRANSPORT_SLACK)
        self._sock.setsockopt(zmq.RCVHWM, max(8, min(1000, QUEUE_OCTETS // max_message)))
        self._ipc_inode = None
        self._closed = True  # until bound
        try:
            if endpoint.startswith("tcp://"):
                self._be_curve_server(security.server_key)
            self._bind(gid)
        except (zmq.ZMQError, OSError) as exc:
            self.close()
            why = exc.strerror.split(" (addr=")[0] if isinstance(exc, zmq.ZMQError) else exc.args[0]
            raise self._error(why) from None
        self._closed = False
        self._poller = zmq.Poller()
        for sock in (self._sock, self._zap, self._monitor):
            if sock is not None:
                self._poller.register(sock, zmq.POLLIN)

    def _socket_file(self) -> str | None:
        """The path of the ipc socket file, None for tcp or an abstract name."""
        if self.endpoint.startswith("ipc://") and not self.endpoint.startswith("ipc://@"):
            return self.endpoint[len("ipc://"):]
        return None

    def _be_curve_server(self, key: ServerKey) -> None:
        """CURVE on the PULL socket, our ZAP handler on its context (bound first: libzmq asks the
        handler that is there when an agent connects), the socket's handshake failures watched."""
        self._zap = self._ctx.socket(zmq.REP)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._zap.bind(ZAP_ENDPOINT)
        self._sock.curve_server = True
        self._sock.curve_secretkey = key.secret
        self._sock.curve_publickey = key.public
        self._sock.zap_domain = ZAP_DOMAIN
        self._sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no handler: refuse, never let everyone in
        self._monitor = self._sock.get_monitor_socket(_FAILED_HANDSHAKE_EVENTS)

    def _bind(self, gid: int | None) -> None:
        """Bind; an ipc socket file is made under umask 0177, then given its group and mode."""
        path = self._socket_file()
        if path is None:
            self._sock.bind(self.endpoint)
            return
        umask = os.umask(0o177)  # only this process's own thread makes files meanwhile
        try:
            self._sock.bind(self.endpoint)
        finally:
            os.umask(umask)
        self._ipc_inode = self._bound_inode()
        try:
            if gid is not None:
                os.chown(path, -1, gid)  # the group first: its bits never apply to the wrong group
            os.chmod(path, self.security.socket_mode)
        except OSError as exc:
            what = (f"cannot give the socket file to group {self.security.socket_group!r}" if gid is not None
                    else "cannot set the socket file's mode")
            raise OSError(f"{what}: {exc.strerror}") from None

    def _error(self, why: str) -> SourceError:
        exc = SourceError(f"{self.name}: cannot bind: {why}")
        exc.strerror = f"cannot bind: {why}"  # what sources.live.open_source puts after the source's name
        return exc

    def _bound_inode(self) -> tuple[int, int] | None:
        """(device, inode) of the ipc socket file we made, to remove it on close if still ours."""
        if self._socket_file() is None:
            return None
        try:
            st = os.lstat(self._socket_file())
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def fileno(self) -> int:
        """The socket's ZMQ_FD. Edge-triggered: it signals once when messages arrive after a
        drain, not while they wait; after a wake-up, iterate ``read(0)`` to its end. A tcp feed's
        agents are let in by ``read`` (the ZAP handler): call it at least every few seconds."""
        return self._sock.getsockopt(zmq.FD)

    def read(self, timeout_s: float) -> Iterator[npt.NDArray]:
        """``PACKET_DTYPE`` rows of the messages waiting, at most about ``max_frames`` rows per
        array; waits up to ``timeout_s`` for the first message, returns when none is left.
        Agents asking to connect meanwhile are let in or refused."""
        if self._closed or not self._wait(timeout_s):
            return
        parts: list[npt.NDArray] = []
        rows = 0
        while True:
            try:
                msg = self._sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            got = self._take(msg)
            if got is not None and len(got):
                parts.append(got)
                rows += len(got)
                if rows >= self.max_frames:
                    yield parts[0] if len(parts) == 1 else np.concatenate(parts)
                    parts, rows = [], 0
        if parts:
            yield parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a message, answering ZAP requests and noting failed
        handshakes meanwhile; True if a message is waiting."""
        deadline = time.monotonic() + timeout_s
        while True:
            ready = dict(self._poller.poll(max(0, int((deadline - time.monotonic()) * 1000 + 0.999))))
            if self._zap is not None and self._zap in ready:
                self._answer_zap()
            if self._monitor is not None and self._monitor in ready:
                self._note_handshakes()
            if self._sock in ready:
                return True
            if not ready or time.monotonic() >= deadline:
                return False

    def _answer_zap(self) -> None:
        """Answer every waiting ZAP request (RFC 27): 200 for an allowed agent's key, else 400, counted."""
        while True:
            try:
                request = self._zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(request) < 6:
                continue  # not a ZAP request: libzmq sends none such
            request_id, address, mechanism = request[1], request[3], request[5]
            key = z85.encode(request[6]) if mechanism == b"CURVE" and len(request) > 6 else b""
            if key in self._allowed:
                self._decoder.note("agents admitted")
                reply = [b"1.0", request_id, b"200", b"OK", key, b""]
            else:
                self._decoder.note(f"refused agents: {UNKNOWN_KEY}", UNKNOWN_KEY,
                                   f"{self.name}: refused an agent from {address.decode(errors='replace')}: "
                                   f"its public key {key.decode()} is not in FeedAllowedKeys")
                reply = [b"1.0", request_id, b"400", b"unknown key", b"", b""]
            self._zap.send_multipart(reply)

    def _note_handshakes(self) -> None:
        """Count the handshakes that failed before ZAP was asked (no CURVE, another server key)."""
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] & _FAILED_HANDSHAKE_EVENTS:
                self._decoder.note(f"refused agents: {FAILED_HANDSHAKE}", FAILED_HANDSHAKE,
                                   f"{self.name}: refused a connection: its CurveZMQ handshake failed "
                                   "(an agent without CURVE, or with another server key)")

    def _take(self, msg: zmq.Frame) -> npt.NDArray | None:
        if msg.more:
            while msg.more:  # the other parts are here already: ZeroMQ delivers a message whole
                try:
                    msg = self._sock.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
            self._decoder.refuse(MULTIPART)
            return None
        return self._decoder.decode(msg.buffer)

    def counters(self) -> dict[str, int]:
        """The decoder's counts (``FeedDecoder.counters``)."""
        return self._decoder.counters()

    def close(self) -> None:
        if getattr(self, "_ctx", None) is None:
            return
        self._closed = True
        if self._monitor is not None:
            self._sock.disable_monitor()
        for sock in (self._sock, self._zap, self._monitor):
            if sock is not None:
                sock.close(linger=0)
        self._ctx.term()
        self._ctx = None
        if self._ipc_inode is not None:
            path = self.endpoint[len("ipc://"):]
            try:
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == self._ipc_inode:
                    os.unlink(path)
            except OSError:
                pass

    def __enter__(self) -> FeedSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
