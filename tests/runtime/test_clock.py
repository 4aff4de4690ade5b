"""The client timing model and the virtual clock (issue #11, item 4)."""

from __future__ import annotations

import io
import math
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmosaic.config import validate
from fedmosaic.core import ConfigError
from fedmosaic.runtime.clock import (
    ClientTimingModel,
    TaskOutcome,
    VirtualClock,
    build_clock,
    client_key,
    load_trace,
    round_duration,
)

IDS = [f"client_{i}" for i in range(10_000)]


def _base(**sections):
    raw = {"rounds": 3, "data": {"dataset": "digits"}}
    raw.update(sections)
    return raw


def _exact(key: str, value, allowed: str) -> str:
    return str(ConfigError(key, value, allowed))


# -- determinism and independence ------------------------------------------------------------
def _profile(model: ClientTimingModel, cid: str) -> tuple[float, ...]:
    return (model.slowness(cid), model.transfer_time(cid), model.duration(cid, 7, 100, 4),
            model.online_until(cid, 1234.5), model.next_available(cid, 1234.5))


def test_same_client_same_draws_whatever_the_order_and_population():
    kw = dict(seed=3, jitter=0.5, bandwidth_mbps=20.0, latency=0.1, model_bytes=10**6,
              availability_period=600.0, availability_fraction=0.5)
    forward = ClientTimingModel(**kw)
    first = {cid: _profile(forward, cid) for cid in IDS[:200]}
    # Another population (some clients removed, others added), asked in reverse order.
    other = ClientTimingModel(**kw)
    for cid in ["extra_a", *reversed(IDS[50:200]), "extra_b"]:
        assert _profile(other, cid) == first.get(cid, _profile(other, cid))
    # Jitter, bandwidth or availability settings leave a client's speed draw alone.
    plain = ClientTimingModel(seed=3)
    assert [plain.slowness(c) for c in IDS[:50]] == [forward.slowness(c) for c in IDS[:50]]
    # Another seed: other draws.
    reseeded = ClientTimingModel(**{**kw, "seed": 4})
    assert sum(reseeded.slowness(c) != forward.slowness(c) for c in IDS[:50]) == 50


def test_draws_touch_no_global_rng():
    np.random.seed(0)
    torch.manual_seed(0)
    expected = (np.random.random(), torch.rand(1).item())
    np.random.seed(0)
    torch.manual_seed(0)
    model = ClientTimingModel(seed=1, jitter=1.0, availability_period=10.0,
                              availability_fraction=0.3)
    for cid in IDS[:100]:
        model.duration(cid, 0, 10, 1)
        model.available(cid, 3.0)
    assert (np.random.random(), torch.rand(1).item()) == expected


def test_client_key_is_stable_across_processes():
    # A fixed value: Python's hash() of a str is salted per process and would change it.
    assert client_key("client_0") == int.from_bytes(
        bytes.fromhex(__import__("hashlib").blake2b(b"client_0", digest_size=8).hexdigest()),
        "little")
    assert client_key("client_0") != client_key("client_1")


def test_draws_are_pinned():
    # Simulated times are part of a run's results: a change of the draws must be deliberate.
    model = ClientTimingModel(seed=0, jitter=0.5)
    assert model.slowness("client_0") == pytest.approx(0.5233663427342333, rel=1e-12)
    assert model.duration("client_0", 3, 100, 1) == pytest.approx(0.16087978647532478,
                                                                  rel=1e-12)


