"""The systemd unit under a real systemd: flowmeter@gateway started, watched, reloaded, killed,
restarted and stopped by systemd itself.

The machine running the tests has no systemd as pid 1, so systemd runs as
pid 1 of a container (podman ``--systemd=always``) made from flowmeter's
image plus systemd, nfcapd and nft (tests/deploy/systemd/Dockerfile). The
test installs the repository's ``flowmeter@.service`` and a profile there
as README "Deploying with systemd" says (the command at
/usr/local/bin/flowmeter, the system user ``flowmeter``), with an
``afpacket:eth0`` and an ``nflog:5`` source exporting to nfcapd on loopback,
then checks what an operator relies on:

- ``systemctl start`` returns once flowmeter said READY=1 (``Type=notify``),
  and the unit's status text is the supervisor's STATUS= line; the watchdog
  has been pinged;
- every process of the unit runs as ``flowmeter`` with no capability in any
  set, the unit's two in the bounding set, and ``NoNewPrivs``;
- ``flowmeter status`` as root finds the run in the unit's runtime directory;
- ``systemctl reload`` applies the profile again in place (same main pid);
- a supervisor killed with SIGKILL is started again by systemd
  (``Restart=on-failure``), its children gone with it;
- ``systemctl stop`` drains: the journal has the summary with nothing lost,
  the unit ends with status 0, and nfcapd has every datagram sent to the
  metered interface and to the NFLOG rule, exactly.

Each step that cannot run fails the test with one line naming it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.steps import Steps

REPO = Path(__file__).resolve().parents[2]
IMAGE = "localhost/flowmeter-systemd-test"
NAME = "flowmeter-systemd-ci"
UNIT = "flowmeter@gateway"
AFPACKET_PORT, AFPACKET_SENT = 5999, 10  # UDP to the container's gateway: crosses eth0
NFLOG_PORT, NFLOG_SENT = 5998, 7  # UDP on loopback, logged to group 5 by an nft rule
PROFILE = {
    "Name": "gateway",
    "FlowMetadata": {
        "Sources": ["afpacket:eth0", "nflog:5"],
        "IpFixCollectors": ["Udp/127.0.0.1:4739"],
        "IdleTimeout": 2000,
        "Workers": 1,
    },
}
NFT = f"""
table inet fmtest {{
    chain output {{
        type filter hook output priority 0; policy accept;
        oifname "lo" udp dport {NFLOG_PORT} log group 5
    }}
}}
"""


STEPS = Steps("systemd")
run, wait_for = STEPS.run, STEPS.wait_for


def inside(step: str, command: str, timeout: float = 120, check: bool = True) -> str:
    """``command`` run by sh in the container, as root."""
    return run(step, ["podman", "exec", NAME, "sh", "-c", command], timeout, check)


def unit_show(*props: str) -> dict[str, str]:
    said = inside("systemctl show", f"systemctl show {UNIT} " + " ".join(f"-p {p}" for p in props))
    return dict(line.split("=", 1) for line in said.splitlines() if "=" in line)




def journal(*args: str) -> str:
    return inside("journal", f"journalctl -u {UNIT} --no-pager -o cat " + " ".join(args))


PROCESSES = """
import json, sys, psutil
main = psutil.Process(int(sys.argv[1]))
out = []
for p in [main, *main.children(recursive=True)]:
    fields = dict(l.split(":\\t", 1) for l in open(f"/proc/{p.pid}/status").read().splitlines() if ":\\t" in l)
    out.append({"pid": p.pid, "name": p.name(), **{k: fields[k].strip() for k in
               ("Uid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")}})
