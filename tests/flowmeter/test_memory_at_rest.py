"""What an idle pipeline holds: LLVM's code is not kept mapped after the kernels are loaded, and an
empty flow table touches none of its per-flow columns (bench/README.md, "Fixed costs").

Each check runs in a fresh interpreter: what other tests loaded or compiled in this one would
blur the figures.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


MAPPED = '''
def mapped(name):
    """kB resident in this process's mappings of a file named name*, read-only ones and all."""
    ro = total = 0
    current = None
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            current = head if len(head) > 5 and os.path.basename(head[5]).startswith(name) else None
        elif current is not None and head[0] == "Rss:":
            total += int(head[1])
            ro += int(head[1]) if "w" not in current[1] else 0
    return ro, total
'''


def test_llvm_code_is_released_after_the_kernels_are_loaded_and_comes_back_for_a_compile():
    got = _run("import os, json\n" + MAPPED + '''
import numpy as np
from flowmeter import warmup
from flowmeter.ipc.packets import PACKET_DTYPE
from flowmeter.jit import njit
from workers import flowtable

flowtable.load_kernels()  # LLVM started, the flow table's kernels loaded; nothing released yet
before = mapped("libllvmlite")
released = warmup.release_compiler_pages()
after = mapped("libllvmlite")
warmup.load_kernels({"afpacket"})  # the supervisor's warm-up: every kernel (LLVM mapped again) ...
warmup.release_compiler_pages()  # ... and the release once the children are started
after_warm_up = mapped("libllvmlite")

table = flowtable.FlowTable(1000, 10**9, 0)  # loaded kernels still run
pk = np.zeros(3, dtype=PACKET_DTYPE)
pk["src_lo"] = [1, 1, 2]
pk["l3_bytes"] = 100
table.update(pk)
records = table.flush()

@njit(cache=False)
def triple(x):  # a compile after the release: LLVM maps the pages it needs again
    return 3 * x

print(json.dumps({"before": before, "after": after, "after_warm_up": after_warm_up, "released": released,
                  "flows": len(records), "packets": int(records["packets"].sum()), "triple": triple(14)}))
''')
    assert got["released"] > 0
    assert got["before"][0] > 16_000, got  # kB of LLVM's read-only pages mapped once it has started
    assert got["after"][0] < 4_000 and got["after_warm_up"][0] < 4_000, got  # left: its relocated data
    assert got["flows"] == 2 and got["packets"] == 3 and got["triple"] == 42


def test_an_empty_flow_table_touches_no_per_flow_column():
    got = _run("import os, json\n" + '''
from workers.flowtable import FlowTable, load_kernels
load_kernels()

def rss_kb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

before = rss_kb()
table = FlowTable(1_000_000, 10**9, 0)  # 1M flows: about 100 MB of columns when full
after = rss_kb()
print(json.dumps({"grew_kb": after - before, "table_bytes": table.nbytes}))
''')
    assert got["table_bytes"] > 50_000_000
    assert got["grew_kb"] < 4_000, got  # the index and output buffers only, not the rows or their times


def _rss_of(pid: int, name: str) -> int:
    """kB resident in process ``pid``'s read-only mappings of a file named ``name``*."""
    total, current = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and not head[0].endswith(":"):
                current = len(head) > 5 and Path(head[5].strip()).name.startswith(name) and "w" not in head[1]
            elif current and head[0] == "Rss:":
                total += int(head[1])
    return total


def test_an_idle_run_holds_no_llvm_code_in_any_process(tmp_path):
    """``flowmeter run`` on a feed (a live source that needs no privilege), left idle: the supervisor,
    which loaded every kernel, and its children hold at most a few MB of LLVM's code each."""
    import signal
    import time

    import psutil

    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"FlowMetadata": {"Sources": [f"feed:ipc://{tmp_path}/feed"], "Workers": 1,
                                                    "StatisticsIntervalSeconds": 0}}))
    proc = subprocess.Popen([sys.executable, "-m", "flowmeter.cli", "run", "--profile", str(profile)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**__import__("os").environ, "RUNTIME_DIRECTORY": str(tmp_path)})
    try:
        deadline = time.monotonic() + 300  # the first start after a change compiles the kernels
        while time.monotonic() < deadline and not (tmp_path / "feed").exists():
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        time.sleep(1.0)  # the supervisor's first turns of its loop: the release is done by then
        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children()
        assert len(tree) == 4, tree
        held = {p.name(): _rss_of(p.pid, "libllvmlite") for p in tree}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()
    assert all(kb < 4_000 for kb in held.values()), held  # was about 65 MB in the supervisor
