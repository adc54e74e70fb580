"""Collector-side decoder: IPFIX messages from any exporter back into records (RFC 7011).

A ``Decoder`` is the collecting process's view of the wire: it keeps the
(options) templates each exporter sent, per (source, observation domain,
template id) (RFC 7011 §8), decodes data sets with them, and checks sequence
numbers per (source, observation domain) (§3.1, §10.3.2). It decodes any
template it was sent, not only ours: enterprise-specific elements (§3.2),
variable-length fields (§7), reduced-size integers (§6.2), padding (§3.3.1)
and template withdrawals (§8.1).

Message layout (RFC 7011 §3.1, §3.3.2, §3.4)::

    0      2        4              8                12                    16
    | version=10 | length | export time (s) | sequence number | observation domain id |
    | set id (2) | set length (2) | records ... [padding] | set id | ... |

    template record:  | template id | field count | specifiers ...
    options template: | template id | field count | scope field count | specifiers ...
    withdrawal:       | template id | field count = 0 |
    specifier:        | E + element id (2) | field length (2) | [enterprise number (4)]
    variable length:  | length (1) | value |  or  | 255 | length (2) | value |

Malformed input never raises out of ``decode``: the message is counted in
``stats.malformed``, the reason goes to ``stats.last_error``, and the records
of the sets before the bad one are returned (templates from those sets are
kept). A data set whose template has not (yet) arrived is counted in
``stats.unknown_template`` and skipped. Such messages, like malformed ones,
leave the record count unknown, so the next message of that domain starts
a fresh sequence check instead of counting a false gap.

Values by abstract data type (RFC 7011 §6, RFC 7012 §3.1): unsigned/signed
-> int (any length), ipv4Address/ipv6Address -> str, macAddress ->
"aa:bb:cc:dd:ee:ff", dateTimeSeconds/Milliseconds -> int (UNIX s / ms),
dateTimeMicroseconds/Nanoseconds (NTP format) -> float UNIX seconds,
boolean -> True/False (other values: the raw int), float32/64 -> float,
string -> str (UTF-8, errors replaced), anything else -> hex string. An
empty value (length 0) is always "".
"""
from __future__ import annotations

import io
import ipaddress
import socket
import struct
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from .ie import VARLEN, InformationElement, lookup
from .message import HEADER, HEADER_LEN, SET_HEADER, SET_HEADER_LEN, VERSION
from .template import MIN_DATA_SET_ID, SET_OPTIONS_TEMPLATE, SET_TEMPLATE

Value = int | float | str | bool  # a decoded field value

_TEMPLATE_HDR = struct.Struct("!HH")  # template id, field count
_SCOPE_COUNT = struct.Struct("!H")
_SPEC = struct.Struct("!HH")  # E + element id, field length
_PEN = struct.Struct("!I")
_U16 = struct.Struct("!H")
_NTP = struct.Struct("!II")  # seconds since 1900, fraction in 2^-32 s
_F32 = struct.Struct("!f")
_F64 = struct.Struct("!d")
_VERSION_LENGTH = struct.Struct("!HH")

NTP_UNIX_OFFSET_S = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01
SEQUENCE_MOD = 1 << 32
ENTERPRISE_BIT = 0x8000
VARLEN_LONG = 255  # RFC 7011 §7: this first octet announces a 2-octet length
NUMPY_MIN_RECORDS = 8  # below this a per-record loop beats building arrays


class MalformedError(ValueError):
    """Bytes that break RFC 7011; raised inside the decoder, caught by ``decode``."""


# --- values ---------------------------------------------------------------


def _hex(b: bytes) -> str:
    return b.hex()


def _unsigned(b: bytes) -> Value:
    return int.from_bytes(b, "big") if b else ""


def _signed(b: bytes) -> Value:
    return int.from_bytes(b, "big", signed=True) if b else ""


def _ipv4(b: bytes) -> str:
    return socket.inet_ntoa(b) if len(b) == 4 else b.hex()


def _ipv6(b: bytes) -> str:
    return str(ipaddress.IPv6Address(b)) if len(b) == 16 else b.hex()


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b) if len(b) == 6 else b.hex()


def _ntp(b: bytes) -> Value:
    # RFC 7011 §6.1.9-6.1.10: NTP seconds since 1900 + 32-bit binary fraction
    if len(b) != 8:
        return b.hex()
    seconds, fraction = _NTP.unpack(b)
    return (seconds - NTP_UNIX_OFFSET_S) + fraction / SEQUENCE_MOD


