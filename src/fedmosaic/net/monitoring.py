"""Server monitoring: Prometheus metrics and structured (JSON lines) logs with secret redaction.

``ServerMetrics`` owns its own ``prometheus_client.CollectorRegistry`` rather than the process
global one, so several servers (or tests) can live in one process. Every labelled metric takes
its label values from a fixed set given at construction; anything else, in particular any string
a client controls, is counted as ``other``, which keeps the number of time series bounded
whatever clients send (Prometheus' guidance on label cardinality).

``configure_logging`` writes one JSON object per line (timestamp, level, logger, message and any
``extra=`` fields such as ``round`` or ``client``) and installs ``RedactSecrets``, a filter that
masks anything that looks like key material before a record is formatted; the formatters redact
the message, traceback and stack again, so a handler installed without the filter does not leak
either. Configuring the root logger also routes uncaught exceptions (``sys.excepthook``, threads'
``threading.excepthook`` and ``sys.unraisablehook``) through it, so a crash's traceback is one
redacted JSON record instead of raw text on stderr: a traceback quotes the source lines and the
messages of every chained exception and note, which is where a key or token can appear. It is
a safety net: the code never logs keys on purpose.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
import sys
import threading
from collections.abc import Iterable, Mapping
from json import dumps
from types import TracebackType
from typing import Any, TextIO

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fedmosaic.core.errors import ConfigError

log = logging.getLogger(__name__)

OTHER = "other"
# Why a message was refused. A fixed set keeps the metric's series bounded; it holds the
# labels ``fedmosaic.net`` raises (``Refused.label``) plus finer validation causes.
REJECT_REASONS: tuple[str, ...] = (
    # caller identity
    "unauthenticated",  # no or unusable client certificate
    "revoked",          # certificate on the CRL
    "crl",              # the server's own CRL is unusable: every caller is refused
    "not_a_client",     # a valid certificate whose role may not call this method
    "not_joined",       # calls before Join, or to a previous server instance
    "not_operator",     # Status without the operator credential
    # message content
    "malformed",        # undecodable or schema-violating message
    "oversized",        # over a size limit
    "wrong_shape",      # wrong number of elements or offsets
    "bad_dtype",        # payload length not a whole number of elements
    "non_finite",       # NaN or infinity
    "invalid_update",   # failed update validation (weight, sample count, metrics)
    "model_mismatch",   # client built another model (parameter count or spec hash)
    "incompatible",     # client's data or model does not fit the task (fedmosaic.compat)
    "bad_profile",      # client's declared data profile is malformed
    "invalid_evaluation",  # an evaluation report with a bad sample count
    # protocol state
    "wrong_round",      # an old or future round
    "unknown_task",     # a task id never issued
    "foreign_task",     # a task id issued to another client
    "replay",           # a task already uploaded
    "task_state",       # a call that does not fit the task's state
    "late",             # after the round closed
    "deadline",         # past the round deadline
    "interrupted",      # upload stream cut off
    "download_limit",   # the model was fetched too often
    "secagg_round",     # a plaintext upload in a secure-aggregation round
    "no_secagg",        # a secure-aggregation message to a federation without it
    "secagg_state",     # a secure-aggregation call that does not fit the round's stage
    "secagg_message",   # a secure-aggregation message the protocol refuses
    # admission control (fedmosaic.net.admission)
    "over_budget",      # the member's own budget: calls in flight, one open upload
    "busy",             # the capacity left is reserved (members with nothing in flight)
    "stalled",          # a stream cut after waiting too long for its client
    OTHER,
)
# Why a client left a round without an accepted update.
DROP_REASONS: tuple[str, ...] = (
    "deadline",           # missed the round deadline (straggler)
    "disconnected",       # rejoined or left during the round
    "heartbeat_timeout",  # went silent
    "interrupted",        # upload stream cut off
    "stalled",            # upload cut: no message within stream_idle_timeout
    "rejected",           # its update failed validation
    "failed",             # reported or suffered another failure
    "refused_by_client",  # the client's privacy policy refused the task (net/policy.py)
    "client_error",       # the client could not run its task (training or evaluation
                          # failed, no test split, data found incompatible)
    OTHER,
)
# Round durations span sub-second simulated rounds to hour-long cross-silo ones.
ROUND_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800,
                                    3600)


def bounded_label(value: object, allowed: Iterable[str]) -> str:
    """``value`` if it is one of ``allowed``, else ``"other"``: never an unbounded label value."""
    return value if isinstance(value, str) and value in allowed else OTHER


class ServerMetrics:
    """The metrics of one federation server, in a registry of its own.

    Thread-safe (prometheus_client metrics are). ``snapshot()`` gives the same numbers as a dict
    for a Status RPC; ``start_http`` serves them in the Prometheus text format.
    """

    def __init__(self, namespace: str = "fedmosaic",
                 reject_reasons: Iterable[str] = REJECT_REASONS,
                 drop_reasons: Iterable[str] = DROP_REASONS,
                 client_refusal_reasons: Iterable[str] | None = None) -> None:
        if client_refusal_reasons is None:
            # Imported here: the codes live with the wire protocol (torch); logging setup
            # imports this module and must stay light.
            from fedmosaic.net.issues import REFUSAL_ISSUE_CODES

            client_refusal_reasons = REFUSAL_ISSUE_CODES
        self.registry = CollectorRegistry(auto_describe=True)
        self.namespace = namespace
        self.reject_reasons = _reason_set("reject_reasons", reject_reasons)
        self.drop_reasons = _reason_set("drop_reasons", drop_reasons)
        self.client_refusal_reasons = _reason_set("client_refusal_reasons",
                                                  client_refusal_reasons)
        ns, reg = namespace, self.registry
        self._rounds = Counter("rounds_completed", "Rounds completed (aggregated and applied)",
                               namespace=ns, registry=reg)
        self._round = Gauge("current_round", "Round in progress, or the last one completed",
                            namespace=ns, registry=reg)
        self._connected = Gauge("connected_clients", "Clients currently connected",
                                namespace=ns, registry=reg)
        self._bytes_in = Counter("received_bytes", "Bytes received from clients",
                                 namespace=ns, registry=reg)
        self._bytes_out = Counter("sent_bytes", "Bytes sent to clients",
                                  namespace=ns, registry=reg)
        self._duration = Histogram("round_duration_seconds", "Wall time of completed rounds",
                                   namespace=ns, registry=reg, buckets=ROUND_BUCKETS)
        self._accepted = Counter("updates_accepted", "Client updates accepted into a round",
                                 namespace=ns, registry=reg)
        self._dropped = Counter("clients_dropped", "Clients dropped from a round, by reason",
                                ["reason"], namespace=ns, registry=reg)
        self._rejected = Counter("rejected_messages", "Messages refused, by reason",
                                 ["reason"], namespace=ns, registry=reg)
        self._clients_refused = Counter(
            "clients_refused", "Clients turned away at join (incompatible model or data) or "
            "that refused or failed a task, or whose update or evaluation was rejected, by "
            "reason", ["reason"], namespace=ns, registry=reg)
        from fedmosaic.net.handshake_tap import KINDS

        self.handshake_kinds = KINDS
        self._handshakes = Counter(
            "tls_handshake_failures", "TLS handshakes refused, by kind (counted from gRPC's "
            "log lines by fedmosaic server; net/handshake_tap.py)", ["kind"], namespace=ns,
            registry=reg)
        # Touch every label value so each series is exported (as 0) from the start.
        for k in KINDS:
            self._handshakes.labels(kind=k)
        for r in self.client_refusal_reasons:
            self._clients_refused.labels(reason=r)
        for r in self.drop_reasons:
            self._dropped.labels(reason=r)
        for r in self.reject_reasons:
            self._rejected.labels(reason=r)
        self._http: Any = None
        self._http_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- recording ---------------------------------------------------------------------------
    def round_started(self, round_: int) -> None:
        self._round.set(_count("round", round_))

    def round_completed(self, record: Mapping[str, Any]) -> None:
        """Count a completed round from the server loop's per-round record.

        Uses ``round``, ``wall_time`` (seconds) and ``updates`` (updates accepted).
        """
        if not isinstance(record, Mapping):
            raise ConfigError("record", type(record).__name__, "the round's record (a mapping)")
        duration = record.get("wall_time")
        if isinstance(duration, bool) or not isinstance(duration, int | float) \
                or not 0 <= duration < float("inf"):
            raise ConfigError("record.wall_time", duration, "a finite number of seconds >= 0")
        round_ = _count("record.round", record.get("round"))
        updates = _count("record.updates", record.get("updates", 0))
        self._round.set(round_)
        self._rounds.inc()
        self._duration.observe(duration)
        self._accepted.inc(updates)

    def set_connected_clients(self, n: int) -> None:
        self._connected.set(_count("connected_clients", n))

    def bytes_in(self, n: int) -> None:
        self._bytes_in.inc(_count("bytes", n))

    def bytes_out(self, n: int) -> None:
        self._bytes_out.inc(_count("bytes", n))

    def client_dropped(self, reason: str) -> str:
        """Count a dropped client; returns the reason label used (``other`` if not known)."""
        label = bounded_label(reason, self.drop_reasons)
        self._dropped.labels(reason=label).inc()
        return label

    def client_refused(self, reason: str) -> str:
        """Count a client turned away or refusing/failing a task, by its issue code
        (``fedmosaic.net.issues``); returns the label used (``other`` if not known)."""
        label = bounded_label(reason, self.client_refusal_reasons)
        self._clients_refused.labels(reason=label).inc()
        return label

    def refused(self, reason: str) -> str:
        """Count a refused message; returns the reason label used (``other`` if not known)."""
        label = bounded_label(reason, self.reject_reasons)
        self._rejected.labels(reason=label).inc()
        return label

    def handshake_failed(self, kind: str) -> str:
        """Count a refused TLS handshake by kind; returns the label used."""
        label = bounded_label(kind, self.handshake_kinds)
        self._handshakes.labels(kind=label).inc()
        return label

    # --- reading -----------------------------------------------------------------------------
    def _value(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(f"{self.namespace}_{name}", dict(labels or {}))
        return 0.0 if value is None else value

    def snapshot(self) -> dict[str, Any]:
        """All metrics as plain numbers (JSON-serialisable), e.g. for a Status RPC."""
        return {
            "rounds_completed": int(self._value("rounds_completed_total")),
            "current_round": int(self._value("current_round")),
            "connected_clients": int(self._value("connected_clients")),
            "bytes_in": int(self._value("received_bytes_total")),
            "bytes_out": int(self._value("sent_bytes_total")),
            "updates_accepted": int(self._value("updates_accepted_total")),
            "round_duration_seconds": {
                "count": int(self._value("round_duration_seconds_count")),
                "sum": self._value("round_duration_seconds_sum"),
            },
            "clients_dropped": {r: int(self._value("clients_dropped_total", {"reason": r}))
                                for r in self.drop_reasons},
            "rejected_messages": {r: int(self._value("rejected_messages_total", {"reason": r}))
                                  for r in self.reject_reasons},
            "clients_refused": {r: int(self._value("clients_refused_total", {"reason": r}))
                                for r in self.client_refusal_reasons},
            "tls_handshake_failures": {
                k: int(self._value("tls_handshake_failures_total", {"kind": k}))
                for k in self.handshake_kinds},
        }

    # --- HTTP endpoint -----------------------------------------------------------------------
    def start_http(self, port: int = 0, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` for this registry; return the port (``port=0``: an ephemeral one).

        The endpoint is plain, unauthenticated HTTP: keep it on loopback or behind a proxy.
        """
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError("metrics_port", port, "an integer from 0 to 65535")
        with self._lock:
            if self._http is not None:
                raise RuntimeError(f"metrics endpoint already running on port "
                                   f"{self._http.server_port}")
            self._http, self._http_thread = start_http_server(port, addr=addr,
                                                              registry=self.registry)
            actual = int(self._http.server_port)
        if not _is_loopback(addr):
            log.warning("metrics endpoint is unauthenticated plain HTTP on a non-loopback "
                        "address", extra={"addr": addr, "port": actual})
        return actual

    @property
    def port(self) -> int | None:
        """The metrics endpoint's port, or None when it is not running."""
        httpd = self._http
        return None if httpd is None else int(httpd.server_port)

    def stop_http(self) -> None:
        """Stop the endpoint (no-op if not running)."""
        with self._lock:
            httpd, thread = self._http, self._http_thread
            self._http = self._http_thread = None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)


