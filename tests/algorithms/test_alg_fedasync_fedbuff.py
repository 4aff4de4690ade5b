"""FedAsync's mixing and FedBuff's buffer as components (issue #11): the equivalences of the
acceptance (FedBuff = FedAvg bit for bit, FedBuff K=1 = FedAsync, FedAsync alpha=1 =
sequential local training), BatchNorm statistics, the paper's normalisation, validation,
and checkpoints of a partly filled buffer."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from fedmosaic.algorithms import (
    ConstantStaleness,
    FedAdam,
    FedAsyncMixer,
    FedAvg,
    FedAvgM,
    FedBuffBuffer,
    HingeStaleness,
    InverseSqrtStaleness,
    ModelHistory,
    PolynomialStaleness,
    ServerSGD,
    staleness_of,
)
from fedmosaic.core import ClientUpdate, ConfigError, InvalidUpdateError
from fedmosaic.data.dataset import ArrayDataset
from fedmosaic.runtime.tally import PartialAggregate, RoundTally
from fedmosaic.train.base import FitConfig
from fedmosaic.train.torch_trainer import TorchTrainer


def bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.fixture(scope="module")
def trainer() -> TorchTrainer:
    return TorchTrainer(bn_model, lr=0.1, epochs=1, batch_size=8)


def client_data(i: int, n: int) -> ArrayDataset:
    rng = np.random.default_rng(100 + i)
    x = rng.normal(loc=i * 0.5, scale=1.0 + i, size=(n, 5))
    return ArrayDataset.create(x, rng.integers(0, 3, size=n))


SIZES = (18, 40, 10, 26, 34)  # no batch of one (BatchNorm needs two samples)


def train_updates(trainer: TorchTrainer, weights: torch.Tensor, base: int,
                  seed: int = 0) -> list[ClientUpdate]:
    """One real local fit per client from ``weights``; deltas include BN statistics."""
    out = []
    for i, n in enumerate(SIZES):
        res = trainer.fit(weights, client_data(i, n), FitConfig(round=base, seed=seed + i))
        out.append(ClientUpdate(f"c{i}", res.weights - weights, res.num_samples, base,
                                metrics={"train_loss": float(i)}))
    return out


def bn_slots(trainer: TorchTrainer) -> list[slice]:
    return [slice(e.offset, e.offset + e.numel) for e in trainer.spec.entries if e.is_buffer]


# -- FedBuff = FedAvg -----------------------------------------------------------------------

@pytest.mark.parametrize("weighting", ["samples", "uniform"])
def test_fedbuff_equals_fedavg_bit_for_bit(trainer: TorchTrainer, weighting: str) -> None:
    """K = cohort, zero staleness, same arrival order: the same mean delta and, through the
    same server optimizer (FedAdam, state carried over three steps), the same model."""
    w_avg = w_buf = trainer.initial_weights(0)
    strategy = FedAvg(weighting=weighting, server_opt=FedAdam(lr=0.05))
    opt = FedAdam(lr=0.05)
    buffer = FedBuffBuffer(len(SIZES), InverseSqrtStaleness(), weighting, dim=w_avg.numel())
    for step in range(3):
        updates = train_updates(trainer, w_avg, base=step, seed=10 * step)
        tally = RoundTally(strategy.aggregator, w_avg.numel(), step)
        for u in updates:
            tally.add(u)
            assert buffer.add(u, staleness_of(u, step)) == strategy.aggregator.weight_of(u)
        assert buffer.full
        mean, stats = buffer.flush()
        assert torch.equal(mean, tally.acc.result())
        w_avg, _ = strategy.finish_round(step, w_avg, tally)
        w_buf = opt.step(w_buf, mean)
        assert torch.equal(w_avg, w_buf)
        assert stats["count"] == len(SIZES) and stats["staleness_max"] == 0
        assert stats["client_ids"] == tally.client_ids
        assert stats["num_samples"] == tally.num_samples == sum(SIZES)
        assert stats["metrics"] == pytest.approx(tally.mean_metrics())
        assert buffer.count == 0 and not buffer.full
    # The model did move, BatchNorm statistics included.
    start = trainer.initial_weights(0)
    for sl in bn_slots(trainer):
        assert not torch.equal(w_buf[sl], start[sl])


def test_fedbuff_merge_equals_round_tally_merge_bit_for_bit() -> None:
    """A partial sum (one SecAgg+ sum, one batch of vmapped clients) merged at staleness 0
    is what RoundTally does with a PartialAggregate."""
    g = torch.Generator().manual_seed(3)
    d = 64
    parts = []
    for j in range(3):
        s = torch.randn(d, generator=g)
        parts.append(PartialAggregate(weighted_sum=s, total_weight=10.0 + j, count=2,
                                      num_samples=10 + j, client_ids=[f"a{j}", f"b{j}"]))
    tally = RoundTally(FedAvg().aggregator, d, 0)
    buffer = FedBuffBuffer(6, dim=d)
    for p in parts:
        tally.add(p)
        assert p.weighted_sum is not None
        buffer.merge(p.weighted_sum, p.total_weight, p.count, 0, client_ids=p.client_ids,
                     num_samples=p.num_samples)
    mean, stats = buffer.flush()
    assert torch.equal(mean, tally.acc.result())
    assert stats["count"] == 6 and stats["client_ids"] == tally.client_ids


# -- normalisation (Nguyen et al. 2022, Algorithm 1) ----------------------------------------

def test_fedbuff_mean_is_the_papers_staleness_weighted_sum_over_k() -> None:
    d, g = 16, torch.Generator().manual_seed(1)
    deltas = [torch.randn(d, generator=g) for _ in range(4)]
    stale = [0, 3, 8, 15]
    buffer = FedBuffBuffer(4, InverseSqrtStaleness(), "uniform", dim=d)
    for i, (delta, t) in enumerate(zip(deltas, stale, strict=True)):
        buffer.add(ClientUpdate(f"c{i}", delta, 10 * (i + 1), 0), t)
    mean, stats = buffer.flush()
    expected = sum(delta / (1 + t) ** 0.5 for delta, t in zip(deltas, stale, strict=True)) / 4
    assert torch.allclose(mean, expected, rtol=1e-6, atol=1e-7)
    assert stats["staleness_mean"] == 6.5
    assert (stats["staleness_min"], stats["staleness_max"]) == (0, 15)
    assert stats["staleness_weight_mean"] == pytest.approx(
        (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert stats["total_weight"] == 4.0

    # Sample weighting: sum_i n_i s_i delta_i / sum_i n_i (staleness shrinks the step).
    buffer = FedBuffBuffer(4, InverseSqrtStaleness(), "samples", dim=d)
    for i, (delta, t) in enumerate(zip(deltas, stale, strict=True)):
        buffer.add(ClientUpdate(f"c{i}", delta, 10 * (i + 1), 0), t)
    mean, stats = buffer.flush()
    n = [10, 20, 30, 40]
    expected = sum(k * delta / (1 + t) ** 0.5
                   for k, delta, t in zip(n, deltas, stale, strict=True)) / sum(n)
    assert torch.allclose(mean, expected, rtol=1e-6, atol=1e-7)
    assert stats["total_weight"] == 100.0
    assert stats["effective_weight"] == pytest.approx(10 + 20 / 2 + 30 / 3 + 40 / 4)


def test_equally_stale_buffer_moves_the_model_less() -> None:
    delta = torch.ones(4)
    fresh = FedBuffBuffer(2, dim=4)
    stale = FedBuffBuffer(2, dim=4)
    for b, t in ((fresh, 0), (stale, 3)):
        b.add(ClientUpdate("a", delta, 5, 0), t)
        b.add(ClientUpdate("b", delta, 7, 0), t)
    assert torch.equal(fresh.mean(), delta)
    assert torch.allclose(stale.mean(), delta * 0.5)


# -- FedBuff K = 1 = FedAsync (FLSim's equivalence test) ------------------------------------

@pytest.mark.parametrize(
    "staleness_fn", [InverseSqrtStaleness(), PolynomialStaleness(0.5), HingeStaleness(10, 4),
                     ConstantStaleness()])
def test_fedbuff_k1_equals_fedasync_bit_for_bit(staleness_fn) -> None:  # type: ignore[no-untyped-def]
    """FedBuff with K = 1, uniform weighting and ServerSGD(lr=alpha) applies
    x + alpha * s * delta: FedAsync's step along the delta, bit for bit, over a sequence."""
    d, alpha = 200, 0.6
    g = torch.Generator().manual_seed(7)
    x_buf = x_async = torch.randn(d, generator=g)
    buffer = FedBuffBuffer(1, staleness_fn, "uniform", dim=d)
    server = ServerSGD(lr=alpha)
    mixer = FedAsyncMixer(alpha, staleness_fn)
    rng = np.random.default_rng(0)
    for step in range(25):
        delta = torch.randn(d, generator=g) * 0.1
        t = int(rng.integers(0, 12))
        buffer.add(ClientUpdate(f"c{step % 3}", delta, int(rng.integers(1, 50)), 0), t)
        assert buffer.full
        mean, _ = buffer.flush()
        x_buf = server.step(x_buf, mean)
        x_async, metrics = mixer.apply_delta(x_async, delta, t)
        assert torch.equal(x_buf, x_async)
        assert metrics["alpha_t"] == pytest.approx(alpha * staleness_fn(t))
    assert mixer.steps == 25


