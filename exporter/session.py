"""Transport sessions: one per collector, with its own sequence numbers and template state.

RFC 7011 §10.3.5: a UDP exporter sending to several collectors keeps
separate state for each. For every observation domain a session holds:

* the sequence number: data records (options data records included,
  template records never) sent before the next message, mod 2^32
  (RFC 7011 §3.1). It advances only when a message actually left; records
  of a failed send are counted in the not-sent totals instead (§4.3);
* when its templates were last sent and how many messages went since, for
  the periodic template refresh over UDP (RFC 7011 §8.4, RFC 6728
  ``templateRefreshTimeout`` and ``templateRefreshPacket``).

A failed send also marks every domain's templates as due, so a collector
that comes back (or a file that has room again) gets the templates again
before its next data.

Every message not sent is counted once, under its cause, in
``SessionCounters.errors``: the errno name of the failed send or write
("ECONNREFUSED", "ENOSPC", "EACCES", ...), ``QUEUE_FULL`` (the exporting
process gave up this collector's oldest messages, see
``exporter/exporting.py``) or ``STOPPED``; the causes add up to
``not_sent_messages``.

Pacing: a session has its own queue of finished messages (``Outgoing``,
shared by every session they are queued for and stamped with this
session's sequence number and export time only when they leave) and, for a
UDP collector with a rate, a ``TokenBucket``: a collector with the kernel's
default receive buffer drops datagrams that come in a burst faster than it
reads them, so messages leave at ``rate`` a second on average and at most
``burst`` at once. The exporting process decides what leaves when
(``exporter/exporting.py``); a session only sends, stamps and counts.
"""
from __future__ import annotations

import errno
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import numpy.typing as npt

from .message import stamp
from .transport import PEER_POLL_S

# causes of messages not sent that are not an errno name (keys of ``SessionCounters.errors``)
QUEUE_FULL = "queue full"  # this collector's queue was full: its oldest messages were given up
STOPPED = "stopped"  # a second stop signal gave up what was still queued


@dataclass(slots=True)
class DomainState:
    sequence: int = 0
    templates_sent_at: float | None = None  # monotonic time, None = never / due now
    messages_since_templates: int = 0


@dataclass(slots=True)
class SessionCounters:
    messages: int = 0
    octets: int = 0
    data_records: int = 0  # all data records (= sum of sequence advances)
    flow_records: int = 0  # flow data records only (exportedFlowRecordTotalCount)
    packets: int = 0  # packets counted in the flow records sent
    template_messages: int = 0
    not_sent_messages: int = 0
    not_sent_records: int = 0
    not_sent_packets: int = 0
    not_sent_octets: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # messages not sent, by cause (adds up to not_sent_messages)


@dataclass(slots=True, eq=False)
class Outgoing:
    """Finished messages of one layout, in order, queued for one or more sessions.

    ``rows`` holds one message per row (all of one size, header sequence
    number and export time filled in when each leaves); each carries
    ``records`` data records. ``packets``/``octets`` are the flow counters of
    each message's records, for the not-sent totals. A statistics entry has
    no rows yet: its record is made when it reaches the head of a session's
    queue, from that session's totals at that moment.
    """

    rows: npt.NDArray[np.uint8] | None
    domain: int
    records: int
    flow: bool = True  # records count as flow records (exportedFlowRecordTotalCount)
    packets: npt.NDArray[np.uint64] | list[int] | None = None
    octets: npt.NDArray[np.uint64] | list[int] | None = None
    templates: bool = False
    statistics: bool = False

    @property
    def count(self) -> int:
        return 1 if self.rows is None else len(self.rows)

    @property
    def size(self) -> int:
        return 0 if self.rows is None else self.rows.shape[1]


class Queued:
    """An ``Outgoing`` in one session's queue and how many of its messages are done."""

    __slots__ = ("out", "pos")

    def __init__(self, out: Outgoing) -> None:
        self.out = out
        self.pos = 0


