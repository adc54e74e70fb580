"""Profile loading: every broken profile is one exact line; good ones give the effective settings."""
from __future__ import annotations

import dataclasses
import ipaddress
import json
from pathlib import Path

import pytest

from exporter.exporting import EXPORT_RATE, ExportSettings
from exporter.transport import CollectorAddress
from flowmeter.config import KEYS, SETTINGS, ConfigError, Profile, load_profile, parse_profile, settings_help


def _flow_metadata(**settings: object) -> str:
    return json.dumps({"FlowMetadata": settings})


# (profile text or None for no file, expected error with {path} for the file's path)
BROKEN_PROFILES = [
    pytest.param(None, "{path}: cannot read profile: No such file or directory", id="missing-file"),
    pytest.param('{"FlowMetadata": {"Enabled": true,}}',
                 "{path}: not valid JSON: Expecting property name enclosed in double quotes "
                 "(line 1 column 35)", id="trailing-comma"),
    pytest.param("[1, 2]", "{path}: top level is [1, 2], not an object with a FlowMetadata object",
                 id="top-level-array"),
    pytest.param('{"Host": {}}', "{path}: no FlowMetadata object at the top level",
                 id="no-flow-metadata"),
    pytest.param('{"FlowMetadata": ["Enabled"]}', '{path}: FlowMetadata: ["Enabled"] is not an object',
                 id="flow-metadata-not-object"),
    pytest.param(_flow_metadata(IpFixCollecters=[]),
                 "{path}: IpFixCollecters: unknown key; did you mean IpFixCollectors?",
                 id="misspelt-key"),
    pytest.param(_flow_metadata(Colour="blue"),
                 "{path}: Colour: unknown key; known keys are " + ", ".join(KEYS), id="unknown-key"),
    pytest.param(_flow_metadata(Interval=-5),
                 "{path}: Interval: -5 is not 0 or a whole number of milliseconds of at least 1000",
                 id="interval-negative"),
    pytest.param(_flow_metadata(Interval=999),
                 "{path}: Interval: 999 is not 0 or a whole number of milliseconds of at least 1000",
                 id="interval-under-a-second"),
    pytest.param(_flow_metadata(Interval=1500.5),
                 "{path}: Interval: 1500.5 is not 0 or a whole number of milliseconds of at least 1000",
                 id="interval-fraction"),
    pytest.param(_flow_metadata(Interval=60000.0),
                 "{path}: Interval: 60000.0 is not 0 or a whole number of milliseconds of at least 1000",
                 id="interval-float"),
    pytest.param(_flow_metadata(Interval=True),
                 "{path}: Interval: true is not 0 or a whole number of milliseconds of at least 1000",
                 id="interval-bool"),
    pytest.param(_flow_metadata(Direction="Egress"),
                 '{path}: Direction: "Egress" is not one of Both, SendingToPeer, ReceivedFromPeer',
                 id="direction-unknown"),
    pytest.param(_flow_metadata(Direction="both"),
                 '{path}: Direction: "both" is not one of Both, SendingToPeer, ReceivedFromPeer',
                 id="direction-wrong-case"),
    pytest.param(_flow_metadata(Enabled="yes"), '{path}: Enabled: "yes" is not true or false',
                 id="enabled-string"),
    pytest.param(_flow_metadata(IpFixCollectors="Udp/127.0.0.1:4739"),
                 '{path}: IpFixCollectors: "Udp/127.0.0.1:4739" is not a list of strings',
                 id="collectors-not-list"),
    pytest.param(_flow_metadata(IpFixCollectors=["Udp/127.0.0.1:4739", "Tcp/1.2.3.4:4739"]),
                 '{path}: IpFixCollectors[1]: "Tcp/1.2.3.4:4739" is not Udp/ADDRESS:PORT, Dtls/ADDRESS:PORT or File/PATH',
                 id="collector-tcp"),
    pytest.param(_flow_metadata(IpFixCollectors=[4739]),
                 "{path}: IpFixCollectors[0]: 4739 is not Udp/ADDRESS:PORT, Dtls/ADDRESS:PORT or File/PATH",
                 id="collector-not-string"),
    pytest.param(_flow_metadata(IpFixCollectors=["Udp/127.0.0.1"]),
                 '{path}: IpFixCollectors[0]: "Udp/127.0.0.1" is not Udp/ADDRESS:PORT, Dtls/ADDRESS:PORT or File/PATH',
                 id="collector-no-port"),
    pytest.param(_flow_metadata(IpFixCollectors=["Udp/::1:4739"]),
                 '{path}: IpFixCollectors[0]: "Udp/::1:4739" is not Udp/ADDRESS:PORT, Dtls/ADDRESS:PORT or File/PATH',
                 id="collector-ipv6-without-brackets"),
    pytest.param(_flow_metadata(IpFixCollectors=["Udp/127.0.0.1:70000"]),
                 '{path}: IpFixCollectors[0]: port 70000 in "Udp/127.0.0.1:70000" is outside 1-65535',
                 id="collector-port-too-big"),
    pytest.param(_flow_metadata(IpFixCollectors=["Udp/127.0.0.1:0"]),
                 '{path}: IpFixCollectors[0]: port 0 in "Udp/127.0.0.1:0" is outside 1-65535',
                 id="collector-port-zero"),
    pytest.param(_flow_metadata(IpFixCollectors=["Udp/[fe80::zz]:4739"]),
                 '{path}: IpFixCollectors[0]: "fe80::zz" in "Udp/[fe80::zz]:4739" is not an IPv6 address',
                 id="collector-bad-ipv6"),
    pytest.param(_flow_metadata(IpFixCollectors=["Udp/nosuchhost.invalid:4739"]),
                 '{path}: IpFixCollectors[0]: cannot resolve host "nosuchhost.invalid" '
                 'in "Udp/nosuchhost.invalid:4739"', id="collector-unresolvable"),
    pytest.param(_flow_metadata(IpFixCollectors=["Udp/127.0.0.1:4739", "udp/127.0.0.1:4739"]),
                 '{path}: IpFixCollectors[1]: "udp/127.0.0.1:4739" repeats IpFixCollectors[0]',
                 id="collector-duplicate"),
    pytest.param(_flow_metadata(IpFixCollectors=["File/"]),
                 '{path}: IpFixCollectors[0]: empty path in "File/"', id="file-collector-empty-path"),
    pytest.param(_flow_metadata(IpFixCollectors=["File/no/such/dir/flows.ipfix"]),
                 '{path}: IpFixCollectors[0]: directory "no/such/dir" of "File/no/such/dir/flows.ipfix" '
                 "does not exist", id="file-collector-missing-directory"),
    pytest.param(_flow_metadata(ObservationDomainId=4294967296),
                 "{path}: ObservationDomainId: 4294967296 is not a whole number from 0 to 4294967295",
                 id="domain-too-big"),
    pytest.param(_flow_metadata(MaxMessageSize=255),
                 "{path}: MaxMessageSize: 255 is not a whole number of octets from 256 to 65507",
                 id="message-too-small"),
    pytest.param(_flow_metadata(MaxMessageSize=65508),
                 "{path}: MaxMessageSize: 65508 is not a whole number of octets from 256 to 65507",
                 id="message-too-big"),
    pytest.param(_flow_metadata(TemplateRefreshSeconds=0),
                 "{path}: TemplateRefreshSeconds: 0 is not a number of seconds greater than 0",
                 id="refresh-zero"),
    pytest.param('{"FlowMetadata": {"TemplateRefreshSeconds": Infinity}}',
                 "{path}: TemplateRefreshSeconds: Infinity is not a number of seconds greater than 0",
                 id="refresh-infinite"),
    pytest.param(_flow_metadata(TemplateRefreshMessages=-1),
                 "{path}: TemplateRefreshMessages: -1 is not a whole number of messages of at least 0",
                 id="refresh-messages-negative"),
    pytest.param(_flow_metadata(StatisticsIntervalSeconds="60"),
                 '{path}: StatisticsIntervalSeconds: "60" is not a number of seconds of at least 0',
                 id="statistics-string"),
    pytest.param(_flow_metadata(ExportingProcessId=-1),
                 "{path}: ExportingProcessId: -1 is not a whole number from 0 to 4294967295",
                 id="process-id-negative"),
    pytest.param(_flow_metadata(ExportRate=-1),
                 "{path}: ExportRate: -1 is not a whole number of messages per second from 0 to 10000000",
                 id="export-rate-negative"),
    pytest.param(_flow_metadata(ExportRate=1500.5),
                 "{path}: ExportRate: 1500.5 is not a whole number of messages per second from 0 to 10000000",
                 id="export-rate-fraction"),
    pytest.param(_flow_metadata(ExportSocketBuffer=4096),
                 "{path}: ExportSocketBuffer: 4096 is not a whole number of octets from 65536 to 1073741824",
                 id="socket-buffer-too-small"),
]


