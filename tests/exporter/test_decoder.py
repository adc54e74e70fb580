"""Wire tests of the collector-side decoder (RFC 7011), and of ``flowmeter collect``.

Messages are written out as hex, one comment per field; ``wire()`` drops the
comments and whitespace.
"""
from __future__ import annotations

import io
import json
import socket
import struct
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.collect import collect, parse_listen, record_line
from exporter.decoder import Decoder, DecodedRecord, compile_template, value_decoder
from exporter.ie import IE
from exporter.message import Message, encode
from exporter.template import Template, default_registry


def wire(text: str) -> bytes:
    """Bytes from hex lines; ``#`` starts a comment."""
    return bytes.fromhex("".join(line.split("#", 1)[0] for line in text.splitlines()))


def header(length: int, sequence: int = 0, domain: int = 1) -> str:
    """A message header as hex (export time 0x5f5e1000 = 1600000000)."""
    return (f"00 0a            # version 10\n"
            f"{length:04x}     # message length\n"
            f"5f 5e 10 00      # export time\n"
            f"{sequence:08x}   # sequence number\n"
            f"{domain:08x}     # observation domain id\n")


# IPFIX-NOTES.md §2: the worked example, 66 octets
WORKED_TEMPLATE_SET = """
00 02 00 1c      # template set, length 28
01 00 00 05      # template 256, 5 fields
00 08 00 04      # sourceIPv4Address, 4
00 0c 00 04      # destinationIPv4Address, 4
00 04 00 01      # protocolIdentifier, 1
00 02 00 08      # packetDeltaCount, 8
00 88 00 01      # flowEndReason, 1
"""
WORKED_RECORD = """
c0 00 02 01                 # 192.0.2.1
c6 33 64 02                 # 198.51.100.2
06                          # TCP
00 00 00 00 00 00 00 0a     # 10 packets
01                          # idle timeout
"""
WORKED_EXAMPLE = wire(header(66) + WORKED_TEMPLATE_SET + """
01 00 00 16                 # data set for template 256, length 22
""" + WORKED_RECORD)

WORKED_FIELDS = {
    "sourceIPv4Address": "192.0.2.1",
    "destinationIPv4Address": "198.51.100.2",
    "protocolIdentifier": 6,
    "packetDeltaCount": 10,
    "flowEndReason": 1,
}


def data_only(sequence: int, n_records: int = 1, domain: int = 1) -> bytes:
    """A message with one data set of ``n_records`` worked-example records."""
    set_length = 4 + 18 * n_records
    return wire(header(16 + set_length, sequence, domain)
                + f"01 00 {set_length:04x}   # data set for template 256\n"
                + WORKED_RECORD * n_records)


# --- well-formed messages ------------------------------------------------------


def test_worked_example_decodes_one_flow_record():
    assert len(WORKED_EXAMPLE) == 66
    d = Decoder()
    records = d.decode(WORKED_EXAMPLE, source=("192.0.2.9", 50000))
    assert records == [DecodedRecord(("192.0.2.9", 50000), 1, 256, 1600000000, 0, False, WORKED_FIELDS)]
    assert list(records[0].fields) == list(WORKED_FIELDS)  # template order
    s = d.stats
    assert (s.messages, s.records, s.templates, s.malformed, s.sequence_gaps) == (1, 1, 1, 0, 0)


def test_worked_example_matches_our_encoder():
    t = Template(256, tuple(IE[n] for n in WORKED_FIELDS))
    rec = t.empty(1)
    rec["sourceIPv4Address"], rec["destinationIPv4Address"] = 0xC0000201, 0xC6336402
    rec["protocolIdentifier"], rec["packetDeltaCount"], rec["flowEndReason"] = 6, 10, 1
    m = Message(1472)
    m.begin(domain=1)
    assert m.add_templates([t]) == 1
    assert m.add_records(t, encode(t, rec)) == 1
    assert bytes(m.finish(sequence=0, export_time=0x5F5E1000)) == WORKED_EXAMPLE


