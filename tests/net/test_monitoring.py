"""Server metrics (Prometheus endpoint, bounded labels) and structured, redacted logs."""

from __future__ import annotations

import base64
import io
import json
import logging
import random
import socket
import urllib.request

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from fedmosaic.core.errors import ConfigError
from fedmosaic.net.monitoring import (
    DROP_REASONS,
    REJECT_REASONS,
    ServerMetrics,
    bounded_label,
    configure_logging,
    redact,
)


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_endpoint_serves_this_registry() -> None:
    m = ServerMetrics()
    m.round_started(1)
    m.round_completed({"round": 1, "wall_time": 0.4, "updates": 3, "test_accuracy": 0.5})
    m.round_started(2)
    m.round_completed({"round": 2, "wall_time": 3.0, "updates": 2})
    m.set_connected_clients(7)
    m.bytes_in(1000)
    m.bytes_in(24)
    m.bytes_out(4096)
    m.client_dropped("deadline")
    m.refused("wrong_round")
    m.refused("wrong_round")
    m.refused("non_finite")
    assert m.port is None
    port = m.start_http(0)
    try:
        assert port > 0 and m.port == port
        got = _scrape(port)
    finally:
        m.stop_http()
    assert m.port is None
    assert got[("fedmosaic_rounds_completed_total", ())] == 2
    assert got[("fedmosaic_current_round", ())] == 2
    assert got[("fedmosaic_connected_clients", ())] == 7
    assert got[("fedmosaic_received_bytes_total", ())] == 1024
    assert got[("fedmosaic_sent_bytes_total", ())] == 4096
    assert got[("fedmosaic_updates_accepted_total", ())] == 5
    assert got[("fedmosaic_round_duration_seconds_count", ())] == 2
    assert got[("fedmosaic_round_duration_seconds_sum", ())] == pytest.approx(3.4)
    assert got[("fedmosaic_round_duration_seconds_bucket", (("le", "0.5"),))] == 1
    assert got[("fedmosaic_round_duration_seconds_bucket", (("le", "5.0"),))] == 2
    assert got[("fedmosaic_clients_dropped_total", (("reason", "deadline"),))] == 1
    assert got[("fedmosaic_rejected_messages_total", (("reason", "wrong_round"),))] == 2
    assert got[("fedmosaic_rejected_messages_total", (("reason", "non_finite"),))] == 1
    # Every reason is exported from the start, at zero.
    assert got[("fedmosaic_rejected_messages_total", (("reason", "replay"),))] == 0
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # stopped: nothing listens any more


def test_two_servers_in_one_process_do_not_share_metrics() -> None:
    a, b = ServerMetrics(), ServerMetrics()
    a.refused("malformed")
    pa, pb = a.start_http(0), b.start_http(0)
    try:
        assert pa != pb
        key = ("fedmosaic_rejected_messages_total", (("reason", "malformed"),))
        assert _scrape(pa)[key] == 1 and _scrape(pb)[key] == 0
        with pytest.raises(RuntimeError, match="already running"):
            a.start_http(0)
    finally:
        a.stop_http()
        b.stop_http()
    a.stop_http()  # idempotent


def test_snapshot_matches_and_is_json() -> None:
    m = ServerMetrics()
    m.round_completed({"round": 4, "wall_time": 1.5, "updates": 6})
    m.bytes_out(10)
    m.client_dropped("heartbeat_timeout")
    m.refused("replay")
    snap = json.loads(json.dumps(m.snapshot()))
    assert snap["rounds_completed"] == 1 and snap["current_round"] == 4
    assert snap["updates_accepted"] == 6
    assert snap["bytes_out"] == 10 and snap["bytes_in"] == 0
    assert snap["round_duration_seconds"] == {"count": 1, "sum": 1.5}
    assert snap["clients_dropped"]["heartbeat_timeout"] == 1
    assert snap["rejected_messages"]["replay"] == 1
    assert set(snap["rejected_messages"]) == set(REJECT_REASONS)
    assert set(snap["clients_dropped"]) == set(DROP_REASONS)


