"""Where ``flowmeter status`` and ``reload`` look for runs: this shell's runtime directory and the
systemd units' (``/run/flowmeter`` for flowmeter.service, ``/run/flowmeter/NAME`` for
flowmeter@NAME), so that an operator's plain ``sudo flowmeter status`` finds a service's run."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flowmeter import status

ROOT = Path(__file__).resolve().parents[2]


def make_run(base, name: str, pid: int) -> str:
    rundir = base / f"flowmeter-{name}"
    rundir.mkdir(parents=True)
    (rundir / status.STATUS_FILE).write_text(json.dumps({"pid": pid, "profile": name, "sources": []}))
    return str(rundir / status.STATUS_FILE)


def a_dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_runs_of_the_shell_and_of_the_service_units_are_found_once(tmp_path, monkeypatch):
    """As root (whose runs go to the service directory, never to a shell's XDG_RUNTIME_DIR)."""
    service = tmp_path / "run-flowmeter"
    monkeypatch.setattr(status, "SERVICE_RUNTIME", str(service))
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    me = os.getpid()
    make_run(tmp_path / "xdg", "terminal", me)
    make_run(service, "unit", me)                 # flowmeter.service
    make_run(service / "gateway", "instance", me)  # flowmeter@gateway
    make_run(service / "edge", "ended", a_dead_pid())
    assert status.runtime_base() == str(service)
    assert sorted(doc["profile"] for doc in status.running_status()) == ["instance", "unit"]

    # inside the unit, runtime_base() is the unit's own directory: its run is listed once, not twice
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(service / "gateway"))
    assert status.runtime_base() == str(service / "gateway")
    assert sorted(doc["profile"] for doc in status.running_status()) == ["instance", "unit"]

    # a base named by the caller is the only place looked in
    assert [doc["profile"] for doc in status.running_status(str(tmp_path / "xdg"))] == ["terminal"]


