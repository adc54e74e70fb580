"""The container image and docker-compose.yml, for real: built, brought up, metering, torn down.

What a newcomer runs from the README's "Container" section, in order:
``deploy/images`` (the base image made with debootstrap when podman has
none, kept afterwards; the wheels; the two images), ``podman-compose up``,
traffic on the compose network, Prometheus's view of flowmeter (the target up,
its counters) through the port the compose file publishes on the host's
loopback, and ``nfdump -R`` of the collector's files.
Traffic goes from the flowmeter container to the collector's address on a
port nothing listens on, so it crosses the metered interface (eth0) and is
told apart from everything else there. Once Prometheus shows every packet
metered also sent (no flow held), its figures are taken; flowmeter is then
stopped (it drains: every flow reaches nfcapd), nfcapd too (it closes its
file), and the flow files on the named volume are read with the collector
image's nfdump: the test flow's 20 packets, and Prometheus's packet and
record counts equal to everything nfcapd wrote.

Each step that cannot run fails the test with one line naming the step and
why, never a skip: a CI machine without podman must not pass silently.
The compose project has a name of its own, so a stack a developer has up
from the same checkout is left alone; it is taken down, volume included,
whatever happened. About two minutes with the images cached, 4-6 minutes the
first time on a machine (debootstrap, then apt inside the image builds).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.support.steps import Steps

REPO = Path(__file__).resolve().parents[2]
PROJECT = "flowmeter-ci"
FLOWMETER = f"{PROJECT}_flowmeter_1"
COLLECTOR = f"{PROJECT}_collector_1"
PROMETHEUS = f"{PROJECT}_prometheus_1"
PROMETHEUS_URL = "http://127.0.0.1:9090"  # docker-compose.yml publishes it on the host's loopback
VOLUME = f"{PROJECT}_flows"
PORT = 5999  # the test traffic's destination port on the collector: nothing listens there
DATAGRAMS = 20


STEPS = Steps("container", poll_s=1)
run, wait_for = STEPS.run, STEPS.wait_for


def compose(*args: str) -> list[str]:
    return ["podman-compose", "-p", PROJECT, *args]


@pytest.fixture
def podman(monkeypatch):
    """Checks what the steps need; podman set up for a machine without systemd unless the caller chose."""
    if os.geteuid() != 0:
        pytest.fail("container: podman: the test builds images and runs containers as root; run pytest as root",
                    pytrace=False)
    missing = [tool for tool in ("podman", "podman-compose") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"container: podman: {', '.join(missing)} not installed (.ci/run installs them)", pytrace=False)
    monkeypatch.setenv("CONTAINERS_CONF", os.environ.get("CONTAINERS_CONF") or str(REPO / "deploy/containers.conf"))
    yield
    subprocess.run(compose("down", "-v", "-t", "5"), cwd=REPO, capture_output=True, timeout=120)
    for volume in (VOLUME, f"{PROJECT}_metrics"):
        subprocess.run(["podman", "volume", "rm", "-f", volume], capture_output=True, timeout=60)


def wait_for_log(container: str, text: str, seconds: float) -> tuple[str, float]:
    """The container's log once it holds ``text``, and how long that took; a failure after ``seconds``."""
    start = time.monotonic()
    while True:
        log = subprocess.run(["podman", "logs", container], capture_output=True, text=True, timeout=30)
        said = log.stdout + log.stderr
        if text in said:
            return said, time.monotonic() - start
        if time.monotonic() - start > seconds:
            pytest.fail(f"container: up: no {text!r} from {container} within {seconds:.0f} s; it said:\n"
                        + "\n".join(said.splitlines()[-15:]), pytrace=False)
        time.sleep(0.2)


def prometheus(path: str, **query: str):
    """The ``data`` of a Prometheus API answer, or None while it does not answer."""
    url = f"{PROMETHEUS_URL}/api/v1/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return json.load(answer)["data"]
    except (OSError, ValueError):
        return None


def figure(query: str, at: float | None = None) -> float | None:
    """The value of a Prometheus query giving one number (at time ``at``, by default now), None
    while it gives none."""
    data = prometheus("query", query=query, **({"time": f"{at:.3f}"} if at else {}))
    if not data or not data["result"]:
        return None
    return float(data["result"][0]["value"][1])