@pytest.mark.parametrize(("text", "expected"), BROKEN_PROFILES)
def test_broken_profile_is_one_exact_line(tmp_path: Path, text: str | None, expected: str) -> None:
    path = tmp_path / "profile.json"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_profile(path)
    assert str(caught.value) == expected.format(path=path)


def test_error_names_the_source_given_to_parse_profile() -> None:
    with pytest.raises(ConfigError, match=r"^<profile>: Enabled: 1 is not true or false$"):
        parse_profile({"FlowMetadata": {"Enabled": 1}})


def test_empty_flow_metadata_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text('{"FlowMetadata": {}}', encoding="utf-8")
    profile = load_profile(str(path))
    assert profile == Profile(
        collectors=(), direction="Both", interval_ms=0, enabled=True, observation_domain_id=1,
        max_message_size=1452, template_refresh_s=30.0, template_refresh_messages=256,
        statistics_interval_s=60.0, exporting_process_id=0, export_rate=EXPORT_RATE,
        export_socket_buffer=4 << 20, sources=(), fanout=1, snap_length=256, capture_filter="",
            meter_export=False, user="", groups=(), drain_timeout_s=5.0, workers=0, idle_timeout_ms=15000,
        max_flows=1_000_000, local_networks=(),
        drop_prefixes=(("drop", 129), ("deny", 129), ("reject", 130)), options_records=True, interfaces=(),
        metrics_address="", source=str(path))


