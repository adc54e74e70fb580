"""Messages that cross a process boundary (the contract between the processes).

Every message is a ZeroMQ multipart message whose first frame is a msgpack
map (the header). Data messages add one raw frame: a numpy structured array
sent with ``copy=False`` and read back with ``np.frombuffer`` (packet
batches of a running pipeline instead lie in shared memory: ``slot``
below); no pickles, never one msgpack object per packet or record.

==========  =================  ==========================================  =====================
kind        direction          header fields (besides ``kind``, ``v``)     payload frame
==========  =================  ==========================================  =====================
records     worker->exporter   sender, seq, count, template, domain,       ``count`` records of
                               dtype                                       the flow template
                                                                           ``template``, host
                                                                           order
packets     capture->worker    sender, seq, count, clock_ns, slot          ``count`` rows of
                                                                           ``PACKET_DTYPE``, or
                                                                           none: in a ring slot
eos         any producer->     sender, seq                                 none
            its consumer
progress    child->supervisor  sender, role, counters (map), pid           none
stats       child->supervisor  sender, role, counters (map): the last,    none
                               pid
error       child->supervisor  sender, role, message, pid                 none
==========  =================  ==========================================  =====================

* ``v`` is the schema version (``VERSION``); a receiver drops (and counts)
  any other version: a new field is a new version. Version 5 changed the
  ``PACKET_DTYPE`` row (ring slots and payload frames alike): ``ifindex``
  became ``ingress_if`` and ``egress_if`` (60 to 64 octets), and the flow
  templates' records gained egressInterface.
* ``sender`` names the producer (e.g. ``"worker-2"``); ``seq`` numbers its
  messages from 0, so a receiver can count gaps.
* ``template`` is the name of a template in ``exporter.template``
  (``"ipv4_tcp"``, ... ``"ipv6_other"``), ``dtype`` its ``dtype.descr`` as
  a string; the receiver checks both, and ``count * itemsize == len(frame)``,
  before it touches the bytes.
* ``domain`` is the observation domain id the records belong to.
* ``clock_ns`` is the capture's clock after this batch (packet time for a
  replay): every worker gets every batch's clock, with an empty payload
  when none of its packets are in it, so timers fire on all shards alike.
* ``slot`` (packets): -1 when the rows follow as the payload frame; else
  the message is the header alone and its rows are the first ``count`` of
  this worker's part of that slot of the sender's batch ring
  (``flowmeter.ipc.batchring``: shared memory, no copy through the socket),
  which the worker releases once it has metered them.
* Control messages (``progress``, ``stats``, ``error``) are small msgpack
  maps on the supervisor's control socket (``Report``, ``ErrorReport``);
  ``counters`` is the role's counters value (``flowmeter.ipc.counters``)
  as a map of its fields, checked field by field on arrival.
* Every producer ends with ``eos``; a consumer that knows how many
  producers it has is drained when it holds one ``eos`` from each.
"""
from __future__ import annotations

import functools

from dataclasses import dataclass

import msgpack
import numpy as np
import numpy.typing as npt

from flowmeter.ipc.counters import BY_ROLE, CountersError, RoleCounters, from_wire, to_wire

VERSION = 5  # 5: packet rows carry ingress_if and egress_if (64 octets, was ifindex: 60)
KIND_RECORDS = "records"
KIND_EOS = "eos"
KIND_PACKETS = "packets"
KIND_PROGRESS, KIND_STATS, KIND_ERROR = "progress", "stats", "error"
CONTROL_KINDS = (KIND_PROGRESS, KIND_STATS, KIND_ERROR)
MAX_HEADER = 4096  # octets; a longer header frame is hostile
MAX_CONTROL = 65536  # octets of a control message


class SchemaError(ValueError):
    """A message that does not follow this schema (counted and dropped by receivers)."""


@functools.lru_cache(maxsize=64)
def dtype_tag(dtype: np.dtype) -> str:
    """The dtype's layout as text (the ``dtype`` field of a records header); cached, it is asked per batch."""
    return str(dtype.descr)


@dataclass(frozen=True, slots=True)
class RecordsHeader:
    sender: str
    seq: int
    count: int
    template: str
    domain: int
    dtype: str

    def pack(self) -> bytes:
        return msgpack.packb({"kind": KIND_RECORDS, "v": VERSION, "sender": self.sender, "seq": self.seq,
                              "count": self.count, "template": self.template, "domain": self.domain,
                              "dtype": self.dtype})


@dataclass(frozen=True, slots=True)
class EndOfStream:
    sender: str
    seq: int

    def pack(self) -> bytes:
        return msgpack.packb({"kind": KIND_EOS, "v": VERSION, "sender": self.sender, "seq": self.seq})


@dataclass(frozen=True, slots=True)
class PacketsHeader:
    sender: str
    seq: int
    count: int
    clock_ns: int
    slot: int = -1  # -1: the rows are the payload frame; else the batch ring slot that holds them

    def pack(self) -> bytes:
        return msgpack.packb({"kind": KIND_PACKETS, "v": VERSION, "sender": self.sender, "seq": self.seq,
                              "count": self.count, "clock_ns": self.clock_ns, "slot": self.slot})