def test_model_mixing_equals_the_delta_step_plus_drift_correction() -> None:
    """mix(x, x_base + delta) = x + a_t delta + a_t (x_base - x): equal to the FedBuff K=1
    step when the base is the current model, otherwise off by exactly the drift term."""
    d = 300
    g = torch.Generator().manual_seed(11)
    x, base, delta = (torch.randn(d, generator=g) for _ in range(3))
    mixer = FedAsyncMixer(0.7, PolynomialStaleness(0.5))
    # staleness 0, base = x: the two directions agree up to float rounding
    a, _ = mixer.mix(x, x + delta, 0)
    b, _ = mixer.apply_delta(x, delta, 0)
    assert torch.allclose(a, b, rtol=0, atol=1e-6)
    # stale: the difference is the drift correction
    t = 3
    a_t = mixer.alpha_t(t)
    a, metrics = mixer.mix(x, base + delta, t)
    b, _ = mixer.apply_delta(x, delta, t)
    assert torch.allclose(a - b, a_t * (base - x), rtol=0, atol=1e-5)
    assert metrics == {"alpha_t": a_t, "staleness": 3, "staleness_weight": 0.5}
    assert a_t == 0.35


def test_mix_is_the_papers_convex_combination() -> None:
    x = torch.tensor([0.0, 2.0, -4.0])
    client = torch.tensor([1.0, 0.0, 4.0])
    mixer = FedAsyncMixer(0.5, HingeStaleness(a=1, b=0))
    new, m = mixer.mix(x, client, 1)  # a_t = 0.5 * 1/2 = 0.25
    assert m["alpha_t"] == 0.25
    assert torch.equal(new, torch.tensor([0.25, 1.5, -2.0]))
    assert torch.equal(x, torch.tensor([0.0, 2.0, -4.0]))  # inputs untouched


