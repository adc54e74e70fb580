"""Where ``flowmeter status`` and ``reload`` look for runs: this shell's runtime directory and the
systemd units' (``/run/flowmeter`` for flowmeter.service, ``/run/flowmeter/NAME`` for
flowmeter@NAME), so that an operator's plain ``sudo flowmeter status`` finds a service's run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from flowmeter import status


def make_run(base, name: str, pid: int) -> str:
    rundir = base / f"flowmeter-{name}"
    rundir.mkdir(parents=True)
    (rundir / status.STATUS_FILE).write_text(json.dumps({"pid": pid, "profile": name, "sources": []}))
    return str(rundir / status.STATUS_FILE)


def a_dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_runs_of_the_shell_and_of_the_service_units_are_found_once(tmp_path, monkeypatch):
    service = tmp_path / "run-flowmeter"
    shell = tmp_path / "xdg"
    monkeypatch.setattr(status, "SERVICE_RUNTIME", str(service))
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shell))
    me = os.getpid()
    make_run(shell, "terminal", me)
    make_run(service, "unit", me)                 # flowmeter.service
    make_run(service / "gateway", "instance", me)  # flowmeter@gateway
    make_run(service / "edge", "ended", a_dead_pid())
    profiles = sorted(doc["profile"] for doc in status.running_status())
    assert profiles == ["instance", "terminal", "unit"]

    # inside the unit, runtime_base() is the unit's own directory: its run is listed once, not twice
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(service / "gateway"))
    assert sorted(doc["profile"] for doc in status.running_status()) == ["instance", "unit"]

    # a base named by the caller is the only place looked in
    assert [doc["profile"] for doc in status.running_status(str(shell))] == ["terminal"]
