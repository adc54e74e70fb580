"""``flowmeter run`` as the systemd units start it: an unprivileged user holding only ambient
CAP_NET_RAW and CAP_NET_ADMIN (deploy/systemd).

The user is ``nobody``: every Debian machine has it, and the test needs no
account of its own that it would have to add and remove. ``setpriv`` gives
it the two capabilities in the inheritable and ambient sets, as systemd's
``AmbientCapabilities`` does, and runs the venv's Python (readable by any
user, see .ci/run). The profile lies in a directory the user can read and
the runtime directory is one it owns, passed as ``RUNTIME_DIRECTORY`` as
systemd's ``RuntimeDirectory`` does.

Each run must open its source with the capability (AF_PACKET on the lab's
veth, an NFLOG group fed by an nftables rule), meter exactly what was sent
into nfcapd, and meanwhile every one of its processes must hold no
capability at all, with ``NoNewPrivs`` set. The same when its capture
process was killed first: the one started again, with no capability to open
anything, reads the socket the supervisor opened.
"""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from flowmeter.recovery import START_GRACE_S

from tests.support.liverun import A4, B4, ROOT, NsNfcapd, Run
from tests.support.netns import entered

USER = "nobody"
CAPS = "+net_raw,+net_admin"
ZERO_CAPS = ("CapInh", "CapPrm", "CapEff", "CapAmb")


@pytest.fixture
def as_user():
    """(setpriv command, directory for the profile, environment): what runs flowmeter as ``USER``."""
    entry = pwd.getpwnam(USER)
    group = grp.getgrgid(entry.pw_gid).gr_name
    shared = Path(tempfile.mkdtemp(prefix="fm-least-privilege-"))  # pytest's tmp_path is root's alone
    shared.chmod(0o755)
    runtime = shared / "run"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, entry.pw_uid, entry.pw_gid)
    wrap = ("setpriv", "--reuid", USER, "--regid", group, "--clear-groups",
            "--inh-caps", CAPS, "--ambient-caps", CAPS, "--")
    # the user's own kernel cache, where flowmeter would choose it for a user without a home: this
    # process's NUMBA_CACHE_DIR (root's, set when flowmeter.jit was imported here) is not the user's
    cache = Path(tempfile.gettempdir()) / f"flowmeter-numba-{entry.pw_uid}"
    cache.mkdir(mode=0o700, exist_ok=True)
    os.chown(cache, entry.pw_uid, entry.pw_gid)
    try:
        yield wrap, shared, {"RUNTIME_DIRECTORY": str(runtime), "NUMBA_CACHE_DIR": str(cache)}
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def assert_no_capability(run: Run, runtime: Path) -> None:
    """Every process of the run: ``USER``, no capability in any set, NoNewPrivs; the run's directory
    in the runtime directory it was given."""
    parent = psutil.Process(run.proc.pid)
    procs = [parent, *parent.children(recursive=True)]
    assert len(procs) >= 4, procs  # supervisor, exporter, worker, capture
    uid = pwd.getpwnam(USER).pw_uid
    for p in procs:
        fields = status_fields(p.pid)
        assert {k: int(fields[k], 16) for k in ZERO_CAPS} == dict.fromkeys(ZERO_CAPS, 0), (p.name(), fields)
        assert fields["NoNewPrivs"].strip() == "1", (p.name(), fields)
        assert {int(u) for u in fields["Uid"].split()} == {uid}, (p.name(), fields["Uid"])
        # the bounding set and the groups as started (setpriv: root's bounding set, --clear-groups)
        assert fields["CapBnd"] == status_fields(os.getpid())["CapBnd"], (p.name(), fields)
        assert fields["Groups"].split() == [], (p.name(), fields)
    assert [d.name.startswith("flowmeter-") for d in runtime.iterdir()] == [True]


