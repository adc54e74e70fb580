"""Templates: the layout of data records, and the registry of this exporter's own.

A template (RFC 7011 §3.4.1) is a value: an id and a tuple of information
elements, the first ``scope_count`` of which are scope fields when it is an
options template (§3.4.2.2). Because every element this project exports has a
fixed length, a template *is* a numpy structured dtype:

* ``dtype``: host order, what workers build records in;
* ``wire_dtype``: big-endian, the bytes of a data record on the wire, so
  encoding a batch is ``records.astype(template.wire_dtype)``.

Template record encoding (RFC 7011 §3.4.1, §3.4.2.2)::

    template:  | template id (2) | field count (2) | specifiers ...
    options:   | template id (2) | field count (2) | scope field count (2) | specifiers ...
    specifier: | E + element id (2) | field length (2) | [enterprise number (4)]

The registry (``TemplateRegistry``) gives each layout an id derived from the
layout itself (``layout_id``: a hash of the scope count and the field
specifiers into 256-65535), so the same layout has the same id in every
process, on every start and in every release, and a changed layout gets
another id. A collector that still caches an id from before a restart or an
upgrade therefore never decodes a record of another layout under it (RFC
7011 §8.4: reusing an id over UDP needs a wait of three refresh periods,
which a restart cannot give). Two layouts meet at one id with odds of about
1 in 65,000 per pair; within a process the later one is moved on (the hash
taken again with a salt), so an id never means two layouts there either.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

import numpy as np

from .ie import IE, VARLEN, InformationElement

SET_TEMPLATE = 2  # RFC 7011 §3.3.2: Set ID of a Template Set
SET_OPTIONS_TEMPLATE = 3  # ... of an Options Template Set
MIN_DATA_SET_ID = 256

_HDR = struct.Struct("!HH")
_OPT_HDR = struct.Struct("!HHH")
_SPEC = struct.Struct("!HH")
_PEN = struct.Struct("!I")


class TemplateError(ValueError):
    """A template that RFC 7011 does not allow."""


@dataclass(frozen=True, slots=True)
class Template:
    """An IPFIX (options) template; built once, its encodings computed then."""

    template_id: int
    elements: tuple[InformationElement, ...]
    scope_count: int = 0
    name: str = ""
    dtype: np.dtype = field(init=False, compare=False, repr=False)
    wire_dtype: np.dtype = field(init=False, compare=False, repr=False)
    record_length: int = field(init=False, compare=False, repr=False)
    encoded: bytes = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not MIN_DATA_SET_ID <= self.template_id <= 0xFFFF:
            raise TemplateError(f"template id {self.template_id} is outside 256-65535")
        if not self.elements:
            raise TemplateError(f"template {self.template_id} has no fields")
        if not 0 <= self.scope_count <= len(self.elements):
            raise TemplateError(f"template {self.template_id}: bad scope field count {self.scope_count}")
        names = [e.name for e in self.elements]
        if len(set(names)) != len(names):
            raise TemplateError(f"template {self.template_id}: an element appears twice")
        fixed = all(e.length != VARLEN for e in self.elements)
        if fixed:
            host = np.dtype([(e.name, e.numpy_code()) for e in self.elements])
            wire = np.dtype([(e.name, e.wire_code()) for e in self.elements])
            length = wire.itemsize
        else:
            host = wire = None
            length = -1
        object.__setattr__(self, "dtype", host)
        object.__setattr__(self, "wire_dtype", wire)
        object.__setattr__(self, "record_length", length)
        object.__setattr__(self, "encoded", self._encode())

    @property
    def is_options(self) -> bool:
        return self.scope_count > 0

    @property
    def set_id(self) -> int:
        return SET_OPTIONS_TEMPLATE if self.is_options else SET_TEMPLATE

    def _encode(self) -> bytes:
        n = len(self.elements)
        out = bytearray(
            _OPT_HDR.pack(self.template_id, n, self.scope_count)
            if self.is_options
            else _HDR.pack(self.template_id, n)
        )
        for e in self.elements:
            if e.pen:
                out += _SPEC.pack(0x8000 | e.element_id, e.length) + _PEN.pack(e.pen)
            else:
                out += _SPEC.pack(e.element_id, e.length)
        return bytes(out)

    def same_layout(self, other: "Template") -> bool:
        """True when both describe the same record bytes (ids aside)."""
        return (
            self.scope_count == other.scope_count
            and len(self.elements) == len(other.elements)
            and all(
                a == b and a.length == b.length for a, b in zip(self.elements, other.elements)
            )
        )

    def empty(self, n: int) -> np.ndarray:
        """A zeroed host-order record array of this template."""
        return np.zeros(n, dtype=self.dtype)

    def describe(self) -> str:
        kind = "options template" if self.is_options else "template"
        size = f"{self.record_length} octets per record" if self.record_length >= 0 else "records of variable length"
        lines = [f"{kind} {self.template_id} {self.name}: {len(self.elements)} fields, {size}"]
        for i, e in enumerate(self.elements):
            scope = " (scope)" if i < self.scope_count else ""
            length = "variable" if e.length == VARLEN else f"{e.length:>2}"
            lines.append(f"  {e.element_id:>5}  {e.name:<32} {length}{scope}")
        return "\n".join(lines)


_REDUCED = {"tcpControlBits": 1}


def _els(*names: str) -> tuple[InformationElement, ...]:
    return tuple(IE[n].with_length(_REDUCED[n]) if n in _REDUCED else IE[n] for n in names)


# --- the flow templates: IPv4/IPv6 x TCP, UDP, ICMP, other -------------------
#
# Class "udp" also carries the other protocols whose first four transport
# octets are the two ports (SCTP 132, DCCP 33, UDP-Lite 136): see FLOW_CLASS.
# tcpControlBits is reduced to 1 octet (RFC 7011 §6.2): the meter sees the
# flags octet of the TCP header (CWR..FIN), and pmacct's nfacctd reads only
# the first octet of the field (a 2-octet field shows as flags 0 there).
# forwardingStatus is the 1-octet reduced size RFC 9710 asks for.

_TIMES_COUNTS = ("flowStartMilliseconds", "flowEndMilliseconds", "octetDeltaCount", "packetDeltaCount")
_TAIL = ("protocolIdentifier", "ipClassOfService", "flowDirection", "flowEndReason",
         "forwardingStatus", "ingressInterface", "egressInterface")
_ADDRS = {4: ("sourceIPv4Address", "destinationIPv4Address"),
          6: ("sourceIPv6Address", "destinationIPv6Address")}
_CLASS_FIELDS = {
    "tcp": ("sourceTransportPort", "destinationTransportPort", "tcpControlBits"),
    "udp": ("sourceTransportPort", "destinationTransportPort"),
    "icmp": None,  # per family, below
    "other": (),
}
_ICMP = {4: ("icmpTypeCodeIPv4",), 6: ("icmpTypeCodeIPv6",)}

FLOW_CLASSES = ("tcp", "udp", "icmp", "other")

# protocol number -> class, per family (anything absent is "other")
FLOW_CLASS = {
    4: {6: "tcp", 17: "udp", 132: "udp", 33: "udp", 136: "udp", 1: "icmp"},
    6: {6: "tcp", 17: "udp", 132: "udp", 33: "udp", 136: "udp", 58: "icmp"},
}


def flow_template_name(family: int, klass: str) -> str:
    return f"ipv{family}_{klass}"


def _flow_layouts() -> dict[str, tuple[InformationElement, ...]]:
    out = {}
    for family in (4, 6):
        for klass in FLOW_CLASSES:
            middle = _ICMP[family] if klass == "icmp" else _CLASS_FIELDS[klass]
            out[flow_template_name(family, klass)] = _els(*_TIMES_COUNTS, *_ADDRS[family], *middle, *_TAIL)
    return out


FLOW_LAYOUTS = _flow_layouts()

# RFC 7011 §4.3 Exporting Process Reliability Statistics, with the §4.1-style
# exported totals, scoped by exportingProcessId; one record per collector
# (each collector is its own transport session with its own totals).
STATS_NAME = "exporter_stats"
STATS_LAYOUT = _els(
    "exportingProcessId",
    "exportedMessageTotalCount",
    "exportedFlowRecordTotalCount",
    "exportedOctetTotalCount",
    "notSentFlowTotalCount",
    "notSentPacketTotalCount",
    "notSentOctetTotalCount",
    "ignoredPacketTotalCount",
    "systemInitTimeMilliseconds",
)
STATS_SCOPE_COUNT = 1

# Options records that describe the export (``exporter/options.py``), sent in every flow domain.
# Sampling (RFC 5477 elements, RFC 7011 §4-style scope): every packet is metered, so systematic
# count-based selection (RFC 5475 algorithm 1) of 1 packet in every 1, none skipped; the scope is
# the observation domain. selectorAlgorithm is reduced to 1 octet, the length nfdump reads.
SAMPLING_NAME = "sampling"
SAMPLING_LAYOUT = (IE["observationDomainId"], IE["selectorAlgorithm"].with_length(1),
                   IE["samplingPacketInterval"], IE["samplingPacketSpace"])
# Interface names: one record per interface index seen in the flow records, scoped by it.
INTERFACES_NAME = "interfaces"
INTERFACES_LAYOUT = (IE["ingressInterface"], IE["interfaceName"], IE["interfaceDescription"])
OPTIONS_SCOPE_COUNT = 1

# the id a layout-less Template gets where only its dtype is wanted (FLOW_DTYPES below)
FIRST_TEMPLATE_ID = MIN_DATA_SET_ID
_ID_SPACE = 0x10000 - MIN_DATA_SET_ID


def layout_id(elements: tuple[InformationElement, ...], scope_count: int = 0, salt: int = 0) -> int:
    """The template id of a layout: its scope count and field specifiers hashed into 256-65535.

    Only what a collector learns from the template record goes in (element
    ids, enterprise numbers, lengths, scope count); names do not. ``salt``
    moves a layout on when its id is taken by another one in the same registry.
    """
    key = bytearray(_HDR.pack(scope_count, salt))
    for e in elements:
        key += _SPEC.pack(e.element_id, e.length) + _PEN.pack(e.pen)
    digest = hashlib.blake2b(bytes(key), digest_size=8, person=b"flowmeter-tid").digest()
    return MIN_DATA_SET_ID + int.from_bytes(digest, "big") % _ID_SPACE


class TemplateRegistry:
    """Gives templates their ids: each layout its own (``layout_id``), never one another layout had."""

    def __init__(self) -> None:
        self._by_name: dict[str, Template] = {}
        self._retired: list[Template] = []
        self._ids: dict[int, Template] = {}  # every id given in this process -> its template

    def define(self, name: str, elements: tuple[InformationElement, ...], scope_count: int = 0) -> Template:
        """(Re)define the template called ``name``; same layout = same template (and id)."""
        candidate = Template(MIN_DATA_SET_ID, elements, scope_count, name)
        current = self._by_name.get(name)
        if current is not None and current.same_layout(candidate):
            return current
        for salt in range(_ID_SPACE):
            tid = layout_id(elements, scope_count, salt)
            held = self._ids.get(tid)
            if held is None or (held.name == name and held.same_layout(candidate)):
                break
        else:
            raise TemplateError("template ids exhausted (65535)")
        tmpl = held if held is not None else Template(tid, elements, scope_count, name)
        self._ids[tid] = tmpl
        if current is not None:
            self._retired.append(current)
        self._by_name[name] = tmpl
        return tmpl

    def __getitem__(self, name: str) -> Template:
        return self._by_name[name]

    def get(self, name: str) -> Template | None:
        return self._by_name.get(name)

    def __iter__(self):
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    @property
    def retired(self) -> tuple[Template, ...]:
        return tuple(self._retired)


def default_registry() -> TemplateRegistry:
    """The registry with this project's flow templates, the statistics template and the options
    templates that describe the export (sampling, interface names)."""
    reg = TemplateRegistry()
    for name, layout in FLOW_LAYOUTS.items():
        reg.define(name, layout)
    reg.define(STATS_NAME, STATS_LAYOUT, STATS_SCOPE_COUNT)
    reg.define(SAMPLING_NAME, SAMPLING_LAYOUT, OPTIONS_SCOPE_COUNT)
    reg.define(INTERFACES_NAME, INTERFACES_LAYOUT, OPTIONS_SCOPE_COUNT)
    return reg


# The host-order record dtype of each flow template, for workers and tests.
FLOW_DTYPES: dict[str, np.dtype] = {n: Template(FIRST_TEMPLATE_ID, l).dtype for n, l in FLOW_LAYOUTS.items()}
