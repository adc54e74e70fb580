"""The fuzzing campaign, short: every target fuzzed for a few seconds, every crash input kept.

``tests/fuzz/crashes/TARGET/`` holds each input that once crashed a target or
made the pure-Python and the compiled kernels disagree (found by ``python -m
tests.fuzz.run``); each must now pass through both the
pure-Python and the compiled kernels with the same result. The short runs
(5 s of fuzzing per target, about a minute in all) fail on any crash; the long campaign is
in README "Fuzzing".
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.run import ROOT, inputs, replay
from tests.fuzz.targets import TARGETS

CRASHES = Path(__file__).resolve().parent / "crashes"
SECONDS = 5


def crash_inputs() -> list[tuple[str, Path]]:
    return [(name, path) for name in TARGETS for path in sorted((CRASHES / name).glob("*"))
            if path.is_file()]


def test_every_kept_crash_input_passes_the_pure_python_and_the_compiled_kernels_alike():
    kept = crash_inputs()
    for name, path in kept:
        TARGETS[name].one(path.read_bytes())  # here: the compiled kernels, in this process
    for name in sorted({name for name, _ in kept}):
        n, problems = replay(name, inputs([CRASHES / name]))
        assert n and not problems, problems


@pytest.mark.parametrize("name", TARGETS)
def test_a_short_fuzzing_run_finds_no_crash(name, tmp_path):
    run = subprocess.run([sys.executable, "-m", "tests.fuzz.run", "--target", name, "--seconds", str(SECONDS),
                          "--work", str(tmp_path), "--quiet"],
                         cwd=ROOT, capture_output=True, text=True, timeout=SECONDS + 120)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    summary = run.stdout.splitlines()[0]
    assert f"{name}: " in summary and "crashes 0" in summary and " cov " in summary, run.stdout
    assert "same results" in run.stdout, run.stdout