def test_a_user_finds_its_runs_in_its_runtime_directory():
    """Not root: runs go to, and are found in, XDG_RUNTIME_DIR (else the temporary directory)."""
    nobody = pwd.getpwnam("nobody")
    top = Path(tempfile.mkdtemp(prefix="fm-status-"))
    try:
        top.chmod(0o755)
        xdg = top / "xdg"
        xdg.mkdir(mode=0o700)
        os.chown(xdg, nobody.pw_uid, nobody.pw_gid)
        seen = subprocess.run(
            ["setpriv", "--reuid", "nobody", "--regid", str(nobody.pw_gid), "--clear-groups", sys.executable, "-c",
             "import json, os\n"
             "from flowmeter import status\n"
             "run = status.make_runtime_dir()\n"
             "open(os.path.join(run, status.STATUS_FILE), 'w').write(json.dumps({'pid': os.getpid(), 'profile': 'mine'}))\n"
             "print(status.runtime_base(), oct(os.stat(run).st_mode & 0o777), [d['profile'] for d in status.running_status()])"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
            env={"PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": str(xdg)})
        assert seen.returncode == 0, seen.stderr
        assert seen.stdout.split(" ", 2) == [str(xdg), "0o700", "['mine']\n"]
    finally:
        shutil.rmtree(top, ignore_errors=True)


def owned(path, entry) -> None:
    os.chown(path, entry.pw_uid, entry.pw_gid)


def test_only_status_files_that_can_be_believed_are_read(monkeypatch):
    """As root: runs of root, and another user's run below a directory only root writes (as
    /run/flowmeter); not another user's run in a directory all may write (as /tmp), where anyone
    could leave one, nor a file whose owner is not its directory's, nor a link."""
    nobody = pwd.getpwnam("nobody")
    top = Path(tempfile.mkdtemp(prefix="fm-status-"))
    try:
        shared, service = top / "tmp", top / "run"
        shared.mkdir(mode=0o1777)
        shared.chmod(0o1777)
        service.mkdir(mode=0o755)
        me = os.getpid()
        make_run(shared, "roots", me)
        owned_path = make_run(shared, "planted", me)
        owned(owned_path, nobody)
        owned(os.path.dirname(owned_path), nobody)
        mixed = make_run(shared, "mixed", me)  # root's file in another user's directory
        owned(os.path.dirname(mixed), nobody)
        service_path = make_run(service, "service", me)
        owned(service_path, nobody)
        owned(os.path.dirname(service_path), nobody)
        linked = shared / "flowmeter-linked"
        linked.mkdir(mode=0o700)
        (linked / status.STATUS_FILE).symlink_to(service_path)
        open_dir = make_run(service, "open", me)
        os.chmod(os.path.dirname(open_dir), 0o777)
        for base in (shared, service):
            for run in base.iterdir():
                if run.name != "flowmeter-open":
                    run.chmod(0o700)
        assert sorted(doc["profile"] for doc in status.running_status(str(shared))) == ["roots"]
        assert sorted(doc["profile"] for doc in status.running_status(str(service))) == ["service"]

        # the same files as seen by the other user: its own run in the shared directory, and root's
        top.chmod(0o755)
        seen = subprocess.run(
            ["setpriv", "--reuid", "nobody", "--regid", str(nobody.pw_gid), "--clear-groups", sys.executable, "-c",
             "import sys; from flowmeter import status\n"
             "print(sorted(d['profile'] for b in sys.argv[1:] for d in status.running_status(b)))",
             str(shared), str(service)], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert seen.returncode == 0, seen.stderr
        # 'service' is nobody's own; 'planted' too; root's 'roots' is readable only if its directory
        # is: it is 0700, so it is not even seen
        assert seen.stdout.strip() == str(["planted", "service"])
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_control_characters_of_a_status_file_are_escaped(tmp_path, monkeypatch):
    path = make_run(tmp_path, "escape", os.getpid())
    doc = json.loads(Path(path).read_text())
    doc.update(profile="\x1b[2J\x1b]0;owned\x07gateway", sources=["afpacket:eth1\r\nforged line"],
               lines=["\x9b31mred"])
    Path(path).write_text(json.dumps(doc))
    [seen] = status.running_status(str(tmp_path))
    text = status.describe_runs([seen])
    assert not any(ord(c) < 0x20 and c != "\n" or 0x7f <= ord(c) < 0xa0 for c in text), repr(text)
    assert "profile \\x1b[2J\\x1b]0;owned\\x07gateway" in text
    assert "afpacket:eth1\\x0d\\x0aforged line" in text and "\\x9b31mred" in text


def test_as_root_a_run_directory_is_made_in_a_service_directory_only_root_writes(tmp_path, monkeypatch, caplog):
    service = tmp_path / "run" / "flowmeter"
    (tmp_path / "run").mkdir()
    monkeypatch.setattr(status, "SERVICE_RUNTIME", str(service))
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    run = Path(status.make_runtime_dir())  # made when missing
    assert run.parent == service and service.stat().st_mode & 0o777 == 0o755
    assert run.stat().st_mode & 0o777 == 0o700 and run.name.startswith("flowmeter-")

    # a service directory others may write, or a link, is not used: the temporary directory is
    service.chmod(0o777)
    elsewhere = Path(status.make_runtime_dir())
    assert elsewhere.parent == Path(tempfile.gettempdir()), elsewhere
    assert f"{service} is not a directory only root may write" in caplog.text
    elsewhere.rmdir()
    shutil.rmtree(service)
    service.symlink_to(tmp_path)
    elsewhere = Path(status.make_runtime_dir())
    assert elsewhere.parent == Path(tempfile.gettempdir()), elsewhere
    elsewhere.rmdir()


def test_empty_run_directories_left_in_the_service_directory_are_removed_at_the_next_start(tmp_path, monkeypatch):
    service = tmp_path / "flowmeter"
    monkeypatch.setattr(status, "SERVICE_RUNTIME", str(service))
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    service.mkdir(mode=0o755)
    ended, starting, running = (service / f"flowmeter-{name}" for name in ("ended", "starting", "running"))
    for d in (ended, starting, running):
        d.mkdir(mode=0o700)
    (running / "control").write_text("")
    old = time.time() - 2 * status.LEFT_BEHIND_S
    for d in (ended, running):
        os.utime(d, (old, old))
    made = Path(status.make_runtime_dir())
    assert sorted(p.name for p in service.iterdir()) == sorted([made.name, starting.name, running.name])
