"""Simulated time for asynchronous and synchronous schedules (issue #11, item 4).

Two pieces, both free of wall-clock time and of any global random state:

``ClientTimingModel``
    How long client ``c``'s ``n``-th task takes in simulated seconds: compute time plus
    network time. Each client's compute speed is drawn once from a lognormal distribution,
    as in the FedBuff evaluation (Nguyen et al. 2022, "Federated Learning with Buffered
    Asynchronous Aggregation", AISTATS: client durations lognormal) and FedScale's device
    model (Lai et al. 2022, ICML), optionally with per-task lognormal jitter; the network
    moves the model down and the update up over a per-client (lognormal) bandwidth plus a
    fixed latency each way. Clients may be available only in periodic windows (a random phase
    per client) or in the intervals of a trace file, which also replaces the speed draws.

``VirtualClock``
    The simulated time of a run and its queue of pending events, ordered by time and, for
    equal times, by the order they were scheduled; its state is plain data, so a checkpoint
    can carry it.

Determinism: every draw is a pure function of (seed, client id, task index). Per-client
values come from a numpy ``Generator`` seeded by ``SeedSequence([seed, H(client_id), stream])``
(``H`` a 64-bit BLAKE2b of the id, not Python's salted ``hash``), so a client's speed does not
depend on the order clients are asked in nor on which other clients exist. The per-task
jitter is a standard normal deviate obtained by Box-Muller from a BLAKE2b digest of
(seed, H(client_id), task index): building one numpy ``Generator`` per task costs ~13 us,
a digest ~0.4 us, and the simulator must time hundreds of thousands of tasks per second.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmosaic.config import CLIENT_ID, CLOCK_DEFAULTS, Experiment
from fedmosaic.core.errors import ConfigError

#: Units ``compute_median`` is counted in: seconds per training sample processed, or per
#: local optimizer step.
COMPUTE_UNITS = ("sample", "step")
#: Defaults of a ``[clock]`` table's keys: config.CLOCK_DEFAULTS (filled in by
#: config._check_clock when the table is given, so they are part of that run's identity).
DEFAULTS: dict[str, Any] = {**CLOCK_DEFAULTS, "bandwidth_sigma": 1.0}
TRACE_COLUMNS = ("client_id", "speed", "bandwidth_mbps", "available")
TRACE_FORMAT = "client_id,speed[,bandwidth_mbps][,available]"

# Independent draws of one client: separate SeedSequence streams.
_STREAM_CLIENT = 0
_TWO_PI = 2.0 * math.pi
_INV_2_53 = 1.0 / float(1 << 53)
_JITTER_PERSON = b"fedmosaic-jit"


def client_key(client_id: str) -> int:
    """A stable 64-bit integer for ``client_id`` (Python's ``hash`` of a str is salted per
    process, so it cannot seed anything reproducible)."""
    return int.from_bytes(hashlib.blake2b(client_id.encode("utf-8"), digest_size=8).digest(),
                          "little")


def _task_normal(seed: int, key: int, task_index: int) -> float:
    """A standard normal deviate, a pure function of (seed, client key, task index)."""
    digest = hashlib.blake2b(f"{seed}:{key}:{task_index}".encode(), digest_size=16,
                             person=_JITTER_PERSON).digest()
    a = int.from_bytes(digest[:8], "little") >> 11
    b = int.from_bytes(digest[8:], "little") >> 11
    u1 = (a + 1) * _INV_2_53  # in (0, 1]: log(u1) is finite
    u2 = b * _INV_2_53
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(_TWO_PI * u2)


@dataclass(frozen=True)
class TraceRow:
    """One client of a trace file: its relative ``speed`` (2.0: twice as fast as
    ``compute_median``), optionally its bandwidth and its online intervals (sorted, disjoint,
    ``[start, end)`` in simulated seconds; None: always online)."""

    speed: float
    bandwidth_mbps: float | None = None
    available: tuple[tuple[float, float], ...] | None = None


@dataclass(frozen=True)
class Trace:
    """A parsed trace file: ``rows`` by client id, and which optional columns it had."""

    rows: dict[str, TraceRow]
    has_bandwidth: bool
    has_availability: bool


def _trace_error(path: Path, line: int | None, problem: str) -> ConfigError:
    where = f"line {line}: " if line is not None else ""
    return ConfigError("clock.trace", str(path),
                       f"a trace CSV with header {TRACE_FORMAT} ({where}{problem})")


def _positive(text: str, what: str, path: Path, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _trace_error(path, line, f"{what} {text!r} is not a number") from None
    if not (0 < value < math.inf):
        raise _trace_error(path, line, f"{what} {text!r} is not a finite number > 0")
    return value


def _intervals(text: str, path: Path, line: int) -> tuple[tuple[float, float], ...] | None:
    """``"0-3600;7200-10800"`` -> ((0, 3600), (7200, 10800)); empty: always online."""
    text = text.strip()
    if not text:
        return None
    out: list[tuple[float, float]] = []
    for part in text.split(";"):
        start_s, sep, end_s = part.strip().partition("-")
        try:
            if not sep:
                raise ValueError
            start, end = float(start_s), float(end_s)
        except ValueError:
            raise _trace_error(path, line, f"availability interval {part.strip()!r} is not "
                               "'start-end' in seconds (intervals separated by ';')") from None
        if not (0 <= start < end < math.inf):
            raise _trace_error(path, line, f"availability interval {part.strip()!r} needs "
                               "0 <= start < end, finite")
        if out and start < out[-1][1]:
            raise _trace_error(path, line, f"availability interval {part.strip()!r} starts "
                               "before the previous one ends (give them sorted, disjoint)")
        out.append((start, end))
    return tuple(out)


def load_trace(path: str | Path) -> Trace:
    """Read and validate a trace CSV (header ``client_id,speed[,bandwidth_mbps][,available]``;
    ``available``: online intervals ``start-end`` in seconds separated by ``;``, empty for
    always online). Every problem is one ``ConfigError`` line naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("clock.trace", str(path), f"an existing trace CSV with header "
                          f"{TRACE_FORMAT}")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            lines = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise _trace_error(path, None, f"unreadable: {exc}") from None
    if not lines or not any(cell.strip() for cell in lines[0]):
        raise _trace_error(path, 1, "no header row")
    header = [c.strip() for c in lines[0]]
    for col in header:
        if col not in TRACE_COLUMNS:
            raise _trace_error(path, 1, f"unknown column {col!r}")
        if header.count(col) > 1:
            raise _trace_error(path, 1, f"column {col!r} given twice")
    for col in ("client_id", "speed"):
        if col not in header:
            raise _trace_error(path, 1, f"missing column {col!r}")
    index = {c: i for i, c in enumerate(header)}
    rows: dict[str, TraceRow] = {}
    for number, cells in enumerate(lines[1:], start=2):
        if not cells or not any(c.strip() for c in cells):
            continue  # blank line
        if len(cells) != len(header):
            raise _trace_error(path, number, f"{len(cells)} fields, the header has "
                               f"{len(header)}")
        cid = cells[index["client_id"]].strip()
        if not CLIENT_ID.fullmatch(cid):
            raise _trace_error(path, number, f"client id {cid!r} is not letters, digits, '.', "
                               "'_' and '-' (starting with a letter or digit, at most 64)")
        if cid in rows:
            raise _trace_error(path, number, f"client {cid!r} appears twice")
        speed = _positive(cells[index["speed"]].strip(), "speed", path, number)
        bandwidth = (_positive(cells[index["bandwidth_mbps"]].strip(), "bandwidth_mbps", path,
                               number) if "bandwidth_mbps" in index else None)
        available = (_intervals(cells[index["available"]], path, number)
                     if "available" in index else None)
        rows[cid] = TraceRow(speed, bandwidth, available)
    if not rows:
        raise _trace_error(path, None, "no client rows")
    return Trace(rows, "bandwidth_mbps" in index, "available" in index)


