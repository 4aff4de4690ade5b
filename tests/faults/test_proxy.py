"""The TCP fault proxy (``fedmosaic.faults.proxy``) against a plain echo server: it forwards
byte for byte, and each fault does what it says, switched at run time, for every connection or
one, with its counters equal to what passed."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from fedmosaic.faults.proxy import Fault, FaultProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(10)
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server.server_address[:2]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(echo: tuple[str, int]) -> Iterator[FaultProxy]:
    with FaultProxy(echo, chunk_bytes=4096) as p:
        yield p


def _dial(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)


def _echo_back(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        part = sock.recv(65536)
        if not part:
            break
        got += part
    return got


def test_forwards_byte_for_byte_and_counts(proxy: FaultProxy) -> None:
    payload = bytes(range(256)) * 400  # 102,400 bytes: many chunks
    with _dial(proxy) as sock:
        assert _echo_back(sock, payload) == payload
    assert proxy.wait_for(lambda p: p.stats()["open"] == 0, 5)
    stats = proxy.stats()
    assert stats["accepted"] == 1 and stats["refused"] == 0 and stats["cut"] == 0
    assert stats["bytes_up"] == stats["bytes_down"] == len(payload)
    (conn,) = proxy.connections()
    assert conn.id == 1 and conn.ended_by == "eof" and conn.peer.startswith("127.0.0.1:")


def test_delay_is_added_per_chunk_and_can_be_lifted(proxy: FaultProxy) -> None:
    with _dial(proxy) as sock:
        started = time.monotonic()
        assert _echo_back(sock, b"ping") == b"ping"
        fast = time.monotonic() - started
        proxy.set_fault(Fault(delay=0.2))
        started = time.monotonic()
        assert _echo_back(sock, b"ping") == b"ping"
        slow = time.monotonic() - started
        proxy.clear()
        started = time.monotonic()
        assert _echo_back(sock, b"ping") == b"ping"
        lifted = time.monotonic() - started
    assert slow >= 0.4 > fast  # one chunk each way, 0.2 s each
    assert lifted < 0.2


def test_throttle_limits_the_rate(proxy: FaultProxy) -> None:
    proxy.set_fault(Fault(rate=100_000))  # bytes/s per direction
    payload = b"x" * 40_000
    with _dial(proxy) as sock:
        started = time.monotonic()
        assert _echo_back(sock, payload) == payload
        took = time.monotonic() - started
    # 40 kB each way at 100 kB/s: at least 0.4 s (pipelined: the two directions overlap).
    assert took >= 0.35


def test_a_throttled_message_trickles_in(proxy: FaultProxy) -> None:
    """At 2,000 B/s a 1,000-byte message arrives in pieces over about 0.5 s, not whole after
    a wait: what a server reading messages from a slow link sees."""
    proxy.set_fault(Fault(rate=2_000))
    with _dial(proxy) as sock:
        started = time.monotonic()
        sock.sendall(b"z" * 1000)
        first = sock.recv(4096)
        got = first
        for _ in range(1000):  # bounded: at most one read per byte
            if len(got) >= 1000:
                break
            got += sock.recv(4096)
        took = time.monotonic() - started
    assert got == b"z" * 1000
    assert len(first) <= 200  # 50 ms worth of bytes at a time
    assert took >= 0.45


def test_one_direction_throttled(proxy: FaultProxy) -> None:
    proxy.set_fault(Fault(rate_up=2_000))
    with _dial(proxy) as sock:
        started = time.monotonic()
        assert _echo_back(sock, b"u" * 1000) == b"u" * 1000
        took = time.monotonic() - started
    assert took >= 0.45  # the way up: 1,000 bytes at 2,000 B/s
    with pytest.raises(ValueError, match="rate_down"):
        Fault(rate_down=0)


def test_drop_holds_one_direction_keeps_the_connection_and_delivers_after(
        proxy: FaultProxy) -> None:
    with _dial(proxy, timeout=0.5) as sock:
        assert _echo_back(sock, b"a") == b"a"
        proxy.set_fault(Fault(drop_down=True), conn=1)
        sock.sendall(b"held")
        with pytest.raises(socket.timeout):
            sock.recv(10)  # the echo came back to the proxy and stays there
        assert proxy.connections(open_only=True)[0].bytes_up == 5  # the request went through
        proxy.clear(conn=1)
        sock.settimeout(5)
        assert sock.recv(10) == b"held"  # intact: a partition, not corruption
    assert proxy.stats()["cut"] == 0


def test_drop_up_only_affects_the_chosen_connection(proxy: FaultProxy) -> None:
    with _dial(proxy, timeout=0.5) as one, _dial(proxy, timeout=5) as two:
        assert _echo_back(one, b"1") == b"1" and _echo_back(two, b"2") == b"2"
        proxy.set_fault(Fault(drop_up=True), conn=1)
        one.sendall(b"lost?")
        assert _echo_back(two, b"still") == b"still"
        with pytest.raises(socket.timeout):
            one.recv(10)
        assert [c.bytes_up for c in proxy.connections()] == [1, 1 + len(b"still")]


def test_cut_now_resets_open_connections(proxy: FaultProxy) -> None:
    with _dial(proxy) as sock:
        assert _echo_back(sock, b"hi") == b"hi"
        assert proxy.cut() == 1
        with pytest.raises(ConnectionResetError):
            for _ in range(50):  # bounded: the reset arrives within a few reads/writes
                sock.sendall(b"x")
                if not sock.recv(10):
                    raise ConnectionResetError("closed")
                time.sleep(0.02)
    assert proxy.stats()["cut"] == 1
    assert proxy.connections()[0].ended_by == "reset"


def test_cut_with_fin_closes_cleanly(proxy: FaultProxy) -> None:
    with _dial(proxy) as sock:
        assert _echo_back(sock, b"hi") == b"hi"
        proxy.cut(reset=False)
        assert sock.recv(10) == b""  # orderly end of stream
    assert proxy.connections()[0].ended_by == "cut"


def test_cut_after_n_bytes(proxy: FaultProxy) -> None:
    proxy.set_fault(Fault(cut_after=1000))
    with _dial(proxy) as sock:
        sock.sendall(b"y" * 600)
        got = b""
        with pytest.raises(ConnectionResetError):
            for _ in range(100):
                part = sock.recv(4096)
                if not part:
                    raise ConnectionResetError("closed")
                got += part
    (conn,) = proxy.connections()
    assert conn.forwarded == 1000 and conn.bytes_up == 600 and conn.bytes_down == 400
    assert got == b"y" * 400
    assert proxy.stats()["cut"] == 1


def test_refuse_new_connections_then_accept_again(proxy: FaultProxy) -> None:
    proxy.refuse(True)
    for _ in range(3):
        # The reset may come as soon as the connect (accepted, then reset at once).
        with pytest.raises((ConnectionResetError, BrokenPipeError)), _dial(proxy) as sock:
            sock.sendall(b"x")
            if not sock.recv(10):
                raise ConnectionResetError("closed")
    proxy.refuse(False)
    with _dial(proxy) as sock:
        assert _echo_back(sock, b"ok") == b"ok"
    stats = proxy.stats()
    assert stats["refused"] == 3 and stats["accepted"] == 1


def test_upstream_down_resets_the_client() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    dead = probe.getsockname()
    probe.close()  # nothing listens there now
    with FaultProxy(dead, connect_timeout=1.0) as proxy:
        with pytest.raises(ConnectionResetError), _dial(proxy) as sock:
            sock.recv(10)
        assert proxy.wait_for(lambda p: p.connections()
                              and p.connections()[0].ended_by == "upstream_refused", 5)


def test_lifetime_bound_ends_a_connection(echo: tuple[str, int]) -> None:
    with FaultProxy(echo, max_connection_seconds=0.3) as proxy, _dial(proxy) as sock:
        assert _echo_back(sock, b"x") == b"x"
        assert proxy.wait_for(lambda p: p.stats()["open"] == 0, 5)
        assert proxy.connections()[0].ended_by == "lifetime"


def test_bad_settings_are_refused_with_the_name() -> None:
    with pytest.raises(ValueError, match="delay"):
        Fault(delay=-1)
    with pytest.raises(ValueError, match="rate"):
        Fault(rate=0)
    with pytest.raises(ValueError, match="cut_after"):
        Fault(cut_after=-5)
    with pytest.raises(RuntimeError, match="not started"):
        _ = FaultProxy(("127.0.0.1", 1)).port


def test_stop_ends_everything_and_is_bounded(echo: tuple[str, int]) -> None:
    proxy = FaultProxy(echo).start()
    sock = _dial(proxy)
    assert _echo_back(sock, b"x") == b"x"
    proxy.set_fault(Fault(drop_up=True))
    sock.sendall(b"held")
    started = time.monotonic()
    proxy.stop()
    assert time.monotonic() - started < 5
    assert proxy.connections()[0].ended_by == "stop"
    sock.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
