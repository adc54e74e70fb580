"""Steps of a deployment test (tests/deploy/): commands and waits that fail the test with one line
naming the area and the step, never a skip and never a traceback of the test's own making."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class Steps:
    """``area``: the first word of every failure (``container``, ``systemd``)."""

    def __init__(self, area: str, poll_s: float = 0.5) -> None:
        self.area = area
        self.poll_s = poll_s

    def fail(self, step: str, what: str) -> None:
        pytest.fail(f"{self.area}: {step}: {what}", pytrace=False)

    def run(self, step: str, args: list[str], timeout: float = 120, check: bool = True) -> str:
        """``args`` run from the repository; its output, or a failure with the last lines it said."""
        try:
            done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail(step, f"{' '.join(args)} took more than {timeout:.0f} s")
        if check and done.returncode != 0:
            said = (done.stdout + done.stderr).strip().splitlines()[-20:]
            self.fail(step, f"{' '.join(args)} exited {done.returncode}:\n" + "\n".join(said))
        return done.stdout

    def wait_for(self, step: str, what: str, check, seconds: float):
        """``check()``'s first true value; a failure saying ``what`` after ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                self.fail(step, f"{what} within {seconds:.0f} s (last answer: {value!r})")
            time.sleep(self.poll_s)