@dataclass(frozen=True)
class _Client:
    """One client's fixed draws (or trace values)."""

    key: int  # client_key(client_id)
    slowness: float  # compute-time multiplier: 1 = median, 2 = twice as slow
    transfer: float  # seconds to move the model both ways, latency included
    phase: float  # offset into the availability period, seconds
    intervals: tuple[tuple[float, float], ...] | None  # trace availability
    starts: tuple[float, ...] | None


@dataclass(frozen=True)
class TaskOutcome:
    """What happens to a task dispatched at ``start``: it ``completed`` at ``end``, or the
    client went offline at ``end`` before finishing (its result never arrives)."""

    end: float
    completed: bool


class ClientTimingModel:
    """Simulated duration and availability of each client's tasks.

    ``duration(c, n, num_samples, steps)`` = ``compute_median * slowness_c * J(c, n) * units``
    + ``2 * latency + 2 * 8 * model_bytes / (bandwidth_c * 1e6)``, where ``units`` is
    ``num_samples`` (``compute_unit = "sample"``) or ``steps`` (``"step"``), ``slowness_c``
    = exp(speed_sigma * Z_c) (or 1 / the trace's speed), ``J(c, n)`` = exp(jitter * Z_cn)
    and ``bandwidth_c`` = bandwidth_mbps * exp(bandwidth_sigma * Z'_c) (or the trace's);
    without a bandwidth the model moves in no time. ``Z`` are independent standard normals.
    """

    def __init__(self, *, seed: int = 0, compute_median: float = DEFAULTS["compute_median"],
                 compute_unit: str = DEFAULTS["compute_unit"],
                 speed_sigma: float = DEFAULTS["speed_sigma"],
                 jitter: float = DEFAULTS["jitter"], bandwidth_mbps: float | None = None,
                 bandwidth_sigma: float = DEFAULTS["bandwidth_sigma"],
                 latency: float = DEFAULTS["latency"],
                 model_bytes: int = 0, availability_period: float | None = None,
                 availability_fraction: float = 1.0, deadline: float | None = None,
                 trace: Trace | None = None) -> None:
        checks = {
            "seed": (seed, isinstance(seed, int) and seed >= 0, "an integer >= 0"),
            "compute_median": (compute_median, 0 < compute_median < math.inf, "a number > 0"),
            "compute_unit": (compute_unit, compute_unit in COMPUTE_UNITS,
                             "one of " + ", ".join(repr(u) for u in COMPUTE_UNITS)),
            "speed_sigma": (speed_sigma, 0 <= speed_sigma <= 4, "a number in [0, 4]"),
            "jitter": (jitter, 0 <= jitter <= 4, "a number in [0, 4]"),
            "bandwidth_mbps": (bandwidth_mbps, bandwidth_mbps is None
                               or 0 < bandwidth_mbps < math.inf, "a number > 0"),
            "bandwidth_sigma": (bandwidth_sigma, 0 <= bandwidth_sigma <= 4,
                                "a number in [0, 4]"),
            "latency": (latency, 0 <= latency < math.inf, "a finite number >= 0"),
            "model_bytes": (model_bytes, isinstance(model_bytes, int) and model_bytes >= 0,
                            "an integer >= 0"),
            "availability_period": (availability_period, availability_period is None
                                    or 0 < availability_period < math.inf, "a number > 0"),
            "availability_fraction": (availability_fraction, 0 < availability_fraction <= 1,
                                      "a number in (0, 1]"),
            "deadline": (deadline, deadline is None or 0 < deadline < math.inf,
                         "a number > 0"),
        }
        for key, (value, ok, allowed) in checks.items():
            if not ok:
                raise ConfigError(f"clock.{key}", value, allowed)
        if trace is not None and trace.has_bandwidth and bandwidth_mbps is not None:
            raise ConfigError("clock.bandwidth_mbps", bandwidth_mbps, "not with a trace file "
                              "that has a bandwidth_mbps column (it gives each client's)")
        if trace is not None and trace.has_availability and availability_period is not None:
            raise ConfigError("clock.availability_period", availability_period, "not with a "
                              "trace file that has an available column (it gives each "
                              "client's online intervals)")
        self.seed = seed
        self.compute_median = float(compute_median)
        self.per_sample = compute_unit == "sample"
        self.speed_sigma = float(speed_sigma)
        self.jitter = float(jitter)
        self.bandwidth_mbps = bandwidth_mbps
        self.bandwidth_sigma = float(bandwidth_sigma)
        self.latency = float(latency)
        self.model_bytes = model_bytes
        # A fraction of 1 is "always online": no windows at all.
        self.period = availability_period if availability_fraction < 1 else None
        self.on_time = (self.period or 0.0) * availability_fraction
        self.deadline = deadline
        self.trace = trace
        self._clients: dict[str, _Client] = {}

    # -- per-client draws ------------------------------------------------------------------
    def _client(self, client_id: str) -> _Client:
        c = self._clients.get(client_id)
        if c is not None:
            return c
        key = client_key(client_id)
        rng = np.random.Generator(np.random.PCG64(
            np.random.SeedSequence([self.seed, key, _STREAM_CLIENT])))
        # Always draw all three, so that a trace or a zero sigma leaves the others unchanged.
        z_speed, z_bw = (float(z) for z in rng.standard_normal(2))
        phase_u = float(rng.random())
        row = None
        if self.trace is not None:
            row = self.trace.rows.get(client_id)
            if row is None:
                raise ConfigError("clock.trace", client_id, "a trace file with a row for every "
                                  f"client (client {client_id!r} has none)")
        slowness = 1.0 / row.speed if row is not None else math.exp(self.speed_sigma * z_speed)
        bandwidth = (row.bandwidth_mbps if row is not None and row.bandwidth_mbps is not None
                     else None if self.bandwidth_mbps is None
                     else self.bandwidth_mbps * math.exp(self.bandwidth_sigma * z_bw))
        transfer = 2.0 * self.latency
        if bandwidth is not None:
            transfer += 2.0 * 8.0 * self.model_bytes / (bandwidth * 1e6)
        intervals = row.available if row is not None else None
        c = _Client(key=key, slowness=slowness, transfer=transfer,
                    phase=phase_u * self.period if self.period else 0.0, intervals=intervals,
                    starts=tuple(s for s, _ in intervals) if intervals else None)
        self._clients[client_id] = c
        return c

    def slowness(self, client_id: str) -> float:
        """The client's compute-time multiplier (1: the median client; 2: twice as slow)."""
        return self._client(client_id).slowness

    def transfer_time(self, client_id: str) -> float:
        """Seconds to download the model and upload the update, latency included."""
        return self._client(client_id).transfer

    def duration(self, client_id: str, task_index: int, num_samples: int, steps: int) -> float:
        """Simulated seconds of client ``client_id``'s task ``task_index`` (any integer >= 0
        naming the task for that client, e.g. its n-th dispatch or the round): training on
        ``num_samples`` samples (all epochs) in ``steps`` optimizer steps, plus transfers."""
        c = self._client(client_id)
        compute = self.compute_median * c.slowness * (num_samples if self.per_sample else steps)
        if self.jitter:
            compute *= math.exp(self.jitter * _task_normal(self.seed, c.key, task_index))
        return compute + c.transfer

    # -- availability -------------------------------------------------------------------------
    def available(self, client_id: str, t: float) -> bool:
        """Whether the client is online at simulated time ``t`` (it may be given a task)."""
        return self.online_until(client_id, t) > t

    def online_until(self, client_id: str, t: float) -> float:
        """The end of the online window holding ``t`` (``inf``: never goes offline; ``t``:
        offline at ``t``)."""
        c = self._client(client_id)
        if c.intervals is not None:
            assert c.starts is not None
            i = bisect.bisect_right(c.starts, t) - 1
            if i >= 0 and t < c.intervals[i][1]:
                return c.intervals[i][1]
            return t
        if self.period is None:
            return math.inf
        pos = (t + c.phase) % self.period
        if pos >= self.on_time:
            return t
        # At least one ulp past t: a window that is open at t must say so at any magnitude.
        return max(t + (self.on_time - pos), math.nextafter(t, math.inf))

    def next_available(self, client_id: str, t: float) -> float:
        """The first time >= ``t`` at which the client is online (``inf``: never again)."""
        c = self._client(client_id)
        if c.intervals is not None:
            assert c.starts is not None
            if self.online_until(client_id, t) > t:
                return t
            i = bisect.bisect_right(c.starts, t)
            return c.starts[i] if i < len(c.starts) else math.inf
        if self.period is None:
            return t
        pos = (t + c.phase) % self.period
        if pos < self.on_time:
            return t
        at = t + (self.period - pos)
        # Rounding may leave ``at`` a few ulps short of the window's opening; step onto it.
        for _ in range(1000):
            if self.online_until(client_id, at) > at:
                return at
            at = math.nextafter(at, math.inf)
        raise AssertionError(f"no availability window found after {t}")  # pragma: no cover

    def outcome(self, client_id: str, task_index: int, start: float, num_samples: int,
                steps: int) -> TaskOutcome:
        """Dispatch a task at ``start``: it completes at ``start + duration`` unless the
        client's online window ends first (then it drops at the window's end). A client
        offline at ``start`` cannot be given a task (``ValueError``)."""
        until = self.online_until(client_id, start)
        if until <= start:
            raise ValueError(f"client {client_id!r} is offline at simulated time {start}; "
                             "dispatch only to available clients")
        end = start + self.duration(client_id, task_index, num_samples, steps)
        return TaskOutcome(end, True) if end <= until else TaskOutcome(until, False)