# -- FedAsync alpha = 1 = sequential local training -----------------------------------------

def test_fedasync_alpha_one_one_client_is_sequential_training(trainer: TorchTrainer) -> None:
    data = client_data(1, 40)
    w0 = trainer.initial_weights(5)
    # Plain sequential local training: each fit starts from the previous model.
    seq = w0
    for step in range(4):
        seq = trainer.fit(seq, data, FitConfig(round=step, seed=step)).weights
    # FedAsync with alpha = 1, one client, zero staleness.
    mixer = FedAsyncMixer(1.0, PolynomialStaleness(0.5))
    history = ModelHistory(max_staleness=2)
    glob = w0
    history.record(0, glob)
    via_delta = w0
    for step in range(4):
        local = trainer.fit(glob, data, FitConfig(round=step, seed=step)).weights
        update = ClientUpdate("c1", local - glob, 40, step)
        t = staleness_of(update, step)
        assert t == 0
        glob, metrics = mixer.mix(glob, local, t)
        assert metrics["alpha_t"] == 1.0
        # The delta path rebuilds the client model as base + delta: equal up to the float
        # rounding of (local - base) + base.
        alt, _ = mixer.mix_update(via_delta, history.base(step), update, t)
        assert torch.allclose(alt, glob, rtol=0, atol=1e-6)
        via_delta = glob
        history.record(step + 1, glob)
    assert torch.equal(glob, seq)


# -- BatchNorm statistics -------------------------------------------------------------------

