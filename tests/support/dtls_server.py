"""A throwaway PKI and ``openssl s_server -dtls1_2`` as an independent DTLS collector endpoint.

s_server writes the application data it decrypts to its standard output
(``-quiet``: nothing else), which is therefore an RFC 5655 file of exactly
the IPFIX messages it received, for ``ipfixDump`` to read.
"""
from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from tests.support.collectors import require

NAME = "collector.test"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_pki(d: Path) -> Path:
    """In ``d``: ca.pem (its key ca.key), server.pem/server.key for NAME and 127.0.0.1 signed by it, and
    other-ca.pem, a CA that signed nothing here."""
    require("openssl")
    d.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test CA", cwd=d)
    _openssl("req", "-x509", *ec, "-keyout", "other-ca.key", "-out", "other-ca.pem", "-days", "2",
             "-subj", "/CN=other CA", cwd=d)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={NAME}", cwd=d)
    (d / "ext.cnf").write_text(f"subjectAltName=DNS:{NAME},IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    return d


class SServer:
    """``openssl s_server -dtls1_2`` on 127.0.0.1:port; ``data`` is what it decrypted (its stdout)."""

    def __init__(self, pki: Path, directory: Path, port: int, name: str = "s_server") -> None:
        require("openssl")
        self.port = port
        self.data = directory / f"{name}.ipfix"
        self.log = directory / f"{name}.log"
        with open(self.data, "wb") as out, open(self.log, "wb") as err:
            # stdin stays open and silent: s_server sends the client whatever its stdin holds
            self.proc = subprocess.Popen(
                ["openssl", "s_server", "-dtls1_2", "-accept", f"127.0.0.1:{port}", "-quiet",
                 "-cert", str(pki / "server.pem"), "-key", str(pki / "server.key")],
                stdin=subprocess.PIPE, stdout=out, stderr=err)
        deadline = time.monotonic() + 10
        while not self._bound():
            assert self.proc.poll() is None, f"s_server exited: {self.log.read_text()}"
            assert time.monotonic() < deadline, f"s_server did not bind: {self.log.read_text()}"
            time.sleep(0.02)

    def _bound(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", self.port))
            except OSError:
                return True
        return False

    def received(self, octets: int, timeout_s: float = 10.0) -> bytes:
        """Its output once it holds ``octets`` (it writes what it decrypts as it comes)."""
        deadline = time.monotonic() + timeout_s
        while self.data.stat().st_size < octets and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)  # nothing more than that comes
        return self.data.read_bytes()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdin:
            self.proc.stdin.close()