def round_duration(durations: Mapping[str, float],
                   deadline: float | None = None) -> tuple[float, list[str]]:
    """How long a synchronous round takes, and who it drops (in the order given).

    It waits for its slowest selected client; with a ``deadline`` it stops waiting then and
    drops those still missing (the round lasts ``deadline`` when anyone is dropped, else until
    its last arrival). A duration of ``inf`` is a client that never reports (it went offline):
    it is dropped, and without a deadline the round ends at the last finite arrival, as if
    the server noticed the loss at once (which favours the synchronous schedule).
    """
    if deadline is not None and not (0 < deadline < math.inf):
        raise ValueError(f"deadline must be a finite number > 0, got {deadline!r}")
    longest = 0.0
    dropped: list[str] = []
    for cid, d in durations.items():
        if not d >= 0:  # also catches NaN
            raise ValueError(f"duration of client {cid!r} must be >= 0, got {d!r}")
        if d == math.inf or (deadline is not None and d > deadline):
            dropped.append(cid)
        elif d > longest:
            longest = d
    if dropped and deadline is not None:
        return float(deadline), dropped
    return longest, dropped


# -- the virtual clock -----------------------------------------------------------------------
_PLAIN_SCALARS = (str, int, float, bool, type(None))


def _check_plain(event: Any, path: str = "event") -> None:
    """Events must survive ``torch.load(weights_only=True)`` and JSON-like inspection: plain
    scalars, lists, tuples and str-keyed dicts of them (no namedtuples, numpy scalars or
    objects: a checkpoint is data, never code)."""
    kind = type(event)
    if kind in _PLAIN_SCALARS:
        return
    if kind in (list, tuple):
        for i, item in enumerate(event):
            _check_plain(item, f"{path}[{i}]")
        return
    if kind is dict:
        for key, item in event.items():
            if type(key) is not str:
                raise TypeError(f"{path} has a non-str key {key!r}; events must be plain data")
            _check_plain(item, f"{path}[{key!r}]")
        return
    raise TypeError(f"{path} is a {kind.__name__} ({event!r}); events must be plain data: "
                    "str, int, float, bool, None, and lists, tuples or str-keyed dicts of "
                    "them (so a checkpoint can carry them)")


