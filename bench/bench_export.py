"""Benchmark: flow records encoded and sent per second to a loopback collector.

Runs the exporting process (templates, message packing, sequence numbers,
UDP sends) on synthetic records of every flow template, with a receiver
process on 127.0.0.1 that counts what arrives, and, as a peer measured in
the same run, a plain per-record ``struct.pack`` encoder doing the same
packing work without numpy. Report the ratio, not only the figure: these
machines are shared and noisy.

    python bench/bench_export.py [--records 1000000] [--max-message 1452]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exporter.exporting import ExportingProcess, ExportSettings  # noqa: E402
from exporter.transport import CollectorAddress  # noqa: E402
from tests.support.synthetic import FLOW_TEMPLATE_NAMES, synthetic_records  # noqa: E402


def _receiver(port_q, counts_q, idle_s=1.0):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    s.bind(("127.0.0.1", 0))
    port_q.put(s.getsockname()[1])
    s.settimeout(idle_s)
    messages = octets = 0
    started = False
    while True:
        try:
            m = s.recv(70000)
        except socket.timeout:
            if started:
                break
            continue
        started = True
        messages += 1
        octets += len(m)
    counts_q.put((messages, octets))


def bench_flowmeter(batches, port, max_message):
    exp = ExportingProcess(ExportSettings(collectors=(CollectorAddress("udp", "127.0.0.1", port),),
                                          max_message=max_message, stats_interval_s=0))
    templates = [exp.registry[name] for name, _ in batches]
    t0 = time.perf_counter()
    for t, (_, recs) in zip(templates, batches):
        exp.export(t, recs, 1)
    exp.flush()
    dt = time.perf_counter() - t0
    c = exp.sessions[0].counters
    return dt, c.messages, c.flow_records, c.not_sent_records


def bench_struct_peer(batches, port, max_message):
    """Per-record ``struct.pack`` into messages of the same size, same socket work."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", port))
    hdr = struct.Struct("!HHIII")
    t0 = time.perf_counter()
    seq = messages = 0
    for name, recs in batches:
        fmt = struct.Struct("!" + "".join(
            {"u1": "B", "u2": "H", "u4": "I", "u8": "Q"}.get(recs.dtype[f].str[1:], f"{recs.dtype[f].itemsize}s")
            for f in recs.dtype.names))
        per = (max_message - 20) // fmt.size
        rows = recs.tolist()
        for i in range(0, len(rows), per):
            chunk = rows[i:i + per]
            body = b"".join(fmt.pack(*r) for r in chunk)
            msg = hdr.pack(10, 20 + len(body), int(time.time()), seq, 1) + struct.pack("!HH", 256, 4 + len(body)) + body
            try:
                s.send(msg)
            except OSError:
                pass
            seq += len(chunk)
            messages += 1
    return time.perf_counter() - t0, messages, seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--max-message", type=int, default=1452)
    args = ap.parse_args()
    per = args.records // len(FLOW_TEMPLATE_NAMES)
    batch = 10_000
    batches = []
    for i, name in enumerate(FLOW_TEMPLATE_NAMES):
        recs = synthetic_records(name, per, seed=i)
        batches += [(name, recs[j:j + batch]) for j in range(0, per, batch)]
    n = per * len(FLOW_TEMPLATE_NAMES)

    ctx = multiprocessing.get_context("fork")
    results = {}
    for label, fn in (("flowmeter", bench_flowmeter), ("struct-peer", bench_struct_peer)):
        port_q, counts_q = ctx.Queue(), ctx.Queue()
        rx = ctx.Process(target=_receiver, args=(port_q, counts_q))
        rx.start()
        port = port_q.get()
        out = fn(batches, port, args.max_message)
        received = counts_q.get()
        rx.join()
        results[label] = (out, received)
        dt = out[0]
        print(f"{label:12s} {n:>9,} records in {dt:6.3f} s = {n / dt:>12,.0f} records/s; "
              f"{out[1]:,} messages sent, {received[0]:,} received by the loopback collector")
    ratio = results["struct-peer"][0][0] / results["flowmeter"][0][0]
    print(f"flowmeter is {ratio:.1f}x the per-record struct.pack peer")


if __name__ == "__main__":
    main()
