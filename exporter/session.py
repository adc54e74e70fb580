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
before its next data. A message the path refuses as too big is not a
failed send (below).

Message size: a session sends messages of at most ``message_size``
octets. For a file that is its ``MaxMessageSize`` (the collector's own, or
the exporter's). For a UDP collector it is that size or, when smaller,
what the path takes whole (``UdpTransport.path_budget``: the kernel's path
MTU minus the IP and UDP headers), read again every ``PATH_CHECK_S`` (so
it grows back when the path does) and at once when the kernel refuses a
datagram with ``EMSGSIZE``. ``MaxMessageSize`` is thus a ceiling the path
may lower, never raise: a message is never fragmented (``IP_PMTUDISC_DO``),
and one line in the log says when the path holds a collector below it.
A queued message larger than the session's size is cut again for this
session alone before it leaves (``fit_head``, ``message.recut``): the same
records in smaller messages. A datagram refused with ``EMSGSIZE`` is
therefore not lost: the size is read again, the message cut and sent
again; it counts as neither sent nor not sent, advances no sequence number
and makes no template due. The kernel also says ``EMSGSIZE`` once for a
datagram that fitted, when an ICMP "fragmentation needed" (IPv6: "packet
too big") about an *earlier* one came back from a router on the path:
that one datagram was dropped by the router and cannot be known here (the
collector sees a gap in the sequence numbers), the refused one is sent
again as it is. Refused twice at a size the path MTU says fits, the
session sends 512-octet packets (RFC 7011 §10.3.3, PMTU unknown) until
the next read; refused at that size, the message is not sent (``EMSGSIZE``).

Observation domain: a collector with a domain of its own (``domain``) gets
it in the header of every message of a non-zero domain; statistics
(domain 0) stay in 0. Sequence numbers and template state are kept per
domain as the collector sees it (RFC 7011 §3.1: per transport session and
observation domain).

Every message not sent is counted once, under its cause, in
``SessionCounters.errors``: the errno name of the failed send or write
("ECONNREFUSED", "ENOSPC", "EACCES", ...), ``QUEUE_FULL`` (the exporting
process gave up this collector's oldest messages, see
``exporter/exporting.py``) or ``STOPPED``; the causes add up to
``not_sent_messages``.

DTLS (``exporter/dtls.py``): every association is a transport session of
its own (RFC 7011 §10.3, §11). ``ready()`` lets the transport advance its
handshake; when it reports a new association, every domain's sequence
number starts again at 0 and its templates are due, so they go before any
data, as for a new UDP transport session. While a handshake is under way
nothing leaves (``allowance()`` is 0, ``send_wait()`` a few milliseconds,
so the exporting process comes back to it); while the association is down
sends fail at once and count as not sent under the transport's cause
("certificate refused", "handshake failed", "ECONNREFUSED", ...).

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
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import numpy.typing as npt

from .message import EncodeError, stamp
from .transport import IP_UDP_OVERHEAD, PEER_POLL_S

log = logging.getLogger("flowmeter.exporter")

# causes of messages not sent that are not an errno name (keys of ``SessionCounters.errors``)
QUEUE_FULL = "queue full"  # this collector's queue was full: its oldest messages were given up
STOPPED = "stopped"  # a second stop signal gave up what was still queued
TOO_BIG = "EMSGSIZE"  # the path refused a message even at the smallest size

PATH_CHECK_S = 2.0  # a UDP collector's path MTU is read again this often (and at every EMSGSIZE)
MIN_MESSAGE = 256  # never smaller messages than this, whatever the path says (MaxMessageSize's minimum)
SAFE_PACKET = 512  # IP packet octets when the path MTU cannot be trusted (RFC 7011 §10.3.3)
HANDSHAKE_POLL_S = 0.005  # a DTLS handshake under way is looked at again this often


@dataclass(slots=True)
class DomainState:
    source: int = 0  # the records' domain (the header's may be the collector's own)
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
    not_sent_records: int = 0  # flow records not sent (notSentFlowTotalCount); options records are not counted
    not_sent_packets: int = 0
    not_sent_octets: int = 0
    recuts: int = 0  # queued messages cut again smaller for this collector (its path or size)
    refused: int = 0  # sends the kernel refused with EMSGSIZE (sent again, cut or as they were)
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
    # options records that describe the export (sampling, interface names: ``exporter/options.py``),
    # sent with the templates: they do not count towards a template refresh by messages
    describes: bool = False

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
                 burst: int = 1, max_message: int = 1452, domain: int | None = None) -> None:
        self.transport = transport
        self.name = str(transport.address)
        self.max_message = max_message  # the ceiling: MaxMessageSize (the collector's own or the exporter's)
        self.message_size = max_message  # what leaves now: the ceiling or, when smaller, the path's
        self.header_domain = domain  # None: each message's own domain
        self._path: int | None = None  # the path's budget at the last read (None: unknown, or a file)
        self._path_read_at = -math.inf
        self._safe_until = -math.inf  # until then, 512-octet packets (refused at a size said to fit)
        self._refused_at: int | None = None  # size of a refusal not yet followed by a send that went
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
        self._association = 0  # the transport's association this session's state belongs to (DTLS)
        self.set_pace(rate, burst)
        self.check_size(time.monotonic(), force=True)

    # --- transport session ------------------------------------------------
    def ready(self, now: float) -> bool:
        """Let the transport make progress (a DTLS handshake); False while nothing may leave yet.

        A new DTLS association is a new transport session: sequence numbers
        from 0, templates first, the size read again (``restart``).
        """
        progress = getattr(self.transport, "progress", None)
        if progress is None:
            return True
        ok = progress(now)
        if self.transport.association != self._association:
            self._association = self.transport.association
            self.restart(now)
        return ok

    def restart(self, now: float) -> None:
        """A new transport session with the same collector: every domain's sequence number starts at 0
        and its templates go first (RFC 7011 §3.1, §8)."""
        for st in self.domains.values():
            st.sequence = 0
            st.templates_sent_at = None
            st.messages_since_templates = 0
        self.check_size(now, force=True)

    # --- message size ---------------------------------------------------
    def check_size(self, now: float, force: bool = False) -> int:
        """``message_size`` as it should be now (the path read again every ``PATH_CHECK_S``, or when ``force``)."""
        budget = getattr(self.transport, "path_budget", None)
        if budget is None:  # a file: no path
            self.message_size = self.max_message
            return self.message_size
        if not force and now - self._path_read_at < PATH_CHECK_S:
            return self.message_size
        self._path_read_at = now
        path = budget()
        if path is not None:
            self._path = path
        size = self.max_message if self._path is None else min(self.max_message, self._path)
        if now < self._safe_until:
            size = min(size, SAFE_PACKET - IP_UDP_OVERHEAD[self.transport.family])
        self._resize(max(MIN_MESSAGE, size))
        return self.message_size

    def _resize(self, size: int) -> None:
        if size == self.message_size:
            return
        self.message_size = size
        if size < self.max_message:
            log.warning("collector %s: its path takes messages of at most %d octets (MaxMessageSize %d): "
                        "sending %d-octet messages", self.name, self._path or size, self.max_message, size)
        else:
            log.info("collector %s: %d-octet messages again (MaxMessageSize)", self.name, size)

    def set_max_message(self, octets: int, now: float) -> None:
        """A new ceiling (a reload): the size follows at once; queued larger messages are cut as they leave."""
        self.max_message = octets
        self.check_size(now, force=True)

    def set_header_domain(self, domain: int | None) -> None:
        """A new domain of its own (a reload): its sequence numbers start at 0, its templates go first.

        The collector sees another observation domain: per RFC 7011 §3.1 a
        counter of its own, starting like any new one.
        """
        if domain == self.header_domain:
            return
        self.header_domain = domain
        sources = {st.source for st in self.domains.values()}
        self.domains = {}
        for source in sources:
            self.domain(source)

    def _refused(self, size: int, now: float) -> bool:
        """The kernel said ``EMSGSIZE`` for a message of ``size`` octets: True when it is to be sent
        again (cut or as it is), False when even the smallest size does not pass (not sent)."""
        self.counters.refused += 1
        self.check_size(now, force=True)
        if self.message_size < size:
            return True  # cut at the path's new size
        if self._refused_at != size:  # the error was an ICMP's about an earlier datagram: once more as it is
            self._refused_at = size
            return True
        safe = max(MIN_MESSAGE, SAFE_PACKET - IP_UDP_OVERHEAD[self.transport.family])
        if size <= safe:
            return False
        self._safe_until = now + PATH_CHECK_S
        self.check_size(now, force=True)
        return True

    def fit_head(self, recut: Callable[[Outgoing, int, int], list[Outgoing]]) -> None:
        """Cut the head of the queue again when its messages are larger than ``message_size``.

        ``recut(out, first, size)`` gives messages ``first`` onwards of
        ``out`` as new ``Outgoing``s of at most ``size`` octets; they take its
        place in this session's queue only (the others keep the shared rows).
        """
        entry = self.queue[0]
        out = entry.out
        if out.rows is None or out.size <= self.message_size or out.templates:
            return
        left = out.count - entry.pos
        try:
            cuts = recut(out, entry.pos, self.message_size)
        except EncodeError:  # a record larger than the message: cannot go to this collector
            self.drop(left, TOO_BIG)
            return
        self.counters.recuts += left
        self.queue.popleft()
        self.queued -= left
        self.queued_octets -= left * out.size
        for piece in reversed(cuts):
            self.queue.appendleft(Queued(piece))
            self.queued += piece.count
            self.queued_octets += piece.count * piece.size

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
        if getattr(self.transport, "handshaking", False):
            return 0.0
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
        if getattr(self.transport, "handshaking", False):
            return HANDSHAKE_POLL_S
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
        if out.flow:  # flow records (notSentFlowTotalCount); a sampling or name record is not one
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

    def header(self, domain: int) -> int:
        """The observation domain this collector sees for records of ``domain``."""
        if self.header_domain is None or domain == 0:
            return domain
        return self.header_domain

    def domain(self, domain: int) -> DomainState:
        """The state of records of ``domain``: that of the domain in this collector's headers."""
        key = self.header(domain)
        st = self.domains.get(key)
        if st is None:
            st = self.domains[key] = DomainState(source=domain)
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
        rows before it, the export time of now and this collector's domain.
        Returns (messages that left, messages lost to an error); the rest were
        not tried. Only what left advances the sequence number and takes
        tokens; what was lost is counted in the not-sent totals and makes
        every template due again. A message refused as too big for the path
        is neither: it stays at the head, to be cut again (``fit_head``).
        """
        assert out.rows is not None
        st = self.domain(out.domain)
        rows = out.rows[first:first + n]
        stamp(rows, st.sequence, out.records, self.export_time(), self.header(out.domain))
        sent, error = self.transport.send_rows(rows, now)
        c = self.counters
        if sent:
            self._refused_at = None
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
            elif not out.describes:
                st.messages_since_templates += sent
            if self.bucket is not None:
                self.bucket.take(sent)
                peer = getattr(self.transport, "peer", None)
                if peer is not None:
                    peer.sent(sent, out.size)
        if error is None:
            return sent, 0
        self.last_cause = error.cause or errno.errorcode.get(error.errno or 0, "EIO")
        if error.errno == errno.EMSGSIZE and self._refused(out.size, now):
            return sent, 0  # not lost: cut smaller (``fit_head``) or as it is, it goes again
        if error.errno == errno.EMSGSIZE:  # even the smallest size does not pass: not sent, no templates due
            lost = min(error.lost, n - sent)
            self._not_sent(out, first + sent, lost, self.last_cause)
            return sent, lost
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