def test_batchnorm_statistics_are_mixed_and_averaged(trainer: TorchTrainer) -> None:
    w = trainer.initial_weights(1)
    updates = train_updates(trainer, w, base=0)
    slots = bn_slots(trainer)
    assert len(slots) == 2  # running_mean, running_var (num_batches_tracked is not float)
    # FedBuff: the BN slots of the mean are the staleness-weighted means of the clients' BN
    # deltas, so the new model's statistics are the weighted mean of the clients'.
    buffer = FedBuffBuffer(len(updates), dim=w.numel())
    stale = [0, 1, 2, 0, 5]
    for u, t in zip(updates, stale, strict=True):
        buffer.add(u, t)
    mean, _ = buffer.flush()
    new = ServerSGD(1.0).step(w, mean)
    n = torch.tensor([float(u.num_samples) for u in updates])
    s = torch.tensor([1 / (1 + t) ** 0.5 for t in stale])
    for sl in slots:
        client_stats = torch.stack([w[sl] + u.delta[sl] for u in updates])
        expected = w[sl] + ((n * s)[:, None] * (client_stats - w[sl])).sum(0) / n.sum()
        assert torch.allclose(new[sl], expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(new[sl], w[sl])
    # FedAsync: a_t = 0.5 mixes the statistics halfway.
    local = w + updates[2].delta
    mixed, _ = FedAsyncMixer(0.5).mix(w, local, 0)
    for sl in slots:
        assert torch.allclose(mixed[sl], (w[sl] + local[sl]) / 2, rtol=1e-6, atol=1e-6)
    # and the mixed vector loads into a model whose BN buffers carry those statistics
    model = bn_model()
    trainer.spec.load_into(model, mixed)
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm1d) and bn.running_mean is not None
    offset = next(e.offset for e in trainer.spec.entries if e.name == "1.running_mean")
    assert torch.equal(bn.running_mean, mixed[offset:offset + 8])


# -- buffer rules ---------------------------------------------------------------------------

def upd(cid: str, d: int = 4, n: int = 3, value: float = 1.0, base: int = 0) -> ClientUpdate:
    return ClientUpdate(cid, torch.full((d,), value), n, base)


def test_a_fast_client_may_fill_two_slots_unless_distinct_clients() -> None:
    buffer = FedBuffBuffer(3, dim=4)
    buffer.add(upd("fast"), 0)
    buffer.add(upd("fast", value=3.0), 1)
    assert buffer.client_ids == ["fast", "fast"]
    strict = FedBuffBuffer(3, dim=4, distinct_clients=True)
    strict.add(upd("fast"), 0)
    with pytest.raises(InvalidUpdateError, match="second update in this buffer"):
        strict.add(upd("fast"), 0)
    assert strict.count == 1
    with pytest.raises(ValueError, match="already in this buffer"):
        strict.merge(torch.ones(4), 3.0, 1, 0, client_ids=["fast"])
    # the rule holds across a checkpoint, and a flush starts a fresh buffer
    resumed = FedBuffBuffer(3, dim=4, distinct_clients=True)
    resumed.load_state_dict(strict.state_dict())
    with pytest.raises(InvalidUpdateError, match="second update in this buffer"):
        resumed.add(upd("fast"), 0)
    resumed.flush()
    resumed.add(upd("fast"), 0)


def test_a_prepared_delta_is_summed_instead_of_the_raw_one() -> None:
    """A per-update stage (a DP clip) runs after validation; the buffer sums its output."""
    raw = ClientUpdate("a", torch.tensor([3.0, 4.0, 0.0, 0.0]), 2, 0)
    clipped = raw.delta / raw.delta.norm()  # clip to norm 1
    buffer = FedBuffBuffer(1, dim=4)
    buffer.add(raw, 0, delta=clipped)
    assert torch.equal(buffer.mean(), clipped)
    other = FedBuffBuffer(1, dim=4)
    for bad in (torch.ones(3), torch.ones(4, dtype=torch.float64),
                torch.tensor([1.0, float("nan"), 0, 0])):
        with pytest.raises(ValueError, match="delta for client 'a'"):
            other.add(raw, 0, delta=bad)
    assert other.count == 0


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (ClientUpdate("x", torch.ones(5), 3, 0), "shape"),
        (ClientUpdate("x", torch.tensor([1.0, float("nan"), 0, 0]), 3, 0), "non-finite"),
        (ClientUpdate("x", torch.ones(4, dtype=torch.float64), 3, 0), "dtype"),
        (ClientUpdate("x", torch.ones(4), 0, 0), "num_samples"),
        (ClientUpdate("x", torch.ones(4), 3, 0, metrics={"loss": float("inf")}), "metric"),
        ("not an update", "expected a ClientUpdate"),
    ],
)
def test_invalid_updates_are_rejected_and_leave_the_buffer_unchanged(
    bad: object, problem: str
) -> None:
    buffer = FedBuffBuffer(2, dim=4)
    buffer.add(upd("a"), 0)
    before = buffer.state_dict()
    with pytest.raises(InvalidUpdateError, match=problem):
        buffer.add(bad, 0)  # type: ignore[arg-type]
    after = buffer.state_dict()
    assert torch.equal(before.pop("sum"), after.pop("sum")) and before == after