def test_next_message_with_sequence_1_is_no_gap():
    d = Decoder()
    d.decode(WORKED_EXAMPLE)
    assert d.decode(data_only(sequence=1))[0].fields == WORKED_FIELDS
    assert (d.stats.sequence_gaps, d.stats.lost_records, d.stats.records) == (0, 0, 2)


def test_options_template_and_options_data_record():
    msg = wire(header(74, domain=0) + """
00 03 00 1a                 # options template set, length 26
01 01 00 04 00 01           # template 257, 4 fields, 1 scope field
00 95 00 04                 # scope: observationDomainId, 4
00 29 00 08                 # exportedMessageTotalCount, 8
00 2a 00 08                 # exportedFlowRecordTotalCount, 8
00 28 00 08                 # exportedOctetTotalCount, 8
01 01 00 20                 # data set for template 257, length 32
00 00 00 01                 # observation domain 1
00 00 00 00 00 00 00 07     # 7 messages
00 00 00 00 00 00 00 64     # 100 flow records
00 00 00 00 00 00 10 00     # 4096 octets
""")
    d = Decoder()
    [r] = d.decode(msg, "file")
    assert r.is_options and r.template_id == 257 and r.domain == 0
    assert r.fields == {"observationDomainId": 1, "exportedMessageTotalCount": 7,
                        "exportedFlowRecordTotalCount": 100, "exportedOctetTotalCount": 4096}
    assert (d.stats.options_templates, d.stats.templates) == (1, 0)
    assert d.template("file", 0, 257).scope_count == 1


def test_enterprise_field_with_pen():
    msg = wire(header(52) + """
00 02 00 14                 # template set, length 20
01 2c 00 02                 # template 300, 2 fields
00 08 00 04                 # sourceIPv4Address, 4
80 01 00 08                 # E=1, element 1, length 8
00 00 72 79                 # enterprise number 29305
01 2c 00 10                 # data set for template 300, length 16
c0 00 02 01                 # 192.0.2.1
00 00 00 00 00 00 05 dc     # the enterprise value
""")
    d = Decoder()
    [r] = d.decode(msg)
    assert r.fields == {"sourceIPv4Address": "192.0.2.1", "e29305id1": "00000000000005dc"}
    f = d.template(None, 1, 300).fields[1]
    assert (f.element.pen, f.element.element_id, f.length) == (29305, 1, 8)


def test_variable_length_string_in_both_length_forms():
    msg = wire(header(61) + """
00 02 00 10                 # template set, length 16
01 01 00 02                 # template 257, 2 fields
00 0a 00 04                 # ingressInterface, 4
00 52 ff ff                 # interfaceName, variable length
01 01 00 1d                 # data set for template 257, length 29
00 00 00 01                 # ingressInterface 1
04 65 74 68 30              # 1-octet length 4, "eth0"
00 00 00 02                 # ingressInterface 2
ff 00 04 65 74 68 31        # 255, 2-octet length 4, "eth1"
00 00 00 03                 # ingressInterface 3
00                          # length 0, ""
""")
    d = Decoder()
    records = d.decode(msg)
    assert [r.fields for r in records] == [
        {"ingressInterface": 1, "interfaceName": "eth0"},
        {"ingressInterface": 2, "interfaceName": "eth1"},
        {"ingressInterface": 3, "interfaceName": ""},
    ]
    assert d.stats.malformed == 0


def test_variable_length_value_longer_than_254_octets():
    name = "x" * 300 + "\u00e9"  # 302 octets in UTF-8
    value = name.encode()
    template = wire("""
00 02 00 0c                 # template set, length 12
01 01 00 01                 # template 257, 1 field
00 53 ff ff                 # interfaceDescription, variable length
""")
    data_set = struct.pack("!HHBH", 257, 4 + 3 + len(value), 255, len(value)) + value
    msg = wire(header(16 + len(template) + len(data_set))) + template + data_set
    assert Decoder().decode(msg)[0].fields == {"interfaceDescription": name}