# -- distributions ---------------------------------------------------------------------------
def test_lognormal_speed_and_bandwidth_parameters_recovered():
    model = ClientTimingModel(seed=11, compute_median=0.02, speed_sigma=1.0,
                              bandwidth_mbps=8.0, bandwidth_sigma=0.5, model_bytes=10**6)
    durations = np.array([model.duration(c, 0, 50, 2) - model.transfer_time(c) for c in IDS])
    log_speed = np.log(durations / (0.02 * 50))
    # 10,000 draws: standard errors 0.01 (mean) and 0.007 (std); tolerances are 5x that.
    assert abs(np.median(log_speed)) < 0.05 and abs(np.mean(log_speed)) < 0.05
    assert abs(np.std(log_speed) - 1.0) < 0.035
    bandwidth = 16.0 / np.array([model.transfer_time(c) for c in IDS])  # 2 * 8 * 1e6 / 1e6
    log_bw = np.log(bandwidth / 8.0)
    assert abs(np.median(log_bw)) < 0.03 and abs(np.std(log_bw) - 0.5) < 0.02
    # Speed and bandwidth are independent draws.
    assert abs(np.corrcoef(log_speed, log_bw)[0, 1]) < 0.05


def test_compute_unit_and_network_terms():
    sample = ClientTimingModel(seed=0, speed_sigma=0.0, compute_median=0.01)
    step = ClientTimingModel(seed=0, speed_sigma=0.0, compute_median=0.25, compute_unit="step")
    assert sample.duration("a", 0, 300, 10) == pytest.approx(3.0)
    assert step.duration("a", 0, 300, 10) == pytest.approx(2.5)
    net = ClientTimingModel(seed=0, speed_sigma=0.0, compute_median=0.01, bandwidth_mbps=8.0,
                            bandwidth_sigma=0.0, latency=0.1, model_bytes=10**6)
    # 1 MB down and up at 8 Mbit/s: 2 s, plus 0.1 s latency each way.
    assert net.duration("a", 0, 300, 10) == pytest.approx(3.0 + 2.0 + 0.2)
    no_bandwidth = ClientTimingModel(seed=0, speed_sigma=0.0, latency=0.5, model_bytes=10**9)
    assert no_bandwidth.transfer_time("a") == 1.0


def test_jitter_is_per_task_lognormal_and_deterministic():
    base = ClientTimingModel(seed=5, compute_unit="step")
    jittered = ClientTimingModel(seed=5, compute_unit="step", jitter=0.3)
    ratios = np.log([jittered.duration("c", n, 0, 10) / base.duration("c", n, 0, 10)
                     for n in range(10_000)])
    assert abs(np.mean(ratios)) < 0.015 and abs(np.std(ratios) - 0.3) < 0.012
    assert jittered.duration("c", 42, 0, 10) == ClientTimingModel(
        seed=5, compute_unit="step", jitter=0.3).duration("c", 42, 0, 10)
    assert jittered.duration("c", 1, 0, 10) != jittered.duration("c", 2, 0, 10)
    assert jittered.duration("c", 1, 0, 10) != jittered.duration("d", 1, 0, 10) * (
        jittered.slowness("c") / jittered.slowness("d"))
    # No jitter: every task of a client takes the same time.
    assert len({base.duration("c", n, 0, 10) for n in range(100)}) == 1


# -- availability ----------------------------------------------------------------------------
def test_availability_fraction_of_time_matches_on_fraction():
    model = ClientTimingModel(seed=2, availability_period=3600.0, availability_fraction=0.3)
    rng = np.random.default_rng(0)
    times = rng.uniform(0, 10 * 3600, size=20_000)
    online = [model.available(IDS[i % 2000], float(t)) for i, t in enumerate(times)]
    assert abs(np.mean(online) - 0.3) < 0.02
    # Each client: exactly 30% of a period, on a fine grid.
    grid = np.arange(0, 3600, 1.0)
    assert abs(np.mean([model.available("client_7", float(t)) for t in grid]) - 0.3) < 0.001
    # Random phases: clients are not all online at the same time.
    assert 0.2 < np.mean([model.available(c, 0.0) for c in IDS[:2000]]) < 0.4


