"""Information elements: the IANA IPFIX entities this project speaks (RFC 7012).

The table is data, one row per element: IANA name (exact camelCase), element
id, private enterprise number (0 = IANA), abstract data type, the length this
project encodes, and the numpy code of the value in a host-order record
array. Look elements up by name (``IE["octetDeltaCount"]``) or by
``(pen, id)`` (``IE_BY_ID[(0, 1)]``).

The decoder in ``exporter/decoder.py`` also uses this table to name and
interpret fields of templates it receives from other exporters; an element
that is not listed is still decoded, as raw octets named ``ie<id>`` (IANA)
or ``e<pen>id<id>`` (enterprise-specific).
"""
from __future__ import annotations

from dataclasses import dataclass

VARLEN = 65535  # RFC 7011 §7: field length 65535 = variable length

# abstract type -> numpy kind for a fixed length (None = raw octets "V<n>")
_UNSIGNED = {1: "u1", 2: "u2", 4: "u4", 8: "u8"}
_SIGNED = {1: "i1", 2: "i2", 4: "i4", 8: "i8"}


@dataclass(frozen=True, slots=True)
class InformationElement:
    """One IPFIX information element; equal when (pen, element_id) are."""

    name: str
    element_id: int
    pen: int
    type: str
    length: int

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, InformationElement):
            return NotImplemented
        return (self.pen, self.element_id) == (other.pen, other.element_id)

    def __hash__(self) -> int:
        return hash((self.pen, self.element_id))

    def with_length(self, length: int) -> "InformationElement":
        """The same element at another encoded length (RFC 7011 §6.2 reduced size)."""
        return InformationElement(self.name, self.element_id, self.pen, self.type, length)

    def numpy_code(self) -> str:
        """Host-order numpy code of one value of this element at its length.

        Integers, counters and millisecond times are host integers; IPv4
        addresses too (so ``astype`` to the big-endian wire dtype puts them
        in network order); everything else is raw octets.
        """
        t, n = self.type, self.length
        if n == VARLEN:
            raise ValueError(f"{self.name}: variable-length elements have no fixed numpy code")
        if t.startswith("unsigned") or t in ("dateTimeMilliseconds", "dateTimeSeconds", "ipv4Address"):
            if n in _UNSIGNED:
                return _UNSIGNED[n]
        elif t.startswith("signed") and n in _SIGNED:
            return _SIGNED[n]
        elif t == "float64" and n in (4, 8):
            return "f8" if n == 8 else "f4"
        elif t == "float32" and n == 4:
            return "f4"
        elif t == "boolean" and n == 1:
            return "u1"
        return f"V{n}"

    def wire_code(self) -> str:
        """Big-endian numpy code: the on-the-wire encoding (RFC 7011 §6)."""
        code = self.numpy_code()
        return code if code.startswith("V") or code.endswith("1") else ">" + code