def test_other_top_level_keys_are_ignored() -> None:
    document = {"Host": {"Whatever": [1, 2]}, "Version": 3,
                "FlowMetadata": {"Direction": "SendingToPeer"}}
    profile = parse_profile(document, "p.json")
    assert profile.direction == "SendingToPeer"
    assert profile.source == "p.json"


def test_ipv6_collector_in_brackets_is_a_bare_literal() -> None:
    profile = parse_profile({"FlowMetadata": {"IpFixCollectors": ["Udp/[::1]:4739"]}})
    assert profile.collectors == (CollectorAddress(kind="udp", host="::1", port=4739),)


def test_host_name_resolves_to_an_address_literal() -> None:
    profile = parse_profile({"FlowMetadata": {"IpFixCollectors": ["Udp/localhost:4739"]}})
    (collector,) = profile.collectors
    assert collector.kind == "udp" and collector.port == 4739
    assert ipaddress.ip_address(collector.host).is_loopback


def test_collector_prefixes_ignore_case_and_file_collector_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "flows.ipfix"
    profile = parse_profile({"FlowMetadata": {
        "IpFixCollectors": ["UDP/192.0.2.7:4739", f"file/{target}"]}})
    assert profile.collectors == (CollectorAddress(kind="udp", host="192.0.2.7", port=4739),
                                  CollectorAddress(kind="file", path=str(target)))
    assert profile.exporting


def test_enabled_without_collectors_is_not_exporting() -> None:
    profile = parse_profile({"FlowMetadata": {"Enabled": True}})
    assert not profile.exporting
    assert profile.describe().splitlines()[-1] == "exporting is OFF: no IpFixCollectors"


def test_disabled_with_collectors_is_not_exporting() -> None:
    profile = parse_profile({"FlowMetadata": {"Enabled": False,
                                              "IpFixCollectors": ["Udp/127.0.0.1:4739"]}})
    assert not profile.exporting
    assert profile.describe().splitlines()[-1] == "exporting is OFF: Enabled is false"


