"""The exporting process: flow record batches in, IPFIX messages out to every collector.

It owns the template registry, one open message per observation domain and
one ``Session`` per collector. Records are encoded once per batch (one
``astype`` to the template's big-endian dtype) and packed into messages;
each finished message goes to every collector, stamped with that
collector's own sequence number (and observation domain, if it has one).

Message sizes: every session has its own (``Session.message_size``: its
``MaxMessageSize``, lowered to what its path takes whole, see
``exporter/session.py``). New messages are built at the largest of them;
a session whose size is smaller cuts each queued message again for itself
just before it leaves (``message.recut``: one reshape for the usual rows of
one data set). Building at the largest costs nothing where every collector
has the same path (the usual case), and where they differ only the
collectors behind the smaller paths pay the cut, instead of every collector
sending as many more messages as the smallest path needs. Template-only
messages are made at each session's own size.

Packing: a batch first fills the domain's open message (small batches of
live traffic share messages, as many as fit); the batch's *full* messages
are then laid out at once as the rows of one uint8 array
(``message.message_rows``) and the few records left over start the next
open message. A batch of thousands of records therefore costs a handful of
numpy calls, not Python work per message, and its messages leave in
segmented sends of up to 64 (``transport.UdpTransport.send_rows``).

Sending: every finished message is queued in each session (the rows are
shared; each session stamps its own sequence number and export time as
they leave). With ``export_rate`` a UDP session sends at most that many
messages a second, ``export_burst`` at once (a ``TokenBucket``): a default
collector socket buffer (212992 octets on Linux) overflows in a burst that
its reader cannot follow, and what overflows is lost without a trace at the
exporter. Nothing here ever waits for tokens: ``pump()`` sends what the
buckets allow and returns, ``next_send_in()`` says when to call it again,
and the caller (``exporter/process.py``) goes on receiving batches
meanwhile. ``drain()`` sends everything queued, paced, before a stop.

Backlog: a paced queue is *full* when it holds ``QUEUE_SECONDS`` of its
pace (or ``QUEUE_OCTETS``). A full queue is one collector's problem, not
every collector's: while at least one session is not full (an unpaced
file or collector never is), new messages keep coming in for all, and a
full session gives up its own *oldest* messages (counted not sent, cause
``"queue full"``) to stay at its limit; the others keep their pace. A
collector that falls behind thus gets the freshest records when it
catches up, and its memory stays bounded by its limit. Only while *every*
session is full does ``backlogged()`` tell the caller to stop receiving:
then nobody keeps up, and holding the producers back (as with one paced
collector) loses nothing at the exporter. Queues overshoot their limit by
at most what one turn of the caller receives while all are full.

Files: a ``File/`` collector that cannot be opened or written (full disk,
I/O error, directory not writable) is a collector that is down: its
messages are counted not sent under the errno's name and the transport
tries again by itself (``transport.FileTransport``); nothing of it ever
raises out of here. Every ``reload()`` reopens the files (logrotate moves
one away, then SIGHUP), and a reopened file gets the templates before any
data, so it decodes alone.

Templates (RFC 7011 §8):

* a session gets a template-only message for a domain before that domain's
  first data, again every ``refresh_s`` seconds or ``refresh_messages``
  messages (whichever comes first), after a failed send, and at once after
  ``reload()``; template messages are messages like any other for pacing;
* flow templates are sent in the flow domains, the statistics options
  template in domain 0, where the exporter-wide statistics go (RFC 7011 §4).

Statistics: every ``stats_interval_s`` each session gets one options data
record of the ``exporter_stats`` template with its own totals (messages,
flow records and octets sent before that message; records, packets and
octets not sent; packets metered and then lost inside flowmeter, as
``ignoredPacketTotalCount``). The record is made when it reaches the head of the
session's queue, so its totals are exact even after a paced wait.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import numpy.typing as npt

from . import options
from .message import HEADER_LEN, SET_HEADER_LEN, Message, encode, message_rows, recut
from .options import InterfaceSpec
from .session import QUEUE_FULL, Outgoing, Session
from .template import INTERFACES_NAME, SAMPLING_NAME, STATS_NAME, Template, TemplateRegistry, default_registry
from .transport import FILE_RETRY_S, SEND_BUFFER, CollectorAddress, open_transport

STATS_DOMAIN = 0  # RFC 7011 §4: exporter-wide records go in messages with ODID 0
TEMPLATE_TRIES = 4  # sends of a domain's templates refused as too big before they count as not sent
EXPORT_RATE = 15_000  # default ExportRate of a profile: messages/s per collector (0 = unlimited)
EXPORT_BURST = 8  # messages a paced collector may get at once: ~20 KB of a 208 KB default buffer
# A paced queue this long (in seconds of its pace, or in octets) is full: the process stops
# taking batches until it drains. Far out on purpose: batches must keep flowing while messages
# wait (ZeroMQ drops the unread batches of a producer that exits meanwhile), and a full queue
# still drains within the supervisor's 30 s stop deadline.
QUEUE_SECONDS = 10.0
QUEUE_OCTETS = 256 << 20
DRAIN_SLEEP_S = 0.05  # longest sleep of a drain between checks for a stop


@dataclass(frozen=True, slots=True)
class ExportSettings:
    collectors: tuple[CollectorAddress, ...]  # each may carry its own max_message and domain
    max_message: int = 1452  # the ceiling of every collector without its own; a UDP path may lower it
    refresh_s: float = 30.0
    refresh_messages: int = 256
    stats_interval_s: float = 60.0
    exporting_process_id: int = 0
    # Unlimited here, for library use and benchmarks; a profile's ExportRate
    # defaults to EXPORT_RATE (``flowmeter/config.py``).
    export_rate: float = 0
    export_burst: int = EXPORT_BURST
    socket_buffer: int = SEND_BUFFER  # SO_SNDBUF asked for each UDP collector, octets
    # UDP_SEGMENT sends (see exporter/transport.py): the same datagrams on the wire, but a packet
    # capture on the exporting host (loopback, NICs with UDP segmentation offload) sees each
    # send as one large packet holding several messages; False sends one message per call.
    segmented_sends: bool = True
    # Options records that describe the export (``exporter/options.py``): sampling and interface
    # names. Off here, for library use and the exporter's own tests; a profile's OptionsRecords
    # defaults to on (``flowmeter/config.py``).
    options_records: bool = False
    # what the interface indexes are called: the profile's map, and whether the kernel's names apply
    # (the run meters live interfaces of this host)
    interfaces: tuple[InterfaceSpec, ...] = ()
    kernel_interface_names: bool = False


def _total(column: npt.NDArray) -> int:
    """Sum of a counter column; in Python for a few values, where numpy's call costs more."""
    if len(column) <= 32:
        return sum(column.tolist())
    return int(column.sum(dtype=np.uint64))


