"""Coverage-guided fuzzing of flowmeter's parsers with atheris (libFuzzer for Python).

    python -m tests.fuzz.run --target decode --seconds 600
    python -m tests.fuzz.run --target all --seconds 5          # every target in turn
    python -m tests.fuzz.run --target pcap --replay DIR_OR_FILE ...

A fuzzing run starts atheris in a child process with ``NUMBA_DISABLE_JIT=1``
(atheris instruments Python bytecode, so the kernels run as Python, where
every read is bounds-checked), seeded with ``../shared/pcaps`` and the
targets' own examples, keeping its corpus in ``--work DIR/NAME/corpus``
across runs. A crash stops libFuzzer; the runner keeps the input (in
``DIR/NAME/crashes``), prints the exception and starts it again until the
time is up. Then the whole corpus is replayed through the pure-Python and
the compiled kernels, whose digests must agree (numba does not bounds-check:
a read outside the buffer there is a crash or a different answer).

It prints one line per target: executions, executions per second, atheris's
coverage (``cov``: edges, ``ft``: features), corpus size, crashes; and exits
1 if any input crashed or the two kernels disagreed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATUS = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/\S+.*?exec/s: (\d+)")
CRASH_FILE = re.compile(r"Test unit written to (\S+)")


def _env(jit: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    if jit:
        env.pop("NUMBA_DISABLE_JIT", None)
    else:
        env["NUMBA_DISABLE_JIT"] = "1"
    return env


# --- in the child ----------------------------------------------------------------------


def _child_fuzz(name: str, libfuzzer_args: list[str]) -> None:
    """Run libFuzzer on one target (this process has NUMBA_DISABLE_JIT=1)."""
    import atheris
    with atheris.instrument_imports(include=["flowmeter", "exporter"]):
        from tests.fuzz import targets
        for module in ("flowmeter.capture.decode", "flowmeter.capture.sources.pcapfile",
                       "flowmeter.capture.sources.nflog", "flowmeter.capture.sources.feedmessage",
                       "exporter.decoder", "exporter.collect"):
            __import__(module)
    one = targets.TARGETS[name].one
    atheris.Setup([sys.argv[0], *libfuzzer_args], lambda data: one(data))
    atheris.Fuzz()


def _child_replay(name: str, paths: list[str]) -> None:
    """Print a JSON map of input path -> digest (or the exception) for each input."""
    from tests.fuzz import targets
    one = targets.TARGETS[name].one
    out = {}
    for path in paths:
        try:
            out[path] = one(Path(path).read_bytes())
        except Exception as exc:  # noqa: BLE001 - the point is to report it
            out[path] = f"CRASH {type(exc).__name__}: {exc}"[:400]
    json.dump(out, sys.stdout)


def _child_seeds(name: str, directory: str) -> None:
    from tests.fuzz import targets
    for data in targets.TARGETS[name].seeds():
        (Path(directory) / hashlib.sha1(data).hexdigest()).write_bytes(data)


# --- in the parent ---------------------------------------------------------------------


def inputs(paths: list[Path]) -> list[str]:
    files: list[str] = []
    for p in paths:
        files += sorted(str(f) for f in p.iterdir() if f.is_file()) if p.is_dir() else [str(p)]
    return files


def replay(name: str, files: list[str], timeout_s: float = 600) -> tuple[int, list[str]]:
    """Replay inputs through the pure-Python and the compiled kernels; (inputs, problems)."""
    results = []
    for jit in (False, True):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(files, f)
        try:
            run = subprocess.run([sys.executable, "-m", "tests.fuzz.run", "--child-replay", name, f.name],
                                 env=_env(jit), cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        finally:
            os.unlink(f.name)
        if run.returncode != 0:
            return len(files), [f"{'jit' if jit else 'pure'} replay died ({run.returncode}): {run.stderr[-2000:]}"]
        results.append(json.loads(run.stdout))
    pure, jitted = results
    problems = []
    for path in files:
        if pure[path].startswith("CRASH") or jitted[path].startswith("CRASH"):
            problems.append(f"{path}: pure {pure[path]}; jit {jitted[path]}")
        elif pure[path] != jitted[path]:
            problems.append(f"{path}: the pure-Python and the compiled kernels disagree")
    return len(files), problems


def fuzz(name: str, seconds: float, work: Path, extra: list[str], quiet: bool) -> dict:
    """Fuzz one target for ``seconds``; restart after each crash. Returns the run's figures."""
    corpus, seeds, crashes = work / name / "corpus", work / name / "seeds", work / name / "crashes"
    for d in (corpus, seeds, crashes):
        d.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "tests.fuzz.run", "--child-seeds", name, str(seeds)],
                   env=_env(True), cwd=ROOT, check=True, timeout=300)
    stats = {"target": name, "seconds": 0.0, "execs": 0, "cov": 0, "ft": 0, "corpus": 0, "crashes": []}
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left < 1:
            break
        start = time.monotonic()
        args = [f"-max_total_time={max(1, int(left))}", f"-artifact_prefix={crashes}/", "-timeout=20",
                "-rss_limit_mb=3072", "-max_len=16384", "-print_final_stats=1", *extra, str(corpus), str(seeds)]
        proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz.run", "--child-fuzz", name, *args],
                                env=_env(False), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, errors="replace")
        execs_this_run = 0
        tail: list[str] = []
        try:
            for line in proc.stderr:
                tail = (tail + [line])[-60:]
                m = STATUS.search(line)
                if m:
                    execs_this_run = int(m[1])
                    stats.update(cov=max(stats["cov"], int(m[2])), ft=max(stats["ft"], int(m[3])),
                                 corpus=int(m[4]))
                    if not quiet and ("NEW" in line or "pulse" in line or "DONE" in line):
                        sys.stderr.write(f"{name}: {line}")
                m = re.search(r"stat::number_of_executed_units: (\d+)", line)
                if m:
                    execs_this_run = int(m[1])
                m = CRASH_FILE.search(line)
                if m:
                    stats["crashes"].append({"input": m[1], "report": "".join(tail[-40:])})
            proc.wait(timeout=max(60, left + 60))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stats["execs"] += execs_this_run
        stats["seconds"] += time.monotonic() - start
        if proc.returncode == 0:
            break
        new = [c for c in stats["crashes"] if not c.get("seen")]
        if not new:  # died without leaving an input: report what it said and stop
            stats["crashes"].append({"input": None, "report": "".join(tail[-40:]), "seen": True})
            break
        for c in new:
            c["seen"] = True
            digest = Path(c["input"]).name.split("-", 1)[-1]
            for d in (corpus, seeds):  # a crashing seed would stop every restart at once
                (d / digest).unlink(missing_ok=True)
            if not quiet:
                sys.stderr.write(f"{name}: crash, input kept as {c['input']}:\n{c['report']}\n")
    stats["corpus"] = len(list(corpus.iterdir()))
    return stats


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child-fuzz":
        _child_fuzz(argv[1], argv[2:])
        return 0
    if argv and argv[0] == "--child-replay":
        _child_replay(argv[1], json.loads(Path(argv[2]).read_text()))
        return 0
    if argv and argv[0] == "--child-seeds":
        _child_seeds(argv[1], argv[2])
        return 0
    from tests.fuzz.targets import TARGETS
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help=f"one of {', '.join(TARGETS)}, or all")
    ap.add_argument("--seconds", type=float, default=60, help="fuzzing time per target (default 60)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "flowmeter-fuzz",
                    help="corpus and crashes are kept in WORK/TARGET (default %(default)s)")
    ap.add_argument("--replay", nargs="+", type=Path, metavar="PATH",
                    help="instead of fuzzing: replay these inputs (files or directories) through both kernels")
    ap.add_argument("--no-replay", action="store_true", help="do not replay the corpus through the compiled kernels")
    ap.add_argument("--quiet", action="store_true", help="only the summary lines")
    ap.add_argument("--libfuzzer", nargs=argparse.REMAINDER, default=[], help="further libFuzzer options")
    args = ap.parse_args(argv)
    names = list(TARGETS) if args.target == "all" else [args.target]
    if any(n not in TARGETS for n in names):
        ap.error(f"--target: {args.target} is not one of {', '.join(TARGETS)} or all")
    failed = False
    for name in names:
        if args.replay:
            n, problems = replay(name, inputs(args.replay))
            print(f"{name}: replayed {n} inputs through the pure-Python and the compiled kernels: "
                  f"{len(problems)} problems", flush=True)
            for p in problems:
                print(f"  {p}")
            failed |= bool(problems)
            continue
        s = fuzz(name, args.seconds, args.work, args.libfuzzer, args.quiet)
        rate = s["execs"] / s["seconds"] if s["seconds"] else 0
        print(f"{name}: {s['seconds']:.0f} s, {s['execs']:,} executions ({rate:,.0f}/s), cov {s['cov']} "
              f"ft {s['ft']}, corpus {s['corpus']} inputs, crashes {len(s['crashes'])}", flush=True)
        for c in s["crashes"]:
            print(f"  crash: {c['input']}\n" + "".join(f"    {line}\n" for line in c["report"].splitlines()[-25:]))
        failed |= bool(s["crashes"])
        if not args.no_replay:
            n, problems = replay(name, inputs([args.work / name / "corpus"]))
            print(f"{name}: corpus of {n} inputs replayed through the compiled kernels: "
                  f"{'same results' if not problems else f'{len(problems)} problems'}", flush=True)
            for p in problems[:20]:
                print(f"  {p}")
            failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
