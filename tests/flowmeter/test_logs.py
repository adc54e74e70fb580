"""Log lines: text with the journal's priorities, JSON for log shippers, hot paths held back."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from flowmeter.ipc import logs
from tests.support.pcapwrite import ethernet_ipv4_udp, write_pcap

ROOT = Path(__file__).resolve().parents[2]


def _logged(process, fmt: str, stream, *lines: tuple[int, str]) -> None:
    """``lines`` logged through ``setup_logging``; the "flowmeter" logger is left as it was found (other
    tests rely on it: pytest's own handlers, propagation)."""
    old = logs.log_format()
    logger = logging.getLogger(logs.LOGGER)
    saved = (list(logger.handlers), logger.propagate, logger.level)
    logs.set_format(fmt)
    try:
        logs.setup_logging(process, stream)
        log = logging.getLogger("flowmeter.test")
        for level, text in lines:
            log.log(level, text)
    finally:
        logs.set_format(old)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        for handler in saved[0]:
            logger.addHandler(handler)
        logger.propagate, logger.level = saved[1], saved[2]


def test_json_lines_name_the_process_its_role_and_the_level():
    out = io.StringIO()
    _logged("worker-3", "json", out, (logging.WARNING, "a 100% full ring"), (logging.INFO, "ok"))
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [(x["level"], x["process"], x["role"], x["message"]) for x in lines] == [
        ("warning", "worker-3", "worker", "a 100% full ring"), ("info", "worker-3", "worker", "ok")]
    assert lines[0]["pid"] == os.getpid() and lines[0]["time"].endswith("Z")


def test_text_lines_carry_syslog_priorities_only_when_stderr_is_the_journal(tmp_path, monkeypatch):
    path = tmp_path / "stream"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        _logged("exporter", "text", stream, (logging.ERROR, "down"), (logging.WARNING, "slow"), (logging.INFO, "up"))
    assert path.read_text().splitlines() == ["<3>flowmeter: exporter: down", "<4>flowmeter: exporter: slow",
                                             "<6>flowmeter: exporter: up"]
    out = io.StringIO()  # not the journal's stream: plain lines
    _logged("exporter", "text", out, (logging.ERROR, "down"))
    assert out.getvalue() == "flowmeter: exporter: down\n"


def test_a_hot_path_is_held_back_and_the_next_line_says_how_much():
    now = [0.0]
    limit = logs.RateLimit(burst=3, window_s=10, clock=lambda: now[0])
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs._Text("", journal=False))  # the text format, without a process prefix
    handler.addFilter(limit)
    log = logging.getLogger("flowmeter.hot")
    log.propagate = False
    log.addHandler(handler)
    try:
        for i in range(20):
            log.warning("frame %d malformed", i)
        log.warning("another kind of line")  # its own allowance
        for i in range(8):  # a bare "%s": each line its own kind (the per-source lines, a child's last error)
            log.warning("%s", f"source {i} line")
        now[0] = 10.5
        log.warning("frame %d malformed", 99)
    finally:
        log.removeHandler(handler)
        log.propagate = True
    assert out.getvalue().splitlines() == [
        "frame 0 malformed", "frame 1 malformed", "frame 2 malformed", "another kind of line",
        *(f"source {i} line" for i in range(8)),
        "frame 99 malformed (17 more like it held back in the last 10 s)"]


def test_a_replay_in_json_gives_json_lines_only_from_every_process(tmp_path):
    cap = tmp_path / "few.pcap"
    write_pcap(cap, [(1_700_000_000 + i, ethernet_ipv4_udp("10.0.0.1", "192.0.2.1", 1000 + i, 53)) for i in range(5)])
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"FlowMetadata": {"IpFixCollectors": ["Udp/127.0.0.1:9"],  # discard: nobody
                                                    "StatisticsIntervalSeconds": 0}}))
    r = subprocess.run([sys.executable, "-m", "flowmeter.cli", "--log-format", "json", "replay", str(cap),
                        "--profile", str(profile)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = [json.loads(x) for x in r.stderr.splitlines()]  # every line is one JSON object
    roles = {x["role"] for x in lines}
    assert {"exporter", "flowmeter"} <= roles, r.stderr  # the exporter's send buffer line, the summary
    assert any("5 packets metered" in x["message"] for x in lines if x["process"] == "flowmeter")
    r = subprocess.run([sys.executable, "-m", "flowmeter.cli", "replay", str(tmp_path / "none.pcap")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "FLOWMETER_LOG_FORMAT": "json"})
    [error] = [json.loads(x) for x in r.stderr.splitlines()]
    assert r.returncode == 1 and error["level"] == "error" and "does not exist" in error["message"]