def test_invalid_utf8_string_is_replaced_not_raised():
    assert value_decoder("string")(b"eth\xff") == "eth\ufffd"


def test_reduced_size_counters():
    msg = wire(header(53) + """
00 02 00 18                 # template set, length 24
01 02 00 04                 # template 258, 4 fields
00 01 00 04                 # octetDeltaCount, reduced to 4
00 02 00 03                 # packetDeltaCount, reduced to 3
00 59 00 01                 # forwardingStatus, 1 (RFC 9710)
00 06 00 01                 # tcpControlBits, reduced to 1
01 02 00 0d                 # data set for template 258, length 13
00 01 00 00                 # 65536 octets
00 00 0a                    # 10 packets
81                          # dropped, ACL deny
12                          # SYN ACK
""")
    [r] = Decoder().decode(msg)
    assert r.fields == {"octetDeltaCount": 65536, "packetDeltaCount": 10,
                        "forwardingStatus": 129, "tcpControlBits": 0x12}


def test_padding_at_the_end_of_a_data_set_is_skipped():
    msg = wire(header(69) + WORKED_TEMPLATE_SET + """
01 00 00 19                 # data set for template 256, length 25
""" + WORKED_RECORD + """
00 00 00                    # 3 octets of padding
""")
    d = Decoder()
    assert [r.fields for r in d.decode(msg)] == [WORKED_FIELDS]
    assert d.stats.malformed == 0
    assert d.decode(data_only(sequence=1))  # padding is not a record: sequence 1 follows


def test_template_withdrawal_removes_the_template():
    d = Decoder()
    d.decode(WORKED_EXAMPLE)
    withdrawal = wire(header(24, sequence=1) + """
00 02 00 08                 # template set, length 8
01 00 00 00                 # template 256, field count 0: withdrawn
""")
    assert d.decode(withdrawal) == []
    assert d.template(None, 1, 256) is None
    assert d.decode(data_only(sequence=1)) == []
    assert (d.stats.withdrawals, d.stats.unknown_template, d.stats.malformed) == (1, 1, 0)


def test_withdraw_all_templates_keeps_options_templates():
    d = Decoder()
    d.decode(WORKED_EXAMPLE)
    msg = wire(header(38, sequence=1) + """
00 03 00 0e                 # options template set, length 14
01 01 00 01 00 01           # template 257, 1 field, 1 scope field
00 95 00 04                 # observationDomainId, 4
00 02 00 08                 # template set, length 8
00 02 00 00                 # template id 2, field count 0: withdraw all templates
""")
    assert d.decode(msg) == [] and d.stats.malformed == 0
    assert d.template(None, 1, 256) is None
    assert d.template(None, 1, 257) is not None


def test_a_new_definition_of_a_template_id_replaces_the_old_one():
    d = Decoder()
    d.decode(WORKED_EXAMPLE)
    redefined = wire(header(40, sequence=1) + """
00 02 00 0c                 # template set, length 12
01 00 00 01                 # template 256 again, now 1 field
00 0c 00 04                 # destinationIPv4Address, 4
01 00 00 0c                 # data set for template 256, length 12
c6 33 64 02                 # 198.51.100.2
c6 33 64 03                 # 198.51.100.3
""")
    assert [r.fields for r in d.decode(redefined)] == [
        {"destinationIPv4Address": "198.51.100.2"}, {"destinationIPv4Address": "198.51.100.3"}]
    assert d.stats.templates == 2 and d.stats.sequence_gaps == 0


def test_templates_are_kept_per_source_and_domain():
    d = Decoder()
    d.decode(WORKED_EXAMPLE, source=("192.0.2.1", 4739))
    assert d.decode(data_only(1), source=("192.0.2.2", 4739)) == []  # other exporter
    assert d.decode(data_only(1, domain=2), source=("192.0.2.1", 4739)) == []  # other domain
    assert len(d.decode(data_only(1), source=("192.0.2.1", 4739))) == 1
    assert d.stats.unknown_template == 2


