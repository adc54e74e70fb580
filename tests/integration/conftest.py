"""Fixtures of the end-to-end tests: the two-namespace lab, and no ``flowmeter run`` left behind."""
from __future__ import annotations

import pytest

from tests.support.liverun import A4, A6, B4, B6, kill_leftover_runs
from tests.support.netns import Namespaces, available


@pytest.fixture(autouse=True)
def no_run_left_behind():
    yield
    kill_leftover_runs()


@pytest.fixture
def lab():
    """Namespaces a and b joined by the veth pair va (A4, A6) -- vb (B4, B6)."""
    why = available()
    assert not why, why
    with Namespaces() as ns:
        a, b = ns.add("a"), ns.add("b")
        ns.veth(a, "va", f"{A4}/24", f"{A6}/64", b, "vb", f"{B4}/24", f"{B6}/64")
        yield ns, a, b