def _boolean_int(v: int) -> Value:
    # RFC 7011 §6.1.5: 1 = true, 2 = false; anything else is kept as it came
    return True if v == 1 else False if v == 2 else v


def _boolean(b: bytes) -> Value:
    return _boolean_int(int.from_bytes(b, "big")) if b else ""


def _float(b: bytes) -> Value:
    # float64 may come reduced to 4 octets (RFC 7011 §6.2)
    if len(b) == 4:
        return _F32.unpack(b)[0]
    if len(b) == 8:
        return _F64.unpack(b)[0]
    return b.hex()


def _string(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


_BY_TYPE: dict[str, Callable[[bytes], Value]] = {
    "ipv4Address": _ipv4,
    "ipv6Address": _ipv6,
    "macAddress": _mac,
    "dateTimeSeconds": _unsigned,
    "dateTimeMilliseconds": _unsigned,
    "dateTimeMicroseconds": _ntp,
    "dateTimeNanoseconds": _ntp,
    "boolean": _boolean,
    "float32": _float,
    "float64": _float,
    "string": _string,
}


def value_decoder(abstract_type: str) -> Callable[[bytes], Value]:
    """The function turning one field's octets into a value of ``abstract_type``."""
    if abstract_type.startswith("unsigned"):
        return _unsigned
    if abstract_type.startswith("signed"):
        return _signed
    return _BY_TYPE.get(abstract_type, _hex)


def _numpy_column(e: InformationElement, length: int) -> tuple[str, Callable | None]:
    """Big-endian numpy code of a fixed-length field and the conversion after ``tolist()``.

    Integers and floats of a native width come out of numpy as Python
    numbers; every other field is a void column whose ``tolist()`` gives the
    octets, converted like the per-record path does.
    """
    t = e.type
    if (t.startswith("unsigned") or t in ("dateTimeSeconds", "dateTimeMilliseconds")) and length in (1, 2, 4, 8):
        return f">u{length}", None
    if t.startswith("signed") and length in (1, 2, 4, 8):
        return f">i{length}", None
    if t in ("float32", "float64") and length in (4, 8):
        return f">f{length}", None
    if t == "boolean" and length == 1:
        return "u1", _boolean_int
    return f"V{length}", value_decoder(t)


# --- templates as received ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReceivedField:
    """One field specifier of a received template."""

    key: str  # element name, made unique within the record ("name#2" for a repeat)
    element: InformationElement
    length: int  # octets on the wire, VARLEN = variable length
    decode: Callable[[bytes], Value] = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ReceivedTemplate:
    """A (options) template as an exporter sent it (RFC 7011 §3.4.1, §3.4.2.2)."""

    template_id: int
    fields: tuple[ReceivedField, ...]
    scope_count: int
    specifiers: tuple[tuple[int, int, int], ...]  # (pen, element id, field length) as received
    min_record_length: int  # fixed lengths + 1 octet per variable-length field
    fixed: bool  # no variable-length field: every record is min_record_length octets
    wire_dtype: np.dtype | None = field(compare=False, repr=False)  # None: per-record only
    posts: tuple[Callable | None, ...] = field(compare=False, repr=False)

    @property
    def is_options(self) -> bool:
        return self.scope_count > 0

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(f.key for f in self.fields)


def compile_template(template_id: int, specifiers: list[tuple[int, int, int]], scope_count: int = 0) -> ReceivedTemplate:
    """A ``ReceivedTemplate`` from (pen, element id, field length) specifiers.

    Raises ``MalformedError`` for a template whose records would be empty
    (every field of length 0): no data set could be split into records.
    """
    fields = []
    seen: dict[str, int] = {}
    for pen, element_id, length in specifiers:
        e = lookup(pen, element_id, length)
        n = seen.get(e.name, 0) + 1
        seen[e.name] = n
        key = e.name if n == 1 else f"{e.name}#{n}"  # RFC 7011 §4.2 repeats observationTime*
        fields.append(ReceivedField(key, e, length, value_decoder(e.type)))
    fixed = all(f.length != VARLEN for f in fields)
    min_length = sum(1 if f.length == VARLEN else f.length for f in fields)
    if min_length == 0:
        raise MalformedError(f"template {template_id}: every field has length 0, records would be empty")
    wire_dtype = None
    posts: tuple[Callable | None, ...] = ()
    if fixed and all(f.length > 0 for f in fields):
        columns = [_numpy_column(f.element, f.length) for f in fields]
        wire_dtype = np.dtype([(f.key, code) for f, (code, _) in zip(fields, columns)])
        posts = tuple(post for _, post in columns)
    return ReceivedTemplate(template_id, tuple(fields), scope_count, tuple(specifiers), min_length, fixed, wire_dtype, posts)


# --- results ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecodedRecord:
    """One data record (flow or options) with the header of its message."""

    source: Hashable
    domain: int  # observation domain id of the message
    template_id: int
    export_time: int  # UNIX seconds, from the message header
    sequence: int  # sequence number of the message
    is_options: bool
    fields: dict[str, Value]  # element name -> value, in template order


@dataclass(slots=True)
class DecoderStats:
    """What the decoder saw; counters only grow."""

    messages: int = 0  # messages decoded or rejected (a truncated stream tail included)
    records: int = 0  # data records returned (options data records included)
    options_records: int = 0  # of which options data records (statistics, sampling, interface names)
    templates: int = 0  # template records received (refreshes included)
    options_templates: int = 0  # options template records received
    withdrawals: int = 0  # template withdrawal records (RFC 7011 §8.1)
    malformed: int = 0  # messages with an error; their later sets are lost
    unknown_template: int = 0  # data sets skipped for want of their template
    sequence_gaps: int = 0  # messages whose sequence number was not the expected one
    lost_records: int = 0  # sum of the forward gaps
    last_error: str = ""


def describe_source(source: Hashable) -> str:
    """ "host:port" for an address tuple ("[v6]:port" for IPv6), str() otherwise."""
    if isinstance(source, tuple) and len(source) >= 2:
        host, port = source[0], source[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "-" if source is None else str(source)


# --- the decoder -------------------------------------------------------------


class Decoder:
    """Collecting-process state: templates and sequence numbers per exporter and domain."""

    def __init__(self, numpy_min_records: int = NUMPY_MIN_RECORDS) -> None:
        self.stats = DecoderStats()
        self.numpy_min_records = numpy_min_records
        self._templates: dict[tuple[Hashable, int, int], ReceivedTemplate] = {}
        self._expected: dict[tuple[Hashable, int], int] = {}

    def template(self, source: Hashable, domain: int, template_id: int) -> ReceivedTemplate | None:
        """The template currently known for (source, observation domain, template id)."""
        return self._templates.get((source, domain, template_id))

    def decode(self, data: bytes | bytearray | memoryview, source: Hashable = None) -> list[DecodedRecord]:
        """Records of one IPFIX message; never raises on any bytes input."""
        self.stats.messages += 1
        out: list[DecodedRecord] = []
        try:
            self._message(bytes(data), source, out)
        except MalformedError as exc:
            self.stats.malformed += 1
            self.stats.last_error = f"{describe_source(source)}: {exc}"
        self.stats.records += len(out)
        self.stats.options_records += sum(r.is_options for r in out)
        return out

    def iter_stream(self, stream: bytes | bytearray | memoryview | BinaryIO, source: Hashable = None) -> Iterator[list[DecodedRecord]]:
        """The records of each message in concatenated messages (an RFC 5655 file).

        ``stream`` is a buffer or a binary file object. A message cut off at
        the end, or a header that is not IPFIX, is counted malformed and ends
        the stream (message boundaries cannot be found past it).
        """
        fh: BinaryIO = stream if hasattr(stream, "read") else io.BytesIO(stream)  # type: ignore[arg-type, assignment]
        offset = 0
        while True:
            head = fh.read(HEADER_LEN)
            if not head:
                return
            if len(head) < HEADER_LEN:
                self._stream_error(source, f"offset {offset}: message truncated, {len(head)} octets left of a {HEADER_LEN}-octet header")
                return
            version, length = _VERSION_LENGTH.unpack_from(head)
            if version != VERSION:
                self._stream_error(source, f"offset {offset}: version {version} is not IPFIX ({VERSION}); stopping")
                return
            if length < HEADER_LEN:
                self._stream_error(source, f"offset {offset}: message length {length} is shorter than its header; stopping")
                return
            rest = fh.read(length - HEADER_LEN)
            if len(rest) < length - HEADER_LEN:
                self._stream_error(source, f"offset {offset}: message truncated, {HEADER_LEN + len(rest)} of {length} octets")
                return
            yield self.decode(head + rest, source)
            offset += length

    def decode_stream(self, stream: bytes | bytearray | memoryview | BinaryIO, source: Hashable = None) -> list[DecodedRecord]:
        """All records of concatenated messages (see ``iter_stream``)."""
        return [r for records in self.iter_stream(stream, source) for r in records]

    def _stream_error(self, source: Hashable, text: str) -> None:
        self.stats.messages += 1
        self.stats.malformed += 1
        self.stats.last_error = f"{describe_source(source)}: {text}"

    # -- message and sets (RFC 7011 §3.1, §3.3) --

    def _message(self, data: bytes, source: Hashable, out: list[DecodedRecord]) -> None:
        if len(data) < HEADER_LEN:
            raise MalformedError(f"{len(data)} octets, shorter than the {HEADER_LEN}-octet message header")
        version, length, export_time, sequence, domain = HEADER.unpack_from(data)
        if version != VERSION:
            raise MalformedError(f"version {version}, expected {VERSION}")
        if length != len(data):
            raise MalformedError(f"message length field {length} does not match the {len(data)} octets received")
        where = f"domain {domain}"
        key = (source, domain)
        # RFC 7011 §10.3.2: the expected value is the previous one plus the
        # data records of the previous message of this domain
        expected = self._expected.pop(key, None)
        if expected is not None and sequence != expected:
            self.stats.sequence_gaps += 1
            ahead = (sequence - expected) % SEQUENCE_MOD
            if ahead < SEQUENCE_MOD // 2:
                self.stats.lost_records += ahead
        counted = True  # False once a data set's records could not be counted
        n_records = 0
        offset = HEADER_LEN
        while offset < length:
            if length - offset < SET_HEADER_LEN:
                raise MalformedError(f"{where}: offset {offset}: {length - offset} octets left, too few for a set header")
            set_id, set_length = SET_HEADER.unpack_from(data, offset)
            if set_length < SET_HEADER_LEN:
                raise MalformedError(f"{where}: set {set_id} at offset {offset}: length {set_length} is shorter than a set header")
            end = offset + set_length
            if end > length:
                raise MalformedError(f"{where}: set {set_id} at offset {offset}: length {set_length} runs past the message end ({length})")
            if set_id in (SET_TEMPLATE, SET_OPTIONS_TEMPLATE):
                self._template_set(data, offset, end, set_id, source, domain)
            elif set_id >= MIN_DATA_SET_ID:
                template = self._templates.get((source, domain, set_id))
                if template is None:
                    self.stats.unknown_template += 1
                    counted = False
                else:
                    records = self._data_set(data, offset, end, template, f"{where}: data set {set_id} at offset {offset}")
                    n_records += len(records)
                    out.extend(
                        DecodedRecord(source, domain, set_id, export_time, sequence, template.is_options, fields)
                        for fields in records
                    )
            else:
                raise MalformedError(f"{where}: offset {offset}: set id {set_id} is not 2, 3 or 256-65535")
            offset = end
        if counted:
            self._expected[key] = (sequence + n_records) % SEQUENCE_MOD

    def _template_set(self, data: bytes, offset: int, end: int, set_id: int, source: Hashable, domain: int) -> None:
        """Apply the (options) template and withdrawal records of one set (RFC 7011 §3.4, §8.1)."""
        options = set_id == SET_OPTIONS_TEMPLATE
        kind = "options template" if options else "template"
        pos = offset + SET_HEADER_LEN
        while end - pos >= _TEMPLATE_HDR.size:
            template_id, count = _TEMPLATE_HDR.unpack_from(data, pos)
            where = f"domain {domain}: {kind} set at offset {offset}: {kind} {template_id}"
            if count == 0:
                self._withdraw(source, domain, template_id, set_id, where)
                pos += _TEMPLATE_HDR.size
                continue
            if template_id < MIN_DATA_SET_ID:
                raise MalformedError(f"{where}: template id is below {MIN_DATA_SET_ID}")
            pos += _TEMPLATE_HDR.size
            scope_count = 0
            if options:
                if end - pos < _SCOPE_COUNT.size:
                    raise MalformedError(f"{where}: scope field count runs past the end of its set")
                (scope_count,) = _SCOPE_COUNT.unpack_from(data, pos)
                pos += _SCOPE_COUNT.size
                if not 1 <= scope_count <= count:  # RFC 7011 §3.4.2.2: never zero
                    raise MalformedError(f"{where}: scope field count {scope_count} is not 1-{count}")
            specifiers = []
            for i in range(count):
                if end - pos < _SPEC.size:
                    raise MalformedError(f"{where}: field {i + 1} of {count} runs past the end of its set")
                element_id, length = _SPEC.unpack_from(data, pos)
                pos += _SPEC.size
                pen = 0
                if element_id & ENTERPRISE_BIT:
                    if end - pos < _PEN.size:
                        raise MalformedError(f"{where}: enterprise number of field {i + 1} runs past the end of its set")
                    (pen,) = _PEN.unpack_from(data, pos)
                    pos += _PEN.size
                    element_id &= ~ENTERPRISE_BIT
                specifiers.append((pen, element_id, length))
            key = (source, domain, template_id)
            known = self._templates.get(key)
            if known is None or known.scope_count != scope_count or known.specifiers != tuple(specifiers):
                try:
                    template = compile_template(template_id, specifiers, scope_count)
                except MalformedError as exc:
                    raise MalformedError(f"domain {domain}: {exc}") from None
                # RFC 7011 §8.4: over UDP a new definition simply replaces the old one
                self._templates[key] = template
            # else: a refresh (RFC 7011 §8.4) of the template we have, nothing to build
            if options:
                self.stats.options_templates += 1
            else:
                self.stats.templates += 1
        _check_padding(data, pos, end, f"domain {domain}: {kind} set at offset {offset}")

    def _withdraw(self, source: Hashable, domain: int, template_id: int, set_id: int, where: str) -> None:
        self.stats.withdrawals += 1
        if template_id == set_id:  # RFC 7011 §8.1: id 2 / 3 withdraws all (options) templates
            options = set_id == SET_OPTIONS_TEMPLATE
            for k, t in list(self._templates.items()):
                if k[0] == source and k[1] == domain and t.is_options == options:
                    del self._templates[k]
        elif template_id < MIN_DATA_SET_ID:
            raise MalformedError(f"{where}: withdrawal of template id below {MIN_DATA_SET_ID}")
        else:
            self._templates.pop((source, domain, template_id), None)

    def _data_set(self, data: bytes, offset: int, end: int, template: ReceivedTemplate, where: str) -> list[dict[str, Value]]:
        """The field dicts of one data set (RFC 7011 §3.4.3)."""
        start = offset + SET_HEADER_LEN
        if template.fixed:
            record_length = template.min_record_length
            n = (end - start) // record_length
            _check_padding(data, start + n * record_length, end, where)
            if template.wire_dtype is not None and n >= self.numpy_min_records:
                return _fixed_records_numpy(data, start, n, template)
            return _fixed_records(data, start, n, template)
        return _variable_records(data, start, end, template, where)


def _check_padding(data: bytes, pos: int, end: int, where: str) -> None:
    # RFC 7011 §3.3.1: padding is shorter than any record and made of zero
    # octets; anything else is a record that was cut off
    if pos < end and any(data[pos:end]):
        raise MalformedError(f"{where}: {end - pos} trailing octets are neither a whole record nor zero padding")


def _fixed_records(data: bytes, start: int, n: int, template: ReceivedTemplate) -> list[dict[str, Value]]:
    out = []
    pos = start
    for _ in range(n):
        fields = {}
        for f in template.fields:
            fields[f.key] = f.decode(data[pos:pos + f.length])
            pos += f.length
        out.append(fields)
    return out


def _fixed_records_numpy(data: bytes, start: int, n: int, template: ReceivedTemplate) -> list[dict[str, Value]]:
    """The whole set as one big-endian structured array, converted column by column."""
    assert template.wire_dtype is not None
    array = np.frombuffer(data, dtype=template.wire_dtype, count=n, offset=start)
    keys = template.keys
    columns = []
    for key, post in zip(keys, template.posts):
        column = array[key].tolist()
        columns.append(column if post is None else [post(v) for v in column])
    return [dict(zip(keys, row)) for row in zip(*columns)]


def _variable_records(data: bytes, start: int, end: int, template: ReceivedTemplate, where: str) -> list[dict[str, Value]]:
    out = []
    pos = start
    while end - pos >= template.min_record_length:
        record_start = pos
        fields = {}
        for f in template.fields:
            length = f.length
            if length == VARLEN:  # RFC 7011 §7
                if pos >= end:
                    raise MalformedError(f"{where}: record {len(out) + 1} at offset {record_start}: {f.key}: length cut off")
                length = data[pos]
                pos += 1
                if length == VARLEN_LONG:
                    if end - pos < _U16.size:
                        raise MalformedError(f"{where}: record {len(out) + 1} at offset {record_start}: {f.key}: length cut off")
                    (length,) = _U16.unpack_from(data, pos)
                    pos += _U16.size
            if end - pos < length:
                raise MalformedError(f"{where}: record {len(out) + 1} at offset {record_start}: "
                                     f"{f.key} ({length} octets) runs past the end of the set")
            fields[f.key] = f.decode(data[pos:pos + length])
            pos += length
        out.append(fields)
    _check_padding(data, pos, end, where)
    return out
