"""Admission control: per-member budgets and reserved capacity for the federation's RPCs.

One authenticated member must not be able to stop the federation (issue #18): neither by
holding uploads open without sending (each pins an upload buffer and a handler), nor by
flooding long polls (each pins a handler until it returns). ``AdmissionControl`` decides,
before any blocking work, whether a call may run:

- a member (one certificate) has at most ``per_member`` calls in flight and at most one open
  upload; a call over that budget is refused at once (label ``over_budget``), never queued;
- of the server's ``capacity`` concurrent calls (its handler threads), the last ``reserved``
  are kept for members with nothing in flight (a newly arriving honest client) and for quick
  calls that never wait (a heartbeat), and the last one for the operator (``Status``), so a
  flood from others leaves room for them (refused otherwise: label ``busy``). This is trunk
  reservation in loss networks: admit a low-priority arrival only while more than
  ``reserved`` circuits are free (Kelly, "Loss networks", Ann. Appl. Probab. 1(3), 1991);
- a stream whose handler has waited longer than ``stream_idle`` seconds for the client (its
  next upload message, or the client taking the next download chunk) is cut (``stalled``),
  and the streams still waiting for their client are cut when the round closes (``late``).

This module is pure logic: no gRPC, no threads of its own. The clock and the lock are
injected (``time.monotonic`` and a ``threading.Lock`` in the threaded service; an event
loop's clock and ``contextlib.nullcontext()`` in an asyncio one), and cutting a stream is a
callback the transport registers (``ServicerContext.cancel`` today). The caller drives
``expire`` periodically (a watchdog thread, or an asyncio task) and calls ``cut_waiting``
when a round closes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

OVER_BUDGET = "over_budget"
BUSY = "busy"
STALLED = "stalled"
LATE = "late"


class AdmissionRefused(Exception):
    """A call refused before it ran: ``label`` is ``over_budget`` (the member's own budget)
    or ``busy`` (the capacity left is reserved for others); ``reason`` says which limit."""

    def __init__(self, label: str, reason: str) -> None:
        super().__init__(reason)
        self.label, self.reason = label, reason


class StreamCut(Exception):
    """The stream was cut by admission control: ``label`` ``stalled`` (idle too long) or
    ``late`` (its round closed while it was still waiting for the client)."""

    def __init__(self, label: str, reason: str) -> None:
        super().__init__(reason)
        self.label, self.reason = label, reason


@dataclass(frozen=True)
class AdmissionLimits:
    """``capacity``: calls the server runs at once (its handler threads); ``reserved``: the
    last of them, kept for members with nothing in flight and the operator (>= 2: one of
    them is the operator's alone); ``per_member``: calls one member may have in flight;
    ``stream_idle``: seconds a stream may wait for its client between two messages."""

    capacity: int
    reserved: int
    per_member: int
    stream_idle: float

    def __post_init__(self) -> None:
        if self.capacity < 3:
            raise ValueError(f"admission capacity must be >= 3, got {self.capacity}")
        if not 2 <= self.reserved < self.capacity:
            raise ValueError(f"reserved calls must be in [2, capacity - 1 = "
                             f"{self.capacity - 1}], got {self.reserved}")
        if self.per_member < 1:
            raise ValueError(f"calls in flight per member must be >= 1, got {self.per_member}")
        if not self.stream_idle > 0:
            raise ValueError(f"the stream idle timeout must be > 0 s, got {self.stream_idle}")


@dataclass(eq=False)
class Ticket:
    """One admitted call. ``released`` once its handler is done (``release`` is idempotent);
    a watched stream also has its cut callback, since when it waits for the client (None:
    not waiting) and why it was cut (None: not cut)."""

    member: str
    method: str
    upload: bool
    released: bool = False
    cut: Callable[[], Any] | None = None
    waiting_since: float | None = None
    cut_label: str | None = None
    cut_reason: str = ""

    def check(self) -> None:
        """Raise ``StreamCut`` if the stream has been cut."""
        if self.cut_label is not None:
            raise StreamCut(self.cut_label, self.cut_reason)


@dataclass
class _Member:
    in_flight: int = 0
    uploads: int = 0


class AdmissionControl:
    """Per-member budgets, reserved capacity and stream idle timeouts; see the module."""

    def __init__(self, limits: AdmissionLimits, *, clock: Callable[[], float] = time.monotonic,
                 lock: Any = None) -> None:
        self.limits = limits
        self.clock = clock
        self._lock = lock if lock is not None else threading.Lock()
        self._members: dict[str, _Member] = {}
        self._total = 0
        self._streams: set[Ticket] = set()

    # -- admission ------------------------------------------------------------------------
    def admit(self, member: str, method: str, *, operator: bool = False,
              upload: bool = False, quick: bool = False) -> Ticket:
        """A ticket for ``member``'s call to ``method``, or ``AdmissionRefused``. ``quick``:
        the call never waits (for a round, a stage or the client), so it may use the reserve
        like a member with nothing in flight."""
        lim = self.limits
        with self._lock:
            m = self._members.get(member)
            mine = m.in_flight if m is not None else 0
            if mine >= lim.per_member:
                raise AdmissionRefused(OVER_BUDGET, f"{mine} calls already in flight from this "
                                       f"member (at most {lim.per_member})")
            if upload and m is not None and m.uploads:
                raise AdmissionRefused(OVER_BUDGET, "an upload from this member is already "
                                       "open (at most one at a time)")
            # Trunk reservation: the general pool ends ``reserved`` calls short of capacity;
            # a member with nothing in flight, or a quick call, may use all but the last
            # call, the operator all of it.
            limit = lim.capacity if operator else \
                lim.capacity - 1 if mine == 0 or quick else lim.capacity - lim.reserved
            if self._total >= limit:
                raise AdmissionRefused(BUSY, f"server busy: {self._total} of {lim.capacity} "
                                       "calls in flight, the rest reserved for members with "
                                       "nothing in flight and the operator")
            if m is None:
                m = self._members[member] = _Member()
            m.in_flight += 1
            m.uploads += int(upload)
            self._total += 1
            return Ticket(member, method, upload)

    def release(self, ticket: Ticket) -> None:
        """The call is over (idempotent: a handler's exit and the RPC's end may both say so)."""
        with self._lock:
            if ticket.released:
                return
            ticket.released = True
            self._total -= 1
            m = self._members[ticket.member]
            m.in_flight -= 1
            m.uploads -= int(ticket.upload)
            self._streams.discard(ticket)
            if m.in_flight == 0:
                del self._members[ticket.member]  # memory bounded by the calls in flight

    # -- streams --------------------------------------------------------------------------
    def watch(self, ticket: Ticket, cut: Callable[[], Any]) -> None:
        """Watch ``ticket``'s stream; ``cut()`` ends it (called without the lock held)."""
        with self._lock:
            if ticket.released:
                return
            ticket.cut = cut
            self._streams.add(ticket)

    def awaiting_client(self, ticket: Ticket) -> None:
        """The handler now waits for the client (its next message, or to take ours)."""
        with self._lock:
            ticket.check()
            ticket.waiting_since = self.clock()

    def heard_from_client(self, ticket: Ticket) -> None:
        """The wait is over; raises ``StreamCut`` if the stream was cut meanwhile."""
        with self._lock:
            ticket.waiting_since = None
            ticket.check()

    def expire(self) -> list[Ticket]:
        """Cut every stream that has waited for its client longer than ``stream_idle``."""
        now, idle = self.clock(), self.limits.stream_idle
        with self._lock:
            cut = [t for t in self._streams if t.waiting_since is not None
                   and now - t.waiting_since > idle]
            for t in cut:
                self._mark(t, STALLED, f"stalled {t.method}: no progress from the client for "
                           f"{now - t.waiting_since:.1f}s (stream_idle_timeout {idle:g}s)")
        return self._run_cuts(cut)

    def cut_waiting(self, reason: str, methods: tuple[str, ...] | None = None) -> list[Ticket]:
        """Cut every stream (of ``methods``, default all) now waiting for its client, e.g.
        when the round closes: nothing it could still send would be accepted."""
        with self._lock:
            cut = [t for t in self._streams if t.waiting_since is not None
                   and (methods is None or t.method in methods)]
            for t in cut:
                self._mark(t, LATE, reason)
        return self._run_cuts(cut)

    def next_expiry(self) -> float | None:
        """When ``expire`` would next cut a stream (clock time), or None: nothing waits."""
        with self._lock:
            waits = [t.waiting_since for t in self._streams if t.waiting_since is not None]
        return min(waits) + self.limits.stream_idle if waits else None

    def _mark(self, ticket: Ticket, label: str, reason: str) -> None:
        ticket.cut_label, ticket.cut_reason = label, reason
        ticket.waiting_since = None
        self._streams.discard(ticket)

    @staticmethod
    def _run_cuts(tickets: list[Ticket]) -> list[Ticket]:
        for t in tickets:
            if t.cut is not None:
                with contextlib.suppress(Exception):  # the call may have just ended
                    t.cut()
        return tickets

    # -- reading --------------------------------------------------------------------------
    def in_flight(self, member: str | None = None) -> int:
        """Calls in flight in all (or of ``member``)."""
        with self._lock:
            if member is None:
                return self._total
            m = self._members.get(member)
            return m.in_flight if m is not None else 0

    def uploads(self, member: str) -> int:
        with self._lock:
            m = self._members.get(member)
            return m.uploads if m is not None else 0