def test_unknown_template_data_set_is_counted_and_skipped():
    msg = wire(header(74) + """
01 05 00 08                 # data set for template 261 (never sent), length 8
de ad be ef                 # a record we cannot read
""" + WORKED_TEMPLATE_SET + """
01 00 00 16                 # data set for template 256, length 22
""" + WORKED_RECORD)
    d = Decoder()
    assert [r.fields for r in d.decode(msg)] == [WORKED_FIELDS]
    assert (d.stats.unknown_template, d.stats.malformed, d.stats.records) == (1, 0, 1)


def test_sequence_gaps_and_lost_records():
    d = Decoder()
    d.decode(WORKED_EXAMPLE)  # sequence 0, 1 record: next expected 1
    d.decode(data_only(sequence=5, n_records=2))  # 4 records lost: next expected 7
    assert (d.stats.sequence_gaps, d.stats.lost_records) == (1, 4)
    d.decode(data_only(sequence=7))  # in order
    assert (d.stats.sequence_gaps, d.stats.lost_records) == (1, 4)
    d.decode(data_only(sequence=3))  # behind (reordered / restarted): a gap, nothing lost
    assert (d.stats.sequence_gaps, d.stats.lost_records) == (2, 4)
    d.decode(data_only(sequence=4))  # continues from the restarted value
    assert (d.stats.sequence_gaps, d.stats.lost_records) == (2, 4)


def test_sequence_number_wraps_modulo_2_32():
    d = Decoder()
    d.decode(wire(header(66, sequence=0xFFFF_FFFF) + WORKED_TEMPLATE_SET
                  + "01 00 00 16  # data set for 256\n" + WORKED_RECORD))
    d.decode(data_only(sequence=0, n_records=3))
    d.decode(data_only(sequence=3))
    assert d.stats.sequence_gaps == 0
    d.decode(data_only(sequence=0xFFFF_FFF0))  # 2^32 - 12 ahead = 12 behind: not lost
    assert (d.stats.sequence_gaps, d.stats.lost_records) == (1, 0)


def test_template_only_message_does_not_advance_the_sequence():
    d = Decoder()
    d.decode(WORKED_EXAMPLE)  # next expected: 1
    only_templates = wire(header(44, sequence=1) + WORKED_TEMPLATE_SET)
    d.decode(only_templates)
    d.decode(data_only(sequence=1))
    assert d.stats.sequence_gaps == 0 and d.stats.templates == 2


def test_sequence_check_restarts_after_an_unknown_template_set():
    d = Decoder()
    d.decode(data_only(sequence=40, n_records=3))  # template unknown: record count unknown
    d.decode(wire(header(66, sequence=99) + WORKED_TEMPLATE_SET
                  + "01 00 00 16  # data set for 256\n" + WORKED_RECORD))
    d.decode(data_only(sequence=100))
    assert (d.stats.sequence_gaps, d.stats.lost_records, d.stats.unknown_template) == (0, 0, 1)


def test_repeated_element_gets_a_numbered_key():
    t = compile_template(300, [(0, 323, 8), (0, 323, 8)])  # RFC 7011 §4.2 first/last
    assert t.keys == ("observationTimeMilliseconds", "observationTimeMilliseconds#2")


def test_values_of_every_abstract_type():
    assert value_decoder("ipv6Address")(bytes.fromhex("20010db8" + "00" * 11 + "01")) == "2001:db8::1"
    assert value_decoder("macAddress")(bytes.fromhex("0200c0ffee01")) == "02:00:c0:ff:ee:01"
    assert value_decoder("boolean")(b"\x01") is True
    assert value_decoder("boolean")(b"\x02") is False
    assert value_decoder("boolean")(b"\x00") == 0
    assert value_decoder("signed32")(b"\xff\xfe") == -2  # reduced size keeps the sign
    assert value_decoder("float64")(struct.pack("!f", 1.5)) == 1.5  # reduced to float32
    assert value_decoder("float32")(struct.pack("!f", -0.25)) == -0.25
    assert value_decoder("dateTimeMilliseconds")(struct.pack("!Q", 1_700_000_000_123)) == 1_700_000_000_123
    assert value_decoder("dateTimeSeconds")(struct.pack("!I", 1_700_000_000)) == 1_700_000_000
    ntp = struct.pack("!II", 1_700_000_000 + 2_208_988_800, 1 << 31)  # + 0.5 s
    assert value_decoder("dateTimeNanoseconds")(ntp) == 1_700_000_000.5
    assert value_decoder("dateTimeMicroseconds")(ntp) == 1_700_000_000.5
    assert value_decoder("octetArray")(b"\x00\xab") == "00ab"
    assert value_decoder("basicList")(b"\x01") == "01"  # types we do not interpret: hex
    assert value_decoder("ipv4Address")(b"\x01\x02\x03") == "010203"  # wrong length: hex
    assert value_decoder("unsigned64")(b"") == ""