@settings(max_examples=200, deadline=None)
@given(reasons=st.lists(st.one_of(st.text(max_size=30), st.integers(), st.none()), max_size=20))
def test_label_cardinality_is_bounded(reasons: list[object]) -> None:
    m = ServerMetrics()
    for r in reasons:
        label = m.refused(r)  # type: ignore[arg-type]
        assert label in REJECT_REASONS
        assert label == (r if r in REJECT_REASONS else "other")
        assert m.client_dropped(r) in DROP_REASONS  # type: ignore[arg-type]
    series = {s.labels["reason"] for fam in m.registry.collect()
              if fam.name == "fedmosaic_rejected_messages" for s in fam.samples
              if s.name.endswith("_total")}
    assert series == set(REJECT_REASONS)
    unknown = sum(1 for r in reasons if r not in REJECT_REASONS)
    assert m.snapshot()["rejected_messages"]["other"] == unknown


def test_bounded_label_and_custom_reasons() -> None:
    assert bounded_label("x", ("x",)) == "x"
    assert bounded_label("X", ("x",)) == "other"
    m = ServerMetrics(reject_reasons=["too_big"], drop_reasons=["late"])
    assert m.reject_reasons == ("too_big", "other") and m.drop_reasons == ("late", "other")
    assert m.refused("wrong_round") == "other"
    with pytest.raises(ConfigError, match="reject_reasons"):
        ServerMetrics(reject_reasons=["Bad Label"])
    with pytest.raises(ConfigError, match="drop_reasons"):
        ServerMetrics(drop_reasons=[])


@pytest.mark.parametrize("call", [
    lambda m: m.bytes_in(-1), lambda m: m.bytes_out(1.5), lambda m: m.bytes_in(True),
    lambda m: m.round_completed({"round": 1, "wall_time": float("nan")}),
    lambda m: m.round_completed({"round": -1, "wall_time": 1.0}),
    lambda m: m.round_completed({"wall_time": 1.0}), lambda m: m.round_completed([1, 2.0]),
    lambda m: m.set_connected_clients(-3), lambda m: m.start_http(70000),
    lambda m: m.start_http("80"),
])
def test_invalid_inputs_are_refused(call) -> None:
    m = ServerMetrics()
    with pytest.raises(ConfigError):
        call(m)
    assert m.snapshot()["bytes_in"] == 0 and m.snapshot()["rounds_completed"] == 0


# --- structured logs ---------------------------------------------------------------------------

@pytest.fixture
def json_log():
    stream = io.StringIO()
    logger = configure_logging("DEBUG", json=True, stream=stream, logger="fedmosaic.test_mon")
    yield logger, stream
    for h in list(logger.handlers):
        logger.removeHandler(h)


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_extra_fields(json_log) -> None:
    logger, stream = json_log
    logger.info("round %d closed", 3, extra={"round": 3, "client": "hospital-a", "bytes": 1024})
    logger.getChild("server").warning("multi\nline", extra={"level": "spoof", "shape": (2, 3)})
    logger.debug("debug shows at DEBUG")
    first, second, third = _lines(stream)
    assert first["message"] == "round 3 closed" and first["level"] == "INFO"
    assert first["logger"] == "fedmosaic.test_mon"
    assert (first["round"], first["client"], first["bytes"]) == (3, "hospital-a", 1024)
    assert first["timestamp"].endswith("+00:00") and "T" in first["timestamp"]
    # A newline in a message stays inside one JSON line; an extra cannot overwrite a core field.
    assert second["message"] == "multi\nline" and second["level"] == "WARNING"
    assert second["extra_level"] == "spoof" and second["shape"] == [2, 3]
    assert second["logger"] == "fedmosaic.test_mon.server"
    assert third["level"] == "DEBUG"


