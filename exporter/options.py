"""Options records that describe the export: sampling, and what the interface indexes are called.

Collectors read two things about an exporter from options records (RFC
7011 §3.4.2.2) rather than from every flow record:

* **Sampling.** Collectors that scale counters by a sampling rate learn
  the rate from an options record, and some drop flows whose rate they do
  not know. flowmeter meters every packet; the ``sampling`` record (scope
  ``observationDomainId``) says so with the RFC 5477 elements:
  ``selectorAlgorithm`` 1 (systematic count-based, RFC 5475),
  ``samplingPacketInterval`` 1 and ``samplingPacketSpace`` 0: one packet
  selected in every one, none skipped. These are the elements that goflow2
  and akvorado (rate = (interval + space) / interval), pmacct's nfacctd
  (both lengths 4) and nfdump (305 and 306, with 304 as the algorithm)
  read; the older ``samplingInterval`` (34) is left out on purpose,
  because nfdump reads it as the *space* between samples (rate 2).
* **Interface names.** The flow records carry interface indexes
  (``ingressInterface``, ``egressInterface``); the ``interfaces`` records
  (scope ``ingressInterface``, then ``interfaceName`` and
  ``interfaceDescription``, both variable length, RFC 7011 §7) say what
  each index is called, so a collector shows names without SNMP. A name
  comes from the profile's ``Interfaces`` map first (which may also give
  an index another number on export, e.g. an overlay peer), else, when the
  run meters live interfaces of this host, from the kernel (the index's
  name, and its alias as the description). An index with no name gets no
  record.

Both go to every collector after the templates of each flow domain, so at
start, at every template refresh and after a collector came back; an
interface index seen for the first time gets its record at once, before
the data that carries it. Options records are data records: they advance
the sequence numbers. Their messages are kept at most ``OPTIONS_MESSAGE``
octets, small enough for any path (a 512-octet IPv4 packet, RFC 7011
§10.3.3), so they never need cutting.
"""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .message import HEADER, HEADER_LEN, SET_HEADER, SET_HEADER_LEN, VERSION
from .session import Outgoing
from .template import Template

OPTIONS_MESSAGE = 512 - 28  # octets: a whole IPv4 packet of 512 octets
NAME_OCTETS = 64  # longest interfaceName sent (UTF-8 octets); longer ones are cut at a character
DESCRIPTION_OCTETS = 256  # longest interfaceDescription sent
_SAMPLING = struct.Struct("!IBII")  # observationDomainId, selectorAlgorithm, samplingPacketInterval, ...Space
_INDEX = struct.Struct("!I")
SYSTEMATIC_COUNT = 1  # RFC 5475 selectorAlgorithm: systematic count-based sampling


@dataclass(frozen=True, slots=True)
class InterfaceSpec:
    """One entry of the profile's ``Interfaces`` map: the index as metered, and what to say of it.

    ``export_index`` (0: the same) is the number the index gets in every
    exported record, flow and options alike.
    """

    index: int
    name: str = ""
    description: str = ""
    export_index: int = 0


def varlen(data: bytes) -> bytes:
    """A variable-length field (RFC 7011 §7): one length octet below 255, else 255 and two octets."""
    if len(data) < 255:
        return bytes((len(data),)) + data
    return b"\xff" + struct.pack("!H", len(data)) + data


def _cut(text: str, octets: int) -> bytes:
    """``text`` in UTF-8, at most ``octets`` long, never ending inside a character."""
    return text.encode("utf-8")[:octets].decode("utf-8", "ignore").encode("utf-8")


def sampling_record(domain: int) -> bytes:
    """The ``sampling`` record of a domain: every packet metered."""
    return _SAMPLING.pack(domain & 0xFFFFFFFF, SYSTEMATIC_COUNT, 1, 0)


def interface_record(index: int, name: str, description: str) -> bytes:
    return _INDEX.pack(index) + varlen(_cut(name, NAME_OCTETS)) + varlen(_cut(description, DESCRIPTION_OCTETS))