def packets_message(sender: str, seq: int, clock_ns: int, packets: npt.NDArray, slot: int = -1) -> list:
    """The frames of a ``packets`` message (``PACKET_DTYPE`` rows, possibly none).

    With ``slot`` >= 0 the rows already lie in that slot of the sender's
    batch ring: the message is the header alone.
    """
    header = PacketsHeader(sender, seq, len(packets), clock_ns, slot).pack()
    return [header] if slot >= 0 else [header, np.ascontiguousarray(packets)]


@dataclass(frozen=True, slots=True)
class Report:
    """A child's counters for the supervisor: ``progress`` while it runs, ``stats`` (``final``) as it ends."""

    sender: str
    counters: RoleCounters
    final: bool = False
    pid: int = 0  # the sender's process: a restarted child's reports are not its predecessor's

    @property
    def role(self) -> str:
        return self.counters.ROLE

    def pack(self) -> bytes:
        return msgpack.packb({"kind": KIND_STATS if self.final else KIND_PROGRESS, "v": VERSION,
                              "sender": self.sender, "role": self.role, "counters": to_wire(self.counters),
                              "pid": self.pid})


@dataclass(frozen=True, slots=True)
class ErrorReport:
    """One line for the operator from a child (a capture file cut short, a source that failed, ...)."""

    sender: str
    role: str
    message: str
    pid: int = 0

    def pack(self) -> bytes:
        return msgpack.packb({"kind": KIND_ERROR, "v": VERSION, "sender": self.sender, "role": self.role,
                              "message": self.message, "pid": self.pid})


def parse_control(frame: bytes | memoryview) -> Report | ErrorReport:
    """A checked control message, typed; ``SchemaError`` otherwise."""
    if len(frame) > MAX_CONTROL:
        raise SchemaError(f"control message longer than {MAX_CONTROL} octets")
    try:
        h = msgpack.unpackb(bytes(frame), raw=False, strict_map_key=True)
    except Exception as exc:
        raise SchemaError(f"control message is not msgpack: {type(exc).__name__}") from None
    if not isinstance(h, dict) or h.get("v") != VERSION or h.get("kind") not in CONTROL_KINDS:
        raise SchemaError("not a control message of this schema version")
    sender, role, pid = h.get("sender"), h.get("role"), h.get("pid", 0)
    if not isinstance(sender, str) or role not in BY_ROLE:
        raise SchemaError("control message without sender or with an unknown role")
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise SchemaError("control message with a pid that is not a number")
    if h["kind"] == KIND_ERROR:
        if not isinstance(h.get("message"), str):
            raise SchemaError("error message without text")
        return ErrorReport(sender, role, h["message"], pid)
    try:
        counters = from_wire(BY_ROLE[role], h.get("counters"))
    except CountersError as exc:
        raise SchemaError(f"{h['kind']} of {sender}: {exc}") from None
    return Report(sender, counters, final=h["kind"] == KIND_STATS, pid=pid)


def records_message(sender: str, seq: int, template: str, domain: int, records: npt.NDArray) -> list:
    """The frames of a ``records`` message (send with ``send_multipart(..., copy=False)``)."""
    header = RecordsHeader(sender, seq, len(records), template, domain, dtype_tag(records.dtype))
    return [header.pack(), np.ascontiguousarray(records)]


def parse_header(frame: bytes | memoryview) -> RecordsHeader | PacketsHeader | EndOfStream:
    """Check and type the header frame of any message; ``SchemaError`` if it is not ours."""
    if len(frame) > MAX_HEADER:
        raise SchemaError(f"header of {len(frame)} octets is longer than {MAX_HEADER}")
    try:
        h = msgpack.unpackb(bytes(frame), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types on hostile input
        raise SchemaError(f"header is not msgpack: {type(exc).__name__}") from None
    if not isinstance(h, dict):
        raise SchemaError("header is not a map")
    if h.get("v") != VERSION:
        raise SchemaError(f"schema version {h.get('v')!r} is not {VERSION}")
    kind = h.get("kind")
    try:
        if kind == KIND_RECORDS:
            out = RecordsHeader(str(h["sender"]), int(h["seq"]), int(h["count"]), str(h["template"]),
                                int(h["domain"]), str(h["dtype"]))
            if out.count < 0 or not 0 <= out.domain <= 0xFFFFFFFF:
                raise SchemaError("count or domain out of range")
            return out
        if kind == KIND_PACKETS:
            out = PacketsHeader(str(h["sender"]), int(h["seq"]), int(h["count"]), int(h["clock_ns"]),
                                int(h["slot"]))
            if out.count < 0 or out.clock_ns < 0 or out.slot < -1:
                raise SchemaError("count, clock or slot out of range")
            return out
        if kind == KIND_EOS:
            return EndOfStream(str(h["sender"]), int(h["seq"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise SchemaError(f"{kind} header lacks or mistypes a field: {exc}") from None
    raise SchemaError(f"unknown message kind {kind!r}")


def records_from_frame(header: RecordsHeader | PacketsHeader, dtype: np.dtype, frame: bytes | memoryview) -> npt.NDArray:
    """The record array of a ``records`` message, after checking dtype and size."""
    if isinstance(header, RecordsHeader) and header.dtype != dtype_tag(dtype):
        raise SchemaError(f"template {header.template}: dtype {header.dtype} is not {dtype_tag(dtype)}")
    size = len(frame)
    if header.count * dtype.itemsize != size:
        raise SchemaError(f"{header.count} records of {dtype.itemsize} octets is not {size} octets")
    return np.frombuffer(frame, dtype=dtype)