def test_compose_stack_meters_its_network_into_nfcapd(podman):
    run("images", ["bash", "deploy/images"], timeout=900)
    for image in ("localhost/flowmeter:latest", "localhost/flowmeter-collector:latest",
                  "localhost/flowmeter-prometheus:latest"):
        run("images", ["podman", "image", "exists", image])
    # the runtime image runs as its own user, with no compiler and no pip
    assert run("images", ["podman", "run", "--rm", "--entrypoint", "id", "localhost/flowmeter", "-un"]).strip() \
        == "flowmeter"
    run("images", ["podman", "run", "--rm", "--entrypoint", "sh", "localhost/flowmeter", "-c",
                   "! command -v gcc && ! command -v cc && ! command -v pip && ! command -v pip3"])

    run("down", compose("down", "-v", "-t", "5"))  # what an interrupted earlier run left
    run("up", compose("up", "-d"))
    # the kernels were compiled at build time: the capture opens in seconds, not a minute of compiling
    _, took = wait_for_log(FLOWMETER, "afpacket:eth0 open", 60)
    assert took < 15, f"container: up: flowmeter took {took:.1f} s to open its capture (kernels not cached?)"

    # Prometheus scrapes the flowmeter target (every 5 s). The stack is whole then: traffic sent
    # earlier could meet the name server while it takes in the last container (name lookups fail)
    targets = wait_for("prometheus", "no flowmeter target up", lambda: [
        t for t in (prometheus("targets") or {}).get("activeTargets", [])
        if t["labels"].get("job") == "flowmeter" and t["health"] == "up"], 60)
    assert targets[0]["scrapeUrl"] == "http://flowmeter:9742/metrics", targets

    run("traffic", ["podman", "exec", FLOWMETER, "python3", "-c",
                    "import socket, time\n"
                    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                    "collector = socket.gethostbyname('collector')\n"
                    f"for _ in range({DATAGRAMS}):\n"
                    f"    s.sendto(b'flowmeter container test', (collector, {PORT})); time.sleep(0.01)\n"])
    sent_at = time.time()
    # flows end 5 s after their last packet (IdleTimeout), and then every packet metered is sent.
    # Other packets cross the metered interface now and then on their own (the containers' IPv6
    # router solicitations, repeated with a growing interval): the figures of a scrape are compared
    # with the records of the flows that began before it. Taken once two scrapes in a row after the
    # test traffic are the same with no flow held: every packet until the first of them was sent,
    # and none came between them (each process reports within 0.5 s of a change), so the flows that
    # began before the middle of those two scrapes are exactly those the figures count.
    scrapes: list[tuple] = []

    def settled():
        t = time.time()  # every query evaluated then: the figures of one scrape
        now = tuple(figure(query, t) for query in (
            "max(timestamp(flowmeter_source_packets_metered_total))", "sum(flowmeter_source_packets_metered_total)",
            "sum(flowmeter_collector_packets_sent_total)", "sum(flowmeter_collector_records_sent_total)",
            "sum(flowmeter_worker_active_flows)"))
        if None in now or now[0] < sent_at or (scrapes and now[0] == scrapes[-1][0]):
            return None
        scrapes.append(now)
        if len(scrapes) < 2:
            return None
        (before, *was), (last, metered, sent, records, held) = scrapes[-2:]
        if was == [metered, sent, records, held] and held == 0 and sent == metered >= DATAGRAMS:
            return (before + last) / 2, metered, records
        return None
    cutoff, metered, records = wait_for("prometheus", f"not two scrapes in a row with every packet metered "
                                        f"({DATAGRAMS}+) sent and no flow held", settled, 90)
    assert figure('up{job="flowmeter"}') == 1

    run("stop flowmeter", compose("stop", "-t", "15", "flowmeter"))  # SIGTERM: it drains to nfcapd
    log = run("stop flowmeter", ["podman", "logs", FLOWMETER]) + \
        subprocess.run(["podman", "logs", FLOWMETER], capture_output=True, text=True).stderr
    assert "lost: none" in log, f"container: stop flowmeter: its summary does not say 'lost: none':\n{log[-2000:]}"
    time.sleep(1)  # nfcapd has read the last datagrams
    run("stop prometheus", compose("stop", "-t", "15", "prometheus"))
    run("stop collector", compose("stop", "-t", "15", "collector"))  # SIGTERM: nfcapd closes its flow file

    flows = run("nfdump", ["podman", "run", "--rm", "--entrypoint", "nfdump", "-v", f"{VOLUME}:/var/lib/nfcapd:ro",
                           "localhost/flowmeter-collector", "-q", "-R", "/var/lib/nfcapd",
                           "-o", "fmt:%ts|%pr|%dp|%pkt"])
    rows = [[field.strip() for field in line.split("|")] for line in flows.splitlines() if line.strip()]
    test_flow = [r for r in rows if r[1] == "UDP" and r[2] == str(PORT)]
    assert test_flow, f"container: nfdump: no record of the test traffic (UDP to port {PORT}) in the collector's files"
    assert sum(int(r[3]) for r in test_flow) == DATAGRAMS, f"container: nfdump: packets of the test flow: {flows}"
    # what Prometheus reported is what the collector has of the flows until then: every record and
    # packet, nothing more (the collector image's clock is UTC)
    began = [r for r in rows if datetime.strptime(r[0], "%Y-%m-%d %H:%M:%S.%f").replace(
        tzinfo=timezone.utc).timestamp() < cutoff]
    assert (len(began), sum(int(r[3]) for r in began)) == (records, metered), \
        f"container: nfdump has {len(began)} records of {sum(int(r[3]) for r in began)} packets of flows begun " \
        f"before {cutoff:.1f}, Prometheus reported {records:.0f} records of {metered:.0f} packets sent:\n{flows}"
    print(f"container: Prometheus target up; {metered:.0f} packets metered and sent in {records:.0f} records, as "
          f"nfcapd has them ({len(rows)} records in all after the stop); the test flow {DATAGRAMS} packets")
