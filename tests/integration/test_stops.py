"""Stopping ``flowmeter run`` the ways operators stop it, under steady live traffic.

systemd's default stop and a terminal's Ctrl-C signal the whole process
group; each must drain in pipeline order (captures, workers, exporter)
and export every packet metered before the stop, within
``DrainTimeoutSeconds``. Past the deadline, or on a second Ctrl-C, the run
stops at once, exits 1, and the packets it counted as lost plus those that
reached the collector are every packet metered. The collector is nfcapd in
another network namespace, across the metered veth.
"""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.support.liverun import A4, B4, NsNfcapd, Run, SteadyTraffic, summary_figure

METERED = r"frames, ([\d,]+) packets metered"


def _collected(rows: list[dict]) -> int:
    return sum(r["in_packets"] for r in rows)


@pytest.mark.parametrize("how", ["group SIGTERM", "group SIGINT", "Ctrl-C in a terminal"])
def test_a_stop_signalled_to_the_whole_group_exports_every_metered_packet(lab, tmp_path, how):
    ns, a, b = lab
    drain = 5
    with NsNfcapd(b, tmp_path, host=B4) as nf:
        run = Run(a, tmp_path, 1, terminal=how.startswith("Ctrl-C"), Sources=["afpacket:va"],
                  IpFixCollectors=[nf.collector], Workers=2, DrainTimeoutSeconds=drain)
        with SteadyTraffic(b, A4, flows=300, rate=3000) as traffic:
            time.sleep(2)  # hundreds of flows cached, none ended yet (IdleTimeout 15 s)
            start = time.monotonic()
            if how == "group SIGTERM":
                os.killpg(run.pgid, signal.SIGTERM)
            elif how == "group SIGINT":
                os.killpg(run.pgid, signal.SIGINT)
            else:
                run.ctrl_c()
            code, out = run.wait(60)
            took = time.monotonic() - start
        rows = nf.records()
    assert code == 0, out
    assert took < drain + 2, out
    metered = summary_figure(out, METERED)
    assert metered >= 3000 and traffic.sent >= metered, out
    assert _collected(rows) == metered, out
    assert "\nlost: none" in out, out
    assert "killed" not in out and "Traceback" not in out, out


def _slow_drain_run(lab, tmp_path, nf, **settings) -> Run:
    """A run whose drain takes about 10 s: thousands of flows, a collector paced to 20 messages a second."""
    ns, a, b = lab
    return Run(a, tmp_path, 1, Sources=["afpacket:va"], IpFixCollectors=[nf.collector], Workers=2,
               ExportRate=20, **settings)


def _lost_packets(out: str) -> int:
    """Every packet the summary's ``lost:`` line counts, wherever it was lost."""
    line = next(x for x in out.splitlines() if x.startswith("lost: "))
    return sum(int(n.replace(",", "")) for n in re.findall(r"([\d,]+) packets", line))


def test_past_the_drain_deadline_the_loss_is_counted_and_the_exit_is_1(lab, tmp_path):
    ns, a, b = lab
    with NsNfcapd(b, tmp_path, host=B4) as nf:
        run = _slow_drain_run(lab, tmp_path, nf, DrainTimeoutSeconds=2)
        with SteadyTraffic(b, A4, flows=6000, rate=6000):
            time.sleep(2)
            start = time.monotonic()
            os.killpg(run.pgid, signal.SIGTERM)
            code, out = run.wait(60)
            took = time.monotonic() - start
        rows = nf.records()
    assert code == 1, out
    assert 2 <= took < 2 + 4, out
    assert "the drain deadline (2 s, DrainTimeoutSeconds) passed: stopped at once" in out, out
    metered = summary_figure(out, METERED)
    lost = _lost_packets(out)
    assert lost > 0
    assert _collected(rows) + lost == metered, out


def test_a_second_ctrl_c_stops_at_once_and_says_what_was_lost(lab, tmp_path):
    ns, a, b = lab
    with NsNfcapd(b, tmp_path, host=B4) as nf:
        run = Run(a, tmp_path, 1, terminal=True, Sources=["afpacket:va"], IpFixCollectors=[nf.collector],
                  Workers=2, ExportRate=20, DrainTimeoutSeconds=60)
        with SteadyTraffic(b, A4, flows=6000, rate=6000):
            time.sleep(2)
            run.ctrl_c()
            time.sleep(1)  # draining: the exporter's queue leaves at 20 messages a second
            start = time.monotonic()
            run.ctrl_c()
            code, out = run.wait(60)
            took = time.monotonic() - start
        rows = nf.records()
    assert code == 1, out
    assert took < 4, out
    assert "stopped again while draining: stopped at once" in out, out
    metered = summary_figure(out, METERED)
    lost = _lost_packets(out)
    assert lost > 0
    assert _collected(rows) + lost == metered, out
