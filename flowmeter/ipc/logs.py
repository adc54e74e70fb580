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

Formats (``flowmeter --log-format``, or ``FLOWMETER_LOG_FORMAT``; a child
takes its parent's through the fork):

* ``text``: the lines above. When stderr is the journal's stream
  (``JOURNAL_STREAM`` names it, as systemd sets it for a service), each line
  starts with its syslog priority (``<3>`` error, ``<4>`` warning, ``<6>``
  info: sd-daemon(3)), which the journal takes as the line's level and
  removes, so ``journalctl -p warning`` finds the warnings.
* ``json``: one object per line for log shippers: ``time`` (UTC, ISO 8601,
  milliseconds), ``level``, ``process`` (``worker-1``; ``flowmeter`` for the
  command's own process), ``role`` (``worker``), ``pid``, ``message``.

Hot paths cannot flood the log: a line of the same kind (the same logger,
level and message template) is written at most ``BURST`` times per
``WINDOW_S``; the next one written after that says how many were held back.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

LOGGER = "flowmeter"  # every module logs under this name ("flowmeter.exporter", ...)
FORMATS = ("text", "json")
BURST = 5  # lines of one kind in a window...
WINDOW_S = 10.0  # ...of this many seconds
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
_format = os.environ.get("FLOWMETER_LOG_FORMAT", "text")
if _format not in FORMATS:
    _format = "text"


def log_format() -> str:
    """The format of this process's lines: "text" or "json"."""
    return _format


def set_format(name: str) -> None:
    """The format of this process's lines and of every child it forks from now on."""
    global _format
    if name not in FORMATS:
        raise ValueError(f"log format {name!r} is not one of {', '.join(FORMATS)}")
    _format = name


def _to_journal(stream) -> bool:
    """Whether ``stream`` is the journal's (``JOURNAL_STREAM`` is "DEVICE:INODE" of it)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


class _Text(logging.Formatter):
    def __init__(self, prefix: str, journal: bool) -> None:
        super().__init__()
        self.prefix = prefix
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = self.prefix + record.getMessage() + getattr(record, "held_back", "")
        return f"<{_PRIORITY.get(record.levelno, 6)}>{line}" if self.journal else line


class _Json(logging.Formatter):
    def __init__(self, process: str | None) -> None:
        super().__init__()
        self.process = process or "flowmeter"
        self.role = re.sub(r"-\d+$", "", self.process)

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        return json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "process": self.process, "role": self.role, "pid": os.getpid(),
            "message": record.getMessage() + getattr(record, "held_back", "")}, ensure_ascii=False)


class RateLimit(logging.Filter):
    """At most ``burst`` lines of one kind per ``window_s``; the next one says how many were held back."""

    def __init__(self, burst: int = BURST, window_s: float = WINDOW_S, clock=time.monotonic) -> None:
        super().__init__()
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._kinds: dict[tuple, list] = {}  # kind -> [window start, lines written, lines held back]

    def filter(self, record: logging.LogRecord) -> bool:
        template = str(record.msg)
        # a template of placeholders only ("%s") says nothing of the kind: the line itself does
        kind = (record.name, record.levelno, template if re.sub(r"%[sdr]|[:\s]", "", template) else
                record.getMessage())
        now = self.clock()
        state = self._kinds.get(kind)
        if state is None or now - state[0] >= self.window_s:
            held = state[2] if state else 0
            self._kinds[kind] = [now, 1, 0]
            if held:
                record.held_back = f" ({held:,} more like it held back in the last {self.window_s:g} s)"
            return True
        if state[1] < self.burst:
            state[1] += 1
            return True
        state[2] += 1
        return False


def setup_logging(process: str | None = None, stream=None) -> None:
    """One handler for every flowmeter log line of this process, in the chosen format, on stderr.

    Called by the command line for its own process (``process`` None:
    ``flowmeter: message``) and by ``child_main`` in each child, which replaces
    the handler inherited through the fork. Info lines are shown: they are
    few and speak to the operator (a send buffer granted, a reload done).
    """
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if _format == "json":
        handler.setFormatter(_Json(process))
    else:
        handler.setFormatter(_Text(f"flowmeter: {process}: " if process else "flowmeter: ", _to_journal(stream)))
    handler.addFilter(RateLimit())
    logger = logging.getLogger(LOGGER)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
