"""What a client-side error means: retry it, join again, or give up at once with the reason.

Every error a client meets is one of:

- **transient**: the network is down, the server refuses connections (restarting), a call
  ran out of time (DEADLINE_EXCEEDED), the server is overloaded (RESOURCE_EXHAUSTED) or
  unavailable without a TLS verdict. Retried with exponential backoff and full jitter (Brooker,
  "Exponential Backoff And Jitter", AWS Architecture Blog, 2015) within the retry budget, a hard
  wall-clock limit counted from the last progress (``Backoff``);
- **rejoin**: the server restarted or forgot this client ("join again"): join at once;
- **permanent**: retrying cannot fix it -- a TLS verdict (the server's certificate is not from
  our CA, expired, or not the generation our CRL names; our key does not fit our certificate),
  PERMISSION_DENIED / UNAUTHENTICATED (revoked or not a client credential), or a join refused
  with a precondition (model layout, data shape, labels; the server marks these with the
  trailing metadata ``fedmosaic-permanent: 1`` and a bounded ``fedmosaic-refusal`` label).
  The client exits at once with the reason in plain words and ``ExitCode.REFUSED``.

The TLS verdicts are read from gRPC's status details, whose wording comes from gRPC Core and
BoringSSL; the strings matched here were collected from gRPC 1.85 against servers with a
certificate from another CA, an expired one and one of a revoked generation. When the *server*
refuses our certificate, gRPC shows only "Socket closed" (TLS 1.3 verifies the client
certificate after the client has finished its handshake, and the server sends no alert);
``fedmosaic.net.preflight.check_server`` then finds the verdict with a TLS handshake of its
own.

Exit codes of ``fedmosaic client`` are defined once, in ``ExitCode`` (docs/troubleshooting.md
lists them).
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import grpc

from fedmosaic.core.errors import FedmosaicError
from fedmosaic.net.errors import PERMANENT_KEY, REFUSAL_KEY  # the server's refusal metadata

log = logging.getLogger(__name__)

_LABEL = re.compile(r"[a-z][a-z0-9_]{0,31}")


class ExitCode(IntEnum):
    """Exit status of ``fedmosaic client`` (and what ``ClientError.exit_code`` carries)."""

    OK = 0
    UNEXPECTED = 1        # a bug in fedmosaic or in user code outside training: a traceback
    USAGE = 2             # bad options or configuration; unreadable or malformed files
    REFUSED = 3           # permanent: refused by the server, or credentials/data/model unfit
    UNREACHABLE = 4       # no progress with the server for --retry-budget seconds
    TRAINING_FAILED = 5   # local training failed deterministically (or 3 rounds in a row)
    INTERRUPTED = 130     # Ctrl-C (128 + SIGINT, the shell convention)


class ClientError(FedmosaicError, RuntimeError):
    """A client gives up: ``message`` in plain words for its operator, ``reason`` a bounded
    label (log field and metrics-style category), ``exit_code`` the process exit status."""

    exit_code: ExitCode = ExitCode.REFUSED

    def __init__(self, message: str, *, reason: str = "refused",
                 exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        self.message, self.reason = message, reason
        if exit_code is not None:
            self.exit_code = exit_code


class PermanentError(ClientError):
    """Refused for good or incompatible: retrying cannot help (exit 3)."""

    exit_code = ExitCode.REFUSED


class UnreachableError(ClientError):
    """No progress with the server within the retry budget (exit 4)."""

    exit_code = ExitCode.UNREACHABLE


class TrainingFailedError(ClientError):
    """Local training failed in a way the next round would repeat (exit 5)."""

    exit_code = ExitCode.TRAINING_FAILED


@dataclass(frozen=True)
class Verdict:
    """What to do about one failed call: ``action`` is ``"retry"`` (transient, with backoff),
    ``"rejoin"``, ``"skip"`` (the server refused this one call, e.g. a late upload: go on),
    or ``"fail"`` (permanent); ``reason`` is a bounded label, ``message`` plain words.
    ``probe``: gRPC saw the connection closed right after TLS, which is how a server refusing
    our certificate looks; ``preflight.check_server`` can tell."""

    action: str
    reason: str
    message: str
    probe: bool = False

    @property
    def permanent(self) -> bool:
        return self.action == "fail"


# TLS verdicts this client reached itself (gRPC details from BoringSSL), first match wins.
LOCAL_TLS: tuple[tuple[str, str, str], ...] = (
    ("unable to get local issuer certificate", "server_untrusted",
     "this client does not trust the server's certificate: it was not issued by the CA in "
     "ca.pem (the server belongs to another federation, or ca.pem does)"),
    ("self-signed certificate", "server_untrusted",
     "this client does not trust the server's certificate: it is self-signed, not issued by "
     "the CA in ca.pem"),
    ("self signed certificate", "server_untrusted",
     "this client does not trust the server's certificate: it is self-signed, not issued by "
     "the CA in ca.pem"),
    ("certificate has expired", "server_expired",
     "the server's certificate has expired (by this machine's clock); the operator must renew "
     "it (fedmosaic certs renew-server)"),
    ("certificate is not yet valid", "server_not_yet_valid",
     "the server's certificate is not valid yet by this machine's clock; check the clocks of "
     "this machine and the server"),
    ("certificate revoked", "server_revoked",
     "the server's certificate is revoked"),
    ("Hostname Verification Check failed", "server_name",
     "the server's certificate does not carry the expected name: it is not the current "
     "server certificate named in crl.pem (revoked, or this crl.pem is outdated), or "
     "--server-name is wrong"),
    ("Hostname mismatch", "server_name",
     "the server's certificate does not carry the expected name: it is not the current "
     "server certificate named in crl.pem (revoked, or this crl.pem is outdated), or "
     "--server-name is wrong"),
    ("Peer name", "server_name",
     "the server's certificate does not carry the name this client dialled (use the name in "
     "the certificate, or --server-name)"),
    ("WRONG_VERSION_NUMBER", "not_tls",
     "the server at this address does not speak TLS: check --server (the host and port "
     "fedmosaic server listens on)"),
    ("Failed to create security handshaker", "bad_credentials",
     "this client's TLS credentials are unusable: the key does not fit the certificate, or a "
     "file is not PEM"),
)
# Alerts the *server* sent (as OpenSSL names them), when a TLS stack shows them.
SERVER_ALERTS: tuple[tuple[str, str, str], ...] = (
    ("TLSV1_ALERT_UNKNOWN_CA", "foreign_ca",
     "the server does not trust this certificate: it was issued by another CA"),
    ("SSLV3_ALERT_CERTIFICATE_EXPIRED", "expired",
     "the server finds this client's certificate expired (check this machine's clock and the "
     "certificate's dates)"),
    ("SSLV3_ALERT_CERTIFICATE_REVOKED", "revoked",
     "the server says this client's certificate is revoked"),
    ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "no_certificate",
     "the server requires a client certificate and none was sent"),
    ("SSLV3_ALERT_BAD_CERTIFICATE", "bad_certificate",
     "the server refused this client's certificate"),
    # A server that offers only TLS 1.2 (fedmosaic clients speak TLS 1.3 only).
    ("SSLV3_ALERT_HANDSHAKE_FAILURE", "tls_version",
     "the server and this client share no TLS version or cipher: fedmosaic uses TLS 1.3 "
     "only (FEDMOSAIC_ALLOW_TLS12=1 allows TLS 1.2; docs/deployment.md)"),
    ("TLSV1_ALERT_PROTOCOL_VERSION", "tls_version",
     "the server and this client share no TLS version or cipher: fedmosaic uses TLS 1.3 "
     "only (FEDMOSAIC_ALLOW_TLS12=1 allows TLS 1.2; docs/deployment.md)"),
)


def _metadata(exc: grpc.RpcError) -> dict[str, str]:
    try:
        items = exc.trailing_metadata() or ()  # type: ignore[attr-defined]
    except Exception:  # not a call error (e.g. a test double): no metadata
        return {}
    out: dict[str, str] = {}
    for item in items:
        key, value = item[0], item[1]
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        out[str(key).lower()] = str(value)
    return out


def _plain(text: str, limit: int = 512) -> str:
    """Server-sent text made safe for one log line: printable, bounded."""
    cleaned = "".join(c if c.isprintable() else " " for c in text).strip()
    return cleaned if len(cleaned) <= limit else cleaned[:limit - 3] + "..."


def classify(exc: grpc.RpcError, method: str = "") -> Verdict:
    """The verdict on a failed gRPC call ``method`` (e.g. ``"Join"``)."""
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    details = _plain(exc.details() or "")  # type: ignore[attr-defined]
    meta = _metadata(exc)
    label = meta.get(REFUSAL_KEY, "")
    label = label if _LABEL.fullmatch(label) else ""
    if meta.get(PERMANENT_KEY) == "1":
        return Verdict("fail", label or "refused",
                       f"refused by the server: {details or code.name}")
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        if not label:
            label = "revoked" if "revoked" in details else code.name.lower()
        return Verdict("fail", label, f"refused by the server: {details or code.name}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN):
        for table in (SERVER_ALERTS, LOCAL_TLS):
            for needle, reason, message in table:
                if needle.lower() in details.lower():
                    return Verdict("fail", reason, message)
    if code == grpc.StatusCode.CANCELLED and label in ("stalled", "late"):
        # The server cut this stream (too slow between messages, or its round closed): the
        # server is there, only this call is over; go on with the next task.
        return Verdict("skip", label, f"the server cut this call ({label}): {details}")
    if code == grpc.StatusCode.FAILED_PRECONDITION and "join again" in details:
        return Verdict("rejoin", "not_joined", details)
    if method == "Join" and code in (grpc.StatusCode.FAILED_PRECONDITION,
                                     grpc.StatusCode.INVALID_ARGUMENT,
                                     grpc.StatusCode.OUT_OF_RANGE):
        # The server looked at what we sent and said no; the same request gets the same answer.
        return Verdict("fail", label or "join_refused", f"refused by the server: {details}")
    transient = {
        grpc.StatusCode.UNAVAILABLE: "unavailable",
        grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
        grpc.StatusCode.RESOURCE_EXHAUSTED: "overloaded",
        grpc.StatusCode.ABORTED: "aborted",
        grpc.StatusCode.CANCELLED: "cancelled",
        grpc.StatusCode.INTERNAL: "server_error",
        grpc.StatusCode.UNKNOWN: "unknown",
    }
    if code in transient:
        probe = code == grpc.StatusCode.UNAVAILABLE and "Socket closed" in details
        return Verdict("retry", transient[code], _transient_words(code, details), probe=probe)
    # One call refused (a late or replayed upload, an unknown task): the next task may work.
    return Verdict("skip", label or code.name.lower(), f"{code.name}: {details}")


# What gRPC's connection errors mean, in plain words (first match wins).
_TRANSIENT_WORDS: tuple[tuple[str, str], ...] = (
    ("Connection refused", "the server refuses connections (not running, or restarting)"),
    ("DNS resolution failed", "the server's host name does not resolve (no network, or a "
                              "wrong --server)"),
    ("Network is unreachable", "the network cannot reach the server"),
    ("No route to host", "the network cannot reach the server"),
    ("Connection reset", "the connection was reset"),
    ("Socket closed", "the connection was closed"),
    ("Connection timed out", "connecting to the server timed out"),
)


def _transient_words(code: grpc.StatusCode, details: str) -> str:
    for needle, words in _TRANSIENT_WORDS:
        if needle.lower() in details.lower():
            return words
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no reply from the server in time"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"the server is overloaded ({details})" if details else "the server is overloaded"
    return f"{code.name}: {details}" if details else code.name


@dataclass
class Backoff:
    """Exponential backoff with full jitter under a hard retry budget.

    ``budget`` seconds after the last ``progress()`` the client gives up
    (``UnreachableError``). The budget is honoured exactly: a sleep never goes past it
    (``wait``), and a call's timeout is cut to what is left of it (``timeout``), so neither
    a long delay nor a hung call can overrun it.
    """

    base: float = 0.2
    cap: float = 10.0
    budget: float = 300.0
    attempts: int = 0
    since: float = field(default_factory=time.monotonic)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        if not self.budget > 0 or not self.base > 0 or self.cap < self.base:
            raise ValueError("Backoff needs budget > 0, base > 0 and cap >= base")
        self.since = self.clock()

    def progress(self) -> None:
        self.attempts, self.since = 0, self.clock()

    def remaining(self) -> float:
        return self.budget - (self.clock() - self.since)

    def _give_up(self, why: str) -> UnreachableError:
        return UnreachableError(f"no progress with the server for {self.budget:g} s "
                                f"(--retry-budget); last error: {why}", reason="unreachable")

    def timeout(self, wanted: float, why: str = "no reply") -> float:
        """``wanted`` seconds for the next call, cut to the budget left; gives up when none
        is left."""
        left = self.remaining()
        if left <= 0:
            raise self._give_up(why)
        return max(min(wanted, left), 0.001)

    def delay(self) -> float:
        """The next sleep: uniform in [0, min(cap, base * 2^attempts)] (full jitter)."""
        return random.uniform(0, min(self.cap, self.base * 2 ** min(self.attempts, 62)))

    def wait(self, why: str) -> float:
        """Sleep before the next attempt; ``UnreachableError`` once the budget is spent.
        Returns the seconds slept."""
        left = self.remaining()
        if left <= 0:
            raise self._give_up(why)
        delay = min(self.delay(), left)
        self.attempts += 1
        self.sleep(delay)
        if self.remaining() <= 0:
            raise self._give_up(why)
        return delay


class RepeatLimiter:
    """Log a repeated message at most once per ``every`` seconds per key.

    A client retrying every few hundred milliseconds would otherwise write the same line as
    often. The first occurrence of a key is logged at once; later ones within ``every`` seconds
    are counted, and the next line logged for that key says how many were left out (as the
    server's ``RefusalLog`` summarises refusals). Keys are bounded labels, so memory is too.
    """

    def __init__(self, every: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 256) -> None:
        self.every, self.clock, self.max_keys = every, clock, max_keys
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, logger: logging.Logger, level: int, key: str, msg: str, *args: Any,
            **kwargs: Any) -> bool:
        """Log ``msg % args`` unless ``key`` was logged less than ``every`` seconds ago;
        returns whether it was logged."""
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.every:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            if last is None and len(self._last) >= self.max_keys:
                oldest = min(self._last, key=self._last.__getitem__)
                self._last.pop(oldest)
                self._suppressed.pop(oldest, None)
            self._last[key] = now
            skipped = self._suppressed.pop(key, 0)
        if skipped:
            msg = f"{msg} (%d similar messages not logged in the last %.0f s)"
            args = (*args, skipped, now - last if last is not None else 0.0)
        logger.log(level, msg, *args, **kwargs)
        return True


# Errors that may not repeat in the next round: memory and other resources of the moment.
_RESOURCE_ERRNOS = frozenset({"ENOMEM", "ENOSPC", "EAGAIN", "EMFILE", "ENFILE", "EBUSY",
                              "EINTR", "ETIMEDOUT", "EDQUOT"})


def is_transient_failure(exc: BaseException) -> bool:
    """Whether a local training error may not recur: out of (GPU) memory, or an operating
    system resource error (no memory, disk full, too many open files, busy). Everything else
    -- a shape error, a bug, bad data -- fails the same way next round."""
    import errno

    if isinstance(exc, MemoryError):
        return True
    oom = _torch_oom()
    if oom is not None and isinstance(exc, oom):
        return True
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, "") in _RESOURCE_ERRNOS
    return False


def _torch_oom() -> type[BaseException] | tuple[type[BaseException], ...] | None:
    import sys

    torch = sys.modules.get("torch")  # never imported for this: no torch, no torch error
    if torch is None:
        return None
    found = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                              getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None))
                  if isinstance(t, type))
    return found or None


def failure_reason(exc: BaseException) -> str:
    """``"<ExceptionType>: <first line of its message>"``, printable and at most 512
    characters (what ``RefuseTask`` carries to the server)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return _plain(text)