def test_numpy_and_per_record_paths_agree():
    reg = default_registry()
    t = reg["ipv6_tcp"]
    rng = np.random.default_rng(7)
    rec = t.empty(20)
    for name in t.dtype.names:
        col = rec[name]
        if col.dtype.kind == "V":
            rec[name] = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in range(20)]
        else:
            rec[name] = rng.integers(0, np.iinfo(col.dtype).max, 20, dtype=col.dtype, endpoint=True)
    m = Message(65535)
    m.begin(3)
    m.add_templates([t])
    assert m.add_records(t, encode(t, rec)) == 20
    msg = bytes(m.finish(0, 0))
    vectorized = Decoder(numpy_min_records=1).decode(msg)
    looped = Decoder(numpy_min_records=10**9).decode(msg)
    assert len(vectorized) == 20 and vectorized == looped
    assert all(type(a) is type(b) for r, s in zip(vectorized, looped) for a, b in zip(r.fields.values(), s.fields.values()))


# --- malformed messages -----------------------------------------------------------

VARLEN_TEMPLATE_SET = """
00 02 00 0c                 # template set, length 12
01 01 00 01                 # template 257, 1 field
00 52 ff ff                 # interfaceName, variable length
"""

MALFORMED = {
    "empty": ("", "shorter than the 16-octet"),
    "short header": ("00 0a 00 10 5f 5e 10 00 00 00 00 00 00 00 00  # 15 octets", "shorter than the 16-octet"),
    "version 9": ("00 09 00 10 5f 5e 10 00 00 00 00 00 00 00 00 01  # version 9", "version 9"),
    "length past buffer": (header(20), "does not match"),
    "length short of buffer": (header(16) + "00 02 00 04  # a set after the message end", "does not match"),
    "set header cut off": (header(18) + "00 02  # half a set header", "too few for a set header"),
    "set length below 4": (header(20) + "00 02 00 03  # set length 3", "shorter than a set header"),
    "set past message end": (header(20) + "00 02 00 08  # set length 8, 4 present", "runs past the message end"),
    "set id 0": (header(20) + "00 00 00 04  # set id 0", "set id 0 is not"),
    "set id 1": (header(20) + "00 01 00 04  # set id 1", "set id 1 is not"),
    "set id 4": (header(20) + "00 04 00 04  # set id 4", "set id 4 is not"),
    "set id 255": (header(20) + "00 ff 00 04  # set id 255", "set id 255 is not"),
    "template id 255": (header(28) + """
00 02 00 0c                 # template set, length 12
00 ff 00 01                 # template 255: below 256
00 08 00 04                 # sourceIPv4Address, 4
""", "template id is below 256"),
    "template past its set": (header(28) + """
00 02 00 0c                 # template set, length 12
01 00 00 02                 # template 256, 2 fields
00 08 00 04                 # sourceIPv4Address, 4; field 2 missing
""", "field 2 of 2 runs past the end of its set"),
    "enterprise number cut off": (header(28) + """
00 02 00 0c                 # template set, length 12
01 00 00 01                 # template 256, 1 field
80 01 00 04                 # E=1, element 1, length 4; no enterprise number
""", "enterprise number of field 1"),
    "scope field count 0": (header(30) + """
00 03 00 0e                 # options template set, length 14
01 01 00 01 00 00           # template 257, 1 field, 0 scope fields
00 95 00 04                 # observationDomainId, 4
""", "scope field count 0"),
    "scope count above field count": (header(30) + """
00 03 00 0e                 # options template set, length 14
01 01 00 01 00 02           # template 257, 1 field, 2 scope fields
00 95 00 04                 # observationDomainId, 4
""", "scope field count 2"),
    "scope field count cut off": (header(24) + """
00 03 00 08                 # options template set, length 8
01 01 00 01                 # template 257, 1 field, no scope count
""", "scope field count runs past"),
    "only zero-length fields": (header(28) + """
00 02 00 0c                 # template set, length 12
01 00 00 01                 # template 256, 1 field
00 08 00 00                 # sourceIPv4Address, length 0
""", "records would be empty"),
    "withdrawal of template 5": (header(24) + """
00 02 00 08                 # template set, length 8
00 05 00 00                 # template 5, field count 0
""", "withdrawal of template id below 256"),
    "garbage after template": (header(23) + """
00 02 00 07                 # template set, length 7
00 00 01                    # 3 octets, not zero: not padding
""", "neither a whole record nor zero padding"),
    "record cut off": (header(56) + WORKED_TEMPLATE_SET + """
01 00 00 0c                 # data set for template 256, length 12
c0 00 02 01 c6 33 64 02     # 8 of 18 octets
""", "neither a whole record nor zero padding"),
    "variable-length value past its set": (header(36) + VARLEN_TEMPLATE_SET + """
01 01 00 08                 # data set for template 257, length 8
05 65 74 68                 # length 5, 3 octets present
""", "runs past the end of the set"),
    "2-octet length cut off": (header(34) + VARLEN_TEMPLATE_SET + """
01 01 00 06                 # data set for template 257, length 6
ff 00                       # 255, half a 2-octet length
""", "length cut off"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_message_is_counted_not_raised(name):
    text, reason = MALFORMED[name]
    d = Decoder()
    assert d.decode(wire(text), source=("192.0.2.7", 1234)) == []
    assert (d.stats.messages, d.stats.malformed, d.stats.records) == (1, 1, 0)
    assert reason in d.stats.last_error
    assert d.stats.last_error.startswith("192.0.2.7:1234: ")


def test_malformed_message_keeps_records_of_earlier_sets():
    msg = wire(header(70) + WORKED_TEMPLATE_SET + "01 00 00 16  # data set for 256\n" + WORKED_RECORD
               + "00 04 00 04  # set id 4: invalid")
    d = Decoder()
    assert [r.fields for r in d.decode(msg)] == [WORKED_FIELDS]
    assert d.stats.malformed == 1 and d.stats.records == 1
    d.decode(data_only(sequence=57))  # record count of a malformed message is unknown:
    assert d.stats.sequence_gaps == 0  # the check restarts without a false gap


def test_decode_stream_reads_concatenated_messages_and_reports_a_truncated_tail():
    stream = WORKED_EXAMPLE + data_only(1, n_records=2) + data_only(3)[:30]
    d = Decoder()
    records = d.decode_stream(stream, source="capture.ipfix")
    assert [r.sequence for r in records] == [0, 1, 1]
    assert (d.stats.messages, d.stats.malformed, d.stats.records) == (3, 1, 3)
    assert d.stats.last_error == "capture.ipfix: offset 122: message truncated, 30 of 38 octets"


def test_decode_stream_stops_at_a_header_that_is_not_ipfix():
    d = Decoder()
    assert len(d.decode_stream(io.BytesIO(WORKED_EXAMPLE + b"\x00\x05" + b"\x00" * 20))) == 1
    assert d.stats.malformed == 1 and "version 5" in d.stats.last_error


# --- fuzzing --------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_decode_never_raises_on_random_bytes(data):
    d = Decoder()
    d.decode(data)
    d.decode_stream(data)
    assert d.stats.messages >= 1


def _valid_messages() -> list[bytes]:
    msgs = [WORKED_EXAMPLE, data_only(1, 3)]
    for text, _ in MALFORMED.values():
        msgs.append(wire(text))
    return msgs


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_valid_messages()), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
       st.integers(0, 40), st.booleans(), st.integers(1, 9))
