"""Network namespaces made and removed by the tests (needs root, iproute2).

Traffic in these tests only ever crosses namespaces made here (or their
loopback): ``Namespaces`` names each one with a per-process prefix, and
removes every namespace it made, with its interfaces, when it closes.

    with Namespaces() as ns:
        a, b = ns.add("a"), ns.add("b")
        ns.veth(a, "va", "10.9.0.1/24", "fd09::1/64", b, "vb", "10.9.0.2/24", "fd09::2/64")
        ns.run(a, "ping", "-c", "3", "10.9.0.2")
        with entered(a):
            sock = socket.socket(socket.AF_PACKET, ...)   # a socket of namespace a
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import time

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(name: str):
    """This thread inside namespace ``name``; sockets made here belong to it for good."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def available() -> str:
    """Empty if namespaces can be made here, else why not (for a clear failure, not a skip)."""
    if os.geteuid() != 0:
        return "network namespace tests need root"
    probe = f"fmprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode:
        return f"ip netns add: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


class Namespaces:
    """Namespaces named ``fm<pid><n><tag>``; every one removed on close."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __enter__(self) -> Namespaces:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, tag: str) -> str:
        name = f"fm{os.getpid()}{len(self.names)}{tag}"
        self._ip("netns", "add", name)
        self.names.append(name)
        self.run(name, "ip", "link", "set", "lo", "up")
        return name

    def veth(self, ns_a: str, if_a: str, v4_a: str, v6_a: str, ns_b: str, if_b: str, v4_b: str, v6_b: str) -> None:
        """A veth pair between two namespaces, addressed and up (IPv6 without DAD).

        Segmentation offloads are off, as on a wire: each TCP segment is one
        frame wherever it is captured (with them on, the sender's capture
        sees one frame of up to 64 KiB where the receiver's sees several).
        """
        self._ip("link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
        for ns, ifname, v4, v6 in ((ns_a, if_a, v4_a, v6_a), (ns_b, if_b, v4_b, v6_b)):
            self.run(ns, "ethtool", "-K", ifname, "tso", "off", "gso", "off", "gro", "off")
            self.run(ns, "sysctl", "-qw", f"net.ipv6.conf.{ifname}.accept_dad=0")
            self.run(ns, "ip", "addr", "add", v4, "dev", ifname)
            self.run(ns, "ip", "addr", "add", v6, "dev", ifname, "nodad")
            self.run(ns, "ip", "link", "set", ifname, "up")
        self.wait_up(ns_a, if_a)
        self.wait_up(ns_b, if_b)

    def wait_up(self, ns: str, ifname: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run(ns, "ip", "-o", "link", "show", ifname).stdout
            if "LOWER_UP" in out or "state UNKNOWN" in out:
                return
            time.sleep(0.02)
        raise TimeoutError(f"{ifname} in {ns} did not come up")

    def run(self, ns: str, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout, **kw)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} in {ns}: exit {r.returncode}: {r.stderr.strip()}")
        return r

    def popen(self, ns: str, *cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], **kw)

    def close(self) -> None:
        for name in reversed(self.names):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.names.clear()

    @staticmethod
    def _ip(*args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
