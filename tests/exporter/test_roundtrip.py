"""Round trip: any records of our templates, encoded by ``exporter.message``, decode to the same values.

Property (RFC 7011 §3, §6): for every template of ``default_registry()`` and
any valid host-order record array, ``Message`` + ``encode`` -> ``Decoder``
gives back every record, in order, with every value, split over as many
messages of 1452 octets (1500-octet MTU over IPv6) as it takes, with
sequence numbers that the decoder finds gap-free.
"""
from __future__ import annotations

import ipaddress

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.decoder import Decoder
from exporter.message import Message, encode
from exporter.template import Template, default_registry

MAX_MESSAGE = 1452
REGISTRY = default_registry()
TEMPLATES = [t for t in REGISTRY if t.dtype is not None]  # variable-length ones: tests/exporter/test_options.py


# How a column is filled: hypothesis picks the mode and the seed, numpy the
# values (drawing thousands of values one by one from hypothesis is ~10x slower).
MODES = ("random", "zero", "max", "extremes", "small")


def _fill(dtype: np.dtype, n: int, mode: str, rng: np.random.Generator) -> np.ndarray:
    if dtype.kind == "V":  # ipv6Address: any 16 octets
        octets = {"zero": np.zeros((n, dtype.itemsize), np.uint8),
                  "max": np.full((n, dtype.itemsize), 255, np.uint8)}.get(
            mode, rng.integers(0, 256, (n, dtype.itemsize), dtype=np.uint8))
        return octets.view(dtype).reshape(n)
    top = np.iinfo(dtype).max  # every other field is unsigned: its whole range
    if mode == "zero":
        return np.zeros(n, dtype)
    if mode == "max":
        return np.full(n, top, dtype)
    if mode == "extremes":
        return rng.choice(np.array([0, 1, top - 1, top], dtype), n)
    if mode == "small":
        return rng.integers(0, min(int(top), 255), n, dtype=dtype, endpoint=True)
    return rng.integers(0, top, n, dtype=dtype, endpoint=True)


@st.composite
def record_arrays(draw, template: Template) -> np.ndarray:
    n = draw(st.integers(0, 45))  # 45 records span 2-3 messages
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    records = template.empty(n)
    for name in template.dtype.names:
        records[name] = _fill(template.dtype[name], n, draw(st.sampled_from(MODES)), rng)
    return records


def expected_fields(template: Template, records: np.ndarray) -> list[dict]:
    """Host values converted the way the decoder presents them."""
    out = []
    for rec in records:
        fields = {}
        for e in template.elements:
            v = rec[e.name]
            if e.type == "ipv4Address":
                fields[e.name] = str(ipaddress.IPv4Address(int(v)))
            elif e.type == "ipv6Address":
                fields[e.name] = str(ipaddress.IPv6Address(bytes(v)))
            else:
                fields[e.name] = int(v)
        out.append(fields)
    return out


def export(template: Template, records: np.ndarray, domain: int) -> list[bytes]:
    """Messages as the exporter builds them: all templates first, then the records."""
    m = Message(MAX_MESSAGE)
    wire = encode(template, records)
    messages = []
    sequence = 0
    m.begin(domain)
    assert m.add_templates(REGISTRY) == len(REGISTRY)
    done = 0
    while True:
        done += m.add_records(template, wire, done)
        messages.append(bytes(m.finish(sequence, export_time=1_700_000_000 + len(messages))))
        sequence += m.data_records
        if done == len(records):
            return messages
        m.begin(domain)


@pytest.mark.parametrize("template", TEMPLATES, ids=[t.name for t in TEMPLATES])
@settings(max_examples=100, deadline=None)
@given(data=st.data(), domain=st.integers(0, 0xFFFF_FFFF), numpy_min_records=st.sampled_from([1, 8, 10**9]))
def test_every_record_survives_encode_and_decode(template, data, domain, numpy_min_records):
    records = data.draw(record_arrays(template))
    messages = export(template, records, domain)
    assert all(len(m) <= MAX_MESSAGE for m in messages)
    d = Decoder(numpy_min_records=numpy_min_records)
    decoded = [r for m in messages for r in d.decode(m, source=("192.0.2.1", 4739))]
    assert [r.fields for r in decoded] == expected_fields(template, records)
    assert all(r.template_id == template.template_id and r.domain == domain
               and r.is_options == template.is_options for r in decoded)
    s = d.stats
    assert (s.messages, s.records, s.malformed, s.unknown_template, s.sequence_gaps) == (
        len(messages), len(records), 0, 0, 0)
    assert s.templates + s.options_templates == len(REGISTRY)