def _reason_set(key: str, reasons: Iterable[str]) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(reasons))
    if not out or not all(isinstance(r, str) and re.fullmatch(r"[a-z][a-z0-9_]*", r)
                          for r in out) or len(out) > 64:
        raise ConfigError(key, reasons, "1 to 64 snake_case label values")
    return out if OTHER in out else (*out, OTHER)


def _count(key: str, n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(key, n, "an integer >= 0")
    return n


def _is_loopback(addr: str) -> bool:
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


# --- structured logging ------------------------------------------------------------------------

REDACTED = "[REDACTED]"
# PEM blocks, including a truncated one with no END line.
_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]{1,64}-----.*?(?:-----END [A-Z0-9 ]{1,64}-----|\Z)",
                  re.DOTALL)
# 32+ hex digits (a 128-bit key or more) with at least one letter, so long decimal numbers stay.
_HEX = re.compile(r"(?<![0-9A-Za-z])(?:0x)?(?=[0-9]*[a-fA-F])[0-9a-fA-F]{32,}(?![0-9A-Za-z])")
# Candidate base64 / base64url runs of 40+ characters (30+ bytes); see _looks_random.
_B64 = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{40,}={0,2}")


def _looks_random(token: str) -> bool:
    # Random base64 mixes cases and digits and has few separators (+ / - _ are 4 of 64
    # symbols); paths and identifiers have a separator every few characters.
    body = token.rstrip("=")
    separators = sum(body.count(c) for c in "+/-_")
    return (any(c.isupper() for c in body) and any(c.islower() for c in body)
            and any(c.isdigit() for c in body) and separators * 8 <= len(body))


