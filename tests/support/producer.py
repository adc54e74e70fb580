"""Drive the exporter process alone with any record batches, as the workers would.

``export_batches`` forks the real exporter process (``exporter.process.run``)
on an ipc endpoint of a fresh private directory, pushes ``(template name,
observation domain, records)`` batches into it with the schema's ``records``
messages, ends with an end-of-stream, and waits for the exporter to drain
and exit. Integration tests and ``bench/`` use it to export known records
to real collectors.
"""
from __future__ import annotations

import multiprocessing
import shutil
import tempfile
from typing import Iterable

import numpy.typing as npt
import zmq

from exporter.exporting import ExportSettings
from flowmeter.ipc.schema import EndOfStream, records_message

SENDER = "test-producer"


def _exporter_main(settings: ExportSettings, endpoint: str, producers: int) -> int:
    from exporter.process import ExporterEndpoints, ExporterSettings, run

    return run(ExporterSettings(settings, producers), ExporterEndpoints(endpoint))


def export_batches(settings: ExportSettings, batches: Iterable[tuple[str, int, npt.NDArray]],
                   timeout_s: float = 60.0, sender: str = SENDER) -> int:
    """Run the exporter process and push ``(template name, domain, records)`` batches into it.

    Returns the exporter's exit code once it has drained (it stops by
    itself after our end-of-stream).
    """
    rundir = tempfile.mkdtemp(prefix="flowmeter-")  # mode 0700: only we can reach the socket
    endpoint = f"ipc://{rundir}/export"
    ctx_mp = multiprocessing.get_context("fork")
    proc = ctx_mp.Process(target=_exporter_main, args=(settings, endpoint, 1), name="flowmeter-exporter")
    proc.start()
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, int(timeout_s * 1000))
        push.setsockopt(zmq.SNDHWM, 1000)
        push.connect(endpoint)
        seq = 0
        for name, domain, records in batches:
            push.send_multipart(records_message(sender, seq, name, domain, records), copy=False)
            seq += 1
        push.send(EndOfStream(sender, seq).pack())
        push.close()
        proc.join(timeout_s)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
            raise TimeoutError(f"exporter did not finish within {timeout_s} s")
        return proc.exitcode
    finally:
        ctx.term()
        shutil.rmtree(rundir, ignore_errors=True)
