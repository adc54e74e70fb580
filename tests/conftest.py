"""Test configuration: make the helper modules in tests/ importable."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def sink_elsewhere(monkeypatch):
    """A loopback collector stands for one on another host: its receive queue is not watched,
    so ExportRate alone paces it (a collector on this host is paced by that queue). Exporter
    processes forked after the fixture inherit it."""
    from exporter import transport

    monkeypatch.setattr(transport.LocalPeerQueue, "for_address", classmethod(lambda cls, host, port: None))
