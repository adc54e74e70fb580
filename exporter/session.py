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
that comes back gets the templates again before its next data.
"""
from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field

from .message import set_sequence
from .transport import TransportError


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
    template_messages: int = 0
    not_sent_messages: int = 0
    not_sent_records: int = 0
    not_sent_packets: int = 0
    not_sent_octets: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class Session:
    """Export state for one collector over one transport."""

    def __init__(self, transport, refresh_s: float, refresh_messages: int) -> None:
        self.transport = transport
        self.name = str(transport.address)
        self.refresh_s = refresh_s
        self.refresh_messages = refresh_messages
        self.domains: dict[int, DomainState] = {}
        self.counters = SessionCounters()
        self._last_export_time = 0

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

    def send(self, message: memoryview, domain: int, data_records: int, now: float, *,
             flow_records: int = 0, packets: int = 0, octets: int = 0,
             templates: bool = False) -> bool:
        """Send a finished message, stamping this session's sequence number and export time.

        Returns True when it left. ``packets``/``octets`` are the flow
        counters carried by its records (for the not-sent totals).
        """
        st = self.domain(domain)
        set_sequence(message, st.sequence)
        message[4:8] = self.export_time().to_bytes(4, "big")
        c = self.counters
        try:
            self.transport.send(message, now)
        except TransportError as exc:
            name = errno.errorcode.get(exc.errno or 0, "EIO")
            c.errors[name] = c.errors.get(name, 0) + 1
            c.not_sent_messages += 1
            c.not_sent_records += data_records
            c.not_sent_packets += packets
            c.not_sent_octets += octets
            self.mark_templates_due()
            return False
        st.sequence = (st.sequence + data_records) & 0xFFFFFFFF
        c.messages += 1
        c.octets += len(message)
        c.data_records += data_records
        c.flow_records += flow_records
        if templates:
            c.template_messages += 1
            st.templates_sent_at = now
            st.messages_since_templates = 0
        else:
            st.messages_since_templates += 1
        return True

    def flush(self) -> None:
        flush = getattr(self.transport, "flush", None)
        if flush is not None:
            flush()

    def close(self) -> None:
        self.transport.close()