def test_configure_logging_is_idempotent_and_validates(json_log) -> None:
    logger, _ = json_log
    stream = io.StringIO()
    again = configure_logging("WARNING", stream=stream, logger="fedmosaic.test_mon")
    assert again is logger
    assert sum(getattr(h, "_fedmosaic", False) for h in logger.handlers) == 1
    logger.info("hidden")
    logger.error("shown")
    assert [r["message"] for r in _lines(stream)] == ["shown"]
    with pytest.raises(ConfigError, match="log_level"):
        configure_logging("LOUD", logger="fedmosaic.test_mon")


def test_root_logger_by_default_catches_library_records() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    try:
        configure_logging("WARNING", stream=stream, capture_uncaught=False)
        # gRPC logs through its own logger (with only a NullHandler attached).
        logging.getLogger("grpc._common").error("Exception deserializing message! %s",
                                                "ab" * 20)
        logging.getLogger("fedmosaic.net.service").info("below the level")
    finally:
        for h in [h for h in root.handlers if h not in saved_handlers]:
            root.removeHandler(h)
        root.setLevel(saved_level)
    (line,) = _lines(stream)
    assert line["logger"] == "grpc._common" and line["level"] == "ERROR"
    assert line["message"] == "Exception deserializing message! [REDACTED]"


def test_text_format(json_log) -> None:
    logger, _ = json_log
    stream = io.StringIO()
    configure_logging("INFO", json=False, stream=stream, logger="fedmosaic.test_mon")
    logger.info("hello", extra={"round": 2})
    line = stream.getvalue().strip()
    assert line.endswith("INFO fedmosaic.test_mon: hello round=2")


def _pem_key() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def test_redaction_in_messages_extras_and_tracebacks(json_log) -> None:
    logger, stream = json_log
    pem = _pem_key().strip()
    body = pem.splitlines()[1]
    secret_hex = "9f" * 20 + "a1b2c3d4e5f60718"
    logger.info("loaded key %s", pem, extra={"key": pem, "token": secret_hex,
                                             "nested": {"k": [pem]}, "raw": b"\x00\x01"})
    try:
        raise ValueError(f"bad key {secret_hex}")
    except ValueError:
        logger.exception("failed")
    text = stream.getvalue()
    assert "PRIVATE KEY" not in text and body not in text and secret_hex not in text
    first, second = _lines(stream)
    assert first["message"] == "loaded key [REDACTED PEM]"
    assert first["key"] == "[REDACTED PEM]" and first["nested"] == {"k": ["[REDACTED PEM]"]}
    assert first["token"] == "[REDACTED]" and first["raw"] == "<2 bytes>"
    assert "ValueError: bad key [REDACTED]" in second["exception"]


CRASH = """
import threading
from fedmosaic.net.monitoring import configure_logging

configure_logging("INFO", json=True)
SECRET = "9f2c4e7a1b3d5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4"


def check(key):
    raise RuntimeError("cannot use key " + key)


def work(pem):
    session_key = SECRET  # a local holding a key: Python never prints locals, nor may we
    check("9f2c4e7a1b3d5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4")  # source line


pem = open(__import__("sys").argv[1]).read()
thread = threading.Thread(target=work, args=(pem,), name="worker")
thread.start()
thread.join()
try:
    work(pem)
except RuntimeError as exc:
    exc.add_note("loaded from " + pem)
    raise ValueError("could not start") from exc
"""


