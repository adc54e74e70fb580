"""DTLS transport: IPFIX over DTLS 1.2 to one collector (RFC 7011 §11, RFC 6347).

A ``Dtls/`` collector gets the same datagrams as a ``Udp/`` one, each
IPFIX message sealed in one DTLS record, one record per datagram. The
exporter is the DTLS client: it verifies the collector's certificate
chain against ``CaFile`` and the name in it against ``ServerName`` (the
host as the profile writes it, unless given), and may show a client
certificate of its own (``CertFile``/``KeyFile``) to a collector that asks.

Binding: pyOpenSSL (OpenSSL's libssl through ``cryptography``'s bindings),
whose ``Connection`` runs over memory BIOs when given no socket. This
module owns the UDP socket (connected, non-blocking, never fragmenting:
``transport.connected_udp_socket``) and moves datagrams between it and the
BIOs itself, so nothing here ever blocks the exporting process: a
handshake advances a step each time the exporter looks at its sessions
(``progress``), and OpenSSL's own retransmission timer
(``DTLSv1_get_timeout``/``DTLSv1_handle_timeout``) resends a lost flight.
What OpenSSL writes to the memory BIO is a run of records without datagram
boundaries; ``_records`` cuts it at the record headers (13 octets, the
length in the last two) and packs whole records into datagrams within the
path MTU (RFC 6347 §4.1.1 allows several records per datagram, never one
across two).

Each association is a transport session (RFC 7011 §10.3, §11): the
exporter counts ``association``; a new one makes the ``Session`` start
every domain's sequence numbers at 0 and send the templates first
(``session.Session.ready``), exactly as a new UDP transport session would.

Record size: an IPFIX message must fit one record, a record one datagram
(RFC 7011 §11.1, RFC 6347 §4.1.1.1). ``path_budget()`` is therefore what
OpenSSL says fits a datagram of the path MTU (``get_cleartext_mtu`` after
``set_ciphertext_mtu``: header, explicit nonce or IV, tag or MAC and
padding of the cipher suite agreed), never more than a record's largest
plaintext (2^14). Before the handshake has chosen a suite it assumes the
costliest of OpenSSL's DTLS 1.2 suites (CBC with SHA-384: 93 octets).

Trouble: a handshake that fails (certificate refused, an alert from the
collector, no answer within ``HANDSHAKE_S``), an ICMP port unreachable
(``ECONNREFUSED``), or an alert or close_notify during the association
take it down. Messages sent meanwhile are counted as not sent under the
cause (``CERTIFICATE``, ``HANDSHAKE``, ``CLOSED``, or the errno name), and
a new association is tried after a backoff: ``BACKOFF_S`` doubled after
every failure, up to ``BACKOFF_MAX_S``, back to the start once one is up.
Each change of trouble is one log line naming the collector and the cause;
the same trouble again is logged at most every ``TROUBLE_LOG_S`` (with how
often it came meanwhile), so a collector that stays away is no storm.
Messages that come while a handshake is under way wait for it (at most
``HANDSHAKE_S``).
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import math
import os
import select
import socket
import struct
import time

import numpy as np
import numpy.typing as npt
from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from .transport import (
    IP_UDP_OVERHEAD,
    SEND_BUFFER,
    SEND_WAIT_S,
    UDP_LARGEST,
    CollectorAddress,
    LocalPeerQueue,
    TransportError,
    apply_send_buffer,
    connected_udp_socket,
    socket_path_mtu,
)

log = logging.getLogger("flowmeter.exporter")

DTLS1_2_VERSION = 0xFEFD  # OpenSSL's DTLS1_2_VERSION (pyOpenSSL names only the TLS ones)
RECORD_HEADER = struct.Struct("!BHHIHH")  # type, version, epoch, sequence (48 bits), length (RFC 6347 §4.1)
RECORD_OVERHEAD_MAX = 13 + 16 + 48 + 16  # header, CBC IV, HMAC-SHA384, padding: the costliest suite
MAX_PLAINTEXT = 1 << 14  # a record's largest plaintext (RFC 6347 §4.1, RFC 5246 §6.2.1)
MIN_LINK_MTU = 256  # OpenSSL ignores a smaller ciphertext MTU
HANDSHAKE_S = 5.0  # a handshake not done by then has failed
HANDSHAKE_POLL_S = 0.005  # while one is under way, the exporter looks at it this often
BACKOFF_S = 1.0  # first wait before a new association after a failure; doubled after each
BACKOFF_MAX_S = 30.0
TROUBLE_LOG_S = 60.0  # the same trouble again is logged at most this often
_READ = 1 << 17  # larger than any record or flight OpenSSL writes at once

# causes of messages not sent (``SessionCounters.errors``) besides errno names
CERTIFICATE = "certificate refused"  # the collector's chain or name did not verify
HANDSHAKE = "handshake failed"  # an alert or no answer during the handshake
CLOSED = "association closed"  # the collector ended the association (close_notify or an alert)
SETTINGS = "DTLS settings"  # CaFile, CertFile or KeyFile cannot be used (changed since the check)

# X509_V_ERR_* codes a collector's chain meets most (openssl/x509_vfy.h); others are shown by number
_X509_ERRORS = {
    2: "issuer certificate not found",
    7: "certificate signature failure",
    9: "certificate not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate not in CaFile",
    19: "self-signed certificate in the chain not in CaFile",
    20: "not signed by a CA of CaFile (unable to get local issuer certificate)",
    21: "unable to verify the first certificate",
    22: "certificate chain too long",
    23: "certificate revoked",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
    27: "certificate not trusted",
    28: "certificate rejected",
}


class DtlsSettingsError(ValueError):
    """A CA, certificate or key file that cannot be used; the message is one line."""


def _ssl_reason(exc: Exception) -> str:
    """The last reason OpenSSL gave in an ``SSL.Error`` / ``crypto.Error`` ("tlsv1 alert unknown ca")."""
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], list) and args[0]:
        last = args[0][-1]
        if isinstance(last, tuple) and last:
            return str(last[-1])
    return str(exc) or type(exc).__name__


def load_context(ca_file: str, cert_file: str = "", key_file: str = "") -> SSL.Context:
    """A DTLS 1.2+ client context that verifies the peer against ``ca_file``; raises ``DtlsSettingsError``."""
    ctx = SSL.Context(SSL.DTLS_CLIENT_METHOD)
    ctx.set_min_proto_version(DTLS1_2_VERSION)
    # the memory BIOs know no MTU: the transport sets it (set_ciphertext_mtu) from the socket's path
    ctx.set_options(SSL.OP_NO_QUERY_MTU)
    if not ca_file:
        raise DtlsSettingsError("no CaFile (PEM CA certificates that verify the collector)")
    if not os.path.isfile(ca_file):
        raise DtlsSettingsError(f"CaFile {ca_file!r} is not a file")
    try:
        ctx.load_verify_locations(ca_file)
    except SSL.Error as exc:
        raise DtlsSettingsError(f"CaFile {ca_file!r} holds no usable PEM certificate ({_ssl_reason(exc)})") from None
    if key_file and not cert_file:
        raise DtlsSettingsError("KeyFile without CertFile")
    if cert_file:
        key_file = key_file or cert_file
        ctx.set_passwd_cb(lambda *_: b"")  # an encrypted key fails here instead of asking a terminal
        for what, path in (("CertFile", cert_file), ("KeyFile", key_file)):
            if not os.path.isfile(path):
                raise DtlsSettingsError(f"{what} {path!r} is not a file")
        try:
            ctx.use_certificate_chain_file(cert_file)
        except SSL.Error as exc:
            raise DtlsSettingsError(f"CertFile {cert_file!r}: no usable PEM certificate ({_ssl_reason(exc)})") from None
        try:
            ctx.use_privatekey_file(key_file)
            ctx.check_privatekey()
        except SSL.Error as exc:
            raise DtlsSettingsError(f"KeyFile {key_file!r}: no key for CertFile's certificate "
                                    f"({_ssl_reason(exc)})") from None
    return ctx


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The names a certificate is for: its subjectAltName DNS names and IP addresses, or, when it has
    none, its subject's common names (as OpenSSL's own host check does)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        names = [*san.get_values_for_type(x509.DNSName),
                 *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]
        if names:
            return names
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def name_matches(name: str, names: list[str]) -> bool:
    """Whether ``name`` (a host name or an IP address) is one of a certificate's ``names`` (RFC 6125 §6.4:
    DNS names compared without case, a wildcard only as the whole leftmost label; addresses exactly)."""
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        ip = None
    if ip is not None:
        for n in names:
            try:
                if ipaddress.ip_address(n) == ip:
                    return True
            except ValueError:
                continue
        return False
    host = name.lower().rstrip(".")
    for n in names:
        pattern = n.lower().rstrip(".")
        if pattern == host:
            return True
        if pattern.startswith("*.") and "." in host:
            first, rest = host.split(".", 1)
            if first and rest == pattern[2:] and "*" not in rest:
                return True
    return False


def _records(data: bytes, mtu: int) -> list[bytes]:
    """Whole DTLS records of ``data`` packed into datagrams of at most ``mtu`` octets (one record larger
    than that goes alone)."""
    out: list[bytes] = []
    start = at = 0
    while at + RECORD_HEADER.size <= len(data):
        end = at + RECORD_HEADER.size + RECORD_HEADER.unpack_from(data, at)[-1]
        if end - start > mtu and at > start:
            out.append(data[start:at])
            start = at
        at = end
    if start < len(data):
        out.append(data[start:])
    return out


class DtlsTransport:
    """A DTLS association to one collector over a connected UDP socket (see the module notes).

    The seam the session uses: ``progress(now)`` (drives a handshake or
    reads what the collector sent; False while a handshake is under way),
    ``handshaking``, ``association`` (associations made so far),
    ``send``/``send_rows`` as ``UdpTransport``'s, ``path_budget()``.
    """

    paced = True

    def __init__(self, address: CollectorAddress, send_buffer: int = SEND_BUFFER) -> None:
        self.address = address
        self.send_buffer = send_buffer
        self.granted_buffer = 0
        self.family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        self.peer = LocalPeerQueue.for_address(address.host, address.port)  # None: not on this host
        self.last_error = ""
        self.association = 0  # associations made so far: each a new transport session
        self.handshaking = False
        self.up = False
        self.protocol = ""  # "DTLSv1.2 ECDHE-ECDSA-AES256-GCM-SHA384" while up
        self._context: SSL.Context | None = None
        self._sock: socket.socket | None = None
        self._conn: SSL.Connection | None = None
        self._deadline = 0.0
        self._retry_at = 0.0
        self._failures = 0  # failures in a row, for the backoff
        self._cause = ""  # why it is down: the not-sent cause
        self._errno = 0
        self._verify_failure = ""
        self._logged = ""  # the trouble last logged, when, and how often it came since
        self._logged_at = -math.inf
        self._repeats = 0
        self.progress(time.monotonic())

    # --- the association ------------------------------------------------
    @property
    def server_name(self) -> str:
        return self.address.server_name or self.address.host

    def progress(self, now: float) -> bool:
        """Drive the association: start one when due, advance a handshake, read what the collector
        sent. True when sends may be tried now (up, or down: they fail at once and are counted)."""
        if not self.up and not self.handshaking and now >= self._retry_at:
            self._start(now)
        if self.handshaking:
            self._handshake(now)
        elif self.up:
            self._service(now)
        return not self.handshaking

    def reconfigure(self, address: CollectorAddress) -> None:
        """New settings of this collector (a reload); new DTLS settings make a new association at once."""
        old, self.address = self.address, address
        if old.dtls_settings != address.dtls_settings:
            self._context = None
            self._close_association(notify=True)
            self._retry_at = 0.0
            self._failures = 0

    def _start(self, now: float) -> None:
        """A new association: a fresh socket (a new transport session) and a ClientHello."""
        self._close_association(notify=False)
        a = self.address
        if self._context is None:
            try:
                self._context = load_context(a.ca_file, a.cert_file, a.key_file)
            except DtlsSettingsError as exc:
                self._fail(now, SETTINGS, 0, str(exc))
                return
        try:
            self._sock, self.granted_buffer = connected_udp_socket(a.host, a.port, self.family, self.send_buffer)
        except OSError as exc:
            self._fail(now, errno.errorcode.get(exc.errno or 0, "EIO"), exc.errno or errno.EIO,
                       f"cannot connect: {exc.strerror or exc}")
            return
        conn = SSL.Connection(self._context, None)
        conn.set_connect_state()
        conn.set_verify(SSL.VERIFY_PEER, self._verify)
        conn.set_ciphertext_mtu(self._link_mtu())
        try:
            ipaddress.ip_address(self.server_name)
        except ValueError:  # SNI carries host names only (RFC 6066 §3)
            try:
                conn.set_tlsext_host_name(self.server_name.encode("idna"))
            except (UnicodeError, ValueError):
                pass
        self._conn = conn
        self._verify_failure = ""
        self.handshaking = True
        self._deadline = now + HANDSHAKE_S

    def _verify(self, conn: SSL.Connection, cert: crypto.X509, code: int, depth: int, ok: int) -> bool:
        """OpenSSL's verdict on each certificate of the chain, and at the collector's own the name."""
        if not ok:
            if not self._verify_failure:
                subject = cert.to_cryptography().subject.rfc4514_string()
                why = _X509_ERRORS.get(code, f"X509 verify error {code}")
                self._verify_failure = f"certificate refused: {why} ({subject or 'no subject'})"
            return False
        if depth == 0:
            names = certificate_names(cert.to_cryptography())
            if not name_matches(self.server_name, names):
                self._verify_failure = (f"certificate refused: ServerName {self.server_name!r} is not a name of "
                                        f"the collector's certificate ({', '.join(names) or 'no names'})")
                return False
        return True

    def _handshake(self, now: float) -> None:
        conn = self._conn
        assert conn is not None
        if not self._receive(now):
            return
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            pass
        except SSL.Error as exc:
            self._flush(now)  # the alert that tells the collector why
            if self._verify_failure:
                self._fail(now, CERTIFICATE, 0, self._verify_failure)
            else:
                self._fail(now, HANDSHAKE, 0, f"DTLS handshake failed: {_ssl_reason(exc)}")
            return
        else:
            self._established(now)
        if not self._flush(now) or not self.handshaking:
            return
        timeout = conn.DTLSv1_get_timeout()
        if timeout is not None and timeout <= 0:
            conn.DTLSv1_handle_timeout()  # a flight lost on the way: OpenSSL resends it
            if not self._flush(now):
                return
        if now >= self._deadline:
            self._fail(now, HANDSHAKE, errno.ETIMEDOUT, f"no answer to the DTLS handshake within {HANDSHAKE_S:g} s")

    def _established(self, now: float) -> None:
        conn = self._conn
        assert conn is not None
        self.handshaking, self.up = False, True
        self.association += 1
        self._failures = 0
        self._cause, self._errno = "", 0
        self.last_error = ""
        self.protocol = f"{conn.get_protocol_version_name()} {conn.get_cipher_name()}"
        log.info("collector %s: DTLS association up (%s, %s verified); templates first, sequence numbers "
                 "from 0", self.address, self.protocol, self.server_name)
        self._logged, self._repeats = "", 0

    def _service(self, now: float) -> None:
        """While up: what the collector sent (a retransmitted flight, an alert, close_notify)."""
        conn = self._conn
        assert conn is not None
        got = self._sock_receive(now)
        if not got:
            return
        try:
            while True:
                conn.recv(_READ)  # a collector sends no data: anything it does is dropped
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            self._fail(now, CLOSED, 0, "the collector closed the DTLS association (close_notify)")
            return
        except SSL.Error as exc:
            self._fail(now, CLOSED, 0, f"the DTLS association ended: {_ssl_reason(exc)}")
            return
        self._flush(now)

    def _sock_receive(self, now: float) -> int:
        """Datagrams waiting on the socket into the memory BIO; how many, -1 when the socket failed
        (the association is down then)."""
        n = 0
        while self._sock is not None and self._conn is not None:
            try:
                data = self._sock.recv(_READ)
            except BlockingIOError:
                return n
            except OSError as exc:  # ECONNREFUSED: an ICMP port unreachable came back
                self._socket_failed(now, exc)
                return -1
            self._conn.bio_write(data)
            n += 1
        return n

    def _receive(self, now: float) -> bool:
        return self._sock_receive(now) >= 0

    def _flush(self, now: float) -> bool:
        """Send what OpenSSL wrote (a flight, an alert); False when the socket failed."""
        conn, sock = self._conn, self._sock
        if conn is None or sock is None:
            return False
        chunks = []
        while True:
            try:
                chunks.append(conn.bio_read(_READ))
            except SSL.WantReadError:
                break
        if not chunks:
            return True
        for datagram in _records(b"".join(chunks), self._link_mtu()):
            try:
                sock.send(datagram)
            except BlockingIOError:
                pass  # a full socket buffer: DTLS resends a lost flight, an alert is best effort
            except OSError as exc:
                self._socket_failed(now, exc)
                return False
        return True

    def _socket_failed(self, now: float, exc: OSError) -> None:
        code = exc.errno or errno.EIO
        what = "DTLS handshake" if self.handshaking else "DTLS association"
        self._fail(now, errno.errorcode.get(code, "EIO"), code, f"{what}: {os.strerror(code)}")

    def _fail(self, now: float, cause: str, code: int, text: str) -> None:
        """Down: close the association, count what comes meanwhile under ``cause``, try again later."""
        self._close_association(notify=False)
        if cause == SETTINGS:
            self._context = None  # read the files again at the next try
        self._cause, self._errno = cause, code
        delay = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** min(self._failures, 16))
        self._failures += 1
        self._retry_at = now + delay
        self.last_error = text
        if text != self._logged or now - self._logged_at >= TROUBLE_LOG_S:
            again = f" ({self._repeats} more time(s) since)" if self._repeats and text == self._logged else ""
            log.warning("collector %s: %s%s; trying again in %g s", self.address, text, again, delay)
            self._logged, self._logged_at, self._repeats = text, now, 0
        else:
            self._repeats += 1

    def _close_association(self, notify: bool) -> None:
        if notify and self.up and self._conn is not None:
            try:
                self._conn.shutdown()  # close_notify (RFC 5246 §7.2.1): the collector may end the session
            except SSL.Error:
                pass
            self._flush(time.monotonic())
        self.handshaking = self.up = False
        self.protocol = ""
        self._conn = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # --- sizes ----------------------------------------------------------
    def path_mtu(self) -> int | None:
        """The kernel's MTU for this socket's path now; None without a socket (or a route)."""
        return socket_path_mtu(self._sock, self.family)

    def _link_mtu(self) -> int:
        """Octets of the largest datagram the path takes (the DTLS ciphertext MTU)."""
        mtu = self.path_mtu()
        if mtu is None or mtu <= 0:
            return 1500 - IP_UDP_OVERHEAD[self.family]
        return max(MIN_LINK_MTU, min(mtu - IP_UDP_OVERHEAD[self.family], UDP_LARGEST[self.family]))

    def path_budget(self) -> int | None:
        """Octets of the largest IPFIX message one DTLS record in one datagram of the path takes."""
        if self.path_mtu() is None:
            return None
        link = self._link_mtu()
        if self.up and self._conn is not None:
            self._conn.set_ciphertext_mtu(link)
            plain = self._conn.get_cleartext_mtu()
        else:
            plain = link - RECORD_OVERHEAD_MAX
        return min(plain, MAX_PLAINTEXT)

    def set_send_buffer(self, octets: int) -> int:
        self.send_buffer = octets
        if self._sock is not None:
            self.granted_buffer = apply_send_buffer(self._sock, octets)
        return self.granted_buffer

    # --- sending --------------------------------------------------------
    def _down_error(self, lost: int) -> TransportError:
        if self.handshaking:
            error = TransportError(errno.EAGAIN, "DTLS handshake under way")
            error.cause = HANDSHAKE
        else:
            error = TransportError(self._errno or errno.ENOTCONN, self.last_error or "no DTLS association")
            error.cause = self._cause or HANDSHAKE
        error.lost = lost
        return error

    def send(self, message: memoryview | bytes, now: float) -> None:
        """Send one message in one record; raise ``TransportError`` when it did not leave."""
        _, error = self.send_rows(np.frombuffer(message, dtype=np.uint8).reshape(1, -1), now)
        if error is not None:
            raise error

    def send_rows(self, rows: npt.NDArray[np.uint8], now: float) -> tuple[int, TransportError | None]:
        """Send equal-size messages (the rows of a uint8 array), one record each, in order.

        Returns how many left and the error that stopped the rest: while
        the association is down every one of them is lost at once (under
        its cause); a socket error takes one and, but for a full socket
        buffer or a message too big, the association with it.
        """
        n = len(rows)
        if not self.up:
            return 0, self._down_error(n)
        conn, sock = self._conn, self._sock
        assert conn is not None and sock is not None
        for i in range(n):
            try:
                conn.send(rows[i])
                record = conn.bio_read(_READ)
            except SSL.Error as exc:
                self._fail(now, CLOSED, 0, f"the DTLS association ended: {_ssl_reason(exc)}")
                return i, self._down_error(n - i)
            try:
                try:
                    sock.send(record)
                except BlockingIOError:  # socket buffer full: wait briefly, try once more
                    select.select([], [sock], [], SEND_WAIT_S)
                    sock.send(record)
            except OSError as exc:
                code = exc.errno or errno.EAGAIN
                if code not in (errno.EAGAIN, errno.EMSGSIZE):
                    self._socket_failed(now, exc)
                    return i, self._down_error(n - i)
                self.last_error = os.strerror(code)
                return i, TransportError(code, self.last_error)
        return n, None

    def flush(self) -> None:
        """Nothing to do: every record left at once."""

    def close(self) -> None:
        """close_notify to the collector, then the socket."""
        self._close_association(notify=True)
        if self.peer is not None:
            self.peer.close()
