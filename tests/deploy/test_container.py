"""The container image and docker-compose.yml, for real: built, brought up, metering, torn down.

What a newcomer runs from the README's "Container" section, in order:
``deploy/images`` (the base image made with debootstrap when podman has
none, kept afterwards; the wheels; the two images), ``podman-compose up``,
traffic on the compose network, and ``nfdump -r`` of the collector's files.
Traffic goes from the flowmeter container to the collector's address on a
port nothing listens on, so it crosses the metered interface (eth0) and is
told apart from everything else there. flowmeter is then stopped (it drains:
every flow reaches nfcapd), nfcapd too (it closes its file), and the flow
files on the named volume are read with the collector image's nfdump.

Each step that cannot run fails the test with one line naming the step and
why, never a skip: a CI machine without podman must not pass silently.
The compose project has a name of its own, so a stack a developer has up
from the same checkout is left alone; it is taken down, volume included,
whatever happened. About a minute with the images cached, 3-5 minutes the
first time on a machine (debootstrap, then apt inside the image builds).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT = "flowmeter-ci"
FLOWMETER = f"{PROJECT}_flowmeter_1"
COLLECTOR = f"{PROJECT}_collector_1"
VOLUME = f"{PROJECT}_flows"
PORT = 5999  # the test traffic's destination port on the collector: nothing listens there
DATAGRAMS = 20


def run(step: str, args: list[str], timeout: float = 120) -> str:
    """Run a command of ``step``; its output, or a failure naming the step and the last lines said."""
    try:
        done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"container: {step}: {' '.join(args)} took more than {timeout:.0f} s", pytrace=False)
    if done.returncode != 0:
        said = (done.stdout + done.stderr).strip().splitlines()[-15:]
        pytest.fail(f"container: {step}: {' '.join(args)} exited {done.returncode}:\n" + "\n".join(said),
                    pytrace=False)
    return done.stdout


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
    subprocess.run(["podman", "volume", "rm", "-f", VOLUME], capture_output=True, timeout=60)


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


def test_compose_stack_meters_its_network_into_nfcapd(podman):
    run("images", ["bash", "deploy/images"], timeout=900)
    for image in ("localhost/flowmeter:latest", "localhost/flowmeter-collector:latest"):
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

    run("traffic", ["podman", "exec", FLOWMETER, "python3", "-c",
                    "import socket, time\n"
                    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                    f"for _ in range({DATAGRAMS}):\n"
                    f"    s.sendto(b'flowmeter container test', ('collector', {PORT})); time.sleep(0.01)\n"])
    time.sleep(0.5)  # the last frame read from the ring (a block is handed over within 100 ms)

    run("stop flowmeter", compose("stop", "-t", "15", "flowmeter"))  # SIGTERM: it drains to nfcapd
    log = run("stop flowmeter", ["podman", "logs", FLOWMETER]) + \
        subprocess.run(["podman", "logs", FLOWMETER], capture_output=True, text=True).stderr
    assert "lost: none" in log, f"container: stop flowmeter: its summary does not say 'lost: none':\n{log[-2000:]}"
    time.sleep(1)  # nfcapd has read the last datagrams
    run("stop collector", compose("stop", "-t", "15", "collector"))  # SIGTERM: nfcapd closes its flow file

    flows = run("nfdump", ["podman", "run", "--rm", "--entrypoint", "nfdump", "-v", f"{VOLUME}:/var/lib/nfcapd:ro",
                           "localhost/flowmeter-collector", "-q", "-R", "/var/lib/nfcapd",
                           "-o", "fmt:%pr %dp %pkt", f"proto udp and dst port {PORT}"])
    rows = [line.split() for line in flows.splitlines() if line.strip()]
    assert rows, f"container: nfdump: no record of the test traffic (UDP to port {PORT}) in the collector's files"
    assert sum(int(r[2]) for r in rows) == DATAGRAMS, f"container: nfdump: packets of the test flow: {flows}"