def test_decode_never_raises_on_mutated_messages(base, edits, cut, fix_length, numpy_min):
    data = bytearray(WORKED_EXAMPLE + base)
    for pos, value in edits:
        if pos < len(data):
            data[pos] = value
    data = data[:len(data) - cut] if cut < len(data) else data
    if fix_length and len(data) >= 4:
        data[0:4] = struct.pack("!HH", 10, len(data))
    d = Decoder(numpy_min_records=numpy_min)
    d.decode(bytes(data))
    d.decode(bytes(data[:len(WORKED_EXAMPLE)]))
    d.decode_stream(bytes(data))


# --- flowmeter collect --------------------------------------------------------------


def _flow_messages() -> list[bytes]:
    """Two messages for ODID 7: templates + 2 TCP records (seq 0), then 3 records (seq 2)."""
    reg = default_registry()
    t = reg["ipv4_tcp"]
    rec = t.empty(5)
    rec["flowStartMilliseconds"] = 1_700_000_000_000 + np.arange(5)
    rec["flowEndMilliseconds"] = 1_700_000_005_456
    rec["octetDeltaCount"], rec["packetDeltaCount"] = 1500, 10
    rec["sourceIPv4Address"], rec["destinationIPv4Address"] = 0xC0000201, 0xC6336402
    rec["sourceTransportPort"], rec["destinationTransportPort"] = 40000 + np.arange(5), 443
    rec["tcpControlBits"], rec["protocolIdentifier"], rec["flowEndReason"] = 0x1A, 6, 1
    rec["forwardingStatus"], rec["ingressInterface"] = 66, 3
    wire_records = encode(t, rec)
    m = Message(1452)
    out = []
    m.begin(7)
    m.add_templates(reg)
    m.add_records(t, wire_records[:2 * t.record_length])
    out.append(bytes(m.finish(0, 1_700_000_010)))
    m.begin(7)
    m.add_records(t, wire_records[2 * t.record_length:])
    out.append(bytes(m.finish(2, 1_700_000_011)))
    return out