def test_online_until_and_next_available_agree_with_available():
    model = ClientTimingModel(seed=9, availability_period=100.0, availability_fraction=0.25)
    for t in np.linspace(0, 500, 301):
        t = float(t)
        until, nxt = model.online_until("x", t), model.next_available("x", t)
        if model.available("x", t):
            assert nxt == t and t < until <= t + 25 + 1e-9
            assert model.available("x", until - 1e-6) and not model.available("x", until + 1e-6)
        else:
            assert until == t and t < nxt <= t + 75 + 1e-9
            assert model.available("x", nxt + 1e-6) and not model.available("x", nxt - 1e-6)
    always = ClientTimingModel(seed=9, availability_period=100.0, availability_fraction=1.0)
    assert always.online_until("x", 5.0) == math.inf and always.next_available("x", 5.0) == 5.0


def test_availability_is_consistent_at_any_magnitude_of_time():
    # Float rounding at large t must not make next_available return an offline time, nor an
    # open window report that it ends at t.
    model = ClientTimingModel(seed=3, availability_period=7.3, availability_fraction=0.37)
    rng = np.random.default_rng(1)
    for t in np.concatenate([rng.uniform(0, 1e3, 300), rng.uniform(1e9, 1e12, 300)]):
        for cid in ("a", "b", "c"):
            t = float(t)
            nxt = model.next_available(cid, t)
            assert nxt >= t and model.available(cid, nxt)
            assert (model.online_until(cid, t) > t) == model.available(cid, t)


def test_task_drops_when_the_client_goes_offline_mid_task():
    model = ClientTimingModel(seed=1, speed_sigma=0.0, compute_median=1.0, compute_unit="step",
                              availability_period=100.0, availability_fraction=0.3)
    start = model.next_available("c", 0.0)
    until = model.online_until("c", start)
    window = until - start
    assert 0 < window <= 30
    short = model.outcome("c", 0, start, 0, math.floor(window) - 0)  # fits in the window
    assert short == TaskOutcome(start + math.floor(window), True)
    long = model.outcome("c", 1, start, 0, 31)  # longer than any window
    assert long == TaskOutcome(until, False)
    with pytest.raises(ValueError, match="client 'c' is offline at simulated time"):
        model.outcome("c", 2, until + 1.0, 0, 1)


