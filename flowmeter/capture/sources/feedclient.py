"""An example datapath-feed client: what an overlay agent does to hand flowmeter its frames.

Importable (the tests use it) and runnable::

    python -m flowmeter.capture.sources.feedclient ipc:///run/flowmeter/feed.sock --frames 1000 --drop-every 10

sends 1000 made-up frames, half in the header form (an IPv4 header with its
TCP or UDP header), half in the metadata form (IPv6 UDP), every 10th one
dropped by a made-up rule. The schema is docs/feed.md; in short::

    from flowmeter.capture.sources.feedclient import FeedClient, header_frame, metadata_frame

    with FeedClient("ipc:///run/flowmeter/feed.sock", agent="wgd/2.1") as feed:
        feed.send([header_frame(ip_octets, dir="in", peer=7),
                   metadata_frame("2001:db8::1", "2001:db8::2", 17, 120, sport=5353, dport=53,
                                  dir="out", verdict="drop", reason="deny: rule 12")])

A ``tcp://`` feed takes only agents with CurveZMQ keys: give the client the
server's public key (its ``.key`` file or the 40-character Z85 text) and the
agent's own key pair (a ``.key_secret`` file made by ``flowmeter keygen``),
whose public half is in the feed's ``FeedAllowedKeys``::

    FeedClient("tcp://192.0.2.1:5599", server_key="/etc/flowmeter/feed.key",
               key="/etc/wgd/agent.key_secret")

``send`` never blocks: a datapath must not wait for its meter. When the
queue towards flowmeter is full (flowmeter is slow or not running) the
message is not sent, ``send`` returns False and ``dropped_messages`` counts it.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import zmq
import zmq.auth

VERSION = 1
SEND_HWM = 1000  # messages queued before send() starts refusing
LINGER_MS = 2000  # how long close() waits for queued messages to leave


def _address(value: str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    if isinstance(value, bytes):
        return value
    return ipaddress.ip_address(value).packed


def _common(t: int | None, dir: str, verdict: str, reason: str | int | None, peer: int | None) -> dict[str, Any]:
    frame: dict[str, Any] = {"t": time.time_ns() if t is None else t, "dir": dir, "verdict": verdict}
    if reason is not None:
        frame["reason"] = reason
    if peer is not None:
        frame["peer"] = peer
    return frame


def header_frame(ip: bytes, *, t: int | None = None, dir: str = "in", verdict: str = "forward",
                 reason: str | int | None = None, peer: int | None = None, length: int | None = None) -> dict:
    """A header-form frame: ``ip`` is the packet from its IP header on (at least the IP and
    transport headers); ``length`` its real layer-3 length when ``ip`` was cut and the IP
    header's own length field would be wrong. ``t`` defaults to now."""
    frame = _common(t, dir, verdict, reason, peer)
    frame["ip"] = bytes(ip)
    if length is not None:
        frame["len"] = length
    return frame


def metadata_frame(src, dst, proto: int, length: int, *, sport: int = 0, dport: int = 0, t: int | None = None,
                   dir: str = "in", verdict: str = "forward", reason: str | int | None = None,
                   peer: int | None = None, tos: int = 0, tcp_flags: int = 0, icmp_type: int = 0,
                   icmp_code: int = 0) -> dict:
    """A metadata-form frame: addresses (text, ``ipaddress`` or packed octets), protocol and
    layer-3 length; zero optional fields are left out."""
    frame = _common(t, dir, verdict, reason, peer)
    frame.update(src=_address(src), dst=_address(dst), proto=proto, len=length)
    for key, value in (("sport", sport), ("dport", dport), ("tos", tos), ("tcp_flags", tcp_flags),
                       ("icmp_type", icmp_type), ("icmp_code", icmp_code)):
        if value:
            frame[key] = value
    return frame


def pack_message(frames: Sequence[dict], agent: str | None = None) -> bytes:
    """One feed message (msgpack; ``bytes`` become msgpack bin, ``str`` msgpack str)."""
    message: dict[str, Any] = {"v": VERSION, "frames": list(frames)}
    if agent is not None:
        message["agent"] = agent
    return msgpack.packb(message, use_bin_type=True)


def _public_key(value: str | bytes) -> bytes:
    """A Z85 public key given as itself (40 characters) or as the path of a key file."""
    if isinstance(value, bytes) or (len(value) == 40 and not os.path.exists(value)):
        return value if isinstance(value, bytes) else value.encode()
    return zmq.auth.load_certificate(value)[0]


