"""The command line as an operator runs it: exit codes, exact one-line errors, output."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from exporter.template import default_registry
from flowmeter.config import SETTINGS

ROOT = Path(__file__).resolve().parents[2]


def flowmeter(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowmeter.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_console_script_is_declared():
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("flowmeter") == "flowmeter.cli:main"


BROKEN = [
    ({"FlowMetadata": {"Interval": -5}},
     "Interval: -5 is not 0 or a whole number of milliseconds of at least 1000"),
    ({"FlowMetadata": {"Interval": 1.5}},
     "Interval: 1.5 is not 0 or a whole number of milliseconds of at least 1000"),
    ({"FlowMetadata": {"Interval": 999}},
     "Interval: 999 is not 0 or a whole number of milliseconds of at least 1000"),
    ({"FlowMetadata": {"Direction": "Egress"}},
     'Direction: "Egress" is not one of Both, SendingToPeer, ReceivedFromPeer'),
    ({"FlowMetadata": {"IpFixCollectors": ["Tcp/1.2.3.4:4739"]}},
     'IpFixCollectors[0]: "Tcp/1.2.3.4:4739" is not Udp/ADDRESS:PORT, Dtls/ADDRESS:PORT or File/PATH'),
    ({"FlowMetadata": {"IpFixCollectors": ["Udp/127.0.0.1:70000"]}},
     'IpFixCollectors[0]: port 70000 in "Udp/127.0.0.1:70000" is outside 1-65535'),
    ({"FlowMetadata": {"IpFixCollectors": ["Udp/127.0.0.1:0"]}},
     'IpFixCollectors[0]: port 0 in "Udp/127.0.0.1:0" is outside 1-65535'),
    ({"FlowMetadata": {"IpFixCollectors": ["Udp/127.0.0.1"]}},
     'IpFixCollectors[0]: "Udp/127.0.0.1" is not Udp/ADDRESS:PORT, Dtls/ADDRESS:PORT or File/PATH'),
    ({"FlowMetadata": {"IpFixCollectors": ["Udp/nosuchhost.invalid:4739"]}},
     'IpFixCollectors[0]: cannot resolve host "nosuchhost.invalid" in "Udp/nosuchhost.invalid:4739"'),
    ({"FlowMetadata": {"IpFixCollectors": "Udp/127.0.0.1:4739"}},
     'IpFixCollectors: "Udp/127.0.0.1:4739" is not a list of strings'),
    ({"FlowMetadata": {"IpFixCollecters": []}},
     "IpFixCollecters: unknown key; did you mean IpFixCollectors?"),
    ({"FlowMetadata": {"Enabled": "yes"}},
     'Enabled: "yes" is not true or false'),
    ({"FlowMetadata": {"MaxMessageSize": 100}},
     "MaxMessageSize: 100 is not a whole number of octets from 256 to 65507"),
    ({"FlowMetadata": {"ObservationDomainId": -1}},
     "ObservationDomainId: -1 is not a whole number from 0 to 4294967295"),
    ({"Other": 1}, "no FlowMetadata object at the top level"),
]


@pytest.mark.parametrize("profile,error", BROKEN, ids=[e.split(":")[0] + str(i) for i, (_, e) in enumerate(BROKEN)])
def test_check_refuses_a_broken_profile_with_one_exact_line(tmp_path, profile, error):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    r = flowmeter("check", str(path))
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr == f"flowmeter: {path}: {error}\n"


def test_check_refuses_invalid_json_and_missing_files(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"FlowMetadata": {')
    r = flowmeter("check", str(path))
    assert r.returncode == 1 and r.stderr.startswith(f"flowmeter: {path}: not valid JSON") and r.stderr.count("\n") == 1
    r = flowmeter("check", str(tmp_path / "missing.json"))
    assert r.returncode == 1
    assert r.stderr == f"flowmeter: {tmp_path / 'missing.json'}: cannot read profile: No such file or directory\n"


def test_check_prints_effective_settings_and_says_when_exporting_is_off(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"Host": {"x": 1}, "FlowMetadata": {"Interval": 60000}}))
    r = flowmeter("check", str(path))
    assert r.returncode == 0
    assert "Interval: 60000" in r.stdout and "Direction: Both" in r.stdout
    assert "exporting is OFF: no IpFixCollectors" in r.stdout
    r = flowmeter("check", "--json", str(path))
    assert json.loads(r.stdout)["Interval"] == 60000


@pytest.mark.parametrize("sample", sorted((ROOT / "deploy" / "profiles").glob("*.json")), ids=lambda p: p.name)
def test_sample_profiles_are_valid(sample):
    r = flowmeter("check", str(sample))
    assert r.returncode == 0, r.stderr
    assert "exporting to" in r.stdout


def test_templates_lists_every_template_with_element_ids():
    r = flowmeter("templates")
    assert r.returncode == 0
    ids = re.findall(r"^(?:options )?template (\d+) (\w+)", r.stdout, re.M)
    registry = default_registry()
    assert [(int(i), n) for i, n in ids] == [(t.template_id, t.name) for t in registry]  # each its layout's id
    assert {n for _, n in ids} >= {"ipv4_tcp", "ipv6_icmp", "exporter_stats"}
    assert re.search(r"^\s+152\s+flowStartMilliseconds\s+8$", r.stdout, re.M)
    assert re.search(r"^\s+61\s+flowDirection\s+1$", r.stdout, re.M)


def test_readme_lists_every_setting_with_its_default():
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", readme, re.M))
    assert set(rows) == {s.key for s in SETTINGS}
    for s in SETTINGS:
        assert rows[s.key].strip('"') == json.dumps(s.default, separators=(", ", ": ")).strip('"'), s.key
    help_text = flowmeter("settings").stdout
    assert all(s.key in help_text for s in SETTINGS)


def test_demo_replays_the_shipped_capture_end_to_end():
    r = flowmeter("demo", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"the collector decoded (\d+) of (\d+) exported flow records", r.stdout)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) > 50
    assert "600 frames, 600 packets metered" in r.stdout
    # the records themselves were printed, both families and directions
    assert re.search(r"^\S+ \S+ TCP +10\.", r.stdout, re.M) and "2001:db8:" in r.stdout
    assert re.search(r" out ", r.stdout) and re.search(r" in ", r.stdout)


def test_reload_without_a_run_is_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "flowmeter.cli", "reload", "--pid", "999999999"], capture_output=True,
                       text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": str(tmp_path)},
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 1
    assert r.stderr == "flowmeter: reload: no flowmeter run is running (as this user) with pid 999999999\n"