def test_describe_lists_every_setting_then_the_collector_count() -> None:
    profile = parse_profile({"FlowMetadata": {
        "IpFixCollectors": ["Udp/127.0.0.1:4739", "Udp/[::1]:4740"], "Interval": 60000}})
    lines = profile.describe().splitlines()
    assert [line.split(":", 1)[0] for line in lines[:-1]] == list(KEYS)
    assert lines[0] == "IpFixCollectors: Udp/127.0.0.1:4739, Udp/[::1]:4740"
    assert "Interval: 60000" in lines
    assert lines[-1] == "exporting to 2 collector(s)"


def test_to_dict_round_trips_through_parse_profile(tmp_path: Path) -> None:
    profile = parse_profile({"FlowMetadata": {
        "IpFixCollectors": ["Udp/127.0.0.1:4739", "Udp/[::1]:4739", f"File/{tmp_path}/f.ipfix"],
        "Direction": "ReceivedFromPeer", "Interval": 60000, "Enabled": False,
        "ObservationDomainId": 7, "MaxMessageSize": 9000, "TemplateRefreshSeconds": 2.5,
        "TemplateRefreshMessages": 0, "StatisticsIntervalSeconds": 0, "ExportingProcessId": 42,
    }}, "first.json")
    document = json.loads(json.dumps({"FlowMetadata": profile.to_dict()}))
    again = parse_profile(document, "second.json")
    assert dataclasses.replace(again, source=profile.source) == profile


def test_export_settings_carry_the_exporter_settings() -> None:
    profile = parse_profile({"FlowMetadata": {
        "IpFixCollectors": ["Udp/127.0.0.1:4739"], "MaxMessageSize": 1400,
        "TemplateRefreshSeconds": 10, "TemplateRefreshMessages": 5,
        "StatisticsIntervalSeconds": 1.5, "ExportingProcessId": 99,
        "ExportRate": 2000, "ExportSocketBuffer": 1 << 20}})
    assert profile.export_settings() == ExportSettings(
        collectors=(CollectorAddress(kind="udp", host="127.0.0.1", port=4739),),
        max_message=1400, refresh_s=10.0, refresh_messages=5, stats_interval_s=1.5,
        exporting_process_id=99, export_rate=2000, socket_buffer=1 << 20, options_records=True)


def test_export_pacing_is_on_by_default_in_a_profile() -> None:
    """A profile paces UDP export (a default collector socket overflows in bursts); 0 turns it off."""
    settings = parse_profile({"FlowMetadata": {}}).export_settings()
    assert settings.export_rate == EXPORT_RATE > 0
    assert settings.socket_buffer == 4 << 20
    assert parse_profile({"FlowMetadata": {"ExportRate": 0}}).export_settings().export_rate == 0


def test_settings_table_covers_every_profile_attribute() -> None:
    fields = {f.name for f in dataclasses.fields(Profile)}
    assert {s.attr for s in SETTINGS} | {"source"} == fields
    assert len(set(KEYS)) == len(KEYS)


def test_settings_help_has_one_line_per_key_with_its_default() -> None:
    lines = settings_help().splitlines()
    assert [line.split()[0] for line in lines] == list(KEYS)
    interval = lines[KEYS.index("Interval")]
    assert "0 or a whole number of milliseconds of at least 1000" in interval
    assert interval.endswith("default 0]")


# --- collectors given as objects, with settings of their own ---

