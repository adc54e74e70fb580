"""Test configuration shared by every test (helpers live in ``tests.support``)."""
import pytest


@pytest.fixture
def sink_elsewhere(monkeypatch):
    """A loopback collector stands for one on another host: its receive queue is not watched,
    so ExportRate alone paces it (a collector on this host is paced by that queue). Exporter
    processes forked after the fixture inherit it."""
    from exporter import transport

    monkeypatch.setattr(transport.LocalPeerQueue, "for_address", classmethod(lambda cls, host, port: None))
