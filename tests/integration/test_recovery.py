"""Children that die or hang during ``flowmeter run`` under steady live traffic.

A worker, the exporter or the capture is killed (``kill -9``), or a worker
is stopped (SIGSTOP): each must be started again within 2 s (or, hung,
within ``HANG_S`` and a second), the other processes must go on as they
were, and every packet sent must be either at the collector or in the
summary's ``lost:`` line, exactly. The link carries nothing else that is
metered: IPv4 only, static neighbours (no ARP), the datagrams go to a
socket that takes them (no ICMP back), and flowmeter's own export is left
out of metering.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import time

import psutil
import pytest

from flowmeter.recovery import HANG_S
from tests.support.collectors import ipfixdump_records
from tests.support.liverun import A4, B4, NsNfcapd, Run, SteadyTraffic, summary_figure
from tests.support.netns import entered

PORT = 9000


@pytest.fixture
def quiet_lab(lab):
    """The lab's veth, carrying only what the test sends (and the export): IPv4 only, static neighbours."""
    ns, a, b = lab
    macs = {}
    for name, ifname in ((a, "va"), (b, "vb")):
        ns.run(name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        ns.run(name, "sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1")
        macs[ifname] = json.loads(ns.run(name, "ip", "-j", "link", "show", ifname).stdout)[0]["address"]
    ns.run(a, "ip", "neigh", "replace", B4, "lladdr", macs["vb"], "dev", "va", "nud", "permanent")
    ns.run(b, "ip", "neigh", "replace", A4, "lladdr", macs["va"], "dev", "vb", "nud", "permanent")
    with entered(a):  # takes the datagrams (never read: the kernel drops what overflows, silently)
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind((A4, PORT))
    try:
        yield ns, a, b
    finally:
        sink.close()


def _child(run: Run, name: str, not_pid: int | None = None, timeout: float = 30) -> int:
    """The pid of the run's process called ``fm-NAME`` (another than ``not_pid``), once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in psutil.Process(run.proc.pid).children():
            try:
                if p.name() == f"fm-{name}" and p.pid != not_pid and p.status() != psutil.STATUS_ZOMBIE:
                    return p.pid
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.01)
    raise AssertionError(f"no {name} other than {not_pid}:\n" + "".join(run.lines))


def _others(run: Run, victim: str) -> dict[str, int]:
    return {p.name(): p.pid for p in psutil.Process(run.proc.pid).children() if p.name() != f"fm-{victim}"}


def _lost(out: str) -> int:
    line = next(x for x in out.splitlines() if x.startswith("lost: "))
    return sum(int(n.replace(",", "")) for n in re.findall(r"([\d,]+) packets", line))


@pytest.mark.parametrize("victim, how", [("worker-1", signal.SIGKILL), ("exporter", signal.SIGKILL),
                                         ("capture-0", signal.SIGKILL), ("worker-0", signal.SIGSTOP)])
def test_a_dead_or_hung_child_is_restarted_and_every_packet_is_delivered_or_counted(quiet_lab, tmp_path, victim, how):
    ns, a, b = quiet_lab
    with NsNfcapd(b, tmp_path, host=B4) as nf:
        ipfix = tmp_path / "stats.ipfix"  # the statistics records, read back by ipfixDump
        run = Run(a, tmp_path, 1, Sources=["afpacket:va"], IpFixCollectors=[nf.collector, f"File/{ipfix}"], Workers=2,
                  StatisticsIntervalSeconds=1)
        with SteadyTraffic(b, A4, flows=200, rate=2000, port=PORT) as traffic:
            time.sleep(2)  # every flow cached in both workers
            pid = _child(run, victim)
            others = _others(run, victim)
            start = time.monotonic()
            os.kill(pid, how)
            successor = _child(run, victim, not_pid=pid, timeout=HANG_S + 10)
            took = time.monotonic() - start
            time.sleep(2)  # the successor meters (or exports) the traffic that goes on
            assert _others(run, victim) == others  # nobody else was restarted
        sent = traffic.sent
        time.sleep(0.5)
        out = run.stop()
        rows = nf.records()
    assert took < (HANG_S + 1.5 if how == signal.SIGSTOP else 2), out
    assert successor != pid
    reason = f"hung: no report for {HANG_S:g} s, killed" if how == signal.SIGSTOP else "killed by signal 9"
    assert re.search(rf"^restarts: {victim} {reason} at [\d.]+ s; restarted [\d.]+ s later$", out, re.M), out
    source = next(x for x in reversed(out.splitlines()) if x.startswith("capture-0 afpacket:va:"))
    dropped = summary_figure(source, r"kernel drops ([\d,]+)")
    if how == signal.SIGKILL:  # restarted at once: the kernel's buffer held what came meanwhile
        assert dropped == 0, out
    collected = sum(r["in_packets"] for r in rows)
    assert collected + _lost(out) + dropped == sent, out
    if victim.startswith("worker"):
        assert _lost(out) > 0, out  # the flows it held
        # ... and the statistics records said so (ignoredPacketTotalCount), once the death was known
        ignored = [int(r["ignoredPacketTotalCount"]) for r in ipfixdump_records(ipfix)
                   if "ignoredPacketTotalCount" in r]
        assert ignored and ignored[0] == 0 and 0 < ignored[-1] <= _lost(out), (ignored, out)