def test_buffer_refuses_caller_errors() -> None:
    buffer = FedBuffBuffer(1, dim=4)
    with pytest.raises(ValueError, match="staleness must be an integer >= 0"):
        buffer.add(upd("a"), -1)
    with pytest.raises(ValueError, match="empty"):
        buffer.flush()
    buffer.add(upd("a"), 0)
    with pytest.raises(ValueError, match="flush it first"):
        buffer.add(upd("b"), 0)
    with pytest.raises(ValueError, match="does not fit"):
        FedBuffBuffer(2, dim=4).merge(torch.ones(4), 3.0, 3, 0)
    with pytest.raises(ValueError, match="non-finite"):
        FedBuffBuffer(2, dim=4).merge(torch.tensor([1.0, float("inf"), 0, 0]), 3.0, 1, 0)
    # a staleness weight that underflows leaves the update no weight: refused, by client
    tiny = FedBuffBuffer(2, PolynomialStaleness(a=200), dim=4)
    with pytest.raises(InvalidUpdateError, match=r"'slow'.*underflow"):
        tiny.add(upd("slow"), 10**6)
    assert tiny.count == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k \\(the buffer size\\) must be an integer >= 1"),
        ({"k": True}, "k \\(the buffer size\\)"),
        ({"k": 2, "dim": 0}, "dim must be a positive integer"),
        ({"k": 2, "weighting": "size"}, "weighting"),
        ({"k": 2, "staleness": lambda t: 1.0}, "StalenessFunction"),
    ],
)
def test_buffer_configuration_is_validated(kwargs: dict, message: str) -> None:
    args = {"dim": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        FedBuffBuffer(**args)
    if "weighting" in kwargs:
        with pytest.raises(ConfigError):
            FedBuffBuffer(**args)


def test_partly_filled_buffer_survives_a_checkpoint() -> None:
    d = 32
    g = torch.Generator().manual_seed(5)
    updates = [ClientUpdate(f"c{i}", torch.randn(d, generator=g), 5 + i, 0,
                            metrics={"train_loss": 0.1 * i}) for i in range(4)]
    stale = [2, 0, 7, 1]
    ref = FedBuffBuffer(4, HingeStaleness(2, 1), dim=d)
    for u, t in zip(updates, stale, strict=True):
        ref.add(u, t)
    expected_mean, expected_stats = ref.flush()

    first = FedBuffBuffer(4, HingeStaleness(2, 1), dim=d)
    for u, t in zip(updates[:2], stale[:2], strict=True):
        first.add(u, t)
    blob = io.BytesIO()
    torch.save(first.state_dict(), blob)
    blob.seek(0)
    state = torch.load(blob, weights_only=True)
    resumed = FedBuffBuffer.from_config(first.describe(), dim=d)
    resumed.load_state_dict(state)
    assert resumed.count == 2 and resumed.client_ids == ["c0", "c1"]
    for u, t in zip(updates[2:], stale[2:], strict=True):
        resumed.add(u, t)
    mean, stats = resumed.flush()
    assert torch.equal(mean, expected_mean)
    assert stats == expected_stats
    # an empty buffer round-trips too
    empty = FedBuffBuffer(4, HingeStaleness(2, 1), dim=d)
    empty.load_state_dict(FedBuffBuffer(4, HingeStaleness(2, 1), dim=d).state_dict())
    assert empty.count == 0
    # another configuration is refused, naming what differs
    other = FedBuffBuffer(4, InverseSqrtStaleness(), dim=d)
    with pytest.raises(ValueError, match="staleness"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="'k'"):
        FedBuffBuffer(5, HingeStaleness(2, 1), dim=d).load_state_dict(state)


def test_describe_is_the_run_identity() -> None:
    b = FedBuffBuffer(10, dim=4)
    assert b.describe() == {"name": "fedbuff", "k": 10, "weighting": "samples",
                            "staleness": {"name": "inverse_sqrt"},
                            "distinct_clients": False}
    m = FedAsyncMixer(0.6, HingeStaleness(10, 4))
    assert m.describe() == {"name": "fedasync", "alpha": 0.6,
                            "staleness": {"name": "hinge", "a": 10.0, "b": 4.0}}
    assert FedAsyncMixer.from_config(m.describe()).describe() == m.describe()


def test_server_momentum_applies_to_the_buffer_mean() -> None:
    """The caller's server optimizer step on the flushed mean (FedAvgM, as in the paper)."""
    buffer = FedBuffBuffer(2, dim=3)
    opt = FedAvgM(lr=1.0, momentum=0.5)
    x = torch.zeros(3)
    for _ in range(2):
        buffer.add(upd("a", d=3, value=1.0), 0)
        buffer.add(upd("b", d=3, value=3.0), 0)
        mean, _ = buffer.flush()
        x = opt.step(x, mean)
    assert torch.equal(x, torch.full((3,), 2.0 + 3.0))  # m: 2, then 0.5 * 2 + 2


# -- mixer rules and history ----------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_mixer_alpha_must_be_in_0_1(alpha: object) -> None:
    with pytest.raises(ValueError, match=r"alpha must be a number in \(0, 1\]"):
        FedAsyncMixer(alpha)  # type: ignore[arg-type]


def test_mixer_refuses_bad_inputs_before_changing_anything() -> None:
    mixer = FedAsyncMixer(0.5)
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="non-finite"):
        mixer.mix(x, torch.tensor([0.0, float("nan"), 1.0]), 0)
    with pytest.raises(ValueError, match="shape"):
        mixer.mix(x, torch.zeros(4), 0)
    with pytest.raises(ValueError, match="float32"):
        mixer.mix(x, torch.zeros(3, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="staleness must be"):
        mixer.apply_delta(x, torch.zeros(3), -2)
    with pytest.raises(InvalidUpdateError, match="'bad'"):
        mixer.mix_update(x, x, ClientUpdate("bad", torch.zeros(5), 3, 0), 0)
    assert mixer.steps == 0


def test_mixer_state_round_trip() -> None:
    mixer = FedAsyncMixer(0.4, PolynomialStaleness(0.5))
    mixer.mix(torch.zeros(2), torch.ones(2), 1)
    state = mixer.state_dict()
    fresh = FedAsyncMixer(0.4, PolynomialStaleness(0.5))
    fresh.load_state_dict(state)
    assert fresh.steps == 1
    with pytest.raises(ValueError, match="differs"):
        FedAsyncMixer(0.5, PolynomialStaleness(0.5)).load_state_dict(state)


def test_model_history_keeps_a_bounded_window() -> None:
    h = ModelHistory(max_staleness=2)
    vs = [torch.full((3,), float(v)) for v in range(6)]
    for v, w in enumerate(vs):
        h.record(v, w)
    assert h.versions == [3, 4, 5] and h.latest == 5
    assert h.base(4) is vs[4]  # kept by reference: no copy
    assert h.nbytes() == 3 * 3 * 4
    with pytest.raises(KeyError, match=r"version 2 is not held.*3..5"):
        h.base(2)
    with pytest.raises(ValueError, match="not after the latest"):
        h.record(5, vs[0])
    with pytest.raises(ValueError, match="shape"):
        h.record(6, torch.zeros(4))
    blob = io.BytesIO()
    torch.save(h.state_dict(), blob)
    blob.seek(0)
    again = ModelHistory(max_staleness=2)
    again.load_state_dict(torch.load(blob, weights_only=True))
    assert again.versions == [3, 4, 5] and torch.equal(again.base(5), vs[5])
    with pytest.raises(ValueError, match="max_staleness"):
        ModelHistory(1).load_state_dict(h.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_components_follow_the_weights_device() -> None:
    x = torch.zeros(8, device="cuda")
    mixer = FedAsyncMixer(0.5)
    new, _ = mixer.mix(x, torch.ones(8), 0)  # a CPU client model, mixed on the GPU
    assert new.device.type == "cuda" and torch.equal(new.cpu(), torch.full((8,), 0.5))
    buffer = FedBuffBuffer(2, dim=8, device="cuda")
    buffer.add(ClientUpdate("a", torch.ones(8), 2, 0), 0)
    buffer.add(ClientUpdate("b", torch.ones(8, device="cuda") * 3, 2, 0), 3)
    mean, _ = buffer.flush()
    assert mean.device.type == "cuda"
    assert torch.allclose(mean.cpu(), torch.full((8,), (1 + 3 * 0.5) / 2))
