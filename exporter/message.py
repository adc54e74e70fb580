"""IPFIX messages: one preallocated buffer filled set by set (RFC 7011 §3).

Layout (all fields big-endian)::

    0      2        4              8                12                16
    | version=10 | length | export time (s) | sequence number | observation domain id |
    | set id | set length | records ... | set id | set length | records ... |

A ``Message`` is a small state machine: ``begin(domain)``, then any number
of ``add_templates(...)`` and ``add_records(...)``, then ``finish(...)``.
Being full is a normal answer: ``add_*`` return how many records they wrote,
and the caller sends the message and goes on with the rest in the next one.
Sets are never padded (RFC 7011 §3.3.1 makes padding optional).

A big batch of one template does not go through a ``Message`` record run by
record run: ``message_rows`` lays out all its *full* messages at once as the
rows of one uint8 array (header and set header broadcast, records copied by
one reshape), byte for byte what ``Message`` would have made, and ``stamp``
writes the per-collector sequence numbers, export time and observation
domain into the header columns of any run of rows in one vectorised write.
Python work then no longer grows with the number of messages.

A collector whose path takes smaller messages than the ones queued for it
gets them cut again (``recut``): the same data records, in the same order,
in as many messages of at most the new size as they need. Rows of one
single data set (what ``message_rows`` makes) are cut as one array: their
record regions laid end to end and reshaped into the new rows. Any other
message (several sets, several templates) is read set by set and packed
again through a ``Message``. The records never change, so sequence numbers
stamped on the new rows stay exact (RFC 7011 §3.1); the packet and octet
totals of each new message are read back from its records.

Worked example (66 octets), a template set and one data record:

>>> from exporter.ie import IE
>>> from exporter.template import Template
>>> import numpy as np
>>> t = Template(256, tuple(IE[n] for n in ("sourceIPv4Address", "destinationIPv4Address",
...     "protocolIdentifier", "packetDeltaCount", "flowEndReason")))
>>> rec = t.empty(1)
>>> rec["sourceIPv4Address"] = 0xC0000201; rec["destinationIPv4Address"] = 0xC6336402
>>> rec["protocolIdentifier"] = 6; rec["packetDeltaCount"] = 10; rec["flowEndReason"] = 1
>>> m = Message(1472)
>>> m.begin(domain=1)
>>> m.add_templates([t])
1
>>> m.add_records(t, encode(t, rec))
1
>>> wire = bytes(m.finish(sequence=0, export_time=0x5F5E1000))
>>> len(wire), wire[:16].hex(" ")
(66, '00 0a 00 42 5f 5e 10 00 00 00 00 00 00 00 00 01')
>>> wire[16:20].hex(" "), wire[44:48].hex(" "), wire[48:].hex(" ")
('00 02 00 1c', '01 00 00 16', 'c0 00 02 01 c6 33 64 02 06 00 00 00 00 00 00 00 0a 01')
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import numpy.typing as npt

from .template import Template

VERSION = 10
HEADER = struct.Struct("!HHIII")  # version, length, export time, sequence, domain
SET_HEADER = struct.Struct("!HH")  # set id, length
_TIME_SEQ = struct.Struct("!II")  # export time, sequence: header octets 4-11
_TIME_SEQ_DOMAIN = struct.Struct("!III")  # export time, sequence, domain: header octets 4-15
HEADER_LEN = HEADER.size
SET_HEADER_LEN = SET_HEADER.size
MAX_MESSAGE = 0xFFFF


class EncodeError(ValueError):
    """Records or templates that cannot be put in a message."""


def encode(template: Template, records: npt.NDArray) -> memoryview:
    """Wire bytes of ``records`` (host-order array of ``template.dtype``)."""
    if records.dtype != template.dtype:
        raise EncodeError(
            f"template {template.template_id} ({template.name}): records have dtype "
            f"{records.dtype}, expected {template.dtype}"
        )
    wire = records.astype(template.wire_dtype, copy=False)
    return memoryview(np.ascontiguousarray(wire)).cast("B")


class Message:
    """One IPFIX message being built in a reusable buffer of ``max_size`` octets."""

    def __init__(self, max_size: int) -> None:
        if not HEADER_LEN + SET_HEADER_LEN < max_size <= MAX_MESSAGE:
            raise EncodeError(f"message size {max_size} is outside {HEADER_LEN + SET_HEADER_LEN + 1}-{MAX_MESSAGE}")
        self.max_size = max_size
        self._buf = bytearray(max_size)
        self._view = memoryview(self._buf)
        self.begin(0)

    def begin(self, domain: int) -> None:
        """Start a new, empty message for observation ``domain``."""
        self.domain = domain
        self._off = HEADER_LEN
        self._set_off = -1  # offset of the open data set, -1 = none
        self._set_tid = -1
        self.data_records = 0
        self.template_records = 0
        self.records_by_template: dict[int, int] = {}

    @property
    def length(self) -> int:
        return self._off

    @property
    def free(self) -> int:
        return self.max_size - self._off

    @property
    def empty(self) -> bool:
        return self._off == HEADER_LEN

    def add_templates(self, templates: Iterable[Template]) -> int:
        """Add template records (grouped into template / options template sets).

        Returns how many were written, in order; stops at the first that
        does not fit. Templates go before data: call this first.
        """
        self._close_data_set()
        written = 0
        set_off = -1
        set_id = -1
        for t in templates:
            need = len(t.encoded) + (0 if t.set_id == set_id else SET_HEADER_LEN)
            if need > self.free:
                break
            if t.set_id != set_id:
                set_off, set_id = self._off, t.set_id
                SET_HEADER.pack_into(self._buf, set_off, set_id, SET_HEADER_LEN)
                self._off += SET_HEADER_LEN
            self._buf[self._off:self._off + len(t.encoded)] = t.encoded
            self._off += len(t.encoded)
            SET_HEADER.pack_into(self._buf, set_off, set_id, self._off - set_off)
            written += 1
        self.template_records += written
        return written

    def add_records(self, template: Template, wire: memoryview | bytes, start: int = 0) -> int:
        """Add data records of ``template`` from ``wire`` (encoded records) from index ``start``.

        Returns how many records were written (0 when the message is full).
        """
        rl = template.record_length
        total = len(wire) // rl
        if len(wire) != total * rl:
            raise EncodeError(f"template {template.template_id}: {len(wire)} octets is not a whole number of {rl}-octet records")
        if start >= total:
            return 0
        extend = self._set_tid == template.template_id
        room = self.free - (0 if extend else SET_HEADER_LEN)
        n = min(total - start, max(room, 0) // rl)
        if n <= 0:
            return 0
        if not extend:
            self._set_off, self._set_tid = self._off, template.template_id
            self._off += SET_HEADER_LEN
        nbytes = n * rl
        self._view[self._off:self._off + nbytes] = wire[start * rl:start * rl + nbytes]
        self._off += nbytes
        SET_HEADER.pack_into(self._buf, self._set_off, template.template_id, self._off - self._set_off)
        self.data_records += n
        self.records_by_template[template.template_id] = self.records_by_template.get(template.template_id, 0) + n
        return n

    def _close_data_set(self) -> None:
        self._set_off, self._set_tid = -1, -1

    def finish(self, sequence: int, export_time: int | None = None) -> memoryview:
        """Write the header; the message bytes (valid until the next ``begin``)."""
        if export_time is None:
            export_time = int(time.time())
        HEADER.pack_into(self._buf, 0, VERSION, self._off, export_time & 0xFFFFFFFF,
                         sequence & 0xFFFFFFFF, self.domain)
        return self._view[:self._off]


def message_rows(template: Template, wire: memoryview | bytes, start: int, messages: int,
                 per_message: int, domain: int) -> npt.NDArray[np.uint8]:
    """``messages`` full messages of ``per_message`` records each, from record ``start`` of ``wire``.

    One row per message, each a single data set: the same octets as
    ``begin(domain)``, ``add_records`` and ``finish`` give when the records
    fill the message, except export time and sequence number, which are left
    0 for ``stamp`` (they belong to the collector the row is sent to).
    """
    rl = template.record_length
    body = per_message * rl
    size = HEADER_LEN + SET_HEADER_LEN + body
    if size > MAX_MESSAGE:
        raise EncodeError(f"a message of {size} octets is over the {MAX_MESSAGE}-octet limit")
    rows = np.empty((messages, size), dtype=np.uint8)
    head = bytearray(HEADER_LEN + SET_HEADER_LEN)
    HEADER.pack_into(head, 0, VERSION, size, 0, 0, domain)
    SET_HEADER.pack_into(head, HEADER_LEN, template.template_id, SET_HEADER_LEN + body)
    rows[:, :HEADER_LEN + SET_HEADER_LEN] = np.frombuffer(head, dtype=np.uint8)
    src = np.frombuffer(wire, dtype=np.uint8, count=messages * body, offset=start * rl)
    rows[:, HEADER_LEN + SET_HEADER_LEN:] = src.reshape(messages, body)
    return rows


def stamp(rows: npt.NDArray[np.uint8], sequence: int, step: int, export_time: int, domain: int | None = None) -> None:
    """Write export time and sequence numbers (and ``domain``, if given) into finished messages (rows) in place.

    Row ``i`` gets ``sequence + i * step`` (mod 2^32): the data records sent
    before it when every row before it carries ``step`` records (RFC 7011 §3.1).
    The rows are shared by every collector they are queued for, so a
    collector with a domain of its own writes it, and every other one its
    message's own, just before each send.
    """
    n = len(rows)
    if n == 1:  # the common small case: one struct call beats building arrays
        if domain is None:
            _TIME_SEQ.pack_into(rows[0], 4, export_time & 0xFFFFFFFF, sequence & 0xFFFFFFFF)
        else:
            _TIME_SEQ_DOMAIN.pack_into(rows[0], 4, export_time & 0xFFFFFFFF, sequence & 0xFFFFFFFF, domain)
        return
    seq = (np.arange(n, dtype=np.uint64) * np.uint64(step) + np.uint64(sequence & 0xFFFFFFFF)) & np.uint64(0xFFFFFFFF)
    rows[:, 8:12] = seq.astype(">u4").view(np.uint8).reshape(n, 4)
    rows[:, 4:8] = np.frombuffer((export_time & 0xFFFFFFFF).to_bytes(4, "big"), dtype=np.uint8)
    if domain is not None:
        rows[:, 12:16] = np.frombuffer(domain.to_bytes(4, "big"), dtype=np.uint8)


@dataclass(slots=True)
class Cut:
    """Messages of one size made by ``recut``, each with ``records`` data records.

    ``packets`` / ``octets``: per message, the sums of the records'
    packetDeltaCount / octetDeltaCount (None when the template has none).
    """

    rows: npt.NDArray[np.uint8]
    records: int
    packets: npt.NDArray[np.uint64] | None
    octets: npt.NDArray[np.uint64] | None


def _counts(template: Template, wire: npt.NDArray[np.uint8], messages: int
            ) -> tuple[npt.NDArray[np.uint64] | None, npt.NDArray[np.uint64] | None]:
    """Per-message packet and octet totals of ``wire`` (records of ``template``, ``messages`` equal runs)."""
    names = template.wire_dtype.names or ()
    if "packetDeltaCount" not in names or "octetDeltaCount" not in names:
        return None, None
    recs = wire.view(template.wire_dtype)
    pk = recs["packetDeltaCount"].astype(np.uint64).reshape(messages, -1).sum(axis=1, dtype=np.uint64)
    oc = recs["octetDeltaCount"].astype(np.uint64).reshape(messages, -1).sum(axis=1, dtype=np.uint64)
    return pk, oc


def data_sets(message: npt.NDArray[np.uint8] | bytes) -> list[tuple[int, memoryview]]:
    """``(set id, set body)`` of every set of one message, in order; raises ``EncodeError`` if torn."""
    view = memoryview(message).cast("B") if not isinstance(message, memoryview) else message
    length = HEADER.unpack_from(view)[1]
    at, out = HEADER_LEN, []
    while at + SET_HEADER_LEN <= length:
        set_id, set_len = SET_HEADER.unpack_from(view, at)
        if set_len < SET_HEADER_LEN or at + set_len > length:
            raise EncodeError(f"set {set_id} at octet {at} runs past the message end ({length})")
        out.append((set_id, view[at + SET_HEADER_LEN:at + set_len]))
        at += set_len
    return out


def recut(rows: npt.NDArray[np.uint8], size: int, template_by_id: Callable[[int], Template | None]) -> list[Cut]:
    """The data records of ``rows`` (finished messages of one domain) in messages of at most ``size`` octets.

    Same records, same order, same domain; export time and sequence number
    are left for ``stamp``. ``template_by_id`` finds each data set's
    template. Template sets cannot be cut (a template-only message is made
    again at the size instead): an ``EncodeError``, as is a record that
    does not fit ``size`` at all.
    """
    n, length = rows.shape
    domain = int.from_bytes(rows[0, 12:16].tobytes(), "big")
    first = HEADER_LEN + SET_HEADER_LEN
    set_ids = (rows[:, HEADER_LEN].astype(np.uint16) << 8) | rows[:, HEADER_LEN + 1]
    set_lens = (rows[:, HEADER_LEN + 2].astype(np.uint16) << 8) | rows[:, HEADER_LEN + 3]
    if length > first and (set_ids == set_ids[0]).all() and (set_lens == length - HEADER_LEN).all():
        template = template_by_id(int(set_ids[0]))
        if template is None:
            raise EncodeError(f"no template {int(set_ids[0])} to cut its messages by")
        return _recut_one_set(rows, size, template, domain)
    return [cut for row in rows for cut in _repack(row, size, template_by_id, domain)]


def _recut_one_set(rows: npt.NDArray[np.uint8], size: int, template: Template, domain: int) -> list[Cut]:
    """Rows of one data set of one template: record regions end to end, reshaped into new rows."""
    rl = template.record_length
    per = (size - HEADER_LEN - SET_HEADER_LEN) // rl
    if per < 1:
        raise EncodeError(f"a {rl}-octet record of template {template.template_id} does not fit "
                          f"in a {size}-octet message")
    flat = np.ascontiguousarray(rows[:, HEADER_LEN + SET_HEADER_LEN:]).reshape(-1)
    total = flat.size // rl
    full, rest = divmod(total, per)
    out = []
    if full:
        pk, oc = _counts(template, flat[:full * per * rl], full)
        out.append(Cut(message_rows(template, flat, 0, full, per, domain), per, pk, oc))
    if rest:
        pk, oc = _counts(template, flat[full * per * rl:], 1)
        out.append(Cut(message_rows(template, flat, full * per, 1, rest, domain), rest, pk, oc))
    return out


def _repack(row: npt.NDArray[np.uint8], size: int, template_by_id: Callable[[int], Template | None],
            domain: int) -> list[Cut]:
    """One message of any sets, its data records packed again through a ``Message`` of ``size``.

    A template without packet and octet counters adds 0 to them, as when
    the message was first filled.
    """
    m = Message(size)
    m.begin(domain)
    out: list[Cut] = []
    counts = [0, 0]  # packets, octets of the message being filled

    def finish() -> None:
        rows = np.frombuffer(m.finish(0, 0), dtype=np.uint8).reshape(1, -1).copy()
        out.append(Cut(rows, m.data_records, np.array([counts[0]], dtype=np.uint64),
                       np.array([counts[1]], dtype=np.uint64)))
        m.begin(domain)
        counts[0] = counts[1] = 0

    for set_id, body in data_sets(row):
        if set_id < 256:
            raise EncodeError(f"set {set_id} is a template set: a template message is made again, not cut")
        template = template_by_id(set_id)
        if template is None:
            raise EncodeError(f"no template {set_id} to cut its messages by")
        wire = np.frombuffer(body, dtype=np.uint8)
        names = template.wire_dtype.names or ()
        has = "packetDeltaCount" in names and "octetDeltaCount" in names
        recs = wire[:len(wire) - len(wire) % template.record_length].view(template.wire_dtype)
        start = 0
        while start < len(recs):
            k = m.add_records(template, body, start)
            if k == 0:
                if m.empty:
                    raise EncodeError(f"a {template.record_length}-octet record of template {set_id} "
                                      f"does not fit in a {size}-octet message")
                finish()
                continue
            if has:
                counts[0] += int(recs["packetDeltaCount"][start:start + k].sum(dtype=np.uint64))
                counts[1] += int(recs["octetDeltaCount"][start:start + k].sum(dtype=np.uint64))
            start += k
    if not m.empty:
        finish()
    return out