BROKEN_COLLECTOR_OBJECTS = [
    pytest.param({"Address": "Udp/127.0.0.1:4739", "Port": 4740},
                 "{path}: IpFixCollectors[1].Port: unknown key; known keys are Address, ObservationDomainId, "
                 "MaxMessageSize, CaFile, ServerName, CertFile, KeyFile", id="unknown-key"),
    pytest.param({"Address": "Udp/127.0.0.1:4739", "MaxMesageSize": 1400},
                 "{path}: IpFixCollectors[1].MaxMesageSize: unknown key; did you mean MaxMessageSize?",
                 id="misspelt-key"),
    pytest.param({"ObservationDomainId": 3},
                 '{path}: IpFixCollectors[1]: {{"ObservationDomainId": 3}} has no Address '
                 "(Udp/ADDRESS:PORT, Dtls/ADDRESS:PORT or File/PATH)", id="no-address"),
    pytest.param({"Address": "Tcp/1.2.3.4:4739"},
                 '{path}: IpFixCollectors[1].Address: "Tcp/1.2.3.4:4739" is not Udp/ADDRESS:PORT, Dtls/ADDRESS:PORT or File/PATH',
                 id="bad-address"),
    pytest.param({"Address": ["Udp/127.0.0.1:4739"]},
                 '{path}: IpFixCollectors[1].Address: ["Udp/127.0.0.1:4739"] is not Udp/ADDRESS:PORT, Dtls/ADDRESS:PORT or File/PATH',
                 id="address-not-string"),
    pytest.param({"Address": "Udp/127.0.0.1:4739", "MaxMessageSize": 100},
                 "{path}: IpFixCollectors[1].MaxMessageSize: 100 is not a whole number of octets from 256 to 65507",
                 id="size-too-small"),
    pytest.param({"Address": "Udp/127.0.0.1:4739", "MaxMessageSize": "1400"},
                 '{path}: IpFixCollectors[1].MaxMessageSize: "1400" is not a whole number of octets '
                 "from 256 to 65507", id="size-string"),
    pytest.param({"Address": "Udp/127.0.0.1:4739", "ObservationDomainId": -1},
                 "{path}: IpFixCollectors[1].ObservationDomainId: -1 is not a whole number from 0 to 4294967295",
                 id="domain-negative"),
    pytest.param({"Address": "Udp/127.0.0.1:4739", "ObservationDomainId": True},
                 "{path}: IpFixCollectors[1].ObservationDomainId: true is not a whole number from 0 to 4294967295",
                 id="domain-bool"),
    pytest.param({"Address": "Udp/127.0.0.1:4739", "ObservationDomainId": 1.5},
                 "{path}: IpFixCollectors[1].ObservationDomainId: 1.5 is not a whole number from 0 to 4294967295",
                 id="domain-fraction"),
    pytest.param({"Address": "udp/[::1]:4739", "MaxMessageSize": 1400},
                 '{path}: IpFixCollectors[1]: "udp/[::1]:4739" repeats IpFixCollectors[0]', id="repeat"),
]


