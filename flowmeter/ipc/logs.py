"""Log lines of every flowmeter process: one set-up, one format, stderr.

Each line names its process: ``flowmeter: exporter: collector udp/...: send
buffer 8388608 octets granted``. The command line sets up its own process
(``flowmeter: ...``); every child of a pipeline sets up its own name right
after the fork (``flowmeter.ipc.lifecycle.child_main``), and its stderr is
the supervisor's, so one stream carries the whole pipeline's lines, whoever
started it (a terminal, systemd's journal). Modules log through
``logging.getLogger("flowmeter.<part>")``; warnings and errors, and the few
info lines meant for the operator (a send buffer granted, a reload done, a
source open), are shown.
"""
from __future__ import annotations

import logging
import sys

LOGGER = "flowmeter"  # every module logs under this name ("flowmeter.exporter", ...)


def setup_logging(process: str | None = None, stream=None) -> None:
    """One handler for every flowmeter log line of this process: ``flowmeter: PROCESS: message`` on stderr.

    Called by the command line for its own process (``process`` None:
    ``flowmeter: message``) and by ``child_main`` in each child, which replaces
    the handler inherited through the fork. Info lines are shown: they are
    few and speak to the operator (a send buffer granted, a reload done).
    """
    prefix = f"flowmeter: {process}: " if process else "flowmeter: "
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(prefix.replace("%", "%%") + "%(message)s"))
    logger = logging.getLogger(LOGGER)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
