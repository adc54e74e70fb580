"""The exporting process: flow record batches in, IPFIX messages out to every collector.

It owns the template registry, one open message per observation domain and
one ``Session`` per collector. Records are encoded once per batch (one
``astype`` to the template's big-endian dtype) and packed into messages no
larger than ``max_message`` octets; each finished message goes to every
collector, stamped with that collector's own sequence number.

Templates (RFC 7011 §8):

* a session gets a template-only message for a domain before that domain's
  first data, again every ``refresh_s`` seconds or ``refresh_messages``
  messages (whichever comes first), after a failed send, and at once after
  ``reload()``;
* flow templates are sent in the flow domains, the statistics options
  template in domain 0, where the exporter-wide statistics go (RFC 7011 §4).

Statistics: every ``stats_interval_s`` each session gets one options data
record of the ``exporter_stats`` template with its own totals (messages,
flow records and octets sent before that message; records, packets and
octets not sent).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .message import Message, encode
from .session import Session
from .template import STATS_NAME, Template, TemplateRegistry, default_registry
from .transport import CollectorAddress, open_transport

STATS_DOMAIN = 0  # RFC 7011 §4: exporter-wide records go in messages with ODID 0


@dataclass(frozen=True, slots=True)
class ExportSettings:
    collectors: tuple[CollectorAddress, ...]
    max_message: int = 1452
    refresh_s: float = 30.0
    refresh_messages: int = 256
    stats_interval_s: float = 60.0
    exporting_process_id: int = 0


class ExportingProcess:
    """Packs record batches into messages and sends them to every session."""

    def __init__(self, settings: ExportSettings, registry: TemplateRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or default_registry()
        self.sessions = [Session(open_transport(a), settings.refresh_s, settings.refresh_messages)
                         for a in settings.collectors]
        self._open: dict[int, Message] = {}
        self._open_packets: dict[int, int] = {}
        self._open_octets: dict[int, int] = {}
        self._scratch = Message(settings.max_message)
        self._template_messages: dict[int, list[bytes]] = {}
        self._flow_domains: set[int] = set()
        self._init_ms = int(time.time() * 1000)
        self._last_stats = time.monotonic()
        self.records_in = 0
        self.batches_in = 0

    # --- templates ------------------------------------------------------
    def _templates_for(self, domain: int) -> list[Template]:
        out = [t for t in self.registry if not t.is_options] if domain in self._flow_domains else []
        if domain == STATS_DOMAIN:
            out.append(self.registry[STATS_NAME])
        return out

    def _template_messages_for(self, domain: int) -> list[bytes]:
        """Template-only messages (header sequence to be stamped) covering all of a domain's templates."""
        cached = self._template_messages.get(domain)
        if cached is not None:
            return cached
        pending = self._templates_for(domain)
        out: list[bytes] = []
        m = self._scratch
        while pending:
            m.begin(domain)
            n = m.add_templates(pending)
            if n == 0:
                raise ValueError(f"template {pending[0].template_id} does not fit in a "
                                 f"{self.settings.max_message}-octet message")
            out.append(bytes(m.finish(0)))
            pending = pending[n:]
        self._template_messages[domain] = out
        return out

    def _ensure_templates(self, session: Session, domain: int, now: float) -> bool:
        if not session.templates_due(domain, now):
            return True
        for raw in self._template_messages_for(domain):
            if not session.send(memoryview(bytearray(raw)), domain, 0, now, templates=True):
                return False
        return True

    def reload(self, settings: ExportSettings | None = None) -> None:
        """Apply new settings (collectors, sizes, periods); templates go out again at once.

        Sessions whose collector stays keep their sequence numbers; new
        collectors start at 0; removed ones are closed. Open messages are
        flushed first so nothing received is lost.
        """
        self.flush()
        if settings is not None:
            old = {s.transport.address: s for s in self.sessions}
            keep = []
            for a in settings.collectors:
                s = old.pop(a, None)
                if s is None:
                    s = Session(open_transport(a), settings.refresh_s, settings.refresh_messages)
                s.refresh_s, s.refresh_messages = settings.refresh_s, settings.refresh_messages
                keep.append(s)
            for s in old.values():
                s.close()
            self.sessions = keep
            if settings.max_message != self.settings.max_message:
                self._open.clear()
                self._scratch = Message(settings.max_message)
            self.settings = settings
        self._template_messages.clear()
        for s in self.sessions:
            s.mark_templates_due()

    # --- data -----------------------------------------------------------
    def export(self, template: Template, records: npt.NDArray, domain: int, now: float | None = None) -> None:
        """Queue ``records`` (host-order array of ``template.dtype``) for every collector."""
        if now is None:
            now = time.monotonic()
        if domain not in self._flow_domains and not template.is_options:
            self._flow_domains.add(domain)
            self._template_messages.pop(domain, None)
        n = len(records)
        self.batches_in += 1
        self.records_in += n
        if n == 0:
            return
        wire = encode(template, records)
        counted = "packetDeltaCount" in template.dtype.names and "octetDeltaCount" in template.dtype.names
        if counted:
            pk = np.cumsum(records["packetDeltaCount"], dtype=np.uint64)
            oc = np.cumsum(records["octetDeltaCount"], dtype=np.uint64)
        m = self._message(domain)
        start = 0
        while start < n:
            k = m.add_records(template, wire, start)
            if k == 0:
                if m.empty:
                    raise ValueError(f"a {template.record_length}-octet record of template "
                                     f"{template.template_id} does not fit in a message")
                self._send(domain, now)
                m = self._message(domain)
                continue
            if counted:
                lo = int(pk[start - 1]) if start else 0
                self._open_packets[domain] += int(pk[start + k - 1]) - lo
                lo = int(oc[start - 1]) if start else 0
                self._open_octets[domain] += int(oc[start + k - 1]) - lo
            start += k
        if m.free < template.record_length:
            self._send(domain, now)

    def _message(self, domain: int) -> Message:
        m = self._open.get(domain)
        if m is None:
            m = self._open[domain] = Message(self.settings.max_message)
            m.begin(domain)
            self._open_packets[domain] = 0
            self._open_octets[domain] = 0
        return m

    def _send(self, domain: int, now: float) -> None:
        m = self._open.get(domain)
        if m is None or m.empty:
            return
        view = m.finish(0)
        stats_only = domain == STATS_DOMAIN and domain not in self._flow_domains
        for s in self.sessions:
            pk, oc = self._open_packets[domain], self._open_octets[domain]
            if not self._ensure_templates(s, domain, now):
                s.counters.not_sent_messages += 1
                s.counters.not_sent_records += m.data_records
                s.counters.not_sent_packets += pk
                s.counters.not_sent_octets += oc
                continue
            s.send(view, domain, m.data_records, now, flow_records=0 if stats_only else m.data_records,
                   packets=pk, octets=oc)
        m.begin(domain)
        self._open_packets[domain] = 0
        self._open_octets[domain] = 0

    def flush(self, now: float | None = None) -> None:
        """Send every open message now."""
        if now is None:
            now = time.monotonic()
        for domain in list(self._open):
            self._send(domain, now)
        for s in self.sessions:
            s.flush()

    # --- periodic work ----------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """Periodic duties: template refresh by time, statistics records."""
        if now is None:
            now = time.monotonic()
        for s in self.sessions:
            for domain in list(s.domains):
                self._ensure_templates(s, domain, now)
        if self.settings.stats_interval_s and now - self._last_stats >= self.settings.stats_interval_s:
            self.send_statistics(now)

    def send_statistics(self, now: float | None = None) -> None:
        """One ``exporter_stats`` options record to each session, with that session's totals."""
        if now is None:
            now = time.monotonic()
        self._last_stats = now
        self.flush(now)
        tmpl = self.registry[STATS_NAME]
        m = self._scratch
        for s in self.sessions:
            if not self._ensure_templates(s, STATS_DOMAIN, now):
                continue
            c = s.counters
            rec = tmpl.empty(1)
            rec["exportingProcessId"] = self.settings.exporting_process_id or (os.getpid() & 0xFFFFFFFF)
            rec["exportedMessageTotalCount"] = c.messages
            rec["exportedFlowRecordTotalCount"] = c.flow_records
            rec["exportedOctetTotalCount"] = c.octets
            rec["notSentFlowTotalCount"] = c.not_sent_records
            rec["notSentPacketTotalCount"] = c.not_sent_packets
            rec["notSentOctetTotalCount"] = c.not_sent_octets
            rec["systemInitTimeMilliseconds"] = self._init_ms
            m.begin(STATS_DOMAIN)
            m.add_records(tmpl, encode(tmpl, rec))
            s.send(m.finish(0), STATS_DOMAIN, 1, now)
        for s in self.sessions:
            s.flush()

    def close(self) -> None:
        self.flush()
        for s in self.sessions:
            s.close()

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
                    "template_messages": s.counters.template_messages,
                    "not_sent_messages": s.counters.not_sent_messages,
                    "not_sent_records": s.counters.not_sent_records,
                    "errors": dict(s.counters.errors),
                    "last_error": s.transport.last_error,
                }
                for s in self.sessions
            },
        }