@pytest.mark.parametrize(("entry", "expected"), BROKEN_COLLECTOR_OBJECTS)
def test_broken_collector_object_is_one_exact_line(tmp_path: Path, entry: dict, expected: str) -> None:
    path = tmp_path / "profile.json"
    path.write_text(_flow_metadata(IpFixCollectors=["Udp/[::1]:4739", entry]), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_profile(path)
    assert str(caught.value) == expected.format(path=path)


def test_collector_objects_carry_their_settings_and_dump_as_given(tmp_path: Path) -> None:
    target = tmp_path / "f.ipfix"
    collectors = ["Udp/127.0.0.1:4739",
                  {"Address": "Udp/[::1]:4740", "ObservationDomainId": 9, "MaxMessageSize": 1232},
                  {"Address": f"File/{target}", "MaxMessageSize": 9000},
                  {"Address": "Udp/192.0.2.1:4739"}]
    profile = parse_profile({"FlowMetadata": {"IpFixCollectors": collectors}})
    plain, v6, file, bare = profile.collectors
    assert (plain.max_message, plain.domain) == (0, None)
    assert (v6.host, v6.port, v6.max_message, v6.domain) == ("::1", 4740, 1232, 9)
    assert (file.path, file.max_message, file.domain) == (str(target), 9000, None)
    assert (bare.max_message, bare.domain) == (0, None)
    # a string stays a string; an object without a setting of its own is one
    assert profile.to_dict()["IpFixCollectors"] == collectors[:3] + ["Udp/192.0.2.1:4739"]
    again = parse_profile(json.loads(json.dumps({"FlowMetadata": profile.to_dict()})))
    assert again.to_dict() == profile.to_dict()
    assert profile.export_settings().collectors[1].domain == 9
    assert profile.describe().splitlines()[0].startswith('IpFixCollectors: Udp/127.0.0.1:4739, {"Address": ')


def test_a_collector_with_other_settings_is_the_same_collector() -> None:
    """Its settings are not its identity: a reload that changes them keeps its session."""
    a = CollectorAddress("udp", "127.0.0.1", 4739)
    b = CollectorAddress("udp", "127.0.0.1", 4739, max_message=1400, domain=3)
    assert a == b and hash(a) == hash(b) and str(a) == str(b)


def test_reload_profile_names_a_changed_collector_setting(tmp_path: Path) -> None:
    from flowmeter.config import reload_profile

    path = tmp_path / "p.json"
    path.write_text(_flow_metadata(IpFixCollectors=["Udp/127.0.0.1:4739"]), encoding="utf-8")
    running = load_profile(path)
    path.write_text(_flow_metadata(IpFixCollectors=[{"Address": "Udp/127.0.0.1:4739", "MaxMessageSize": 1200}]),
                    encoding="utf-8")
    effective, changed, waiting = reload_profile(running, path)
    assert changed == ["IpFixCollectors"] and waiting == []
    assert effective.export_settings().collectors[0].max_message == 1200


METRICS_ACCEPTS = 'an IP address and port such as "127.0.0.1:9742" or "[::1]:9742", or "" (off)'


@pytest.mark.parametrize(("value", "expected"), [
    ("127.0.0.1:9742", ("127.0.0.1", 9742)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("[::1]:9742", ("::1", 9742)),
    ("[2001:DB8::0:1]:65535", ("2001:db8::1", 65535)),
])
def test_metrics_address_is_an_address_literal_and_a_port(value: str, expected: tuple) -> None:
    from flowmeter.config import metrics_endpoint

    p = parse_profile({"FlowMetadata": {"MetricsAddress": value}})
    assert p.metrics_address == value and metrics_endpoint(p.metrics_address) == expected
    assert parse_profile({"FlowMetadata": p.to_dict()}) == p


def test_metrics_are_off_by_default() -> None:
    assert parse_profile({"FlowMetadata": {}}).metrics_address == ""


@pytest.mark.parametrize(("value", "detail"), [
    (9742, f"9742 is not {METRICS_ACCEPTS}"),
    ("127.0.0.1", f'"127.0.0.1" is not {METRICS_ACCEPTS}'),
    ("::1:9742", f'"::1:9742" is not {METRICS_ACCEPTS}'),
    ("127.0.0.1:0", 'port 0 in "127.0.0.1:0" is outside 1-65535'),
    ("127.0.0.1:70000", 'port 70000 in "127.0.0.1:70000" is outside 1-65535'),
    ("localhost:9742", f'"localhost:9742" is not {METRICS_ACCEPTS} (a host name is not taken)'),
    ("[127.0.0.1]:9742", f'"[127.0.0.1]:9742" is not {METRICS_ACCEPTS} (a host name is not taken)'),
    ("256.1.1.1:9742", f'"256.1.1.1:9742" is not {METRICS_ACCEPTS} (a host name is not taken)'),
])
def test_broken_metrics_address_is_one_exact_line(value, detail: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_profile({"FlowMetadata": {"MetricsAddress": value}})
    assert str(caught.value) == f"<profile>: MetricsAddress: {detail}"


def test_a_reload_that_changes_the_metrics_address_waits_for_a_restart(tmp_path: Path) -> None:
    from flowmeter.config import reload_profile

    path = tmp_path / "p.json"
    path.write_text(_flow_metadata(MetricsAddress="127.0.0.1:9742"), encoding="utf-8")
    running = load_profile(path)
    path.write_text(_flow_metadata(MetricsAddress="127.0.0.1:9743"), encoding="utf-8")
    effective, changed, waiting = reload_profile(running, path)
    assert (changed, waiting) == ([], ["MetricsAddress"]) and effective.metrics_address == "127.0.0.1:9742"