print(json.dumps(out))
"""


@pytest.fixture
def machine(monkeypatch):
    """The container with systemd as pid 1, up; removed afterwards whatever happened."""
    if os.geteuid() != 0 or shutil.which("podman") is None:
        pytest.fail("systemd: podman: the test runs a container as root with podman (.ci/run installs it)",
                    pytrace=False)
    monkeypatch.setenv("CONTAINERS_CONF", os.environ.get("CONTAINERS_CONF") or str(REPO / "deploy/containers.conf"))
    run("images", ["bash", "deploy/images"], timeout=900)  # flowmeter's image, of this checkout
    run("image", ["podman", "build", "-q", "-t", IMAGE, "tests/deploy/systemd"], timeout=600)
    subprocess.run(["podman", "rm", "-f", "-t", "0", NAME], capture_output=True, timeout=60)
    # NET_ADMIN for the nft rule and the NFLOG group (podman's defaults hold NET_RAW)
    run("boot", ["podman", "run", "-d", "--name", NAME, "--systemd=always", "--cap-add", "NET_ADMIN", IMAGE])
    try:
        wait_for("boot", "systemd not running", lambda: inside(
            "boot", "systemctl is-system-running", check=False).strip() in ("running", "degraded"), 90)
        yield
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "5", NAME], capture_output=True, timeout=120)


def test_flowmeter_service_under_systemd(machine, tmp_path):
    # installed as README "Deploying with systemd" says
    run("install", ["podman", "cp", str(REPO / "deploy/systemd/flowmeter@.service"),
                    f"{NAME}:/etc/systemd/system/flowmeter@.service"])
    (tmp_path / "gateway.json").write_text(json.dumps(PROFILE))
    (tmp_path / "rules.nft").write_text(NFT)
    inside("install", "install -d -m 0755 /etc/flowmeter && "
           "ln -sf /opt/flowmeter/bin/flowmeter /usr/local/bin/flowmeter")
    run("install", ["podman", "cp", str(tmp_path / "gateway.json"), f"{NAME}:/etc/flowmeter/gateway.json"])
    run("install", ["podman", "cp", str(tmp_path / "rules.nft"), f"{NAME}:/etc/flowmeter/rules.nft"])
    inside("install", "chmod 0644 /etc/flowmeter/gateway.json && nft -f /etc/flowmeter/rules.nft && "
           "flowmeter check /etc/flowmeter/gateway.json >/dev/null && systemctl daemon-reload")
    inside("collector", "systemd-run --unit nfcapd-test --property=KillSignal=SIGTERM "
           "sh -c 'mkdir -p /var/lib/nfcapd-test && exec nfcapd -w /var/lib/nfcapd-test -p 4739 -t 60'")

    # Type=notify: start returns once READY=1 came, with the sources open
    started = time.monotonic()
    inside("start", f"systemctl enable --now {UNIT}", timeout=330)
    took = time.monotonic() - started
    state = unit_show("ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    assert journal().count(" open") >= 2, journal()  # both sources said open before READY
    main = int(state["MainPID"])
    # STATUS= from the supervisor, and the watchdog pinged (WatchdogSec=30, every 15 s: the first at once)
    status_text = wait_for("status", "no STATUS= line", lambda: unit_show("StatusText")["StatusText"], 10)
    assert status_text.startswith("metering 2 source(s): "), status_text
    assert int(unit_show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]) > 0

    # every process: the unit's user, no capability but the two in the bounding set, NoNewPrivs
    procs = json.loads(inside("processes", f"/opt/flowmeter/bin/python -c '{PROCESSES}' {main}"))
    uid = inside("processes", "id -u flowmeter").strip()
    assert len(procs) >= 5, procs  # supervisor, exporter, worker, two captures
    for p in procs:
        assert set(p["Uid"].split()) == {uid}, p
        assert [int(p[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapAmb")] == [0] * 4, p
        assert int(p["CapBnd"], 16) == (1 << 12) | (1 << 13), p  # CAP_NET_ADMIN, CAP_NET_RAW
        assert p["NoNewPrivs"] == "1", p

    # the traffic: datagrams across eth0 (afpacket) and on loopback (the NFLOG rule)
    inside("traffic", "/opt/flowmeter/bin/python -c \"import socket, subprocess, time\n"
           "gw = subprocess.run(['ip', '-j', 'route', 'show', 'default'], capture_output=True, text=True).stdout\n"
           "import json; gw = json.loads(gw)[0]['gateway']\n"
           "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
           f"for _ in range({AFPACKET_SENT}): s.sendto(b'x' * 100, (gw, {AFPACKET_PORT})); time.sleep(0.01)\n"
           f"for _ in range({NFLOG_SENT}): s.sendto(b'y' * 50, ('127.0.0.1', {NFLOG_PORT})); time.sleep(0.01)\n\"")

    # flowmeter status, as root with no variable set, finds the unit's run
    said = inside("status", "flowmeter status")
    assert f"pid {main}, profile /etc/flowmeter/gateway.json" in said and "afpacket:eth0:" in said, said

    # reload: SIGHUP through ExecReload, applied in place
    inside("reload", f"systemctl reload {UNIT}")
    wait_for("reload", "no 'reloaded' line in the journal", lambda: "reloaded /etc/flowmeter/gateway.json" in journal(),
             20)
    assert int(unit_show("MainPID")["MainPID"]) == main

    # the flows end (IdleTimeout 2 s) and are exported; then the supervisor is killed outright:
    # systemd ends the rest of the unit's processes and starts it again
    time.sleep(4)
    inside("kill", f"kill -9 {main}")
    again = wait_for("restart", "not started again", lambda: (lambda s: s if s["ActiveState"] == "active"
                     and s["MainPID"] not in ("0", str(main)) else None)(unit_show("ActiveState", "MainPID",
                                                                                     "NRestarts")), 60)
    assert int(again["NRestarts"]) == 1, again
    pids = " ".join(str(p["pid"]) for p in procs)
    left = inside("restart", f"/opt/flowmeter/bin/python -c 'import sys, psutil; "
                  f"print([p for p in map(int, sys.argv[1:]) if psutil.pid_exists(p)])' {pids}")
    assert left.strip() == "[]", f"processes of the killed run still there: {left}"

    # stop: SIGTERM to the whole unit; the supervisor drains; the unit ends cleanly
    since = inside("stop", "date +%s").strip()
    inside("stop", f"systemctl stop {UNIT}", timeout=60)
    end = unit_show("ActiveState", "Result", "ExecMainStatus")
    assert (end["ActiveState"], end["Result"], end["ExecMainStatus"]) == ("inactive", "success", "0"), end
    last = journal(f"--since @{since}")
    assert "lost: none" in last, last

    # nfcapd closes its file on SIGTERM; nfdump then has every datagram, once
    inside("collector", "systemctl stop nfcapd-test")
    rows = inside("nfdump", "nfdump -q -R /var/lib/nfcapd-test -o 'fmt:%pr|%dp|%pkt' 'proto udp'")
    packets: dict[int, int] = {}
    for line in rows.splitlines():
        proto, port, n = (f.strip() for f in line.split("|"))
        packets[int(port)] = packets.get(int(port), 0) + int(n)
    assert (packets.get(AFPACKET_PORT), packets.get(NFLOG_PORT)) == (AFPACKET_SENT, NFLOG_SENT), rows

    # the journal keeps each line's level: the sources' lines are info (6), the restart a warning or worse
    entries = [json.loads(line) for line in inside("journal", f"journalctl -u {UNIT} --no-pager -o json").splitlines()]
    opened = [e for e in entries if e.get("MESSAGE", "").endswith("afpacket:eth0 open")]
    assert opened and {e["PRIORITY"] for e in opened} == {"6"}, opened
    print(f"systemd: started in {took:.1f} s; {len(procs)} processes; {status_text}")