def crash_capture(run: Run) -> None:
    """SIGKILL to the capture process; back once another one runs (started by the supervisor)."""
    def capture() -> list[psutil.Process]:
        return [p for p in psutil.Process(run.proc.pid).children()
                if p.name() == "fm-capture-0" and p.status() != psutil.STATUS_ZOMBIE]

    [victim] = capture()
    victim.kill()
    deadline = time.monotonic() + START_GRACE_S
    while not [p for p in capture() if p.pid != victim.pid]:
        assert time.monotonic() < deadline, "".join(run.lines)
        time.sleep(0.05)
    while not any("capture-0 restarted" in line for line in run.lines):
        assert time.monotonic() < deadline, "".join(run.lines)
        time.sleep(0.05)


def udp_flows(rows: list[dict]) -> tuple[Counter, Counter]:
    packets, octets = Counter(), Counter()
    for r in rows:
        if r["proto"] == 17 and r.get("src4_addr") == A4:
            key = (r["src4_addr"], r["dst4_addr"], r["src_port"], r["dst_port"])
            packets[key] += r["in_packets"]
            octets[key] += r["in_bytes"]
    return packets, octets


def send(sizes, sport: int, dport: int, namespace: str) -> None:
    with entered(namespace):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.bind((A4, sport))
        for size in sizes:
            sock.sendto(b"p" * size, (B4, dport))
            time.sleep(0.01)


SIZES = (10, 200, 1000)
SENT = (len(SIZES), len(SIZES) * 28 + sum(SIZES))  # packets, IPv4 + UDP octets


def meter_as_user(where: str, source: str, sport: int, as_user, tmp_path, crash: bool, sender: str) -> None:
    """``flowmeter run`` of ``source`` in namespace ``where`` as the user: no capability in any of its
    processes (also after a capture restart), and nfcapd gets exactly the datagrams ``sender`` sent."""
    wrap, shared, env = as_user
    with NsNfcapd(where, tmp_path) as nf:
        run = Run(where, shared, 1, wrap=wrap, env=env, Sources=[source], IpFixCollectors=[nf.collector])
        if crash:
            crash_capture(run)
        assert_no_capability(run, Path(env["RUNTIME_DIRECTORY"]))
        send(SIZES, sport, sport + 1, sender)
        time.sleep(0.3)
        run.stop()
        packets, octets = udp_flows(nf.records())
    key = (A4, B4, sport, sport + 1)
    assert dict(packets) == {key: SENT[0]} and dict(octets) == {key: SENT[1]}, (packets, octets)


@pytest.mark.parametrize("crash", [False, True], ids=["", "capture-restarted"])
def test_afpacket_as_a_user_with_ambient_capabilities_keeps_none(lab, tmp_path, as_user, crash):
    ns, a, b = lab
    meter_as_user(a, "afpacket:va", 7100, as_user, tmp_path, crash, sender=a)


NFT_INPUT = """
table inet fmlp {
    chain input {
        type filter hook input priority 0; policy accept;
        udp dport 7201 log group 7
    }
}
"""


@pytest.mark.parametrize("crash", [False, True], ids=["", "capture-restarted"])
def test_nflog_as_a_user_with_ambient_capabilities_keeps_none(lab, tmp_path, as_user, crash):
    ns, a, b = lab
    rules = tmp_path / "input.nft"
    rules.write_text(NFT_INPUT)
    ns.run(b, "nft", "-f", str(rules))
    meter_as_user(b, "nflog:7", 7200, as_user, tmp_path, crash, sender=a)


@pytest.mark.parametrize("source, says", [
    ("afpacket:lo", "flowmeter: afpacket:lo: permission denied: reading an interface needs root or CAP_NET_RAW"),
    ("nflog:9", "flowmeter: nflog:9: binding a log group needs CAP_NET_ADMIN in this network namespace"),
])
def test_without_the_capability_a_source_says_so_in_one_line(as_user, source, says):
    """The same user without the capabilities: the source's own error, nothing else, exit 1."""
    wrap, shared, env = as_user
    wrap = tuple(a for a in wrap if a not in ("--inh-caps", "--ambient-caps", CAPS))
    profile = shared / "profile.json"
    profile.write_text(f'{{"FlowMetadata": {{"Sources": ["{source}"]}}}}')
    r = subprocess.run([*wrap, sys.executable, "-m", "flowmeter.cli", "run", "--profile", str(profile)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, **env})
    assert (r.returncode, r.stdout, r.stderr) == (1, "", says + "\n")