# -- trace files -----------------------------------------------------------------------------
def _trace(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_trace_replaces_the_draws(tmp_path):
    path = _trace(tmp_path, "client_id,speed,bandwidth_mbps,available\n"
                            "fast,4,80,\n"
                            "slow,0.5,8,0-100;200-300\n")
    model = ClientTimingModel(seed=0, compute_median=0.01, model_bytes=10**6,
                              trace=load_trace(path))
    assert model.slowness("fast") == 0.25 and model.slowness("slow") == 2.0
    assert model.duration("fast", 0, 400, 1) == pytest.approx(0.01 * 400 / 4 + 16 / 80)
    assert model.duration("slow", 0, 400, 1) == pytest.approx(0.01 * 400 * 2 + 16 / 8)
    assert model.online_until("fast", 1e9) == math.inf
    assert [model.available("slow", t) for t in (0, 99.9, 100, 150, 200, 299, 300, 400)] == \
        [True, True, False, False, True, True, False, False]
    assert model.next_available("slow", 150) == 200 and model.next_available("slow", 300) \
        == math.inf
    assert model.outcome("slow", 0, 210, 4, 1) == TaskOutcome(210 + 0.08 + 2.0, True)
    assert model.outcome("slow", 0, 299, 4, 1) == TaskOutcome(300, False)
    with pytest.raises(ConfigError, match="client 'unknown' has none"):
        model.duration("unknown", 0, 1, 1)


def test_trace_minimal_columns_keep_random_bandwidth_and_periodic_availability(tmp_path):
    trace = load_trace(_trace(tmp_path, "speed,client_id\n2,a\n\n1,b\n"))
    assert not trace.has_bandwidth and not trace.has_availability and set(trace.rows) == {"a",
                                                                                         "b"}
    kw = dict(seed=4, bandwidth_mbps=10.0, model_bytes=1000, availability_period=50.0,
              availability_fraction=0.5)
    traced, drawn = ClientTimingModel(trace=trace, **kw), ClientTimingModel(**kw)
    assert traced.transfer_time("a") == drawn.transfer_time("a")
    assert traced.online_until("a", 7.0) == drawn.online_until("a", 7.0)
    with pytest.raises(ConfigError) as exc:
        ClientTimingModel(seed=0, bandwidth_mbps=5.0, trace=load_trace(
            _trace(tmp_path, "client_id,speed,bandwidth_mbps\na,1,2\n")))
    assert str(exc.value) == _exact("clock.bandwidth_mbps", 5.0, "not with a trace file that "
                                    "has a bandwidth_mbps column (it gives each client's)")
    with pytest.raises(ConfigError) as exc:
        ClientTimingModel(seed=0, availability_period=5.0, availability_fraction=0.5,
                          trace=load_trace(_trace(tmp_path, "client_id,speed,available\na,1,\n")))
    assert str(exc.value) == _exact("clock.availability_period", 5.0, "not with a trace file "
                                    "that has an available column (it gives each client's "
                                    "online intervals)")


TRACE_ERRORS = [
    ("", "line 1: no header row"),
    ("client_id,speed,color\n", "line 1: unknown column 'color'"),
    ("client_id,speed,speed\n", "line 1: column 'speed' given twice"),
    ("client_id,available\na,0-1\n", "line 1: missing column 'speed'"),
    ("client_id,speed\n", "no client rows"),
    ("client_id,speed\na,1,2\n", "line 2: 3 fields, the header has 2"),
    ("client_id,speed\n-a,1\n", "line 2: client id '-a' is not letters, digits, '.', '_' and "
                               "'-' (starting with a letter or digit, at most 64)"),
    ("client_id,speed\na,1\na,2\n", "line 3: client 'a' appears twice"),
    ("client_id,speed\na,fast\n", "line 2: speed 'fast' is not a number"),
    ("client_id,speed\na,0\n", "line 2: speed '0' is not a finite number > 0"),
    ("client_id,speed\na,inf\n", "line 2: speed 'inf' is not a finite number > 0"),
    ("client_id,speed,bandwidth_mbps\na,1,\n", "line 2: bandwidth_mbps '' is not a number"),
    ("client_id,speed,available\na,1,10\n", "line 2: availability interval '10' is not "
     "'start-end' in seconds (intervals separated by ';')"),
    ("client_id,speed,available\na,1,5-5\n", "line 2: availability interval '5-5' needs "
     "0 <= start < end, finite"),
    ("client_id,speed,available\na,1,10-20;15-30\n", "line 2: availability interval '15-30' "
     "starts before the previous one ends (give them sorted, disjoint)"),
]


@pytest.mark.parametrize(("text", "problem"), TRACE_ERRORS)
def test_trace_errors_are_one_clear_line(tmp_path, text, problem):
    path = _trace(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_trace(path)
    assert str(exc.value) == _exact("clock.trace", str(path), "a trace CSV with header "
                                    f"client_id,speed[,bandwidth_mbps][,available] ({problem})")
    assert "\n" not in str(exc.value)


def test_missing_trace_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_trace(tmp_path / "nope.csv")
    assert str(exc.value) == _exact("clock.trace", str(tmp_path / "nope.csv"), "an existing "
                                    "trace CSV with header "
                                    "client_id,speed[,bandwidth_mbps][,available]")


# -- the virtual clock -----------------------------------------------------------------------
def test_events_pop_in_time_order_ties_in_schedule_order():
    clock = VirtualClock()
    for at, event in [(5.0, "e1"), (1.0, "e2"), (5.0, "e3"), (1.0, "e4"), (3.0, "e5"),
                      (5.0, "e6")]:
        clock.schedule(at, event)
    assert clock.peek_time() == 1.0 and len(clock) == 6
    out = []
    while clock:
        at, event = clock.pop()
        assert clock.now == at
        out.append(event)
    assert out == ["e2", "e4", "e5", "e1", "e3", "e6"]
    with pytest.raises(IndexError):
        clock.pop()


def test_time_never_goes_backwards():
    clock = VirtualClock(start=10.0)
    with pytest.raises(ValueError, match="not before now"):
        clock.schedule(9.0, "late")
    with pytest.raises(ValueError, match="finite"):
        clock.schedule(math.inf, "never")
    clock.schedule(20.0, "x")
    clock.advance_to(15.0)
    assert clock.now == 15.0
    with pytest.raises(ValueError, match=r"an event is pending at 20\.0"):
        clock.advance_to(21.0)
    clock.advance_to(20.0)
    with pytest.raises(ValueError, match="not before now"):
        clock.advance_to(19.0)
    assert clock.pop() == (20.0, "x")


def test_events_must_be_plain_data():
    clock = VirtualClock()
    clock.schedule(1.0, ("arrival", "client_3", 7, {"version": 2, "weight": 0.5, "x": None}))
    Arrival = namedtuple("Arrival", "client version")
    with pytest.raises(TypeError, match=r"event is a Arrival"):
        clock.schedule(1.0, Arrival("c", 1))
    with pytest.raises(TypeError, match=r"event\[1\] is a float64"):
        clock.schedule(1.0, ("arrival", np.float64(1.0)))
    with pytest.raises(TypeError, match="non-str key 1"):
        clock.schedule(1.0, {1: "a"})
    assert len(clock) == 1


def test_state_dict_round_trip_through_a_weights_only_checkpoint():
    clock = VirtualClock()
    for i in range(20):
        clock.schedule(float(i % 4), ("arrival", f"c{i}", i, [i, 0.5]))
    popped = [clock.pop() for _ in range(7)]
    assert popped[-1][0] == 1.0
    buf = io.BytesIO()
    torch.save(clock.state_dict(), buf)
    buf.seek(0)
    restored = VirtualClock()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.now == clock.now == 1.0 and len(restored) == 13
    # New events at an existing time come after the ones already queued, in both.
    for c in (clock, restored):
        c.schedule(2.0, "new")
    assert [clock.pop() for _ in range(14)] == [restored.pop() for _ in range(14)]
    assert restored.state_dict() == clock.state_dict()


@pytest.mark.parametrize("state", [
    {"now": 0.0, "events": []},
    {"now": -1.0, "next_seq": 0, "events": []},
    {"now": 5.0, "next_seq": 2, "events": [[4.0, 0, "past"]]},
    {"now": 0.0, "next_seq": 1, "events": [[1.0, 1, "seq too big"]]},
    {"now": 0.0, "next_seq": 2, "events": [[1.0, 0, "a"], [1.0, 0, "dup"]]},
    {"now": 0.0, "next_seq": 1, "events": [[1.0, 0]]},
])
def test_load_state_dict_rejects_bad_states(state):
    clock = VirtualClock()
    clock.schedule(3.0, "kept")
    with pytest.raises(ValueError, match="not a VirtualClock"):
        clock.load_state_dict(state)
    assert clock.pop() == (3.0, "kept")  # unchanged


# -- synchronous rounds ----------------------------------------------------------------------
def test_round_duration_waits_for_the_slowest_or_drops_past_the_deadline():
    d = {"a": 3.0, "b": 12.0, "c": 7.5, "d": 20.0}
    assert round_duration(d) == (20.0, [])
    assert round_duration(d, deadline=10.0) == (10.0, ["b", "d"])
    assert round_duration(d, deadline=25.0) == (20.0, [])  # all in time: ends at the last
    assert round_duration(d, deadline=20.0) == (20.0, [])  # arriving at the deadline counts
    assert round_duration({}) == (0.0, [])
    # A client that never reports (went offline) is dropped.
    assert round_duration({"a": 3.0, "x": math.inf}) == (3.0, ["x"])
    assert round_duration({"a": 3.0, "x": math.inf}, deadline=8.0) == (8.0, ["x"])
    with pytest.raises(ValueError, match="client 'a' must be >= 0"):
        round_duration({"a": float("nan")})
    with pytest.raises(ValueError, match="deadline must be a finite number > 0"):
        round_duration(d, deadline=0.0)


# -- configuration ---------------------------------------------------------------------------
def test_without_a_clock_table_nothing_changes():
    exp = validate(_base())
    assert exp["clock"] == {} and "clock" not in exp.identity()
    assert build_clock(exp) is None


def test_clock_table_defaults_and_identity():
    exp = validate(_base(seed=7, clock={}))
    assert exp["clock"] == {"compute_median": 0.005, "compute_unit": "sample",
                            "speed_sigma": 1.0, "jitter": 0.0, "latency": 0.0}
    assert exp.identity()["clock"] == exp["clock"]
    assert exp.identity() != validate(_base(seed=7, clock={"jitter": 0.1})).identity()
    model = build_clock(exp, model_bytes=4000)
    assert model is not None and model.seed == 7 and model.model_bytes == 4000
    assert model.slowness("a") == ClientTimingModel(seed=7).slowness("a")
    bw = validate(_base(clock={"bandwidth_mbps": 10.0, "model_bytes": 99, "seed": 3}))
    assert bw["clock"]["bandwidth_sigma"] == 1.0
    model = build_clock(bw, model_bytes=4000)
    assert model is not None and model.model_bytes == 99 and model.seed == 3


def test_build_clock_reads_a_trace_relative_to_the_experiment(tmp_path):
    (tmp_path / "traces").mkdir()
    _trace(tmp_path / "traces", "client_id,speed\nclient_0,2\n")
    exp = validate(_base(clock={"trace": "traces/trace.csv"}), source=tmp_path / "exp.toml")
    assert "speed_sigma" not in exp["clock"]
    model = build_clock(exp)
    assert model is not None and model.slowness("client_0") == 0.5
    exp.base_dir = tmp_path / "elsewhere"
    with pytest.raises(ConfigError, match="an existing trace CSV"):
        build_clock(exp)


@pytest.mark.parametrize(("clock", "key", "value", "allowed"), [
    ({"speed_sigma": 5}, "clock.speed_sigma", 5, "a number in [0, 4]"),
    ({"compute_median": 0}, "clock.compute_median", 0,
     "a finite number > 0 (seconds per sample or per step)"),
    ({"compute_unit": "batch"}, "clock.compute_unit", "batch", "one of 'sample', 'step'"),
    ({"latency": -1}, "clock.latency", -1, "a finite number >= 0 (seconds)"),
    ({"availability_fraction": 0.5}, "clock.availability_period", "<missing>",
     "required with clock.availability_fraction: a finite number > 0 (seconds)"),
    ({"availability_period": 60}, "clock.availability_fraction", "<missing>",
     "required with clock.availability_period: a number in (0, 1]"),
    ({"availability_period": 60, "availability_fraction": 0}, "clock.availability_fraction", 0,
     "a number in (0, 1]"),
    ({"trace": "t.csv", "speed_sigma": 1.0}, "clock.speed_sigma", 1.0,
     "not with clock.trace (the trace gives each client's speed)"),
    ({"bandwidth_sigma": 0.5}, "clock.bandwidth_sigma", 0.5,
     "only with clock.bandwidth_mbps (the median bandwidth)"),
    ({"deadline": math.inf}, "clock.deadline", math.inf, "a finite number > 0 (seconds)"),
    ({"model_bytes": 0}, "clock.model_bytes", 0, "an integer >= 1"),
])
def test_clock_config_errors(clock, key, value, allowed):
    with pytest.raises(ConfigError) as exc:
        validate(_base(clock=clock))
    assert str(exc.value) == _exact(key, value, allowed)


def test_unknown_clock_key():
    with pytest.raises(ConfigError, match=r"config key 'clock.sigma': got 1; allowed: one of "
                                          r"the known keys: availability_fraction, "):
        validate(_base(clock={"sigma": 1}))