def test_crash_traceback_is_one_redacted_json_record(tmp_path) -> None:
    """An uncaught exception (main thread and another thread), whose message, source line and
    note hold key material, reaches stderr only as redacted JSON records."""
    import subprocess
    import sys
    from pathlib import Path

    pem = _pem_key()
    (tmp_path / "key.pem").write_text(pem)
    secret = "9f2c4e7a1b3d5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4"
    script = tmp_path / "crash.py"  # a file, so that tracebacks quote its source lines
    script.write_text(CRASH)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "key.pem")],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    err = proc.stderr
    assert secret not in err and "PRIVATE KEY" not in err and pem.splitlines()[1] not in err
    records = [json.loads(line) for line in err.splitlines() if line.strip()]  # all JSON
    thread_rec, main_rec = [r for r in records if "exception" in r]
    assert thread_rec["level"] == "ERROR" and "thread worker" in thread_rec["message"]
    assert main_rec["level"] == "CRITICAL" and main_rec["message"].startswith("uncaught")
    assert "RuntimeError: cannot use key [REDACTED]" in thread_rec["exception"]
    tb = main_rec["exception"]
    assert tb.startswith("Traceback") and "ValueError: could not start" in tb
    assert 'check("[REDACTED]")' in tb  # the quoted source line
    assert "direct cause" in tb and "loaded from [REDACTED PEM]" in tb


def test_formatters_redact_even_without_the_filter() -> None:
    from fedmosaic.net.monitoring import JsonFormatter, TextFormatter

    secret = "ab" * 16 + "0123456789abcdef"
    logger = logging.getLogger("fedmosaic.test_mon.nofilter")
    logger.propagate = False
    streams = [io.StringIO(), io.StringIO()]
    handlers = [logging.StreamHandler(out) for out in streams]
    handlers[0].setFormatter(JsonFormatter())
    handlers[1].setFormatter(TextFormatter())
    for h in handlers:
        logger.addHandler(h)
    try:
        try:
            raise KeyError(secret)
        except KeyError:
            logger.exception("token %s", secret, stack_info=True)
    finally:
        for h in handlers:
            logger.removeHandler(h)
    for out in streams:
        assert secret not in out.getvalue() and "[REDACTED]" in out.getvalue()
    record = json.loads(streams[0].getvalue())
    assert record["message"] == "token [REDACTED]" and "KeyError" in record["exception"]


def test_redact_catches_random_secrets_and_keeps_ordinary_text() -> None:
    rng = random.Random(0)
    for _ in range(200):
        raw = rng.randbytes(32)
        for secret in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode(),
                       raw.hex(), "0x" + raw.hex().upper()):
            assert redact(f"token={secret};") == "token=[REDACTED];", secret
    truncated = _pem_key()[:120]  # a PEM block cut off before its END line
    assert redact(f"got {truncated}") == "got [REDACTED PEM]"
    ordinary = [
        "round 12 finished: 10 updates, 2 dropped, accuracy 0.8731",
        "/tmp/pytest-of-root/pytest-45/test_cli_never_prints_key_material0/federation/clients",
        "client hospital-a sent chunk at offset 1048576 of 25000000 (float32)",
        "serial 7f3a9c01 revoked",  # a short hex prefix stays readable
        "epoch 1795831111571142012345678901234567890",  # long decimals are not hex secrets
        "test_label_cardinality_is_bounded_with_a_long_identifier_name",
        "ConfigError: config key 'client_id': got '../x'",
    ]
    for text in ordinary:
        assert redact(text) == text


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=16, max_size=64))
def test_redact_masks_any_hex_key_with_a_letter(raw: bytes) -> None:
    secret = raw.hex()
    out = redact(f"k={secret}")
    if any(c in "abcdef" for c in secret):
        assert secret not in out
    else:  # all digits: indistinguishable from a number, and left alone
        assert out == f"k={secret}"


def test_non_loopback_endpoint_warns(caplog: pytest.LogCaptureFixture) -> None:
    m = ServerMetrics()
    with caplog.at_level(logging.WARNING, logger="fedmosaic.net.monitoring"):
        port = m.start_http(0, addr="0.0.0.0")
    try:
        assert _scrape(port)[("fedmosaic_rounds_completed_total", ())] == 0
    finally:
        m.stop_http()
    assert any("non-loopback" in r.getMessage() for r in caplog.records)
