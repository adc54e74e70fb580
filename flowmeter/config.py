"""The profile: flowmeter's settings, read from the ``FlowMetadata`` object of a JSON file.

Every setting is one row of ``SETTINGS``: PascalCase key, the JSON type it
takes, its default (as written in JSON), what it accepts (said in errors and
in help), one line of help, and an optional check that converts the JSON
value into the ``Profile`` attribute. The same table validates a profile,
renders ``settings_help()`` and turns a ``Profile`` back into JSON.

Other top-level keys of the file belong to the host application and are
ignored. Anything wrong -- a misspelt key, a wrong type, an impossible
value, a collector host that does not resolve -- is a ``ConfigError`` whose
message is one line naming the file, the key, the bad value and what is
accepted::

    profile.json: Interval: -5 is not 0 or a whole number of milliseconds of at least 1000
"""
from __future__ import annotations

import dataclasses
import difflib
import grp
import ipaddress
import json
import math
import os
import re
import pwd
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from exporter.exporting import EXPORT_RATE, ExportSettings
from exporter.options import DESCRIPTION_OCTETS, NAME_OCTETS, InterfaceSpec
from exporter.transport import SEND_BUFFER, CollectorAddress

from flowmeter.capture.sources import KINDS, SourceSpec
from flowmeter.ipc.packets import DROP_REASONS

SECTION = "FlowMetadata"
DIRECTIONS = ("Both", "SendingToPeer", "ReceivedFromPeer")
COLLECTOR_FORMS = "Udp/ADDRESS:PORT, Dtls/ADDRESS:PORT or File/PATH"
# keys of a collector given as an object; the DTLS ones are for Dtls/ collectors only
DTLS_KEYS = ("CaFile", "ServerName", "CertFile", "KeyFile")
COLLECTOR_KEYS = ("Address", "ObservationDomainId", "MaxMessageSize", *DTLS_KEYS)
DOMAIN_ACCEPTS = "a whole number from 0 to 4294967295"
SIZE_ACCEPTS = "a whole number of octets from 256 to 65507"
SOURCE_FORMS = "pcap:PATH, afpacket:IFACE, nflog:GROUP or feed:ENDPOINT"
_IFNAME = re.compile(r"[^/\s:]{1,15}")  # a Linux interface name (IFNAMSIZ - 1 octets)
UINT32_MAX = 0xFFFF_FFFF
MAX_EXPORT_RATE = 10_000_000  # messages/s; more than any link carries
MIN_SOCKET_BUFFER = 65536  # holds the largest message (65507 octets)
MAX_SOCKET_BUFFER = 1 << 30
DRAIN_TIMEOUT_S = 5  # default DrainTimeoutSeconds
_SHOW_MAX = 80  # longest bad value quoted in an error
_UDP_TARGET = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]+)")


class ConfigError(ValueError):
    """A profile that cannot be used; the message is one line for the operator."""