def redact(text: str) -> str:
    """Mask PEM blocks and long hex or base64 strings that look like keys or secrets."""
    text = _PEM.sub("[REDACTED PEM]", text)
    text = _HEX.sub(REDACTED, text)
    return _B64.sub(lambda m: REDACTED if _looks_random(m.group(0)) else m.group(0), text)


def _redact_value(value: object, depth: int = 0) -> object:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"  # raw bytes are never logged
    if depth < 4 and isinstance(value, Mapping):
        return {str(k): _redact_value(v, depth + 1) for k, v in value.items()}
    if depth < 4 and isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v, depth + 1) for v in value]
    return value


# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items()
            if k not in _RECORD_ATTRS and not k.startswith("_")}


class RedactSecrets(logging.Filter):
    """Rewrite a record's message, extra fields and traceback with ``redact`` applied."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # format arguments that do not fit the message
            message = f"{record.msg} (unformattable log arguments)"
        record.msg, record.args = redact(message), None
        for key, value in _extras(record).items():
            setattr(record, key, _redact_value(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
            record.exc_info = None  # formatters must use the redacted text
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp (UTC, ISO 8601), level, logger, message, extras."""

    CORE = ("timestamp", "level", "logger", "message")

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key, value in _extras(record).items():
            out[f"extra_{key}" if key in self.CORE else key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            # The whole traceback is one JSON string: its lines never reach the stream raw.
            out["exception"] = redact(record.exc_text)
        if record.stack_info:
            out["stack"] = redact(record.stack_info)
        # default=str: an extra that is not JSON (a Path, a tensor shape) still logs.
        return dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``timestamp LEVEL logger: message key=value ...`` for humans at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(
            timespec="milliseconds")
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{stamp} {record.levelname} {record.name}: {redact(record.getMessage())}"
        line = f"{line} {extras}" if extras else line
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        return f"{line}\n{redact(record.exc_text)}" if record.exc_text else line


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The logger that uncaught exceptions go to, once configure_logging has installed the hooks.
_uncaught_logger: str | None = None


def _log_uncaught(exc_type: type[BaseException], exc: BaseException,
                  tb: TracebackType | None) -> None:
    if _uncaught_logger is None or issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)  # Ctrl-C stays a one-line exit
        return
    logging.getLogger(_uncaught_logger).critical(
        "uncaught exception, exiting", exc_info=(exc_type, exc, tb))


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:  # threading's own default ignores it too
        return
    if _uncaught_logger is None:
        threading.__excepthook__(args)
        return
    name = args.thread.name if args.thread is not None else "unknown"
    logging.getLogger(_uncaught_logger).error(
        "uncaught exception in thread %s", name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))  # type: ignore[arg-type]


