"""Counting TLS handshake failures, by kind, for the operator (issue #18 item 4).

A connection whose TLS handshake fails (no client certificate, a certificate from another CA,
an expired one, plain TCP garbage, an old TLS version) never becomes a gRPC call, and gRPC's
Python API offers no hook for it. gRPC's C core logs each one, with OpenSSL's reason, as one
line on the process's standard error, e.g. ``I1207 16:46:12.264462 11788
ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: error:100000c0:SSL
routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE: ...``.

``HandshakeTap`` therefore sits on file descriptor 2 of the ``fedmosaic server`` process: a
pipe replaces it, and a daemon thread copies every byte through to the original standard
error unchanged, classifying the handshake lines on the way (``classify``) into a fixed set
of kinds (``KINDS``), counted in ``counts`` and reported to its listeners (the Prometheus
counter ``fedmosaic_tls_handshake_failures_total{kind}``, ``fedmosaic status``) and logged at
most ``burst`` lines per ``window`` seconds. Only the ``fedmosaic server`` command installs it
(``install``): a library user's own process keeps its standard error untouched.

Limits, stated: gRPC's line names no peer address, so the count is by kind only; it relies on
gRPC logging these lines (INFO level, on by default; ``GRPC_VERBOSITY=ERROR`` or ``NONE``
hides them, and the tap then warns once at start that it counts nothing); the format is
gRPC's, parsed as found in grpcio 1.6x-1.8x (``tests/net/test_handshake_tap.py`` checks it
against the installed grpcio by making real failed handshakes).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable

log = logging.getLogger(__name__)

#: The kinds a failed handshake is counted as (a fixed set: bounded metric series).
KINDS: tuple[str, ...] = (
    "no_certificate",   # the client presented no certificate
    "unknown_ca",       # a certificate not issued by the federation's CA (or self-signed)
    "expired",          # an expired (or not yet valid) certificate
    "wrong_purpose",    # e.g. a server certificate presented as a client's
    "bad_certificate",  # any other certificate verification failure
    "not_tls",          # plain text, HTTP or garbage where a TLS ClientHello was expected
    "tls_version",      # an old TLS version or no shared cipher (the server is TLS 1.3 only)
    "other",            # any other handshake failure
)

_LINE = re.compile(r"Handshake failed with (?:fatal )?error (\S+?):? (.*)$")
_NOT_TLS = ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNKNOWN_PROTOCOL",
            "PACKET_LENGTH_TOO_LONG", "RECORD_LENGTH_MISMATCH", "WRONG_SSL_VERSION",
            "EXCESSIVE_MESSAGE_SIZE")
_VERSION = ("NO_SHARED_CIPHER", "UNSUPPORTED_PROTOCOL", "PROTOCOL_VERSION",
            "NO_SUPPORTED_VERSIONS_ENABLED", "NO_CIPHERS_AVAILABLE")


def classify(line: str) -> str | None:
    """The kind of handshake failure a gRPC log line reports, or None if it reports none."""
    m = _LINE.search(line)
    if m is None:
        return None
    text = m.group(2)
    upper = text.upper()
    if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in upper:
        return "no_certificate"
    if "CERTIFICATE_VERIFY_FAILED" in upper:
        lower = text.lower()
        if "expired" in lower or "not yet valid" in lower:
            return "expired"
        if "local issuer" in lower or "self signed" in lower or "self-signed" in lower \
                or "unknown ca" in lower:
            return "unknown_ca"
        if "purpose" in lower:
            return "wrong_purpose"
        return "bad_certificate"
    if any(k in upper for k in _NOT_TLS):
        return "not_tls"
    if any(k in upper for k in _VERSION):
        return "tls_version"
    if "CERTIFICATE" in upper:
        return "bad_certificate"
    return "other"


class HandshakeTap:
    """Counts the handshake failures gRPC logs on standard error; see the module docstring.

    ``fd`` is the descriptor to tap (2); ``listeners`` are called with each failure's kind
    (from the tap's thread). ``burst`` lines per ``window`` seconds are logged one by one, the
    rest summed up in the next line."""

    def __init__(self, fd: int = 2, burst: int = 20, window: float = 10.0) -> None:
        self.fd, self.burst, self.window = fd, burst, window
        self.counts: Counter[str] = Counter()
        self.listeners: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._saved: int | None = None
        self._thread: threading.Thread | None = None
        self._window_start = 0.0
        self._logged = 0
        self._suppressed: Counter[str] = Counter()
        # Log lines go to standard error, i.e. into the pipe the pump thread drains: the pump
        # must never write them itself (a full pipe would block its only reader), so a
        # thread of their own logs them.
        self._lines: queue.SimpleQueue[tuple[str, tuple[object, ...], dict[str, object]]] = \
            queue.SimpleQueue()

    @property
    def installed(self) -> bool:
        return self._saved is not None

    def install(self) -> None:
        """Put the pipe in place of the descriptor and start copying (idempotent)."""
        if self._saved is not None:
            return
        verbosity = os.environ.get("GRPC_VERBOSITY", "").upper()
        if verbosity in ("ERROR", "NONE"):
            log.warning("GRPC_VERBOSITY=%s: gRPC does not log failed TLS handshakes, so "
                        "they are not counted (fedmosaic_tls_handshake_failures_total stays "
                        "0); unset it or set INFO to count them", verbosity)
        read, write = os.pipe()
        self._saved = os.dup(self.fd)
        os.dup2(write, self.fd)
        os.close(write)
        self._thread = threading.Thread(target=self._pump, args=(read,), daemon=True,
                                         name="fedmosaic-handshake-tap")
        self._thread.start()
        threading.Thread(target=self._log_lines, daemon=True,
                         name="fedmosaic-handshake-log").start()
        atexit.register(self.uninstall)

    def _log_lines(self) -> None:
        while True:
            msg, args, extra = self._lines.get()
            log.warning(msg, *args, extra=extra)

    def uninstall(self) -> None:
        """Give the descriptor back (at exit: nothing may block on a pipe nobody reads)."""
        saved, self._saved = self._saved, None
        if saved is not None:
            os.dup2(saved, self.fd)  # the pipe's writer closes: the pump reads EOF and ends
            os.close(saved)

    def _pump(self, read: int) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(read, 65536)
            except OSError:
                return
            if not chunk:
                return
            saved = self._saved
            if saved is not None:
                with contextlib.suppress(OSError):  # through, unchanged, before anything else
                    os.write(saved, chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > 65536:  # a line without end: keep memory bounded
                pending = pending[-4096:]
            for raw in lines:
                with contextlib.suppress(Exception):  # never stop copying standard error
                    self.feed(raw.decode("utf-8", "replace"))

    def feed(self, line: str) -> str | None:
        """Count ``line`` if it reports a failed handshake; its kind, or None."""
        kind = classify(line)
        if kind is None:
            return None
        with self._lock:
            self.counts[kind] += 1
            now = time.monotonic()
            if now - self._window_start >= self.window:
                if self._suppressed:
                    self._emit("refused %d more TLS handshakes in the last %.0fs (by kind: "
                               "%s)", sum(self._suppressed.values()), self.window,
                               ", ".join(f"{k}={v}" for k, v in
                                         sorted(self._suppressed.items())))
                self._window_start, self._logged = now, 0
                self._suppressed.clear()
            if self._logged < self.burst:
                self._logged += 1
                self._emit("refused a TLS handshake (%s)", kind, code=f"tls_{kind}")
            else:
                self._suppressed[kind] += 1
        for listener in self.listeners:
            listener(kind)
        return kind

    def _emit(self, msg: str, *args: object, code: str = "tls_handshake") -> None:
        """Log from the logging thread when installed, else here (tests feed lines)."""
        if self._saved is not None:
            self._lines.put((msg, args, {"code": code}))
        else:
            log.warning(msg, *args, extra={"code": code})

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: self.counts[k] for k in KINDS if self.counts[k]}


#: The process's tap (installed by ``fedmosaic server`` only).
TAP = HandshakeTap()