class _Rejected(Exception):
    """Raised by a check: ``detail`` replaces "VALUE is not ACCEPTS"; ``where`` follows the key."""

    def __init__(self, detail: str | None = None, where: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.where = where


def _show(value: Any) -> str:
    """``value`` as JSON, shortened so that an error stays one readable line."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _SHOW_MAX else text[:_SHOW_MAX - 3] + "..."


def _is_json_type(value: Any, kind: type) -> bool:
    """JSON typing: a bool is not a number, and an int is a valid float."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


# -- checks: JSON value (already of the setting's type) -> Profile attribute --

def _within(low: int, high: float = math.inf) -> Callable[[int], int]:
    def check(value: int) -> int:
        if not low <= value <= high:
            raise _Rejected()
        return value
    return check


def _seconds(low: float, *, inclusive: bool) -> Callable[[float], float]:
    def check(value: float) -> float:
        try:
            seconds = float(value)
        except OverflowError:  # a JSON integer too large for a float
            raise _Rejected() from None
        ok = seconds >= low if inclusive else seconds > low
        if not ok or not math.isfinite(seconds):
            raise _Rejected()
        return seconds
    return check


def _interval(value: int) -> int:
    if value != 0 and value < 1000:
        raise _Rejected()
    return value


def _direction(value: str) -> str:
    if value not in DIRECTIONS:
        raise _Rejected()
    return value


def _collectors(items: list[Any]) -> tuple[CollectorAddress, ...]:
    """Each entry a string, or an object with its own settings (``_collector_object``)."""
    seen: dict[CollectorAddress, int] = {}  # address -> index of its first entry
    out = []
    for index, item in enumerate(items):
        where = f"[{index}]"
        try:
            address = _collector_object(item) if isinstance(item, dict) else _collector(item)
        except _Rejected as exc:
            raise _Rejected(exc.detail, where + exc.where) from None
        if address.kind == "dtls" and not address.ca_file:  # the string form: no room for its CaFile
            raise _Rejected(f"{_show(item)} needs CaFile: write it as an object "
                            f"{{\"Address\": {_show(item)}, \"CaFile\": PEM}}", where)
        if address in seen:  # the same address with other settings is still the same collector
            shown = item.get("Address") if isinstance(item, dict) else item
            raise _Rejected(f"{_show(shown)} repeats IpFixCollectors[{seen[address]}]", where)
        seen[address] = index
        out.append(address)
    return tuple(out)


def _collector_object(item: dict[str, Any]) -> CollectorAddress:
    """``{"Address": "Udp/...", "ObservationDomainId": N, "MaxMessageSize": M}``: settings of this collector only.

    ``ObservationDomainId`` replaces the domain in the headers of this
    collector's messages (statistics stay in domain 0); ``MaxMessageSize``
    is this collector's largest message (a UDP path may still lower it).
    A ``Dtls/`` collector also takes ``CaFile`` (required), ``ServerName``,
    ``CertFile`` and ``KeyFile`` (``_dtls_settings``).
    """
    for key in item:
        if key not in COLLECTOR_KEYS:
            close = difflib.get_close_matches(str(key), COLLECTOR_KEYS, n=1)
            hint = f"did you mean {close[0]}?" if close else "known keys are " + ", ".join(COLLECTOR_KEYS)
            raise _Rejected(f"unknown key; {hint}", f".{key}")
    if "Address" not in item:
        raise _Rejected(f"{_show(item)} has no Address ({COLLECTOR_FORMS})")
    try:
        address = _collector(item["Address"])
    except _Rejected as exc:
        raise _Rejected(exc.detail, ".Address") from None
    domain, size = item.get("ObservationDomainId"), item.get("MaxMessageSize", 0)
    if domain is not None and not (_is_json_type(domain, int) and 0 <= domain <= UINT32_MAX):
        raise _Rejected(f"{_show(domain)} is not {DOMAIN_ACCEPTS}", ".ObservationDomainId")
    if "MaxMessageSize" in item and not (_is_json_type(size, int) and 256 <= size <= 65507):
        raise _Rejected(f"{_show(size)} is not {SIZE_ACCEPTS}", ".MaxMessageSize")
    address = dataclasses.replace(address, max_message=size, domain=domain)
    if address.kind == "dtls":
        return _dtls_settings(item, address)
    for key in DTLS_KEYS:
        if key in item:
            raise _Rejected(f"applies to Dtls/ collectors only, not {_show(item['Address'])}", f".{key}")
    return address


def _dtls_settings(item: dict[str, Any], address: CollectorAddress) -> CollectorAddress:
    """A ``Dtls/`` collector's CA, name and client certificate, each file loaded once now (as the exporter
    will) so that a wrong one is refused before anything starts."""
    from exporter.dtls import DtlsSettingsError, load_context

    values = {}
    for key in DTLS_KEYS:
        value = item.get(key, "")
        if not isinstance(value, str):
            raise _Rejected(f"{_show(value)} is not a string", f".{key}")
        values[key] = value
    if not values["CaFile"]:
        raise _Rejected(f"{_show(item['Address'])} needs CaFile: the PEM CA certificates that verify the collector",
                        ".CaFile")
    if "ServerName" in item and not re.fullmatch(r"[A-Za-z0-9.:_-]{1,253}", values["ServerName"]):
        raise _Rejected(f"{_show(values['ServerName'])} is not a host name or an address", ".ServerName")
    try:
        load_context(values["CaFile"], values["CertFile"], values["KeyFile"])
    except DtlsSettingsError as exc:
        key = next((k for k in DTLS_KEYS if str(exc).startswith(k)), "CaFile")
        raise _Rejected(str(exc), f".{key}") from None
    return dataclasses.replace(address, ca_file=values["CaFile"], cert_file=values["CertFile"],
                               key_file=values["KeyFile"],
                               server_name=values["ServerName"] or address.server_name)


def _collector(item: Any) -> CollectorAddress:
    """One ``"Udp/ADDRESS:PORT"``, ``"Dtls/ADDRESS:PORT"`` or ``"File/PATH"`` entry, host names resolved now.

    A ``Dtls/`` one keeps the host as written as its ``server_name`` (the
    name its certificate is checked for, unless ``ServerName`` says another).
    """
    if not isinstance(item, str):
        raise _Rejected(f"{_show(item)} is not {COLLECTOR_FORMS}")
    kind, _, rest = item.partition("/")
    kind = kind.lower()
    if kind == "file":
        return _file_collector(item, rest)
    match = _UDP_TARGET.fullmatch(rest) if kind in ("udp", "dtls") else None
    if match is None:
        raise _Rejected(f"{_show(item)} is not {COLLECTOR_FORMS}")
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise _Rejected(f"port {port} in {_show(item)} is outside 1-65535")
    if match["v6"] is not None:
        try:
            host = str(ipaddress.IPv6Address(match["v6"]))
        except ValueError:
            raise _Rejected(f"{_show(match['v6'])} in {_show(item)} is not an IPv6 address") from None
    else:
        host = _resolve(match["host"], port, item)
    if kind == "dtls":
        return CollectorAddress(kind="dtls", host=host, port=port, server_name=match["v6"] or match["host"])
    return CollectorAddress(kind="udp", host=host, port=port)


def _resolve(host: str, port: int, item: str) -> str:
    """An IPv4 literal as is; a host name through the resolver (first UDP answer)."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        answers = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError, ValueError):  # gaierror, bad IDNA label, NUL
        raise _Rejected(f"cannot resolve host {_show(host)} in {_show(item)}") from None
    return str(answers[0][4][0])


def _file_collector(item: str, path: str) -> CollectorAddress:
    if not path:
        raise _Rejected(f"empty path in {_show(item)}")
    if os.path.isdir(path):
        raise _Rejected(f"{_show(path)} in {_show(item)} is a directory")
    if os.path.islink(path):
        raise _Rejected(f"{_show(path)} in {_show(item)} is a symbolic link (File/ outputs never follow one)")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise _Rejected(f"directory {_show(parent)} of {_show(item)} does not exist")
    return CollectorAddress(kind="file", path=path)


def _sources(items: list[Any]) -> tuple[SourceSpec, ...]:
    """Each entry checked as far as it can be before it is opened (interfaces may come later)."""
    out = []
    for index, item in enumerate(items):
        where = f"[{index}]"
        kind, _, target = item.partition(":") if isinstance(item, str) else ("", "", "")
        kind = kind.lower()
        if kind not in KINDS or not target:
            raise _Rejected(f"{_show(item)} is not {SOURCE_FORMS}", where)
        if kind == "pcap" and not os.path.isfile(target):
            raise _Rejected(f"capture file {_show(target)} of {_show(item)} does not exist", where)
        if kind == "afpacket" and not _IFNAME.fullmatch(target):
            raise _Rejected(f"{_show(target)} of {_show(item)} is not an interface name", where)
        if kind == "nflog" and not (target.isdigit() and 0 <= int(target) <= 65535):
            raise _Rejected(f"{_show(target)} of {_show(item)} is not a log group from 0 to 65535", where)
        if kind == "feed" and not re.fullmatch(r"(ipc://.+|tcp://.+:[0-9]+)", target):
            raise _Rejected(f"{_show(target)} of {_show(item)} is not a ZeroMQ endpoint "
                            "(ipc://PATH or tcp://HOST:PORT)", where)
        spec = SourceSpec(kind, target)
        if spec in out:
            raise _Rejected(f"{_show(item)} is listed twice", where)
        out.append(spec)
    return tuple(out)


def _capture_filter(expression: str) -> str:
    """Compiled once here by tcpdump, so that a typo is said at load, not when the capture opens."""
    if expression.strip():
        from flowmeter.capture.sources.afpacket import LINKTYPE_ETHERNET, compile_filter

        try:
            compile_filter(expression, LINKTYPE_ETHERNET, 256)
        except OSError as exc:
            raise _Rejected(str(exc)) from None
    return expression


METRICS_ACCEPTS = 'an IP address and port such as "127.0.0.1:9742" or "[::1]:9742", or "" (off)'


def _metrics_address(value: str) -> str:
    """An address literal, not a host name: what ``/metrics`` listens on is decided here, not by
    the resolver at each start; ``metrics_endpoint`` splits it for the listening socket."""
    if value:
        metrics_endpoint(value)
    return value


def metrics_endpoint(value: str) -> tuple[str, int]:
    """``(address, port)`` of a ``MetricsAddress`` value; raises ``_Rejected`` for anything else."""
    match = _UDP_TARGET.fullmatch(value)
    if match is None:
        raise _Rejected()
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise _Rejected(f"port {port} in {_show(value)} is outside 1-65535")
    try:
        if match["v6"] is not None:
            return str(ipaddress.IPv6Address(match["v6"])), port
        return str(ipaddress.IPv4Address(match["host"])), port
    except ValueError:
        raise _Rejected(f"{_show(value)} is not {METRICS_ACCEPTS} (a host name is not taken)") from None


def _user(name: str) -> str:
    if name:
        try:
            pwd.getpwnam(name)
        except KeyError:
            raise _Rejected(f"{_show(name)} is not a user of this system") from None
    return name


def _groups(items: list[Any]) -> tuple[str, ...]:
    for index, name in enumerate(items):
        if not isinstance(name, str) or not name:
            raise _Rejected(f"entry {index} is not a group name")
        try:
            grp.getgrnam(name)
        except KeyError:
            raise _Rejected(f"{_show(name)} is not a group of this system") from None
    return tuple(items)


def _networks(items: list[Any]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for index, item in enumerate(items):
        try:
            if not isinstance(item, str):
                raise ValueError
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise _Rejected(f"{_show(item)} is not an IPv4 or IPv6 network such as "
                            f"\"192.0.2.0/24\" or \"2001:db8::/32\"", f"[{index}]") from None
    return tuple(out)


INTERFACE_KEYS = ("Name", "Description", "Index")
INTERFACES_ACCEPTS = 'an object of interface indexes, e.g. {"3": {"Name": "wg0", "Description": "overlay"}}'


def _interfaces(value: dict[str, Any]) -> tuple[InterfaceSpec, ...]:
    """``{"INDEX": {"Name": ..., "Description": ..., "Index": N}}``: what an interface index is called
    in the options records, and the number it gets on export (``exporter/options.py``)."""
    specs: list[InterfaceSpec] = []
    exported: dict[int, str] = {}  # number on export -> the key that gives it
    for key, item in value.items():
        where = f".{key}"
        if not (key.isdigit() and 1 <= int(key) <= UINT32_MAX):
            raise _Rejected(f"{_show(key)} is not an interface index (1 to {UINT32_MAX}, as a string)", where)
        if not isinstance(item, dict):
            raise _Rejected(f"{_show(item)} is not an object with Name, Description or Index", where)
        for k in item:
            if k not in INTERFACE_KEYS:
                close = difflib.get_close_matches(str(k), INTERFACE_KEYS, n=1)
                hint = f"did you mean {close[0]}?" if close else "known keys are " + ", ".join(INTERFACE_KEYS)
                raise _Rejected(f"unknown key; {hint}", f"{where}.{k}")
        name, description = item.get("Name", ""), item.get("Description", "")
        for k, text, limit in (("Name", name, NAME_OCTETS), ("Description", description, DESCRIPTION_OCTETS)):
            if not isinstance(text, str) or len(text.encode("utf-8")) > limit or any(c < " " for c in text):
                raise _Rejected(f"{_show(text)} is not a string of at most {limit} octets without control "
                                "characters", f"{where}.{k}")
        number = item.get("Index", 0)
        if "Index" in item and not (_is_json_type(number, int) and 1 <= number <= UINT32_MAX):
            raise _Rejected(f"{_show(number)} is not an interface index from 1 to {UINT32_MAX}", f"{where}.Index")
        index = int(key)
        out = number or index
        if out in exported:
            raise _Rejected(f"exports as {out}, as {exported[out]} does", where)
        exported[out] = key
        specs.append(InterfaceSpec(index, name, description, number if number != index else 0))
    return tuple(sorted(specs, key=lambda s: s.index))


def _interfaces_dump(specs: tuple[InterfaceSpec, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in specs:
        entry: dict[str, Any] = {}
        if s.name:
            entry["Name"] = s.name
        if s.description:
            entry["Description"] = s.description
        if s.export_index:
            entry["Index"] = s.export_index
        out[str(s.index)] = entry
    return out


def _drop_prefixes(mapping: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    """NFLOG log prefix -> forwardingStatus of a frame dropped by policy (RFC 7270: 128-191)."""
    out = []
    for prefix, reason in mapping.items():
        code = DROP_REASONS.get(reason) if isinstance(reason, str) else None
        if code is None and isinstance(reason, int) and not isinstance(reason, bool) and 128 <= reason <= 191:
            code = reason
        if code is None:
            raise _Rejected(f"{_show(reason)} is not one of {', '.join(DROP_REASONS)} "
                            f"or a forwardingStatus from 128 to 191", f"[{_show(prefix)}]")
        out.append((prefix, code))
    return tuple(out)


def _drop_prefixes_json(pairs: tuple[tuple[str, int], ...]) -> dict[str, Any]:
    names = {v: k for k, v in DROP_REASONS.items()}
    return {prefix: names.get(code, code) for prefix, code in pairs}


def _as_is(value: Any) -> Any:
    return value


def _collector_strings(collectors: tuple[CollectorAddress, ...]) -> list[str | dict[str, Any]]:
    """Each collector as its string, or as an object when it has settings of its own."""
    out: list[str | dict[str, Any]] = []
    for c in collectors:
        if not c.max_message and c.domain is None and c.kind != "dtls":
            out.append(str(c))
            continue
        entry: dict[str, Any] = {"Address": str(c)}
        if c.domain is not None:
            entry["ObservationDomainId"] = c.domain
        if c.max_message:
            entry["MaxMessageSize"] = c.max_message
        if c.kind == "dtls":
            entry["CaFile"] = c.ca_file
            entry["ServerName"] = c.server_name or c.host
            for key, value in (("CertFile", c.cert_file), ("KeyFile", c.key_file)):
                if value:
                    entry[key] = value
        out.append(entry)
    return out


def _feed_server_key(path: str) -> Any:
    """The server's key pair, read now (as the user that loads the profile: the key file must be
    readable by ``User``, who reads it again at a reload)."""
    if not path:
        return None
    from flowmeter.capture.sources.feed import FeedKeyError, load_server_key

    try:
        return load_server_key(path)
    except FeedKeyError as exc:
        raise _Rejected(str(exc)) from None


def _feed_allowed_keys(entries: list[Any]) -> Any:
    """The agents' public keys, read now (like ``FeedServerKey``); None if there are none."""
    if not entries:
        return None
    from flowmeter.capture.sources.feed import FeedKeyError, load_allowed_keys

    for index, entry in enumerate(entries):
        if not isinstance(entry, str) or not entry:
            raise _Rejected(f"{_show(entry)} is not a key file, a directory of .key files or a Z85 key",
                            f"[{index}]")
    try:
        return load_allowed_keys(entries)
    except FeedKeyError as exc:
        raise _Rejected(str(exc)) from None


