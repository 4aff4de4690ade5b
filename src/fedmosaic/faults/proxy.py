"""A local TCP fault proxy: sits between clients and a server on 127.0.0.1 and, switchable at
run time for every connection or for one, delays, throttles, drops (stops forwarding one
direction, the connection kept open), cuts (FIN or RST, now or after N bytes) and refuses
connections. asyncio in a background thread, standard library only.

It works at the TCP stream level, as a network fault seen from the endpoints does: TLS and
HTTP/2 pass through untouched, so a fault never corrupts bytes. A *drop* is a partition, not
packet loss: the bytes of the dropped direction are held (not read, so TCP backpressure
builds), and forwarded intact once the drop is lifted, as TCP's retransmissions deliver them
after a network heals. To lose the connection as well, *cut* it.

Bounded: every connection lives at most ``max_connection_seconds``; a pump moves at most
``max_chunks`` reads; a held (dropped) direction is re-checked every 20 ms until lifted,
cut, or that lifetime ends; ``stop`` gives the loop ``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Direction = Literal["up", "down"]  # up: client -> server; down: server -> client
_POLL = 0.02  # seconds between checks of a held (dropped) direction


@dataclass(frozen=True)
class Fault:
    """What the proxy does to a connection. ``delay``: seconds slept before forwarding each
    chunk (each read, at most ``chunk_bytes``); ``rate``: bytes per second per direction,
    paced in reads of at most 50 ms worth of bytes, so that a message trickles in as over a
    slow link (``None``: unthrottled); ``rate_up`` / ``rate_down``: the same for one direction
    (``None``: ``rate``); ``drop_up`` / ``drop_down``: hold that direction;
    ``cut_after``: close the connection with a reset once it has forwarded this many bytes
    (both directions together; ``None``: never)."""

    delay: float = 0.0
    rate: float | None = None
    rate_up: float | None = None
    rate_down: float | None = None
    drop_up: bool = False
    drop_down: bool = False
    cut_after: int | None = None

    def __post_init__(self) -> None:
        if self.delay < 0:
            raise ValueError(f"Fault.delay must be >= 0 seconds, got {self.delay}")
        for name in ("rate", "rate_up", "rate_down"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"Fault.{name} must be > 0 bytes/s or None, got {value}")
        if self.cut_after is not None and self.cut_after < 0:
            raise ValueError(f"Fault.cut_after must be >= 0 bytes or None, got {self.cut_after}")

    def drops(self, direction: Direction) -> bool:
        return self.drop_up if direction == "up" else self.drop_down

    def rate_of(self, direction: Direction) -> float | None:
        own = self.rate_up if direction == "up" else self.rate_down
        return own if own is not None else self.rate


NO_FAULT = Fault()


@dataclass
class Connection:
    """One proxied connection: its id (1, 2, ... in accept order), the client's address, the
    bytes forwarded each way, and how it ended."""

    id: int
    peer: str
    opened: float
    bytes_up: int = 0
    bytes_down: int = 0
    closed: float | None = None
    ended_by: str = ""  # "", "eof", "cut", "reset", "lifetime", "upstream_refused", "stop"
    fault: Fault | None = None  # this connection's own fault (overrides the global one)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list, repr=False)
    _done: asyncio.Event | None = field(default=None, repr=False)

    @property
    def forwarded(self) -> int:
        return self.bytes_up + self.bytes_down

    def snapshot(self) -> Connection:
        return replace(self, _writers=[], _done=None)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed host or a middlebox does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """Forward ``127.0.0.1:port`` to ``target`` with faults that can change while it runs.

    >>> with FaultProxy(("127.0.0.1", server_port)) as proxy:   # doctest: +SKIP
    ...     proxy.set_fault(Fault(delay=0.05))                    # every connection
    ...     proxy.cut()                                           # reset all open ones now
    ...     proxy.refuse(True)                                    # reset new ones at once

    Thread-safe: the control methods may be called from any thread.
    """

    def __init__(self, target: tuple[str, int], *, host: str = "127.0.0.1", port: int = 0,
                 chunk_bytes: int = 64 * 1024, max_connections: int = 256,
                 max_connection_seconds: float = 900.0, max_chunks: int = 10_000_000,
                 connect_timeout: float = 5.0) -> None:
        if chunk_bytes < 1 or max_connections < 1 or max_chunks < 1:
            raise ValueError("chunk_bytes, max_connections and max_chunks must be >= 1")
        if max_connection_seconds <= 0 or connect_timeout <= 0:
            raise ValueError("max_connection_seconds and connect_timeout must be > 0")
        self.target = target
        self.host, self._port = host, port
        self.chunk_bytes = chunk_bytes
        self.max_connections = max_connections
        self.max_connection_seconds = max_connection_seconds
        self.max_chunks = max_chunks
        self.connect_timeout = connect_timeout
        self._fault = NO_FAULT
        self._refusing = False
        self._lock = threading.Lock()
        self._conns: dict[int, Connection] = {}
        self._history: list[Connection] = []  # closed connections, as they ended
        self._ids = itertools.count(1)
        self._counts = {"accepted": 0, "refused": 0, "cut": 0, "over_limit": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # --- life cycle ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._ready.is_set():
            raise RuntimeError("the proxy is not started")
        return self._port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the proxy did not start listening within {timeout}s")
        if self._error is not None:
            raise RuntimeError(f"the proxy could not listen: {self._error}") from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            with contextlib.suppress(RuntimeError, TimeoutError, asyncio.TimeoutError):
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(asyncio.start_server(
                self._handle, self.host, self._port, backlog=self.max_connections))
            self._port = self._server.sockets[0].getsockname()[1]
        except OSError as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(asyncio.wait_for(
                    asyncio.gather(*pending, return_exceptions=True), 2.0))
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            self._end(conn, "stop", reset=True)
        # Let the handlers see their connections ended and return (bounded), rather than
        # cancelling them mid-await.
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if handlers:
            await asyncio.wait(handlers, timeout=2.0)

    # --- control (any thread) --------------------------------------------------------------

    def set_fault(self, fault: Fault, conn: int | None = None) -> None:
        """The fault for every connection (``conn`` None: open ones without their own fault,
        and new ones), or for connection ``conn`` only."""
        with self._lock:
            if conn is None:
                self._fault = fault
            else:
                self._connection(conn).fault = fault

    def clear(self, conn: int | None = None) -> None:
        """No fault: globally (and every connection's own fault is removed), or for one."""
        with self._lock:
            if conn is None:
                self._fault = NO_FAULT
                for c in self._conns.values():
                    c.fault = None
            else:
                self._connection(conn).fault = None

    def refuse(self, on: bool = True) -> None:
        """Reset new connections at once (counted as ``refused``) while ``on``."""
        self._refusing = on

    def cut(self, conn: int | None = None, *, reset: bool = True, timeout: float = 5.0) -> int:
        """Close open connections now (all, or ``conn``): with an RST, or a FIN when not
        ``reset``. Returns how many were cut."""
        loop = self._loop
        if loop is None or not loop.is_running():
            raise RuntimeError("the proxy is not running")

        async def cut_now() -> int:
            targets = [c for c in self._conns.values() if conn is None or c.id == conn]
            for c in targets:
                self._end(c, "cut" if not reset else "reset", reset=reset)
            return len(targets)

        return asyncio.run_coroutine_threadsafe(cut_now(), loop).result(timeout)

    def connections(self, open_only: bool = False) -> list[Connection]:
        """Copies of the connections so far (open ones only if ``open_only``), by id."""
        with self._lock:
            conns = [c.snapshot() for c in self._conns.values()]
            history = list(self._history)
        merged = {c.id: c for c in [*history, *conns]}
        out = [merged[k] for k in sorted(merged)]
        return [c for c in out if c.closed is None] if open_only else out

    def stats(self) -> dict[str, int]:
        """Connections accepted, refused, cut (by ``cut`` or ``cut_after``), turned away over
        ``max_connections``, open now, and bytes forwarded each way (all connections)."""
        conns = self.connections()
        with self._lock:
            counts = dict(self._counts)
        return {**counts, "open": sum(c.closed is None for c in conns),
                "bytes_up": sum(c.bytes_up for c in conns),
                "bytes_down": sum(c.bytes_down for c in conns)}

    def wait_for(self, predicate: Any, timeout: float) -> bool:
        """Poll ``predicate(self)`` every 20 ms for at most ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate(self):
                return True
            time.sleep(_POLL)
        return bool(predicate(self))

    # --- the loop's side -------------------------------------------------------------------

    def _connection(self, conn: int) -> Connection:
        try:
            return self._conns[conn]
        except KeyError:
            raise KeyError(f"no open connection {conn} (open: {sorted(self._conns)})") from None

    def _fault_of(self, conn: Connection) -> Fault:
        return conn.fault if conn.fault is not None else self._fault

    def _end(self, conn: Connection, why: str, *, reset: bool) -> None:
        if conn.closed is not None:
            return
        conn.closed = time.monotonic()
        conn.ended_by = why
        if why in ("cut", "reset"):
            with self._lock:
                self._counts["cut"] += 1
        for writer in conn._writers:
            if reset:
                _reset(writer)
            else:
                with contextlib.suppress(Exception):
                    writer.close()
        if conn._done is not None:
            conn._done.set()
        with self._lock:
            self._conns.pop(conn.id, None)
            self._history.append(conn.snapshot())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        with self._lock:
            full = len(self._conns) >= self.max_connections
            if self._refusing or full:
                self._counts["refused" if self._refusing else "over_limit"] += 1
        if self._refusing or full:
            _reset(writer)
            return
        conn = Connection(id=next(self._ids), peer=f"{peer[0]}:{peer[1]}" if peer else "?",
                          opened=time.monotonic(), _writers=[writer], _done=asyncio.Event())
        with self._lock:
            self._conns[conn.id] = conn
            self._counts["accepted"] += 1
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.target), self.connect_timeout)
        except (OSError, asyncio.TimeoutError):
            self._end(conn, "upstream_refused", reset=True)
            return
        conn._writers.append(up_writer)
        if conn.closed is not None:  # cut while connecting
            _reset(up_writer)
            return
        assert conn._done is not None
        pumps = [asyncio.ensure_future(self._pump(conn, reader, up_writer, "up")),
                 asyncio.ensure_future(self._pump(conn, up_reader, writer, "down"))]
        left = conn.opened + self.max_connection_seconds - time.monotonic()
        done_waiter = asyncio.ensure_future(conn._done.wait())
        await asyncio.wait([asyncio.gather(*pumps), done_waiter], timeout=max(0.0, left),
                           return_when=asyncio.FIRST_COMPLETED)
        if conn.closed is None:
            both_done = all(p.done() for p in pumps)
            self._end(conn, "eof" if both_done else "lifetime", reset=not both_done)
        for task in (*pumps, done_waiter):
            task.cancel()
        await asyncio.gather(*pumps, done_waiter, return_exceptions=True)

    async def _pump(self, conn: Connection, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, direction: Direction) -> None:
        """Forward one direction until EOF, a cut, or the connection's lifetime."""
        deadline = conn.opened + self.max_connection_seconds
        for _ in range(self.max_chunks):
            # A dropped direction is held before reading (the bytes wait in the socket) and,
            # when the drop began during the read, with the chunk read (forwarded intact later).
            if not await self._held(conn, direction, deadline):
                return
            rate = self._fault_of(conn).rate_of(direction)
            # Throttled, a read takes at most 50 ms worth of bytes, so that a message trickles
            # in as over a slow link instead of passing whole and then waiting.
            size = self.chunk_bytes if rate is None else max(1, min(self.chunk_bytes,
                                                                     int(rate * _POLL * 2.5)))
            try:
                data = await reader.read(size)
            except (ConnectionError, OSError):
                data = b""
            if data and not await self._held(conn, direction, deadline):
                return
            if not data:
                with contextlib.suppress(Exception):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            fault = self._fault_of(conn)
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if (rate := fault.rate_of(direction)) is not None:  # time on the throttled link
                await asyncio.sleep(len(data) / rate)
            if fault.cut_after is not None and conn.forwarded + len(data) >= fault.cut_after:
                data = data[:max(0, fault.cut_after - conn.forwarded)]
                if data:
                    self._count(conn, direction, len(data))
                    writer.write(data)
                    with contextlib.suppress(Exception):
                        await writer.drain()
                self._end(conn, "reset", reset=True)
                return
            if conn.closed is not None:
                return
            self._count(conn, direction, len(data))
            writer.write(data)
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                return
            if time.monotonic() > deadline:
                return

    async def _held(self, conn: Connection, direction: Direction, deadline: float) -> bool:
        """Wait while ``direction`` is dropped; False if the connection ended meanwhile or its
        lifetime is over."""
        while self._fault_of(conn).drops(direction) and conn.closed is None:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(_POLL)
        return conn.closed is None

    def _count(self, conn: Connection, direction: Direction, n: int) -> None:
        if direction == "up":
            conn.bytes_up += n
        else:
            conn.bytes_down += n