# name, id, type, default length. IDs and types from the IANA registry
# "IP Flow Information Export (IPFIX) Entities".
_ROWS = """
octetDeltaCount              1 unsigned64           8
packetDeltaCount             2 unsigned64           8
protocolIdentifier           4 unsigned8            1
ipClassOfService             5 unsigned8            1
tcpControlBits               6 unsigned16           2
sourceTransportPort          7 unsigned16           2
sourceIPv4Address            8 ipv4Address          4
sourceIPv4PrefixLength       9 unsigned8            1
ingressInterface            10 unsigned32           4
destinationTransportPort    11 unsigned16           2
destinationIPv4Address      12 ipv4Address          4
destinationIPv4PrefixLength 13 unsigned8            1
egressInterface             14 unsigned32           4
ipNextHopIPv4Address        15 ipv4Address          4
bgpSourceAsNumber           16 unsigned32           4
bgpDestinationAsNumber      17 unsigned32           4
bgpNextHopIPv4Address       18 ipv4Address          4
postMCastPacketDeltaCount   19 unsigned64           8
postMCastOctetDeltaCount    20 unsigned64           8
flowEndSysUpTime            21 unsigned32           4
flowStartSysUpTime          22 unsigned32           4
postOctetDeltaCount         23 unsigned64           8
postPacketDeltaCount        24 unsigned64           8
minimumIpTotalLength        25 unsigned64           8
maximumIpTotalLength        26 unsigned64           8
sourceIPv6Address           27 ipv6Address         16
destinationIPv6Address      28 ipv6Address         16
sourceIPv6PrefixLength      29 unsigned8            1
destinationIPv6PrefixLength 30 unsigned8            1
flowLabelIPv6               31 unsigned32           4
icmpTypeCodeIPv4            32 unsigned16           2
igmpType                    33 unsigned8            1
samplingInterval            34 unsigned32           4
samplingAlgorithm           35 unsigned8            1
flowActiveTimeout           36 unsigned16           2
flowIdleTimeout             37 unsigned16           2
exportedOctetTotalCount     40 unsigned64           8
exportedMessageTotalCount   41 unsigned64           8
exportedFlowRecordTotalCount 42 unsigned64          8
sourceMacAddress            56 macAddress           6
postVlanId                  59 unsigned16           2
ipVersion                   60 unsigned8            1
flowDirection               61 unsigned8            1
ipNextHopIPv6Address        62 ipv6Address         16
destinationMacAddress       80 macAddress           6
interfaceName               82 string           65535
interfaceDescription        83 string           65535
octetTotalCount             85 unsigned64           8
packetTotalCount            86 unsigned64           8
forwardingStatus            89 unsigned32           1
vlanId                      58 unsigned16           2
minimumTTL                  52 unsigned8            1
maximumTTL                  53 unsigned8            1
fragmentIdentification      54 unsigned32           4
postIpClassOfService        55 unsigned8            1
droppedOctetDeltaCount     132 unsigned64           8
droppedPacketDeltaCount    133 unsigned64           8
flowEndReason              136 unsigned8            1
observationPointId         138 unsigned64           8
icmpTypeCodeIPv6           139 unsigned16           2
meteringProcessId          143 unsigned32           4
exportingProcessId         144 unsigned32           4
templateId                 145 unsigned16           2
observationDomainId        149 unsigned32           4
flowStartSeconds           150 dateTimeSeconds      4
flowEndSeconds             151 dateTimeSeconds      4
flowStartMilliseconds      152 dateTimeMilliseconds 8
flowEndMilliseconds        153 dateTimeMilliseconds 8
flowStartMicroseconds      154 dateTimeMicroseconds 8
flowEndMicroseconds        155 dateTimeMicroseconds 8
flowStartNanoseconds       156 dateTimeNanoseconds  8
flowEndNanoseconds         157 dateTimeNanoseconds  8
flowStartDeltaMicroseconds 158 unsigned32           4
flowEndDeltaMicroseconds   159 unsigned32           4
systemInitTimeMilliseconds 160 dateTimeMilliseconds 8
flowDurationMilliseconds   161 unsigned32           4
ignoredPacketTotalCount    164 unsigned64           8
ignoredOctetTotalCount     165 unsigned64           8
notSentFlowTotalCount      166 unsigned64           8
notSentPacketTotalCount    167 unsigned64           8
notSentOctetTotalCount     168 unsigned64           8
flowKeyIndicator           173 unsigned64           8
icmpTypeIPv4               176 unsigned8            1
icmpCodeIPv4               177 unsigned8            1
icmpTypeIPv6               178 unsigned8            1
icmpCodeIPv6               179 unsigned8            1
tcpSequenceNumber          184 unsigned32           4
ipDiffServCodePoint        195 unsigned8            1
paddingOctets              210 octetArray       65535
firewallEvent              233 unsigned8            1
dot1qVlanId                243 unsigned16           2
selectorAlgorithm          304 unsigned16           2
samplingPacketInterval     305 unsigned32           4
samplingPacketSpace        306 unsigned32           4
observationTimeSeconds     322 dateTimeSeconds      4
observationTimeMilliseconds 323 dateTimeMilliseconds 8
observationTimeMicroseconds 324 dateTimeMicroseconds 8
observationTimeNanoseconds 325 dateTimeNanoseconds  8
"""


def _parse(rows: str) -> tuple[InformationElement, ...]:
    out = []
    for line in rows.strip().splitlines():
        name, eid, typ, length = line.split()
        out.append(InformationElement(name, int(eid), 0, typ, int(length)))
    return tuple(out)


ELEMENTS: tuple[InformationElement, ...] = _parse(_ROWS)
IE: dict[str, InformationElement] = {e.name: e for e in ELEMENTS}
IE_BY_ID: dict[tuple[int, int], InformationElement] = {(e.pen, e.element_id): e for e in ELEMENTS}

assert len(IE) == len(ELEMENTS) == len(IE_BY_ID), "duplicate element in the IE table"


def lookup(pen: int, element_id: int, length: int) -> InformationElement:
    """The element for (pen, id) at the given length; unknown ones as octetArray."""
    known = IE_BY_ID.get((pen, element_id))
    if known is not None:
        return known if known.length == length else known.with_length(length)
    name = f"e{pen}id{element_id}" if pen else f"ie{element_id}"
    return InformationElement(name, element_id, pen, "octetArray", length)
