"""Statistics that cross a process boundary: one typed value per role.

Every stage process reports its counters to the supervisor: a ``progress``
message about twice a second and one final ``stats`` message as it ends
(``flowmeter.ipc.schema``). The counters travel as a msgpack map of the
value's fields and arrive as the same dataclass, checked field by field;
the supervisor adds up the values of one role (``merge``), prints them,
writes them to the status file and to ``replay --stats``. Nobody parses a
name back into a meaning: a cause of loss is a key of a ``dict[str, int]``
field, printed as it is.

==========  ====================  ==============================================
role        value                 what it counts
==========  ====================  ==============================================
capture     ``CaptureCounters``   frames read, packets and octets sent to the
                                  workers, frames not metered by cause, the
                                  live source's own counts (kernel packets,
                                  drops, ...), capture file progress
worker      ``WorkerCounters``    packets metered, flows made, flows held,
                                  records sent by flowEndReason, messages
                                  dropped by cause, flow table size
exporter    ``ExporterCounters``  batches and records received, producer
                                  sequence gaps, batches dropped by cause, and
                                  per collector (``CollectorCounters``):
                                  messages, records sent and not sent
==========  ====================  ==============================================

Every value also carries ``cpu_s``: the process's CPU seconds so far.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union


# keys of ``WorkerCounters.end_reasons``, in flowEndReason order (IANA IE 136: 1 idle timeout .. 5 lack of resources)
END_REASONS = ("idle", "active", "end_of_flow", "forced", "lack_of_resources")


class CountersError(ValueError):
    """A counters map that is not a value of its role (a field of the wrong type, an unknown field)."""


@dataclass(slots=True)
class CaptureCounters:
    frames: int = 0  # frames (records) read from the source
    packets: int = 0  # IP packets sent to the workers: metered
    octets: int = 0  # their layer-3 octets
    other_direction: int = 0  # IP packets the Direction setting left out
    not_metered: dict[str, int] = field(default_factory=dict)  # frames not metered, by cause (not IP, ...)
    file_octets: int = 0  # capture file octets read so far
    file_size: int = 0  # octets of the capture files opened so far
    source: str = ""  # the live source read ("afpacket:eth0"); "" for capture files
    source_counters: dict[str, int] = field(default_factory=dict)  # the live source's own counts, as it names them
    cpu_s: float = 0.0

    ROLE: ClassVar[str] = "capture"


@dataclass(slots=True)
class WorkerCounters:
    packets: int = 0  # packets metered into the flow table
    octets: int = 0
    flows: int = 0  # flows made
    evictions: int = 0  # flows ended early because the table was full
    records_out: int = 0  # flow records sent to the exporter
    packets_out: int = 0  # packets counted in those records (packets - packets_out: held in flows)
    end_reasons: dict[str, int] = field(default_factory=dict)  # records by flowEndReason (END_REASONS)
    active_flows: int = 0  # flows held now
    active_peak: int = 0  # most flows held at once
    table_bytes: int = 0  # octets of the flow table's arrays
    dropped: dict[str, int] = field(default_factory=dict)  # messages dropped, by cause
    given_up_packets: int = 0  # packets of batches given up for this worker's predecessor (lost)
    cpu_s: float = 0.0

    ROLE: ClassVar[str] = "worker"


@dataclass(slots=True)
class CollectorCounters:
    messages: int = 0  # IPFIX messages sent
    octets: int = 0
    data_records: int = 0  # data records sent (flow and statistics records)
    flow_records: int = 0  # flow records sent
    packets: int = 0  # packets counted in the flow records sent
    template_messages: int = 0
    not_sent_messages: int = 0  # messages that could not be sent (counted per cause in ``errors``)
    not_sent_records: int = 0
    not_sent_packets: int = 0  # packets counted in the flow records not sent
    queued_messages: int = 0  # waiting for the collector's pace
    export_rate: float = 0.0  # messages a second; 0 = unpaced
    send_buffer: int = 0  # octets of send buffer the kernel granted
    segmented_sends: bool = False  # UDP_SEGMENT in use
    message_size: int = 0  # octets of the largest message it gets now (MaxMessageSize or its path's)
    recuts: int = 0  # queued messages cut again smaller for it (a smaller path or size)
    refused: int = 0  # sends refused with EMSGSIZE (sent again, cut or as they were)
    errors: dict[str, int] = field(default_factory=dict)  # messages not sent, by cause (ENOSPC, ...)
    last_error: str = ""


@dataclass(slots=True)
class ExporterCounters:
    batches: int = 0  # record batches received
    records: int = 0  # flow records received
    packets: int = 0  # packets counted in them
    gaps: int = 0  # gaps in a producer's message sequence numbers
    dropped: dict[str, int] = field(default_factory=dict)  # batches dropped, by cause
    collectors: dict[str, CollectorCounters] = field(default_factory=dict)  # by collector ("udp/192.0.2.1:4739")
    cpu_s: float = 0.0

    ROLE: ClassVar[str] = "exporter"


RoleCounters = Union[CaptureCounters, WorkerCounters, ExporterCounters]
BY_ROLE: dict[str, type] = {c.ROLE: c for c in (CaptureCounters, WorkerCounters, ExporterCounters)}


def to_wire(value: Any) -> dict[str, Any]:
    """The value as a map of plain types (msgpack, JSON): nested counters become maps too."""
    return dataclasses.asdict(value)


def from_wire(cls: type, data: Any) -> Any:
    """A ``cls`` value from a map made by ``to_wire``; ``CountersError`` if any field does not fit."""
    if not isinstance(data, dict):
        raise CountersError(f"{cls.__name__}: not a map")
    kinds = _FIELDS[cls]
    values = {}
    for key, raw in data.items():
        kind = kinds.get(key)
        if kind is None:
            raise CountersError(f"{cls.__name__}: unknown field {key!r}")
        values[key] = _convert(cls, key, kind, raw)
    return cls(**values)


def _convert(cls: type, key: str, kind: Any, raw: Any) -> Any:
    where = f"{cls.__name__}.{key}"
    if kind is bool:
        if not isinstance(raw, bool):
            raise CountersError(f"{where}: {raw!r} is not true or false")
        return raw
    if kind is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise CountersError(f"{where}: {raw!r} is not a whole number")
        return raw
    if kind is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise CountersError(f"{where}: {raw!r} is not a number")
        return float(raw)
    if kind is str:
        if not isinstance(raw, str):
            raise CountersError(f"{where}: {raw!r} is not text")
        return raw
    # a map of name -> int, or of name -> nested counters
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise CountersError(f"{where}: not a map of names")
    inner = kind[1]
    if inner is int:
        return {k: _convert(cls, f"{key}[{k!r}]", int, v) for k, v in raw.items()}
    return {k: from_wire(inner, v) for k, v in raw.items()}


_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "dict[str, int]": ("dict", int),
          "dict[str, CollectorCounters]": ("dict", CollectorCounters)}
_FIELDS = {cls: {f.name: _TYPES[f.type] for f in dataclasses.fields(cls)}
           for cls in (CaptureCounters, WorkerCounters, ExporterCounters, CollectorCounters)}


def merge(values: list[Any]) -> Any:
    """The sum of values of one class: numbers added, maps merged key by key (and summed), text: the last."""
    if not values:
        raise ValueError("merge: no values")
    cls = type(values[0])
    out = cls()
    for value in values:
        if type(value) is not cls:
            raise TypeError(f"merge: {type(value).__name__} is not {cls.__name__}")
        for f in dataclasses.fields(cls):
            setattr(out, f.name, _add(getattr(out, f.name), getattr(value, f.name)))
    return out


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, bool):
        return a or b
    if isinstance(a, (int, float)):
        return a + b
    if isinstance(a, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _add(out[k], v) if k in out else v
        return out
    if dataclasses.is_dataclass(a):
        return merge([a, b])
    return b or a
