"""The latest problem of each client, for the operator (``fedmosaic status``, Prometheus).

"1 clients failed" tells an operator nothing. Whenever a client is turned away or leaves a
task unfinished the transport records why, per client: incompatible data or model at join
(``fedmosaic.compat`` codes), a task the client refused or could not run (the
``TaskRefusal`` codes of ``fedmosaic.net.wire.REFUSAL_CODES``: its privacy policy,
``training_failed``, ``evaluation_failed``, ``no_test_data``, ``incompatible_data``), an update
or evaluation report the server rejected, or a client dropped from a round (deadline, lost
heartbeat, reconnected). Only the latest issue per client is kept, and at most ``capacity``
clients (the least recently troubled are forgotten first), so memory stays bounded whatever
the number of clients or how often they fail. Codes come from a fixed set (``ISSUE_CODES``):
they label metrics; the reason text is checked printable and bounded before it is kept.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from fedmosaic.compat import INCOMPATIBILITY_CODES
from fedmosaic.net.wire import REFUSAL_CODES, printable_reason

# Issues the server itself finds besides the join check and the clients' refusals.
SERVER_ISSUE_CODES: tuple[str, ...] = (
    "rejected_update",      # the client's update failed validation
    "rejected_evaluation",  # the client's evaluation report failed validation
    "deadline",             # missed the round's (or evaluation's) deadline
    "heartbeat_timeout",    # went silent during a task
    "disconnected",         # rejoined during a task (restarted or reconnected)
    "stalled",              # its upload waited too long for its next message (cut)
)
ISSUE_CODES: tuple[str, ...] = tuple(dict.fromkeys(
    (*INCOMPATIBILITY_CODES, *REFUSAL_CODES, *SERVER_ISSUE_CODES)))
# Codes that mean "the server refused the client" or "the client refused its task": counted
# in ``clients_refused_total``; drops (deadline, heartbeat, reconnection) are counted in
# ``clients_dropped_total`` instead.
REFUSAL_ISSUE_CODES: tuple[str, ...] = tuple(c for c in ISSUE_CODES if c not in (
    "deadline", "heartbeat_timeout", "disconnected", "stalled"))
MAX_ISSUES = 1000


@dataclass(frozen=True)
class ClientIssue:
    """Why ``client_id`` was turned away or gave up: ``code`` (one of ``ISSUE_CODES``),
    ``reason`` (one printable line), the ``round`` (0: at join) and when (monotonic)."""

    client_id: str
    code: str
    reason: str
    round: int
    at: float


class IssueBoard:
    """The latest ``ClientIssue`` of each client (thread-safe, bounded); see the module."""

    def __init__(self, capacity: int = MAX_ISSUES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1:
            raise ValueError("IssueBoard needs capacity >= 1")
        self.capacity, self.clock = capacity, clock
        self._issues: OrderedDict[str, ClientIssue] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, client_id: str, code: str, reason: str, round_num: int) -> ClientIssue:
        """Keep ``reason`` as ``client_id``'s latest issue (replacing an older one)."""
        if code not in ISSUE_CODES:
            raise ValueError(f"unknown client issue code {code!r}")
        issue = ClientIssue(client_id, code, printable_reason(reason), int(round_num),
                            self.clock())
        with self._lock:
            self._issues.pop(client_id, None)
            self._issues[client_id] = issue
            while len(self._issues) > self.capacity:
                self._issues.popitem(last=False)
        return issue

    def clear(self, client_id: str, codes: tuple[str, ...] | None = None) -> None:
        """Forget ``client_id``'s issue (only if its code is one of ``codes``, if given)."""
        with self._lock:
            issue = self._issues.get(client_id)
            if issue is not None and (codes is None or issue.code in codes):
                del self._issues[client_id]

    def get(self, client_id: str) -> ClientIssue | None:
        with self._lock:
            return self._issues.get(client_id)

    def latest(self) -> list[ClientIssue]:
        """Every kept issue, sorted by client id."""
        with self._lock:
            return sorted(self._issues.values(), key=lambda i: i.client_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._issues)