class TokenBucket:
    """At most ``rate`` messages a second on average, and ``burst`` at once after a quiet spell.

    Tokens may go below zero (a set of template messages is sent whole once
    one token is there); the debt is paid before the next message, so over
    any run of N messages the time taken is at least (N - burst) / rate.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = max(1, int(burst))
        self._clock = clock
        self._tokens = float(self.burst)
        self._at = clock()

    def tokens(self) -> float:
        now = self._clock()
        if now > self._at:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
            self._at = now
        return self._tokens

    def take(self, n: int) -> None:
        self.tokens()
        self._tokens -= n

    def wait(self, want: int) -> float:
        """Seconds until ``want`` tokens (at most the burst) are there."""
        short = min(want, self.burst) - self.tokens()
        return short / self.rate if short > 0 else 0.0


class Session:
    """Export state for one collector over one transport."""

    def __init__(self, transport, refresh_s: float, refresh_messages: int, rate: float = 0,
                 burst: int = 1) -> None:
        self.transport = transport
        self.name = str(transport.address)
        self.refresh_s = refresh_s
        self.refresh_messages = refresh_messages
        self.domains: dict[int, DomainState] = {}
        self.counters = SessionCounters()
        self._last_export_time = 0
        self.queue: deque[Queued] = deque()
        self.queued = 0  # messages waiting in the queue
        self.queued_octets = 0
        self.bucket: TokenBucket | None = None
        self._peer_full = False  # the local collector's receive queue had no room at the last look
        self._peer_paced = False  # the last allowance came from that queue, not from the tokens
        self.last_cause = ""  # errno name of the last failed send ("ENOSPC", "ECONNREFUSED", ...)
        self.set_pace(rate, burst)

    def set_pace(self, rate: float, burst: int) -> None:
        """Pace this session at ``rate`` messages a second (0 = unlimited; files are never paced)."""
        if rate and getattr(self.transport, "paced", False):
            if self.bucket is None or (self.bucket.rate, self.bucket.burst) != (float(rate), max(1, int(burst))):
                self.bucket = TokenBucket(rate, burst)
        else:
            self.bucket = None

    @property
    def rate(self) -> float:
        return self.bucket.rate if self.bucket is not None else 0.0

    def allowance(self) -> float:
        """How many messages may leave now (infinite when not paced).

        Paced: for a collector on this host, the room in its socket's receive
        queue (``transport.LocalPeerQueue``), which says exactly what it can
        take: no rate needs guessing. For any other collector, or when that
        queue cannot be read, the tokens.
        """
        if self.bucket is None:
            return math.inf
        peer = getattr(self.transport, "peer", None)
        if peer is not None:
            room = peer.room(self.queue[0].out.size if self.queue else 1500, time.monotonic())
            if room is not None:
                self._peer_paced, self._peer_full = True, room < 1
                return room
        self._peer_paced = self._peer_full = False
        return self.bucket.tokens()

    def send_wait(self) -> float | None:
        """Seconds until the queue can go on (a burst's worth of tokens, or room at a local
        collector); None = nothing queued."""
        if not self.queue:
            return None
        if self.bucket is None:
            return 0.0
        if self._peer_paced:
            return PEER_POLL_S if self._peer_full else 0.0
        return self.bucket.wait(self.queued)

    def enqueue(self, out: Outgoing) -> None:
        self.queue.append(Queued(out))
        self.queued += out.count
        self.queued_octets += out.count * out.size

    def _advance(self, entry: Queued, n: int) -> None:
        entry.pos += n
        self.queued -= n
        self.queued_octets -= n * entry.out.size
        if entry.pos >= entry.out.count:
            self.queue.popleft()

    def _not_sent(self, out: Outgoing, first: int, n: int, cause: str) -> None:
        c = self.counters
        c.not_sent_messages += n
        c.errors[cause] = c.errors.get(cause, 0) + n
        c.not_sent_records += n * out.records
        if out.packets is not None:
            c.not_sent_packets += int(np.sum(out.packets[first:first + n], dtype=np.uint64))
        if out.octets is not None:
            c.not_sent_octets += int(np.sum(out.octets[first:first + n], dtype=np.uint64))

    def fill_head(self, rows: npt.NDArray[np.uint8]) -> None:
        """Give the statistics entry at the head of the queue its message, made just now."""
        self.queue[0].out.rows = rows
        self.queued_octets += rows.shape[1]

    def discard_head(self) -> None:
        """Remove the entry at the head of the queue without counting it anywhere."""
        entry = self.queue[0]
        self._advance(entry, entry.out.count - entry.pos)

    def drop(self, n: int, cause: str) -> None:
        """The next ``n`` messages of the queue's head do not leave: count them as not sent, for ``cause``."""
        entry = self.queue[0]
        n = min(n, entry.out.count - entry.pos)
        self._not_sent(entry.out, entry.pos, n, cause)
        self._advance(entry, n)

    def drop_all(self, cause: str = STOPPED) -> None:
        """Everything queued is given up (a stop that cannot wait): counted as not sent."""
        while self.queue:
            self.drop(self.queue[0].out.count, cause)

    def domain(self, domain: int) -> DomainState:
        st = self.domains.get(domain)
        if st is None:
            st = self.domains[domain] = DomainState()
        return st

    def templates_due(self, domain: int, now: float) -> bool:
        st = self.domain(domain)
        if st.templates_sent_at is None:
            return True
        if self.refresh_s and now - st.templates_sent_at >= self.refresh_s:
            return True
        return bool(self.refresh_messages) and st.messages_since_templates >= self.refresh_messages

    def mark_templates_due(self) -> None:
        for st in self.domains.values():
            st.templates_sent_at = None

    def export_time(self) -> int:
        """UNIX seconds for a message header; never goes backwards (RFC 7011 §8)."""
        t = max(int(time.time()), self._last_export_time)
        self._last_export_time = t
        return t

    def send(self, out: Outgoing, first: int, n: int, now: float) -> tuple[int, int]:
        """Send messages ``first`` to ``first + n`` of ``out``, stamped for this session.

        Row ``i`` gets this session's sequence number plus the records of the
        rows before it, and the export time of now. Returns (messages that
        left, messages lost to an error); the rest were not tried. Only what
        left advances the sequence number and takes tokens; what was lost is
        counted in the not-sent totals and makes every template due again.
        """
        assert out.rows is not None
        st = self.domain(out.domain)
        rows = out.rows[first:first + n]
        stamp(rows, st.sequence, out.records, self.export_time())
        sent, error = self.transport.send_rows(rows, now)
        c = self.counters
        if sent:
            st.sequence = (st.sequence + sent * out.records) & 0xFFFFFFFF
            c.messages += sent
            c.octets += sent * out.size
            c.data_records += sent * out.records
            if out.flow:
                c.flow_records += sent * out.records
            if out.packets is not None:
                c.packets += int(np.sum(out.packets[first:first + sent], dtype=np.uint64))
            if out.templates:
                c.template_messages += sent
                st.templates_sent_at = now
                st.messages_since_templates = 0
            else:
                st.messages_since_templates += sent
            if self.bucket is not None:
                self.bucket.take(sent)
                peer = getattr(self.transport, "peer", None)
                if peer is not None:
                    peer.sent(sent, out.size)
        if error is None:
            return sent, 0
        self.last_cause = errno.errorcode.get(error.errno or 0, "EIO")
        lost = min(error.lost, n - sent)
        self._not_sent(out, first + sent, lost, self.last_cause)
        self.mark_templates_due()
        return sent, lost

    def send_head(self, n: int, now: float) -> int:
        """Send up to ``n`` messages from the head of the queue; how many were done (sent or lost)."""
        entry = self.queue[0]
        n = min(n, entry.out.count - entry.pos)
        sent, lost = self.send(entry.out, entry.pos, n, now)
        self._advance(entry, sent + lost)
        return sent + lost

    def flush(self) -> None:
        flush = getattr(self.transport, "flush", None)
        if flush is not None:
            flush()

    def close(self) -> None:
        self.transport.close()