def _key_pair(value: str | tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys given as themselves or as the path of a ``.key_secret`` file."""
    if isinstance(value, tuple):
        return value
    public, secret = zmq.auth.load_certificate(value)
    if secret is None:
        raise ValueError(f"{value} holds no secret key: give the agent's .key_secret file")
    return public, secret


class FeedClient:
    """A ZeroMQ PUSH socket connected to a flowmeter feed endpoint; a CurveZMQ client when
    ``server_key`` is given (with the agent's ``key`` pair, or a pair made up for this client)."""

    def __init__(self, endpoint: str, *, agent: str | None = None, send_hwm: int = SEND_HWM,
                 context: zmq.Context | None = None, server_key: str | bytes | None = None,
                 key: str | tuple[bytes, bytes] | None = None) -> None:
        self.endpoint, self.agent = endpoint, agent
        self.sent_messages = self.dropped_messages = 0
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, send_hwm)
        self._sock.setsockopt(zmq.LINGER, LINGER_MS)
        if server_key is not None:
            public, secret = _key_pair(key) if key is not None else zmq.curve_keypair()
            self._sock.curve_serverkey = _public_key(server_key)
            self._sock.curve_publickey = public
            self._sock.curve_secretkey = secret
        self._sock.connect(endpoint)

    def send(self, frames: Sequence[dict]) -> bool:
        """Send one message of ``frames``; False (and counted) if the queue is full."""
        return self.send_raw(pack_message(frames, self.agent))

    def send_raw(self, *parts: bytes) -> bool:
        """Send octets as they are (one part, or several: a multipart message), for tests of
        what flowmeter does with messages that break the schema."""
        try:
            self._sock.send_multipart(parts, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped_messages += 1
            return False
        self.sent_messages += 1
        return True

    def close(self) -> None:
        """Close the socket, waiting at most ``LINGER_MS`` for queued messages to leave."""
        self._sock.close()
        if self._own_context:
            self._ctx.term()

    def __enter__(self) -> FeedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def example_frames(n: int, drop_every: int = 0, start_ns: int | None = None) -> list[dict]:
    """``n`` made-up frames of both forms, both directions, four peers; every ``drop_every``-th dropped."""
    from flowmeter.capture.frames import ipv4, tcp, udp

    start_ns = time.time_ns() if start_ns is None else start_ns
    frames = []
    for i in range(n):
        common = {"t": start_ns + i * 1000, "dir": "in" if i % 2 == 0 else "out", "peer": 1 + i % 4}
        if drop_every and (i + 1) % drop_every == 0:
            common.update(verdict="drop", reason="deny: example rule 7")
        if i % 2 == 0:
            transport = tcp(40000 + i % 100, 443, 0x10) if i % 4 == 0 else udp(40000 + i % 100, 53, b"\0" * 32)
            frames.append(header_frame(ipv4("10.0.0.2", "192.0.2.10", 6 if i % 4 == 0 else 17, transport),
                                       **common))
        else:
            frames.append(metadata_frame("2001:db8::2", "2001:db8:1::53", 17, 48 + 40 + i % 100,
                                         sport=50000 + i % 100, dport=53, **common))
    return frames


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flowmeter.capture.sources.feedclient",
                                     description="Send made-up frames to a flowmeter datapath feed.")
    parser.add_argument("endpoint", help="the feed's endpoint: ipc:///PATH or tcp://HOST:PORT")
    parser.add_argument("--frames", type=int, default=1000, help="frames to send (default 1000)")
    parser.add_argument("--drop-every", type=int, default=0, metavar="K",
                        help="mark every K-th frame dropped by policy (default 0: none)")
    parser.add_argument("--per-message", type=int, default=256, metavar="N",
                        help="frames per message (default 256)")
    parser.add_argument("--agent", default="flowmeter.feedclient", help="the agent name sent with each message")
    parser.add_argument("--server-key", metavar="KEY", help="a tcp feed's public key: its .key file or Z85 text")
    parser.add_argument("--key", metavar="FILE", help="this agent's .key_secret file (flowmeter keygen), "
                        "its public key in the feed's FeedAllowedKeys")
    args = parser.parse_args(argv)
    if args.frames < 0 or args.drop_every < 0 or not 1 <= args.per_message <= 4096:
        parser.error("--frames and --drop-every must be >= 0, --per-message from 1 to 4096")
    frames = example_frames(args.frames, args.drop_every)
    if (args.key is None) != (args.server_key is None):
        parser.error("--server-key and --key go together")
    try:
        feed = FeedClient(args.endpoint, agent=args.agent, server_key=args.server_key, key=args.key)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    with feed:
        for i in range(0, len(frames), args.per_message):
            feed.send(frames[i:i + args.per_message])
    lost = f", {feed.dropped_messages} not sent (queue full)" if feed.dropped_messages else ""
    print(f"sent {len(frames)} frames in {feed.sent_messages} messages to {args.endpoint}{lost}")
    return 0 if not feed.dropped_messages else 1


if __name__ == "__main__":
    sys.exit(main())
