"""Reloading a running ``flowmeter run`` under steady live traffic (SIGHUP and ``flowmeter reload``).

Each setting that can change in place is changed in turn, and each must
show its effect while the collector present from start to end receives
every packet metered, exactly. A profile that fails its checks is refused
and the run goes on; a restart-only setting is named and left as it runs.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time


from tests.support.liverun import A4, B4, ROOT, NsNfcapd, Run, SteadyTraffic, summary_figure
from tests.support.netns import entered



class Profile:
    """The run's profile file, rewritten setting by setting."""

    def __init__(self, run: Run, ns: str) -> None:
        self.run, self.ns = run, ns
        self.doc = json.loads(run.profile.read_text())
        self.reloads = 0

    def set(self, how: str = "SIGHUP", **settings) -> str:
        """Write the settings, reload, and return the run's line about it."""
        self.doc["FlowMetadata"].update(settings)
        self.run.profile.write_text(json.dumps(self.doc))
        return self.reload(how)

    def reload(self, how: str = "SIGHUP") -> str:
        seen = len(self._lines())
        if how == "SIGHUP":
            self.run.proc.send_signal(1)
        else:
            with entered(self.ns):
                r = subprocess.run([sys.executable, "-m", "flowmeter.cli", "reload", "--pid", str(self.run.proc.pid)],
                                   cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            assert f"reload sent to pid {self.run.proc.pid}" in r.stdout, r.stdout
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            lines = self._lines()[seen:]
            if lines:
                time.sleep(0.3)  # every child applies it from its next batch on
                return lines[0]
            time.sleep(0.05)
        raise AssertionError("no reload line:\n" + "".join(self.run.lines))

    def _lines(self) -> list[str]:
        return [x for x in self.run.lines if x.startswith("flowmeter: reload")]  # the supervisor's lines


def _end_reasons(out: str) -> dict[str, int]:
    line = next(x for x in out.splitlines() if x.startswith("flows: "))
    return {k: int(v.replace(",", "")) for k, v in re.findall(r"(\w+) ([\d,]+)", line.split("(", 1)[1])}


def test_every_in_place_setting_reloads_under_traffic_without_losing_a_record(lab, tmp_path):
    ns, a, b = lab
    with NsNfcapd(b, tmp_path / "one", host=B4) as nf, NsNfcapd(b, tmp_path / "two", host=B4) as added:
        run = Run(a, tmp_path, 1, Sources=["afpacket:va"], IpFixCollectors=[nf.collector], Workers=2,
                  IdleTimeout=15000, Interval=0)
        p = Profile(run, a)
        # both directions: b -> a all along; a -> b (SteadyTraffic from a) to see Direction at work
        with SteadyTraffic(b, A4, flows=40, rate=800) as inbound, SteadyTraffic(a, B4, flows=40, rate=800, port=9100):
            time.sleep(1.5)
            line = p.set(Interval=1000)  # long flows now end an interim record every second
            assert re.search(r"reloaded .*: Interval changed$", line), line
            time.sleep(2.5)
            line = p.set(how="command", Direction="ReceivedFromPeer")  # a -> b no longer metered
            assert "Direction changed" in line, line
            time.sleep(1)
            line = p.set(IpFixCollectors=[nf.collector, added.collector])  # templates at once, own export left out
            assert "IpFixCollectors changed" in line, line
            time.sleep(1.5)
            settings = dict(Interval=0, IdleTimeout=1000, ExportRate=5000, TemplateRefreshSeconds=5,
                            StatisticsIntervalSeconds=30, LocalNetworks=["10.9.0.0/24"],
                            DropPrefixes={"deny": "AclDeny"}, MaxMessageSize=1400, ObservationDomainId=7,
                            DrainTimeoutSeconds=8)
            line = p.set(**settings)
            for key in settings:
                assert key in line, line
            line = p.set(Workers=3, Sources=["afpacket:va", "nflog:7"])  # need a restart
            assert "no in-place setting changed; Sources, Workers changed in the file but apply only at a restart" \
                in line, line
            run.profile.write_text('{"FlowMetadata": {"Interval": -5}}')
            line = p.reload()
            assert re.search(r"reload refused, the running profile stays: .*Interval: -5 is not", line), line
            time.sleep(1)
        inbound.stop()
        time.sleep(2)  # idle for more than the new IdleTimeout: every flow ends idle before the stop
        out = run.stop()
        rows, rows_added = nf.records(), added.records()
    metered = summary_figure(out, r"frames, ([\d,]+) packets metered")
    assert sum(r["in_packets"] for r in rows) == metered, out  # present all along: every packet
    reasons = _end_reasons(out)
    assert reasons.get("active", 0) >= 40, out  # Interval 1000 applied to the cached flows
    assert reasons.get("idle", 0) >= 40, out  # IdleTimeout 1000 applied
    assert summary_figure(out, r"other direction ([\d,]+)") > 500, out  # Direction applied
    assert rows_added and sum(r["in_packets"] for r in rows_added) > 0  # the added collector got data
    assert not [r for r in rows + rows_added if r.get("dst_port") in (nf.port, added.port)]  # never meters its export
    assert "\nlost: none" in out, out