def _free_udp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def test_collect_over_udp_prints_json_lines_and_a_summary():
    port = _free_udp_port()
    is_ready = threading.Event()
    out, err = io.StringIO(), io.StringIO()
    result = []
    th = threading.Thread(target=lambda: result.append(
        collect(f"udp/127.0.0.1:{port}", True, out, count=5, duration=10, err=err, ready=is_ready.set)))
    th.start()
    assert is_ready.wait(5)  # bound: datagrams sent from now on are received
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        sender = f"127.0.0.1:{s.getsockname()[1]}"
        for msg in _flow_messages():
            s.sendto(msg, ("127.0.0.1", port))
    th.join(10)
    assert not th.is_alive()
    assert err.getvalue().splitlines()[0].startswith(f"collect: listening on udp/127.0.0.1:{port}")
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert len(lines) == 5
    assert list(lines[0])[:6] == ["exporter", "domain", "template", "sequence", "options", "flowStartMilliseconds"]
    assert lines[0]["exporter"] == sender
    assert [x["sequence"] for x in lines] == [0, 0, 2, 2, 2]
    assert [x["sourceTransportPort"] for x in lines] == [40000, 40001, 40002, 40003, 40004]
    assert lines[4]["sourceIPv4Address"] == "192.0.2.1" and lines[4]["options"] is False
    stats = result[0]
    options = sum(t.is_options for t in default_registry())  # statistics, sampling, interfaces
    assert (stats.messages, stats.records, stats.templates, stats.options_templates) == (2, 5, 8, options)
    assert err.getvalue().splitlines()[-1] == (
        f"collect: 2 messages, 5 records, 8 templates, {options} options templates, 0 malformed, "
        "0 unknown-template sets, 0 sequence gaps, 0 lost records")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_collect_stops_when_the_stop_event_is_set():
    stop = threading.Event()
    err = io.StringIO()
    th = threading.Thread(target=collect, args=("udp/[::1]:0", False, io.StringIO()),
                          kwargs={"stop": stop, "err": err, "ready": stop.set})
    th.start()
    th.join(5)
    assert not th.is_alive()
    first, last = err.getvalue().splitlines()
    assert first.startswith("collect: listening on udp/[::1]:")
    assert last.startswith("collect: 0 messages, 0 records")


