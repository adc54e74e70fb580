"""Prometheus metrics: ``/metrics`` over HTTP from the supervisor (``MetricsAddress``).

Only the supervisor sees every process's counters (each child reports its
own over the control socket), so only it serves them: ``PipelineCollector``
builds the metric families at scrape time from the ``PipelineReport``'s
children, the same values the summary and the status file are made of.
A counter of a name is summed over every process of that name, so it does
not go back when a dead process is replaced; a live source's own counts
(``source_counters``) live in the source, which outlives its process, and
are taken from the latest report. Gauges (flows held, CPU, memory) are the
current process's.

The HTTP server is the standard library's, one request at a time, in a
daemon thread of the supervisor: its socket is bound before any child is
forked (a port below 1024 while still root; a port in use stops the start
with one line) and closed in every child at its fork. A scrape reads
references the supervisor's loop replaces whole (a child's counters, the
list of children), never a value half written.
"""
from __future__ import annotations

import os
import socket
import threading
from importlib.metadata import PackageNotFoundError, version
from typing import Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from flowmeter.ipc.counters import merge
from flowmeter.status import PipelineReport, process_usage


def flowmeter_version() -> str:
    try:
        return version("flowmeter")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


class PipelineCollector:
    """Every ``flowmeter_`` metric family, from a report's children as they are at scrape time."""

    def __init__(self, report: PipelineReport) -> None:
        self.report = report

    def collect(self) -> Iterator[Metric]:
        children = list(self.report.children)
        by_name: dict[str, list] = {}
        for c in children:
            if c.counters is not None:
                by_name.setdefault(c.name, []).append(c)
        summed = {name: merge([c.counters for c in gens]) for name, gens in by_name.items()}
        current = {c.name: c for c in children if not c.replaced}
        yield from _sources(self.report, by_name, summed)
        yield from _workers(summed, current)
        yield from _collectors(summed)
        yield from self._processes(children, current)
        info = GaugeMetricFamily("flowmeter_build_info", "flowmeter's version (the value is always 1)",
                                 labels=["version"])
        info.add_metric([flowmeter_version()], 1)
        yield info

    def _processes(self, children: list, current: dict) -> Iterator[Metric]:
        restarts = CounterMetricFamily("flowmeter_process_restarts", "processes started again after they died "
                                       "or hung", labels=["role"])
        lost = CounterMetricFamily("flowmeter_lost_packets", "packets metered or read and then lost inside "
                                   "flowmeter, by the role of the process that held them (a worker's flows and "
                                   "batches, a capture's frames read but not metered)", labels=["role"])
        for role in ("capture", "worker", "exporter"):
            restarts.add_metric([role], sum(1 for i in self.report.incidents if i.restart_s is not None
                                            and _role(i.name) == role))
        for role, n in self.report.lost_packets().items():
            lost.add_metric([role], n)
        yield restarts
        yield lost
        cpu = CounterMetricFamily("flowmeter_process_cpu_seconds", "CPU time of each running process, user "
                                  "and system", labels=["role", "process"])
        rss = GaugeMetricFamily("flowmeter_process_resident_memory_bytes", "resident memory of each running "
                                "process", labels=["role", "process"])
        for name, role, cpu_s, rss_bytes in process_usage([c for c in current.values()]):
            cpu.add_metric([role, name], cpu_s)
            rss.add_metric([role, name], rss_bytes)
        yield cpu
        yield rss


def _role(name: str) -> str:
    return name.rsplit("-", 1)[0]


def _source_label(report: PipelineReport, name: str, counters) -> str:
    """The live source a capture process reads, or its capture files (``pcap:A,pcap:B``)."""
    return counters.source or report.files_of.get(name, "pcap")


def _sources(report: PipelineReport, by_name: dict, summed: dict) -> Iterator[Metric]:
    packets = CounterMetricFamily("flowmeter_source_packets_metered", "IP packets metered", labels=["source"])
    octets = CounterMetricFamily("flowmeter_source_metered_bytes", "layer-3 octets of the packets metered",
                                 labels=["source"])
    frames = CounterMetricFamily("flowmeter_source_frames_not_metered", "frames read and not metered, by cause",
                                 labels=["source", "cause"])
    kernel = CounterMetricFamily("flowmeter_source_kernel_packets", "packets the kernel counted for a live "
                                 "source's sockets", labels=["source"])
    drops = CounterMetricFamily("flowmeter_source_kernel_drops", "packets the kernel dropped before a live "
                                "source read them", labels=["source"])
    other = CounterMetricFamily("flowmeter_source_counts", "a live source's other counts, as it names them "
                                "(frames read, frames lost, dropped messages: CAUSE, ...)", labels=["source", "count"])
    per: dict[str, dict] = {}
    for name, gens in by_name.items():
        if gens[0].role != "capture":
            continue
        s = summed[name]
        label = _source_label(report, name, s)
        p = per.setdefault(label, {"packets": 0, "octets": 0, "not": {}, "own": {}})
        p["packets"] += s.packets
        p["octets"] += s.octets
        for cause, n in {**s.not_metered, "other direction": s.other_direction}.items():
            p["not"][cause] = p["not"].get(cause, 0) + n
        for key, n in gens[-1].counters.source_counters.items():  # kept by the source across restarts
            p["own"][key] = p["own"].get(key, 0) + n
    for label, p in sorted(per.items()):
        packets.add_metric([label], p["packets"])
        octets.add_metric([label], p["octets"])
        for cause, n in sorted(p["not"].items()):
            frames.add_metric([label, cause], n)
        own = dict(p["own"])
        if "kernel packets" in own:
            kernel.add_metric([label], own.pop("kernel packets"))
        if "kernel drops" in own:
            drops.add_metric([label], own.pop("kernel drops"))
        for key, n in sorted(own.items()):
            other.add_metric([label, key], n)
    yield from (packets, octets, frames, kernel, drops, other)