def _feed_socket_mode(text: str) -> int:
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise _Rejected()
    mode = int(text, 8)
    if mode & 0o007:
        raise _Rejected(f"{_show(text)} lets every local user reach the feed; give the owner's and the "
                        "group's bits only (0600, 0660)")
    if mode & 0o200 != 0o200:
        raise _Rejected(f"{_show(text)} does not let flowmeter's own user write the socket (0600, 0660)")
    return mode


def _feed_socket_group(group: str) -> str:
    if group:
        from flowmeter.capture.sources.feed import socket_gid

        try:
            socket_gid(group)
        except KeyError:
            raise _Rejected(f"{_show(group)} is no group of this system") from None
    return group


def _feed_clock_skew(value: float) -> float:
    if not (math.isfinite(value) and 0.001 <= value <= 3600):
        raise _Rejected()
    return float(value)


def _feed_rules(values: dict[str, Any]) -> tuple[str, str] | None:
    """(where, why) a feed of ``Sources`` is not allowed by the feed settings; None if all are."""
    if not any(spec.kind == "feed" for spec in values["sources"]):
        return None  # the feed source (and the kernels it imports: numba) is not loaded for nothing
    from flowmeter.capture.sources.feed import FeedSecurity, feed_refusal

    security = FeedSecurity(values["feed_server_key"], values["feed_allowed_keys"], values["feed_socket_mode"],
                            values["feed_socket_group"], values["feed_abstract_socket"])
    for index, spec in enumerate(values["sources"]):
        why = spec.kind == "feed" and feed_refusal(spec.target, security)
        if why:
            return f"Sources[{index}]", f"{spec}: {why}"
    return None