def messages(template: Template, records: list[bytes], domain: int, size: int = OPTIONS_MESSAGE) -> list[Outgoing]:
    """``records`` (encoded) of ``template`` in as few messages of at most ``size`` octets as they fit.

    Each message is one row (header sequence number and export time to be
    stamped when it leaves); its records count as data records, not flow records.
    """
    out: list[Outgoing] = []
    i = 0
    while i < len(records):
        body = bytearray()
        k = 0
        while i + k < len(records) and HEADER_LEN + SET_HEADER_LEN + len(body) + len(records[i + k]) <= size:
            body += records[i + k]
            k += 1
        if k == 0:
            raise ValueError(f"an options record of {len(records[i])} octets does not fit in a {size}-octet message")
        length = HEADER_LEN + SET_HEADER_LEN + len(body)
        row = np.empty((1, length), dtype=np.uint8)
        HEADER.pack_into(row[0], 0, VERSION, length, 0, 0, domain)
        SET_HEADER.pack_into(row[0], HEADER_LEN, template.template_id, SET_HEADER_LEN + len(body))
        row[0, HEADER_LEN + SET_HEADER_LEN:] = np.frombuffer(bytes(body), dtype=np.uint8)
        out.append(Outgoing(row, domain, k, flow=False, describes=True))
        i += k
    return out


def kernel_name(index: int) -> tuple[str, str] | None:
    """(name, alias) of interface ``index`` in this network namespace; None when there is none."""
    try:
        name = socket.if_indextoname(index)
    except OSError:
        return None
    try:
        with open(f"/sys/class/net/{name}/ifalias", encoding="utf-8", errors="replace") as f:
            alias = f.read().strip()
    except OSError:
        alias = ""
    return name, alias


class Interfaces:
    """The interface indexes of the flow records: their numbers on export, and their names.

    ``seen(records)`` finds the indexes of a batch not met before (a
    min/max look first: a batch of one interface costs two reductions per
    column) and returns the records for the named ones; ``renumber``
    applies the profile's new numbers to a batch.
    """

    COLUMNS = ("ingressInterface", "egressInterface")

    def __init__(self, specs: tuple[InterfaceSpec, ...] = (), kernel: bool = False) -> None:
        self.given = (tuple(specs), kernel)  # what it was made from (a reload compares)
        self.specs = {s.index: s for s in specs}
        self.kernel = kernel
        self._new_numbers = {s.index: s.export_index for s in specs if s.export_index and s.export_index != s.index}
        self.known: dict[int, bytes | None] = {0: None}  # index as metered -> its record (None: no name)

    def record_for(self, index: int) -> bytes | None:
        spec = self.specs.get(index)
        name = spec.name if spec else ""
        description = spec.description if spec else ""
        if self.kernel and (not name or not description):
            found = kernel_name(index)
            if found is not None:
                name = name or found[0]
                description = description or found[1]
        if not name and not description:
            return None
        exported = spec.export_index if spec and spec.export_index else index
        return interface_record(exported, name, description)

    def seen(self, records: npt.NDArray) -> list[bytes]:
        """Records of the named interfaces that ``records`` carry for the first time."""
        names = records.dtype.names or ()
        new: list[bytes] = []
        for column in self.COLUMNS:
            if column not in names or not len(records):
                continue
            values = records[column]
            lo, hi = int(values.min()), int(values.max())
            if hi - lo <= 1 and lo in self.known and hi in self.known:
                continue  # nothing in between: all known
            indexes = (lo,) if lo == hi else np.unique(values).tolist()
            for index in indexes:
                if index not in self.known:
                    rec = self.known[index] = self.record_for(index)
                    if rec is not None:
                        new.append(rec)
        return new

    def renamed(self, specs: tuple[InterfaceSpec, ...], kernel: bool) -> Interfaces:
        """New names (a reload): every index met so far, named again by ``specs`` and ``kernel``."""
        out = Interfaces(specs, kernel)
        out.known = {i: out.record_for(i) if i else None for i in self.known}
        return out

    def all_records(self) -> list[bytes]:
        return [rec for rec in self.known.values() if rec is not None]

    def renumber(self, records: npt.NDArray) -> npt.NDArray:
        """``records`` with the profile's new numbers in both interface columns (a copy when any applies)."""
        if not self._new_numbers:
            return records
        names = records.dtype.names or ()
        out = records
        for column in self.COLUMNS:
            if column not in names:
                continue
            values = records[column]
            hits = [(np.flatnonzero(values == old), new) for old, new in self._new_numbers.items()]
            if not any(len(at) for at, _ in hits):
                continue
            if out is records:
                out = records.copy()
            for at, new in hits:  # positions found before any change: no chain of renumbering
                out[column][at] = new
        return out