def _workers(summed: dict, current: dict) -> Iterator[Metric]:
    active = GaugeMetricFamily("flowmeter_worker_active_flows", "flows held in the worker's flow table now",
                               labels=["worker"])
    flows = CounterMetricFamily("flowmeter_worker_flows", "flows made", labels=["worker"])
    evictions = CounterMetricFamily("flowmeter_worker_evictions", "flows ended early because the flow table was "
                                    "full (flowEndReason lack of resources)", labels=["worker"])
    records = CounterMetricFamily("flowmeter_worker_records", "flow records made, by flowEndReason",
                                  labels=["worker", "reason"])
    dropped = CounterMetricFamily("flowmeter_worker_messages_dropped", "messages a worker dropped, by cause",
                                  labels=["worker", "cause"])
    for name, w in sorted(summed.items()):
        if w.ROLE != "worker":
            continue
        now = current.get(name)
        active.add_metric([name], now.counters.active_flows if now is not None and now.counters is not None
                          and now.process.exitcode is None else 0)
        flows.add_metric([name], w.flows)
        evictions.add_metric([name], w.evictions)
        for reason, n in sorted(w.end_reasons.items()):
            records.add_metric([name, reason], n)
        for cause, n in sorted(w.dropped.items()):
            dropped.add_metric([name, cause], n)
    yield from (active, flows, evictions, records, dropped)


def _collectors(summed: dict) -> Iterator[Metric]:
    exporters = [e for e in summed.values() if e.ROLE == "exporter"]
    dropped = CounterMetricFamily("flowmeter_exporter_batches_dropped", "record batches the exporter dropped, by "
                                  "cause", labels=["cause"])
    families = {
        "flow_records": CounterMetricFamily("flowmeter_collector_records_sent", "flow records sent",
                                            labels=["collector"]),
        "packets": CounterMetricFamily("flowmeter_collector_packets_sent", "packets counted in the flow records "
                                       "sent", labels=["collector"]),
        "messages": CounterMetricFamily("flowmeter_collector_messages_sent", "IPFIX messages sent",
                                        labels=["collector"]),
        "octets": CounterMetricFamily("flowmeter_collector_sent_bytes", "octets of the IPFIX messages sent",
                                      labels=["collector"]),
        "template_messages": CounterMetricFamily("flowmeter_collector_template_messages_sent", "IPFIX messages "
                                                 "of templates sent", labels=["collector"]),
        "not_sent_records": CounterMetricFamily("flowmeter_collector_records_not_sent", "flow records that could "
                                                "not be sent", labels=["collector"]),
        "not_sent_packets": CounterMetricFamily("flowmeter_collector_packets_not_sent", "packets counted in the "
                                                "flow records not sent", labels=["collector"]),
        "refused": CounterMetricFamily("flowmeter_collector_send_refused", "sends refused as too large "
                                       "(EMSGSIZE), sent again cut smaller or as they were", labels=["collector"]),
    }
    not_sent = CounterMetricFamily("flowmeter_collector_messages_not_sent", "IPFIX messages that could not be "
                                   "sent, by cause", labels=["collector", "cause"])
    if exporters:
        exp = merge(exporters)
        for cause, n in sorted(exp.dropped.items()):
            dropped.add_metric([cause], n)
        for collector, c in sorted(exp.collectors.items()):
            for attr, family in families.items():
                family.add_metric([collector], getattr(c, attr))
            for cause, n in sorted(c.errors.items()):
                not_sent.add_metric([collector, cause], n)
    yield dropped
    yield from families.values()
    yield not_sent


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr per scrape (the run's log is the operator's)."""

    def log_message(self, format, *args) -> None:
        pass


class _Server(WSGIServer):
    allow_reuse_address = True


class MetricsServer:
    """``/metrics`` on ``(address, port)``: bound in the constructor (``OSError`` if it cannot be),
    served from ``start()`` in a daemon thread, closed by ``close()`` and in every forked child."""

    def __init__(self, report: PipelineReport, address: str, port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PipelineCollector(report))
        server = type("Server", (_Server,), {"address_family": socket.AF_INET6 if ":" in address
                                              else socket.AF_INET})
        self.httpd = make_server(address, port, make_wsgi_app(self.registry), server, handler_class=_QuietHandler)
        self._thread: threading.Thread | None = None
        os.register_at_fork(after_in_child=self._close_in_child)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.2,), name="metrics", daemon=True)
        self._thread.start()

    def _close_in_child(self) -> None:
        self.httpd.socket.close()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
        self.httpd.server_close()