class ExportingProcess:
    """Packs record batches into messages and sends them to every session."""

    def __init__(self, settings: ExportSettings, registry: TemplateRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or default_registry()
        self.sessions = [self._session(a, settings) for a in settings.collectors]
        self._retiring: list[Session] = []  # removed by a reload, sending what they still hold
        self._open: dict[int, Message] = {}
        self._open_packets: dict[int, int] = {}
        self._open_octets: dict[int, int] = {}
        self._scratch = Message(settings.max_message)
        self._template_messages: dict[tuple[int, int], list[Outgoing]] = {}  # (domain, size) -> messages
        self._by_id: dict[int, Template] = {}  # templates by id, for cutting messages again
        self._flow_domains: set[int] = set()
        self.interfaces = options.Interfaces(settings.interfaces, settings.kernel_interface_names)
        self._options_messages: dict[int, list[Outgoing]] = {}  # domain -> its interface records' messages
        self._init_ms = int(time.time() * 1000)
        # packets metered and then lost inside flowmeter, as known so far (a worker that died with its
        # flows, ...): the supervisor's count, for ignoredPacketTotalCount (0 without a supervisor)
        self.ignored_packets: Callable[[], int] = lambda: 0
        self._last_stats = time.monotonic()
        self.records_in = 0
        self.batches_in = 0

    def unopened(self) -> list[str]:
        """One line per ``File/`` collector whose file is not open now (it is tried again by itself)."""
        return [f"collector {s.name}: {s.transport.last_error}; its records are counted as not sent "
                f"and the file is tried again every {FILE_RETRY_S:g} s"
                for s in self.sessions if getattr(s.transport, "is_open", True) is False]

    @staticmethod
    def _session(address: CollectorAddress, settings: ExportSettings) -> Session:
        if address.kind == "dtls":
            from .dtls import DtlsTransport  # pyOpenSSL is loaded only where a DTLS collector is

            transport = DtlsTransport(address, settings.socket_buffer)
        else:
            transport = open_transport(address, settings.socket_buffer)
        if hasattr(transport, "gso"):
            transport.gso = settings.segmented_sends
        return Session(transport, settings.refresh_s, settings.refresh_messages, settings.export_rate,
                       settings.export_burst, address.max_message or settings.max_message, address.domain)

    def build_size(self) -> int:
        """The size new messages are made at: the largest session's (see the module notes)."""
        if not self.sessions:
            return self.settings.max_message
        return max(s.message_size for s in self.sessions)

    def _template(self, template_id: int) -> Template | None:
        t = self._by_id.get(template_id)
        if t is None:
            self._by_id = {t.template_id: t for t in (*self.registry.retired, *self.registry)}
            t = self._by_id.get(template_id)
        return t

    def _recut(self, out: Outgoing, first: int, size: int) -> list[Outgoing]:
        """Messages ``first`` onwards of ``out`` cut again at ``size`` octets (``Session.fit_head``)."""
        assert out.rows is not None
        return [Outgoing(c.rows, out.domain, c.records, flow=out.flow, packets=c.packets, octets=c.octets,
                         statistics=out.statistics, describes=out.describes)
                for c in recut(out.rows[first:], size, self._template)]

    # --- templates ------------------------------------------------------
    def _templates_for(self, domain: int) -> list[Template]:
        out = []
        if domain in self._flow_domains:
            out = [t for t in self.registry if not t.is_options]
            if self.settings.options_records:
                out += [self.registry[SAMPLING_NAME], self.registry[INTERFACES_NAME]]
        if domain == STATS_DOMAIN:
            out.append(self.registry[STATS_NAME])
        return out

    def _template_messages_for(self, domain: int, size: int) -> list[Outgoing]:
        """Template-only messages of at most ``size`` octets (header sequence to be stamped) covering
        all of a domain's templates."""
        cached = self._template_messages.get((domain, size))
        if cached is not None:
            return cached
        pending = self._templates_for(domain)
        out: list[Outgoing] = []
        m = Message(size)
        while pending:
            m.begin(domain)
            n = m.add_templates(pending)
            if n == 0:
                raise ValueError(f"template {pending[0].template_id} does not fit in a {size}-octet message")
            rows = np.frombuffer(m.finish(0, 0), dtype=np.uint8).reshape(1, -1).copy()
            out.append(Outgoing(rows, domain, 0, flow=False, templates=True))
            pending = pending[n:]
        self._template_messages[(domain, size)] = out
        return out

    def _send_templates(self, session: Session, domain: int, now: float) -> bool:
        """Every template message of ``domain`` to ``session``, at its size; False when one did not
        leave (``session.last_cause`` says why). A message the path refused as too big goes again,
        made at the session's new size: a few tries, each one smaller or the last one as it was."""
        for _ in range(TEMPLATE_TRIES):
            refused = False
            for out in self._template_messages_for(domain, session.message_size):
                sent, lost = session.send(out, 0, 1, now)
                if not sent:
                    if lost:
                        return False
                    refused = True
                    break
            if not refused:
                return self._send_options(session, domain, now)
        return False

    def _send_options(self, session: Session, domain: int, now: float) -> bool:
        """After a flow domain's templates: its ``sampling`` record and the names of the interfaces
        met so far (``exporter/options.py``); False when one did not leave."""
        if domain not in self._flow_domains or not self.settings.options_records:
            return True
        outs = options.messages(self.registry[SAMPLING_NAME], [options.sampling_record(session.header(domain))],
                                domain)
        cached = self._options_messages.get(domain)
        if cached is None:
            cached = self._options_messages[domain] = options.messages(
                self.registry[INTERFACES_NAME], self.interfaces.all_records(), domain)
        for out in (*outs, *cached):
            sent, _ = session.send(out, 0, 1, now)
            if not sent:
                return False
        return True

    def reload(self, settings: ExportSettings | None = None) -> list[str]:
        """Apply new settings (collectors, sizes, periods, pacing); templates go out again at once.

        Sessions whose collector stays keep their sequence numbers and their
        queue; new collectors start at 0; removed ones send what they still
        hold (paced) and are closed then. A collector's own settings apply
        in place: a new ``max_message`` keeps its sequence numbers (queued
        messages larger than the new size are cut as they leave); a new
        ``domain`` starts that domain's sequence numbers at 0 (RFC 7011 §3.1:
        another domain, another counter), with its templates first. Open messages are flushed first so
        nothing received is lost. Every ``File/`` collector is reopened at
        its path (after logrotate's move, a new file, which gets the
        templates first). Returns one line per collector that could not be
        opened: a file is kept and tried again (``unopened``); a UDP
        collector whose socket cannot even be made is left out.
        """
        self.flush()
        notes = []
        if settings is not None:
            old = {s.transport.address: s for s in self.sessions}
            keep = []
            for a in settings.collectors:
                s = old.pop(a, None)
                if s is None:  # a new collector: templates of every domain seen go to it at once
                    try:
                        s = self._session(a, settings)
                    except OSError as exc:
                        notes.append(f"collector {a}: cannot open: {exc.strerror or exc}; left out")
                        continue
                    for domain in (*self._flow_domains, *((STATS_DOMAIN,) if settings.stats_interval_s else ())):
                        s.domain(domain)  # due: the next tick() sends them
                else:
                    reconfigure = getattr(s.transport, "reconfigure", None)  # DTLS: new settings, new association
                    if reconfigure is not None:
                        reconfigure(a)
                    s.transport.address = a  # the same collector, perhaps with other settings of its own
                    s.set_max_message(a.max_message or settings.max_message, time.monotonic())
                    s.set_header_domain(a.domain)
                    s.refresh_s, s.refresh_messages = settings.refresh_s, settings.refresh_messages
                    s.set_pace(settings.export_rate, settings.export_burst)
                    if hasattr(s.transport, "gso"):
                        if settings.socket_buffer != self.settings.socket_buffer:
                            s.transport.set_send_buffer(settings.socket_buffer)
                        if settings.segmented_sends != self.settings.segmented_sends:
                            s.transport.gso = settings.segmented_sends
                keep.append(s)
            self._retiring.extend(old.values())
            self.sessions = keep
            if settings.max_message != self.settings.max_message:
                self._open.clear()
                self._scratch = Message(settings.max_message)
            if (settings.interfaces, settings.kernel_interface_names) != self.interfaces.given:
                self.interfaces = self.interfaces.renamed(settings.interfaces, settings.kernel_interface_names)
                self._options_messages.clear()
            self.settings = settings
        now = time.monotonic()
        for s in self.sessions:
            reopen = getattr(s.transport, "reopen", None)
            if reopen is not None:
                reopen(now)
        self._template_messages.clear()
        for s in self.sessions:
            s.mark_templates_due()
        self.pump(now)
        return notes + self.unopened()

    # --- data -----------------------------------------------------------
    def export(self, template: Template, records: npt.NDArray, domain: int, now: float | None = None) -> None:
        """Queue ``records`` (host-order array of ``template.dtype``) for every collector, and send what may go."""
        if now is None:
            now = time.monotonic()
        if domain not in self._flow_domains and not template.is_options:
            self._flow_domains.add(domain)
            for key in [k for k in self._template_messages if k[0] == domain]:  # made before it had flows
                del self._template_messages[key]
        n = len(records)
        self.batches_in += 1
        self.records_in += n
        if n == 0:
            return
        named = self.interfaces.seen(records) if self.settings.options_records else None
        if named:  # an interface met for the first time: its name goes before the data that carries it
            self._options_messages.clear()
            for d in self._flow_domains:
                outs = options.messages(self.registry[INTERFACES_NAME], named, d)
                for s in self.sessions:
                    if not s.templates_due(d, now):  # else the names go with its templates, these among them
                        for out in outs:
                            s.enqueue(out)
        records = self.interfaces.renumber(records)
        wire = encode(template, records)
        rl = template.record_length
        for s in self.sessions:
            s.check_size(now)  # a path read again (every few seconds) before messages are made for it
        size = self.build_size()
        per = (size - HEADER_LEN - SET_HEADER_LEN) // rl  # records in a full message
        if per == 0:
            raise ValueError(f"a {rl}-octet record of template {template.template_id} does not fit in a message")
        names = template.dtype.names
        counted = "packetDeltaCount" in names and "octetDeltaCount" in names
        pk = records["packetDeltaCount"] if counted else None
        oc = records["octetDeltaCount"] if counted else None
        # 1. the open message takes what fits
        m = self._message(domain, size)
        start = self._fill(m, template, wire, 0, pk, oc)
        if start < n:
            # 2. it is full: every full message of the rest at once, 3. the rest opens the next one
            self._finish_open(domain)
            full = (n - start) // per
            if full:
                end = start + full * per
                rows = message_rows(template, wire, start, full, per, domain)
                self._enqueue(Outgoing(
                    rows, domain, per, flow=self._flow(domain),
                    packets=pk[start:end].reshape(full, per).sum(axis=1, dtype=np.uint64) if counted else None,
                    octets=oc[start:end].reshape(full, per).sum(axis=1, dtype=np.uint64) if counted else None))
                start = end
            if start < n:
                start = self._fill(m, template, wire, start, pk, oc)
        if m.free < rl:
            self._finish_open(domain)
        self.pump(now)

    def _fill(self, m: Message, template: Template, wire: memoryview, start: int,
              pk: npt.NDArray | None, oc: npt.NDArray | None) -> int:
        """Records from ``start`` into the open message ``m`` while they fit; the next record left."""
        k = m.add_records(template, wire, start)
        if k and pk is not None and oc is not None:
            self._open_packets[m.domain] += _total(pk[start:start + k])
            self._open_octets[m.domain] += _total(oc[start:start + k])
        return start + k

    def _flow(self, domain: int) -> bool:
        """Whether data records of ``domain`` count as flow records (not in a statistics-only domain 0)."""
        return not (domain == STATS_DOMAIN and domain not in self._flow_domains)

    def _message(self, domain: int, size: int) -> Message:
        """The open message of ``domain``, made at ``size`` (one of another size is queued first)."""
        m = self._open.get(domain)
        if m is not None and m.max_size != size:
            self._finish_open(domain)
            m = None
        if m is None:
            m = self._open[domain] = Message(size)
            m.begin(domain)
            self._open_packets[domain] = 0
            self._open_octets[domain] = 0
        return m

    def _finish_open(self, domain: int) -> None:
        """Queue the open message of ``domain`` (if it holds anything) and start the next one."""
        m = self._open.get(domain)
        if m is None or m.empty:
            return
        rows = np.frombuffer(m.finish(0, 0), dtype=np.uint8).reshape(1, -1).copy()
        self._enqueue(Outgoing(rows, domain, m.data_records, flow=self._flow(domain),
                               packets=[self._open_packets[domain]], octets=[self._open_octets[domain]]))
        m.begin(domain)
        self._open_packets[domain] = 0
        self._open_octets[domain] = 0

    def _enqueue(self, out: Outgoing) -> None:
        for s in self.sessions:
            s.enqueue(out)
        if not self.backlogged():  # someone keeps up: a full queue gives up its own oldest
            for s in self.sessions:
                if self._full(s):
                    self._trim(s)

    def flush(self, now: float | None = None) -> None:
        """Queue every open message and send what may go now (all of it when not paced)."""
        if now is None:
            now = time.monotonic()
        for domain in list(self._open):
            self._finish_open(domain)
        self.pump(now)
        for s in self.sessions:
            s.flush()

    # --- sending ----------------------------------------------------------
    def pump(self, now: float | None = None) -> None:
        """Send from every session's queue what its tokens allow, in order; never waits."""
        if now is None:
            now = time.monotonic()
        for s in self.sessions:
            self._pump(s, now)
        if self._retiring:
            for s in self._retiring:
                self._pump(s, now)
                if not s.queue:
                    s.close()
            self._retiring = [s for s in self._retiring if s.queue]

    def _pump(self, s: Session, now: float) -> None:
        q = s.queue
        if not s.ready(now):  # a DTLS handshake under way: the queue waits for it
            return
        if q:
            s.check_size(now)
        while q:
            allowance = s.allowance()
            if allowance < 1:
                return
            s.fit_head(self._recut)
            if not q:
                return
            entry = q[0]
            out = entry.out
            if s.templates_due(out.domain, now):
                if not self._send_templates(s, out.domain, now):
                    # as for a collector that is down: this message does not go either
                    if out.statistics:
                        s.discard_head()  # a statistics record not made is no loss of data
                    else:
                        s.drop(1, s.last_cause)
                    continue
                allowance = s.allowance()
                if allowance < 1:
                    return
            if out.statistics and out.rows is None:
                s.fill_head(self._statistics_row(s))
            n = out.count - entry.pos
            if allowance < n:
                n = int(allowance)
            if s.refresh_messages:  # a refresh by count falls between two messages of a run
                n = min(n, s.refresh_messages - s.domain(out.domain).messages_since_templates)
            s.send_head(n, now)

    def next_send_in(self) -> float | None:
        """Seconds until a queued message may leave; None when nothing is queued."""
        waits = [w for s in (*self.sessions, *self._retiring) if (w := s.send_wait()) is not None]
        return min(waits) if waits else None

    @staticmethod
    def _limit(s: Session) -> int:
        """Messages a paced session may hold: ``QUEUE_SECONDS`` of its pace, at least a burst."""
        assert s.bucket is not None
        return max(s.bucket.burst, int(s.rate * QUEUE_SECONDS))

    def _full(self, s: Session) -> bool:
        """Whether ``s`` holds as much as it may (never, unpaced: it sends everything at once)."""
        if s.bucket is None or not s.queued:
            return False
        return s.queued_octets >= QUEUE_OCTETS or s.queued >= self._limit(s)

    def _trim(self, s: Session) -> None:
        """Give up the oldest messages of ``s`` until it is back at its limit (cause "queue full")."""
        limit = self._limit(s)
        while s.queue and (s.queued > limit or s.queued_octets > QUEUE_OCTETS):
            entry = s.queue[0]
            if entry.out.rows is None:
                s.discard_head()  # a statistics record not yet made: no data lost
                continue
            over = s.queued - limit
            if s.queued_octets > QUEUE_OCTETS:
                over = max(over, -(-(s.queued_octets - QUEUE_OCTETS) // entry.out.size))
            s.drop(over, QUEUE_FULL)

    def backlogged(self) -> bool:
        """True while every session's queue is full: take no more batches until one drains.

        One full queue alone does not hold the input back: that session
        gives up its own oldest messages instead (see the module notes).
        """
        return bool(self.sessions) and all(self._full(s) for s in self.sessions)

    def queued(self) -> int:
        """Messages queued, all sessions together."""
        return sum(s.queued for s in (*self.sessions, *self._retiring))

    def drain(self, stop: Callable[[], bool] | None = None) -> bool:
        """Send everything queued, paced; blocks until then.

        ``stop()`` is asked between sends: when it says True, what is still
        queued is given up and counted as not sent. Returns True when all
        was sent (or lost to a collector error, counted as usual).
        """
        while True:
            self.pump()
            wait = self.next_send_in()
            if wait is None:
                return True
            if stop is not None and stop():
                for s in (*self.sessions, *self._retiring):
                    s.drop_all()
                return False
            time.sleep(min(max(wait, 0.0005), DRAIN_SLEEP_S))

    # --- periodic work ----------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """Periodic duties: sends that tokens now allow, template refresh by time, statistics records."""
        if now is None:
            now = time.monotonic()
        self.pump(now)
        for s in self.sessions:
            s.check_size(now)
            for st in list(s.domains.values()):
                if s.templates_due(st.source, now) and s.allowance() >= 1:
                    self._send_templates(s, st.source, now)
        if self.settings.stats_interval_s and now - self._last_stats >= self.settings.stats_interval_s:
            self.send_statistics(now)

    def send_statistics(self, now: float | None = None) -> None:
        """One ``exporter_stats`` options record to each session, with that session's totals.

        Queued behind everything received so far; the record is made when it
        leaves (``_statistics_row``).
        """
        if now is None:
            now = time.monotonic()
        self._last_stats = now
        for domain in list(self._open):
            self._finish_open(domain)
        for s in self.sessions:
            s.enqueue(Outgoing(None, STATS_DOMAIN, 1, flow=False, statistics=True))
        self.pump(now)
        for s in self.sessions:
            s.flush()

    def _statistics_row(self, s: Session) -> npt.NDArray[np.uint8]:
        """The statistics message for ``s``: its totals now, excluding this message."""
        tmpl = self.registry[STATS_NAME]
        c = s.counters
        rec = tmpl.empty(1)
        rec["exportingProcessId"] = self.settings.exporting_process_id or (os.getpid() & 0xFFFFFFFF)
        rec["exportedMessageTotalCount"] = c.messages
        rec["exportedFlowRecordTotalCount"] = c.flow_records
        rec["exportedOctetTotalCount"] = c.octets
        rec["notSentFlowTotalCount"] = c.not_sent_records
        rec["notSentPacketTotalCount"] = c.not_sent_packets
        rec["notSentOctetTotalCount"] = c.not_sent_octets
        rec["ignoredPacketTotalCount"] = self.ignored_packets()
        rec["systemInitTimeMilliseconds"] = self._init_ms
        m = self._scratch
        m.begin(STATS_DOMAIN)
        m.add_records(tmpl, encode(tmpl, rec))
        return np.frombuffer(m.finish(0, 0), dtype=np.uint8).reshape(1, -1).copy()

    def close(self, stop: Callable[[], bool] | None = None) -> None:
        """Send everything (paced, see ``drain``), then close every transport."""
        self.flush()
        self.drain(stop)
        for s in (*self.sessions, *self._retiring):
            s.flush()
            s.close()
        self._retiring = []

    def totals(self) -> dict:
        """Counters for logs and ``status``: per collector and overall."""
        return {
            "records_in": self.records_in,
            "batches_in": self.batches_in,
            "collectors": {
                s.name: {
                    "messages": s.counters.messages,
                    "octets": s.counters.octets,
                    "data_records": s.counters.data_records,
                    "flow_records": s.counters.flow_records,
                    "packets": s.counters.packets,
                    "template_messages": s.counters.template_messages,
                    "not_sent_messages": s.counters.not_sent_messages,
                    "not_sent_records": s.counters.not_sent_records,
                    "not_sent_packets": s.counters.not_sent_packets,
                    "queued_messages": s.queued,
                    "export_rate": s.rate,
                    "send_buffer": s.transport.granted_buffer,
                    "segmented_sends": getattr(s.transport, "gso", False),
                    "message_size": s.message_size,
                    "recuts": s.counters.recuts,
                    "refused": s.counters.refused,
                    "errors": dict(s.counters.errors),
                    "last_error": s.transport.last_error,
                }
                for s in self.sessions
            },
        }