class VirtualClock:
    """Simulated time and the pending events of a run (a discrete-event simulation).

    ``pop`` returns the earliest event and moves ``now`` to its time; events at the same
    time come out in the order they were scheduled. Time never goes backwards.
    """

    def __init__(self, start: float = 0.0) -> None:
        if not (0 <= start < math.inf):
            raise ValueError(f"start must be a finite number >= 0, got {start!r}")
        self._now = float(start)
        self._seq = 0
        self._heap: list[tuple[float, int, Any]] = []

    @property
    def now(self) -> float:
        """The current simulated time, in seconds."""
        return self._now

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, at: float, event: Any) -> None:
        """Queue ``event`` (plain data) for simulated time ``at`` (>= now, finite)."""
        if not (self._now <= at < math.inf):
            raise ValueError(f"cannot schedule an event at {at!r}: it must be finite and not "
                             f"before now ({self._now})")
        _check_plain(event)
        heapq.heappush(self._heap, (float(at), self._seq, event))
        self._seq += 1

    def peek_time(self) -> float | None:
        """The time of the earliest pending event (None: nothing pending)."""
        return self._heap[0][0] if self._heap else None

    def pop(self) -> tuple[float, Any]:
        """Remove the earliest pending event; ``now`` becomes its time."""
        if not self._heap:
            raise IndexError("no pending events")
        at, _, event = heapq.heappop(self._heap)
        self._now = at
        return at, event

    def advance_to(self, t: float) -> None:
        """Move ``now`` to ``t`` (>= now), not past a pending event (pop those first)."""
        if not (self._now <= t < math.inf):
            raise ValueError(f"cannot advance to {t!r}: it must be finite and not before now "
                             f"({self._now})")
        if self._heap and t > self._heap[0][0]:
            raise ValueError(f"cannot advance to {t}: an event is pending at "
                             f"{self._heap[0][0]} (pop it first)")
        self._now = float(t)

    def state_dict(self) -> dict[str, Any]:
        """Plain data: ``now``, the next sequence number and the pending events in order."""
        return {"now": self._now, "next_seq": self._seq,
                "events": [list(item) for item in sorted(self._heap)]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned (validated: a checkpoint is input)."""
        try:
            now, seq, events = float(state["now"]), state["next_seq"], state["events"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a VirtualClock state: {exc!r}") from None
        if not (0 <= now < math.inf) or type(seq) is not int or seq < 0:
            raise ValueError(f"not a VirtualClock state: now={state['now']!r}, "
                             f"next_seq={seq!r}")
        heap: list[tuple[float, int, Any]] = []
        seen: set[int] = set()
        for item in events:
            if not (isinstance(item, (list, tuple)) and len(item) == 3):
                raise ValueError(f"not a VirtualClock event: {item!r}")
            at, s, event = item
            if not (isinstance(at, (int, float)) and now <= at < math.inf
                    and type(s) is int and 0 <= s < seq and s not in seen):
                raise ValueError(f"not a VirtualClock event: {item!r} (now {now}, next_seq "
                                 f"{seq})")
            _check_plain(event)
            seen.add(s)
            heap.append((float(at), s, event))
        heapq.heapify(heap)
        self._now, self._seq, self._heap = now, seq, heap


# -- configuration ---------------------------------------------------------------------------
def build_clock(exp: Experiment, model_bytes: int = 0) -> ClientTimingModel | None:
    """The experiment's timing model, or None without a ``[clock]`` table.

    ``model_bytes``: the size of the model a client downloads and uploads (e.g. 4 bytes per
    float32 parameter); ``[clock] model_bytes`` overrides it. ``[clock] seed`` defaults to
    the run's seed; a relative ``trace`` path is relative to the experiment's directory.
    """
    c = dict(exp["clock"])
    if not c:
        return None
    trace = None
    if "trace" in c:
        path = Path(c.pop("trace")).expanduser()
        if not path.is_absolute():
            base = getattr(exp, "base_dir", None)
            base = (Path(base) if base is not None else exp.source.resolve().parent
                    if exp.source is not None else Path.cwd())
            path = base / path
        trace = load_trace(path)
    c.setdefault("seed", exp[""]["seed"])
    c.setdefault("model_bytes", model_bytes)
    return ClientTimingModel(trace=trace, **c)