@dataclass(frozen=True, slots=True)
class Setting:
    """One key of the ``FlowMetadata`` object and everything said about it."""

    key: str  # PascalCase, as in the profile
    attr: str  # the Profile attribute
    type: type  # JSON type taken: bool, int, float (any number), str, list
    default: Any  # as written in JSON
    accepts: str  # completes "VALUE is not ..."
    help: str
    check: Callable[[Any], Any] = _as_is  # JSON value -> attribute; raises _Rejected
    dump: Callable[[Any], Any] = _as_is  # attribute -> JSON value
    restart: bool = False  # True: a reload cannot change it in place (the running value stays until a restart)

    def parse(self, value: Any) -> Any:
        """The attribute for a JSON ``value``; raises ``_Rejected``."""
        if not _is_json_type(value, self.type):
            raise _Rejected()
        return self.check(value)


SETTINGS: tuple[Setting, ...] = (
    Setting("IpFixCollectors", "collectors", list, [], "a list of strings",
            "collectors: Udp/ADDRESS:PORT ([IPv6] in brackets, host names resolved at load), "
            "Dtls/ADDRESS:PORT (DTLS 1.2, as an object with its CaFile) or File/PATH (RFC 5655 file), or an "
            "object {\"Address\": ..., \"ObservationDomainId\": N, \"MaxMessageSize\": M, \"CaFile\": PEM, "
            "\"ServerName\": NAME, \"CertFile\": PEM, \"KeyFile\": PEM} with settings of that collector only",
            _collectors, _collector_strings),
    Setting("Direction", "direction", str, "Both", "one of " + ", ".join(DIRECTIONS),
            "traffic metered: Both, SendingToPeer (egress only), ReceivedFromPeer (ingress only)",
            _direction),
    Setting("Interval", "interval_ms", int, 0,
            "0 or a whole number of milliseconds of at least 1000",
            "ms between interim records of a long flow; 0 = only at flow end", _interval),
    Setting("Enabled", "enabled", bool, True, "true or false",
            "export flow records; enabled with no collector = exporting is off"),
    Setting("ObservationDomainId", "observation_domain_id", int, 1,
            DOMAIN_ACCEPTS,
            "observation domain ID in the IPFIX message header (RFC 7011 §3.1)",
            _within(0, UINT32_MAX)),
    Setting("MaxMessageSize", "max_message_size", int, 1452,
            SIZE_ACCEPTS,
            "largest IPFIX message (1452 fits a 1500-byte MTU over IPv6 and UDP); a UDP collector's "
            "messages are smaller where its path MTU is smaller, never fragmented",
            _within(256, 65507)),
    Setting("TemplateRefreshSeconds", "template_refresh_s", float, 30,
            "a number of seconds greater than 0",
            "templates are re-sent over UDP this often (RFC 7011 §8.4)",
            _seconds(0, inclusive=False)),
    Setting("TemplateRefreshMessages", "template_refresh_messages", int, 256,
            "a whole number of messages of at least 0",
            "templates are also re-sent every N messages; 0 = only by time", _within(0)),
    Setting("StatisticsIntervalSeconds", "statistics_interval_s", float, 60,
            "a number of seconds of at least 0",
            "period of the exporter statistics options records; 0 = off",
            _seconds(0, inclusive=True)),
    Setting("ExportingProcessId", "exporting_process_id", int, 0,
            f"a whole number from 0 to {UINT32_MAX}",
            "exportingProcessId in the statistics records; 0 = the process id",
            _within(0, UINT32_MAX)),
    Setting("ExportRate", "export_rate", int, EXPORT_RATE,
            f"a whole number of messages per second from 0 to {MAX_EXPORT_RATE}",
            "IPFIX messages per second to each UDP collector on another host, with a short burst "
            "allowed (one on this host is paced by its receive queue); 0 = unlimited", _within(0, MAX_EXPORT_RATE)),
    Setting("ExportSocketBuffer", "export_socket_buffer", int, SEND_BUFFER,
            f"a whole number of octets from {MIN_SOCKET_BUFFER} to {MAX_SOCKET_BUFFER}",
            "send buffer (SO_SNDBUF) of each UDP collector's socket", _within(MIN_SOCKET_BUFFER, MAX_SOCKET_BUFFER)),
    Setting("Sources", "sources", list, [], "a list of strings",
            "what flowmeter run meters: pcap:PATH (pcap or pcapng file), afpacket:IFACE (an interface), "
            "nflog:GROUP (frames the firewall logs to a netfilter log group), feed:ENDPOINT (an overlay "
            "agent's ZeroMQ feed)", _sources, lambda specs: [str(s) for s in specs], restart=True),
    Setting("Fanout", "fanout", int, 1, "a whole number from 1 to 16",
            "capture processes per afpacket source, sharing its frames by flow hash (PACKET_FANOUT)",
            _within(1, 16), restart=True),
    Setting("SnapLength", "snap_length", int, 256, "a whole number of octets from 96 to 65535",
            "octets of each frame copied from the kernel (afpacket, nflog): headers are all that is metered",
            _within(96, 65535), restart=True),
    Setting("CaptureFilter", "capture_filter", str, "", "a tcpdump filter expression",
            "afpacket sources meter only frames this expression matches (compiled by tcpdump); "
            "empty = every frame", _capture_filter, restart=True),
    Setting("MeterExport", "meter_export", bool, False, "true or false",
            "meter UDP datagrams to the collectors' addresses and ports (flowmeter's own export); "
            "false keeps a capture of the export interface from metering itself"),
    Setting("User", "user", str, "", "the name of a user of this system",
            "started as root: every process runs as this user once the capture sockets are open; "
            "empty = stay root", _user, restart=True),
    Setting("Groups", "groups", list, [], "a list of group names of this system",
            "with User: the supplementary groups every process keeps (none of the user's own memberships "
            "otherwise)", _groups, list, restart=True),
    Setting("DrainTimeoutSeconds", "drain_timeout_s", float, DRAIN_TIMEOUT_S, "a number of seconds greater than 0",
            "on a stop, the longest wait for every cached flow to be exported; past it what is left is "
            "counted as lost and the run exits 1 (keep systemd's TimeoutStopSec above it)",
            _seconds(0, inclusive=False)),
    Setting("Workers", "workers", int, 0, "a whole number from 0 to 64",
            "shard workers (flow tables); 0 = chosen for the machine", _within(0, 64), restart=True),
    Setting("IdleTimeout", "idle_timeout_ms", int, 15000,
            "a whole number of milliseconds of at least 1000",
            "a flow with no packet for this long ends (flowEndReason idle)", _within(1000)),
    Setting("MaxFlows", "max_flows", int, 1_000_000, "a whole number from 64 to 100000000",
            "flows held at once, all workers together; when full the oldest end early "
            "(flowEndReason lack of resources)", _within(64, 100_000_000), restart=True),
    Setting("LocalNetworks", "local_networks", list, [], "a list of strings",
            "networks of this side: a frame of unknown direction from inside is SendingToPeer, "
            "else ReceivedFromPeer", _networks, lambda nets: [str(n) for n in nets]),
    Setting("DropPrefixes", "drop_prefixes", dict, {"drop": "AclDeny", "deny": "AclDeny", "reject": "AclDrop"},
            "an object of log prefix: reason",
            "NFLOG log prefixes (matched case-insensitively at the start) of frames dropped by policy, "
            "with their forwardingStatus reason", _drop_prefixes, _drop_prefixes_json),
    Setting("OptionsRecords", "options_records", bool, True, "true or false",
            "send the options records that describe the export to every collector: sampling (every "
            "packet metered) and interface names"),
    Setting("Interfaces", "interfaces", dict, {}, INTERFACES_ACCEPTS,
            "names and descriptions of interface indexes for the collectors (options records), and an "
            "index's number on export (Index); live interfaces are named by the kernel without it",
            _interfaces, _interfaces_dump),
    Setting("MetricsAddress", "metrics_address", str, "", METRICS_ACCEPTS,
            "the supervisor serves Prometheus metrics over HTTP at /metrics on this address; "
            "empty = off", _metrics_address, restart=True),
    # the feed: who may send (README, "Securing the feed")
    Setting("FeedServerKey", "feed_server_key", str, "", "the path of a .key_secret file (flowmeter keygen)",
            "a tcp feed's CurveZMQ key pair (the .key_secret file flowmeter keygen makes); a tcp feed needs it",
            _feed_server_key, lambda key: key.path if key else "", restart=True),
    Setting("FeedAllowedKeys", "feed_allowed_keys", list, [], "a list of key files, directories or Z85 keys",
            "the agents a tcp feed takes: their public keys, as .key files, directories of .key files or "
            "40-character Z85 text; any other agent is refused and counted", _feed_allowed_keys,
            lambda keys: list(keys.entries) if keys else [], restart=True),
    Setting("FeedSocketMode", "feed_socket_mode", str, "0600", 'an octal mode such as "0600" or "0660"',
            "mode of an ipc feed's socket file (an agent connects if it may write it)", _feed_socket_mode,
            lambda mode: f"{mode:04o}", restart=True),
    Setting("FeedSocketGroup", "feed_socket_group", str, "", "the name or number of a group of this system",
            "group of an ipc feed's socket file; empty = flowmeter's own", _feed_socket_group, restart=True),
    Setting("FeedAbstractSocket", "feed_abstract_socket", bool, False, "true or false",
            "allow a feed on an abstract socket (ipc://@NAME), which has no file permissions: any local "
            "user can send to it", restart=True),
    Setting("FeedClockSkewSeconds", "feed_clock_skew_s", float, 5, "a number of seconds from 0.001 to 3600",
            "a feed frame whose time is further than this from this host's clock is metered at this host's "
            "clock (counted: frames with clock skew)", _feed_clock_skew, restart=True),
)
KEYS = tuple(s.key for s in SETTINGS)
RESTART_KEYS = tuple(s.key for s in SETTINGS if s.restart)  # a reload leaves these as they run