def _log_unraisable(args: Any) -> None:
    if _uncaught_logger is None or args.exc_type is None:
        sys.__unraisablehook__(args)
        return
    logging.getLogger(_uncaught_logger).error(
        "exception ignored in %r: %s", args.object, args.err_msg or "unraisable exception",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _install_exception_hooks(logger: str) -> None:
    global _uncaught_logger
    _uncaught_logger = logger
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_exception
    sys.unraisablehook = _log_unraisable


def configure_logging(level: str | int = "INFO", json: bool = True, *,
                      stream: TextIO | None = None, logger: str = "",
                      capture_uncaught: bool | None = None) -> logging.Logger:
    """Send ``logger`` (default: the root, so that libraries' records such as gRPC's are
    included) to ``stream`` (stderr) as JSON lines or plain text, with secrets redacted.

    ``capture_uncaught`` (default: when configuring the root logger) routes uncaught
    exceptions of the process and its threads, and "exception ignored" reports, through the
    same logger, redacted, instead of Python's raw traceback on stderr; Ctrl-C stays as is.
    Idempotent: a second call replaces the handler installed by the first. A named logger
    stops propagating to the root, so each record is written exactly once.
    """
    if isinstance(level, str) and level.upper() in _LEVELS:
        numeric = getattr(logging, level.upper())
    elif isinstance(level, int) and not isinstance(level, bool) and level >= 0:
        numeric = level
    else:
        raise ConfigError("log_level", level, _LEVELS)
    target = logging.getLogger(logger)
    for old in [h for h in target.handlers if getattr(h, "_fedmosaic", False)]:
        target.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler._fedmosaic = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler.addFilter(RedactSecrets())
    target.addHandler(handler)
    target.setLevel(numeric)
    if logger:
        target.propagate = False
    if capture_uncaught if capture_uncaught is not None else not logger:
        _install_exception_hooks(logger)
    return target
