"""The systemd units in deploy/systemd, as systemd itself reads them (``systemd-analyze verify``).

verify also checks that ``ExecStart``'s program exists, and this machine
need not have flowmeter installed at /usr/local/bin: each unit is checked
as a copy, in a directory of the test's own, whose ``ExecStart`` runs
/bin/true instead. verify exits 0 on an unknown key (it only says so), so
anything it says at all fails the test; a unit with a misspelled key shows
that this is enough to catch one. The template is checked as an instance.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
INSTALLED = "/usr/local/bin/flowmeter"


def verify(tmp_path: Path, unit: str, text: str) -> str:
    """What ``systemd-analyze verify`` says of ``text`` installed as ``unit`` (its exit code included)."""
    assert INSTALLED in text
    path = tmp_path / unit
    path.write_text(text.replace(INSTALLED, "/bin/true"))
    if "@" in unit:  # a template is verified as one of its instances, next to it
        instance = tmp_path / unit.replace("@", "@gateway")
        instance.write_text(path.read_text())
        path = instance
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    return f"exit {r.returncode}: {r.stdout}{r.stderr}".strip() if r.returncode or r.stdout or r.stderr else ""


@pytest.mark.parametrize("unit", ["flowmeter.service", "flowmeter@.service"])
def test_unit_verifies_cleanly(tmp_path, unit):
    assert verify(tmp_path, unit, (UNITS / unit).read_text()) == ""


@pytest.mark.parametrize("unit", ["flowmeter.service", "flowmeter@.service"])
def test_a_misspelled_directive_is_caught(tmp_path, unit):
    text = (UNITS / unit).read_text().replace("\nProtectHome=", "\nProtectHme=")
    assert "ProtectHme" in verify(tmp_path, unit, text)


def test_the_template_meters_its_instance_profile():
    text = (UNITS / "flowmeter@.service").read_text()
    assert f"ExecStart={INSTALLED} run --profile /etc/flowmeter/%i.json\n" in text
    assert "\nRuntimeDirectory=flowmeter/%i\n" in text  # stopping one instance leaves the others' alone


@pytest.mark.parametrize("unit", ["flowmeter.service", "flowmeter@.service"])
def test_stop_timeout_leaves_room_for_the_default_drain(unit):
    """TimeoutStopSec above DrainTimeoutSeconds (its default) with the README's 5 s margin."""
    from flowmeter.config import DRAIN_TIMEOUT_S

    settings = dict(line.split("=", 1) for line in (UNITS / unit).read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    assert int(settings["TimeoutStopSec"]) >= DRAIN_TIMEOUT_S + 5
    assert "MemoryDenyWriteExecute" not in settings  # numba's JIT needs executable mappings