@dataclass(frozen=True, slots=True)
class Profile:
    """The effective settings of one profile (one attribute per row of ``SETTINGS``)."""

    collectors: tuple[CollectorAddress, ...]
    direction: str
    interval_ms: int
    enabled: bool
    observation_domain_id: int
    max_message_size: int
    template_refresh_s: float
    template_refresh_messages: int
    statistics_interval_s: float
    exporting_process_id: int
    export_rate: int
    export_socket_buffer: int
    sources: tuple[SourceSpec, ...]
    fanout: int
    snap_length: int
    capture_filter: str
    meter_export: bool
    user: str
    groups: tuple[str, ...]
    drain_timeout_s: float
    workers: int
    idle_timeout_ms: int
    max_flows: int
    local_networks: tuple
    drop_prefixes: tuple[tuple[str, int], ...]
    options_records: bool
    interfaces: tuple[InterfaceSpec, ...]
    metrics_address: str
    source: str  # the profile's path, or what the caller called it
    feed_server_key: Any = None  # feed.ServerKey, or None
    feed_allowed_keys: Any = None  # feed.AllowedKeys, or None
    feed_socket_mode: int = 0o600
    feed_socket_group: str = ""
    feed_abstract_socket: bool = False
    feed_clock_skew_s: float = 5.0

    @property
    def exporting(self) -> bool:
        """True when records go anywhere: enabled, with at least one collector."""
        return self.enabled and len(self.collectors) > 0

    @property
    def worker_count(self) -> int:
        """``Workers``, or when 0 one per CPU core beyond the first (capture and exporter share it), 1-8."""
        if self.workers:
            return self.workers
        return max(1, min(8, (os.cpu_count() or 2) - 1))

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON ``FlowMetadata`` object (PascalCase keys)."""
        return {s.key: s.dump(getattr(self, s.attr)) for s in SETTINGS}

    def describe(self) -> str:
        """One ``Key: value`` line per setting, then whether and where it exports."""
        lines = [f"{key}: {_human(value)}" for key, value in self.to_dict().items()]
        if not self.enabled:
            lines.append("exporting is OFF: Enabled is false")
        elif not self.collectors:
            lines.append("exporting is OFF: no IpFixCollectors")
        else:
            lines.append(f"exporting to {len(self.collectors)} collector(s)")
        return "\n".join(lines)

    def export_settings(self) -> ExportSettings:
        """What the exporting process needs from the profile."""
        return ExportSettings(
            collectors=self.collectors,
            max_message=self.max_message_size,
            refresh_s=self.template_refresh_s,
            refresh_messages=self.template_refresh_messages,
            stats_interval_s=self.statistics_interval_s,
            exporting_process_id=self.exporting_process_id,
            export_rate=self.export_rate,
            socket_buffer=self.export_socket_buffer,
            options_records=self.options_records,
            interfaces=self.interfaces,
            # the kernel's names apply to the indexes of live interfaces of this host
            kernel_interface_names=any(spec.kind in ("afpacket", "nflog") for spec in self.sources),
        )


def _human(value: Any) -> str:
    if value == "":
        return "none"
    if isinstance(value, list):
        return ", ".join(v if isinstance(v, str) else json.dumps(v) for v in value) if value else "none"
    return value if isinstance(value, str) else json.dumps(value)


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and check the profile file at ``path``; raises ``ConfigError``."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read profile: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: cannot read profile: not UTF-8 text "
                          f"(byte {exc.start})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON: {exc.msg} "
                          f"(line {exc.lineno} column {exc.colno})") from None
    return parse_profile(document, source)


def parse_profile(obj: Mapping[str, Any], source: str = "<profile>") -> Profile:
    """Check a whole profile document (its ``FlowMetadata`` object); raises ``ConfigError``."""
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{source}: top level is {_show(obj)}, not an object "
                          f"with a {SECTION} object")
    if SECTION not in obj:
        raise ConfigError(f"{source}: no {SECTION} object at the top level")
    section = obj[SECTION]
    if not isinstance(section, Mapping):
        raise ConfigError(f"{source}: {SECTION}: {_show(section)} is not an object")
    for key in section:
        if key not in KEYS:
            raise ConfigError(f"{source}: {key}: unknown key; {_suggest(str(key))}")
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        value = section.get(setting.key, setting.default)
        try:
            values[setting.attr] = setting.parse(value)
        except _Rejected as exc:
            detail = exc.detail or f"{_show(value)} is not {setting.accepts}"
            raise ConfigError(f"{source}: {setting.key}{exc.where}: {detail}") from None
    refused = _feed_rules(values)
    if refused:
        raise ConfigError(f"{source}: {refused[0]}: {refused[1]}")
    return Profile(source=source, **values)


def reload_profile(running: Profile, path: str | os.PathLike[str]) -> tuple[Profile, list[str], list[str]]:
    """The profile a reload applies: ``(effective, changed, not applied)``.

    ``effective`` is the file's profile with every ``RESTART_KEYS`` setting
    kept as it runs; ``changed`` names the settings it changes in place,
    ``not applied`` the restart settings the file changes (they wait for a
    restart). A file that fails validation raises ``ConfigError``; the
    running profile then stays whole.
    """
    new = load_profile(path)
    old_doc, new_doc = running.to_dict(), new.to_dict()
    waiting = [k for k in RESTART_KEYS if old_doc[k] != new_doc[k]]
    kept = {s.attr: getattr(running, s.attr) for s in SETTINGS if s.restart}
    effective = dataclasses.replace(new, **kept)
    changed = [k for k in KEYS if k not in RESTART_KEYS and old_doc[k] != new_doc[k]]
    return effective, changed, waiting


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, KEYS, n=1)
    return f"did you mean {close[0]}?" if close else "known keys are " + ", ".join(KEYS)


def settings_help() -> str:
    """One line per ``FlowMetadata`` key: help, accepted values and default."""
    width = max(len(key) for key in KEYS)
    return "\n".join(f"{s.key:<{width}}  {s.help} [{s.accepts}; default {_show(s.default)}"
                     + ("; a restart applies it" if s.restart else "") + "]"
                     for s in SETTINGS)