def test_collect_stops_after_its_duration():
    stats = collect("udp/127.0.0.1:0", True, io.StringIO(), duration=0.3, err=io.StringIO())
    assert stats.messages == 0


def test_collect_reads_an_ipfix_file_and_reports_a_truncated_tail(tmp_path):
    path = tmp_path / "flows.ipfix"
    msgs = _flow_messages()
    path.write_bytes(msgs[0] + msgs[1] + msgs[1][:20])
    out, err = io.StringIO(), io.StringIO()
    stats = collect(f"FILE/{path}", False, out, err=err)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5
    assert lines[0].split() == ["2023-11-14T22:13:20.000", "2023-11-14T22:13:25.456", "TCP",
                                "192.0.2.1:40000", "->", "198.51.100.2:443", "10", "pkts", "1500", "B",
                                "...AP.S.", "in", "idle", "fwd", "ipClassOfService=0", "ingressInterface=3",
                                "egressInterface=0"]
    assert stats.malformed == 1 and stats.records == 5
    assert err.getvalue().splitlines()[-1].endswith(f"message truncated, 20 of {len(msgs[1])} octets")
    assert "1 malformed" in err.getvalue()


def test_collect_file_stops_after_count(tmp_path):
    path = tmp_path / "flows.ipfix"
    path.write_bytes(b"".join(_flow_messages()))
    out = io.StringIO()
    collect(f"file/{path}", True, out, count=3, err=io.StringIO())
    assert [json.loads(x)["exporter"] for x in out.getvalue().splitlines()] == [str(path)] * 3


def test_options_record_line_lists_fields():
    r = DecodedRecord(None, 0, 264, 0, 0, True, {"exportingProcessId": 1, "interfaceName": "eth 0"})
    assert record_line(r) == '0 264  exportingProcessId=1 interfaceName="eth 0"'


def test_icmp_flow_line_shows_type_and_code():
    r = DecodedRecord(None, 1, 258, 0, 0, False, {
        "sourceIPv6Address": "2001:db8::1", "destinationIPv6Address": "2001:db8::2",
        "icmpTypeCodeIPv6": 128 * 256, "protocolIdentifier": 58, "flowDirection": 1})
    assert "ICMPv6 2001:db8::1 -> 2001:db8::2 type 128/0" in record_line(r)
    assert " out " in record_line(r)


@pytest.mark.parametrize("spec, expected", [
    ("udp/127.0.0.1:4739", ("udp", "127.0.0.1", 4739, "")),
    ("UDP/[::1]:4739", ("udp", "::1", 4739, "")),
    ("udp/collector.example:4739", ("udp", "collector.example", 4739, "")),
    ("file/out/flows.ipfix", ("file", "", 0, "out/flows.ipfix")),
])
def test_parse_listen(spec, expected):
    p = parse_listen(spec)
    assert (p.kind, p.host, p.port, p.path) == expected


@pytest.mark.parametrize("spec", ["tcp/1.2.3.4:1", "udp/1.2.3.4", "udp/::1:4739", "udp/[::1]4739",
                                  "udp/[nope]:1", "udp/1.2.3.400:1", "udp/1.2.3.4:65536", "file/", "udp"])
def test_parse_listen_rejects_bad_specs_with_one_line(spec):
    with pytest.raises(ValueError) as info:
        parse_listen(spec)
    assert str(info.value).startswith(f'--listen: "{spec}"') and "\n" not in str(info.value)
