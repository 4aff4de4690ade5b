"""Client-level central DP under the asynchronous schedules (privacy/async_dp.py): the clip
bound of every buffered update, the noise on the released mean, the per-step accounting
against dp-accounting computed here independently, the budget stop, the refusals, and the
equivalence with plain FedBuff when the noise is zero."""

from __future__ import annotations

import math
from dataclasses import dataclass

import dp_accounting
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

import fedmosaic as fm
from fedmosaic.algorithms.fedbuff import FedBuffBuffer
from fedmosaic.algorithms.staleness import InverseSqrtStaleness, StalenessFunction
from fedmosaic.core import ConfigError
from fedmosaic.core.update import ClientUpdate
from fedmosaic.models import MLP
from fedmosaic.privacy.async_dp import (
    ASYNC_DP_GUARANTEE,
    AsyncDPFedAvg,
    AsyncGaussianRelease,
    DPFedBuffBuffer,
)
from fedmosaic.privacy.dp_fedavg import DPFedAvg
from fedmosaic.privacy.randomness import SeededNoise
from fedmosaic.runtime import SequentialTransport
from fedmosaic.runtime.schedule import FedAsyncSchedule, FedBuffSchedule

DIM = 64


def _trainer() -> fm.TorchTrainer:
    return fm.TorchTrainer(lambda: MLP(5, [8], 3), lr=0.1, batch_size=8)


def _update(cid: str, delta: torch.Tensor, base: int = 0) -> ClientUpdate:
    return ClientUpdate(delta=delta, num_samples=10, client_id=cid, base_round=base)


def _release(z: float = 1.0, clip: float = 1.0, seed: int = 0, **kw) -> AsyncGaussianRelease:
    return AsyncGaussianRelease(clip=clip, noise_multiplier=z, delta=1e-5,
                                noise=lambda step: SeededNoise(seed * 100_003 + step), **kw)


def _dp_buffer(k: int, release: AsyncGaussianRelease, dim: int = DIM,
               staleness: StalenessFunction | None = None) -> DPFedBuffBuffer:
    inner = FedBuffBuffer(k, staleness, "uniform", dim=dim, distinct_clients=True)
    return DPFedBuffBuffer(inner, release)


def _dp_eps(z: float, steps: int, delta: float = 1e-5, kind: str = "rdp") -> float:
    """Independent: dp-accounting's epsilon of ``steps`` self-composed Gaussian mechanisms."""
    acc = (RdpAccountant() if kind == "rdp" else
           PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE))
    acc.compose(dp_accounting.GaussianDpEvent(z), steps)
    return acc.get_epsilon(delta)


# -- the mechanism ---------------------------------------------------------------------------

def test_every_buffered_update_is_clipped_to_c_before_its_staleness_weight():
    c = 0.7
    buf = _dp_buffer(5, _release(clip=c))
    seen: list[tuple[float, float]] = []
    add = buf.inner.add

    def spy(update, staleness, *, delta=None):
        seen.append((float(torch.linalg.vector_norm(delta)), buf.inner.staleness(staleness)))
        return add(update, staleness, delta=delta)

    buf.inner.add = spy  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        for i in range(5):
            scale = [1e-3, 0.5, 3.0, 50.0, 1e4][i]
            delta = torch.randn(DIM, generator=gen) * scale
            effective = buf.add(_update(f"c{i}", delta, base=0), staleness=step * i)
            norm = float(torch.linalg.vector_norm(delta))
            # within the bound the update is summed untouched; beyond it, scaled to C
            assert seen[-1][0] == pytest.approx(min(norm, c), rel=1e-5)
            assert effective == seen[-1][1] <= 1.0
        buf.flush()
    assert len(seen) == 20
    # The sensitivity: every summed term s_i * clip(delta_i) has norm <= C.
    assert all(n * s <= c * (1 + 1e-6) for n, s in seen)
    assert any(s < 1 for _, s in seen) and any(n > 0.99 * c for n, _ in seen)


def test_a_staleness_weight_above_one_is_refused_it_would_raise_the_sensitivity():
    @dataclass(frozen=True)
    class Boost(StalenessFunction):
        name = "boost"
        offset: float = 0.0

        def _weight(self, staleness: int) -> float:
            return 1.0 + self.offset + staleness

        def parameters(self) -> dict[str, float]:
            return {}

    @dataclass(frozen=True)
    class Rising(Boost):  # violates the non-increasing contract: caught on arrival
        name = "rising"

        def _weight(self, staleness: int) -> float:
            return 0.5 + staleness

    with pytest.raises(ConfigError, match="weight above 1 would raise the sensitivity"):
        _dp_buffer(2, _release(), staleness=Boost(offset=0.5))  # at configuration
    buf = _dp_buffer(2, _release(), staleness=Rising())
    buf.add(_update("a", torch.ones(DIM)), 0)  # weight 0.5: fine
    with pytest.raises(ConfigError, match="weight above 1 would raise the sensitivity"):
        buf.add(_update("b", torch.ones(DIM)), 1)


def test_the_noise_std_on_the_flushed_mean_is_z_c_over_k():
    z, c, k, dim = 1.3, 0.5, 4, 50_000
    release = _release(z=z, clip=c, seed=7)
    gen = torch.Generator().manual_seed(3)
    diffs = []
    for _ in range(4):
        deltas = [torch.randn(dim, generator=gen) for _ in range(k)]
        stal = [0, 1, 3, 8]
        buf = _dp_buffer(k, release, dim=dim)
        plain = FedBuffBuffer(k, None, "uniform", dim=dim)
        for i, (d, s) in enumerate(zip(deltas, stal, strict=True)):
            buf.add(_update(f"c{i}", d), s)
            clipped = d * (c / float(torch.linalg.vector_norm(d)))
            plain.add(_update(f"c{i}", d), s, delta=clipped)
        noised, stats = buf.flush()
        assert stats["extra"]["dp_noise_std_on_mean"] == z * c / k
        diffs.append((noised - plain.flush()[0]).double())
    noise = torch.cat(diffs)  # 200,000 draws: the sample std is within 0.5% w.p. > 1 - 1e-6
    assert float(noise.std()) == pytest.approx(z * c / k, rel=0.01)
    assert abs(float(noise.mean())) < 5 * z * c / k / math.sqrt(noise.numel())
    assert release.steps == 4


def test_only_a_full_buffer_is_released_and_a_client_once_per_buffer():
    buf = _dp_buffer(3, _release())
    buf.add(_update("a", torch.ones(DIM)), 0)
    with pytest.raises(ValueError, match="released full only"):
        buf.flush()
    from fedmosaic.core.errors import InvalidUpdateError

    with pytest.raises(InvalidUpdateError, match="distinct_clients"):
        buf.add(_update("a", torch.ones(DIM)), 0)
    with pytest.raises(ConfigError, match="'uniform' under DP"):
        DPFedBuffBuffer(FedBuffBuffer(3, None, "samples", dim=DIM, distinct_clients=True),
                        _release())
    with pytest.raises(ValueError, match="distinct_clients=True"):
        DPFedBuffBuffer(FedBuffBuffer(3, None, "uniform", dim=DIM), _release())
    with pytest.raises(ValueError, match="z = 0 releases the clipped sum with no privacy"):
        _release(z=0.0)


# -- runs: accounting, budget, guarantees ----------------------------------------------------

def _strategy(**kw) -> AsyncDPFedAvg:
    args = {"clip": 1.0, "delta": 1e-5, "noise_multiplier": 1.1, **kw}
    return AsyncDPFedAvg(**args)


def _run(fed, strategy, schedule, rounds=5, **kw):
    kw.setdefault("transport", "sequential")  # bit-for-bit comparisons (auto may batch)
    return fm.simulate(_trainer(), fed, strategy, rounds=rounds, seed=3, schedule=schedule,
                       **kw)


@pytest.mark.parametrize("kind", ["fedbuff", "fedasync"])
def test_epsilon_after_t_steps_is_dp_accountings_t_fold_gaussian(blobs_fed, kind):
    from fedmosaic.runtime.clock import ClientTimingModel

    clock = ClientTimingModel(seed=2, speed_sigma=1.0)
    schedule = (FedBuffSchedule(3, 4, clock=clock) if kind == "fedbuff"
                else FedAsyncSchedule(0.5, 3, clock=clock))
    res = _run(blobs_fed, _strategy(), schedule, rounds=6)
    assert [r["version"] for r in res.history] == list(range(1, 7))
    for t, rec in enumerate(res.history, start=1):
        assert rec["dp_epsilon"] == pytest.approx(_dp_eps(1.1, t), rel=1e-9)
        assert rec["dp_noise_std_on_mean"] == 1.1 * 1.0 / (3 if kind == "fedbuff" else 1)
    assert max(r["staleness_max"] for r in res.history) >= 1  # stale steps are accounted too
    dp = res.guarantees["differential_privacy"]
    assert dp["guarantee"] == ASYNC_DP_GUARANTEE
    assert dp["rounds"] == 6 and dp["epsilon"] == res.history[-1]["dp_epsilon"]
    assert "no amplification" in dp["guarantee"] and dp["sampling"].startswith("none")
    assert any("participation pattern" in n for n in dp["not_covered"])


def test_the_pld_accountant_gives_dp_accountings_pld_value(blobs_fed):
    res = _run(blobs_fed, _strategy(accountant="pld"), FedBuffSchedule(3, 3), rounds=3)
    assert res.history[-1]["dp_epsilon"] == pytest.approx(_dp_eps(1.1, 3, kind="pld"),
                                                          rel=1e-9)


def test_the_budget_stops_the_run_before_the_step_that_would_exceed_it(blobs_fed):
    budget = (_dp_eps(1.1, 3) + _dp_eps(1.1, 4)) / 2
    res = _run(blobs_fed, _strategy(budget_epsilon=budget), FedBuffSchedule(2, 3), rounds=10)
    assert len(res.history) == 3
    assert res.history[-1]["dp_epsilon"] <= budget
    assert res.stopped is not None and "server step 4 would exceed the budget" in res.stopped
    fa = _run(blobs_fed, _strategy(budget_epsilon=budget), FedAsyncSchedule(0.5, 3), rounds=10)
    assert len(fa.history) == 3 and "server step 4" in fa.stopped


def test_target_epsilon_calibrates_z_for_the_planned_unsampled_steps():
    s = _strategy(noise_multiplier=None, target_epsilon=4.0, rounds=20)
    z = s.noise_multiplier
    assert _dp_eps(z, 20) <= 4.0 < _dp_eps(z / 1.02, 20)


def test_zero_noise_and_a_huge_clip_is_plain_fedbuff_bit_for_bit(blobs_fed, monkeypatch):
    """The DP path adds noise / K to the plain buffer's mean: with the noise source giving
    zeros and nothing clipped, the run is FedBuff (uniform weighting) bit for bit. (z = 0
    itself is refused: it would release the sum without privacy.)"""
    from fedmosaic.runtime.clock import ClientTimingModel

    class Zeros(SeededNoise):
        def gaussian(self, shape, std, dtype=torch.float32):
            return torch.zeros(shape, dtype=dtype)

    for sched in (lambda: FedBuffSchedule(3, 3),
                  lambda: FedBuffSchedule(2, 3, clock=ClientTimingModel(seed=4,
                                                                        speed_sigma=0.5))):
        dp = _strategy(clip=1e12)
        monkeypatch.setattr(dp, "step_noise", lambda step: Zeros(0))
        dp.release.noise = dp.step_noise
        plain = _run(blobs_fed, fm.FedAvg(weighting="uniform"), sched(), rounds=4)
        private = _run(blobs_fed, dp, sched(), rounds=4)
        assert torch.equal(plain.weights, private.weights)
        assert [r["test_accuracy"] for r in plain.history] == \
            [r["test_accuracy"] for r in private.history]


def test_a_resumed_run_keeps_the_spend_and_the_model(blobs_fed, tmp_path):
    whole = _run(blobs_fed, _strategy(), FedBuffSchedule(2, 3), rounds=5)
    _run(blobs_fed, _strategy(), FedBuffSchedule(2, 3), rounds=5, out_dir=tmp_path,
         stop_after=2)
    resumed = _run(blobs_fed, _strategy(), FedBuffSchedule(2, 3), rounds=5, out_dir=tmp_path,
                   resume=True)
    assert torch.equal(whole.weights, resumed.weights)
    assert resumed.history[-1]["dp_epsilon"] == whole.history[-1]["dp_epsilon"]
    assert resumed.guarantees["differential_privacy"]["rounds"] == 5


# -- refusals --------------------------------------------------------------------------------

def _server(strategy, fed, schedule):
    trainer = _trainer()
    return fm.Server(trainer=trainer, strategy=strategy, rounds=2, schedule=schedule,
                     transport=SequentialTransport(trainer, fed))


def test_python_api_refusals(blobs_fed):
    sampled = DPFedAvg(clip=1.0, noise_multiplier=1.0, delta=1e-5, sampling="fixed",
                       clients_per_round=3)
    with pytest.raises(ConfigError, match="accounting assumes sampled synchronous rounds"):
        _server(sampled, blobs_fed, FedBuffSchedule(2, 3))
    with pytest.raises(ConfigError, match="at most the 6 clients under DP"):
        _server(_strategy(), blobs_fed, FedBuffSchedule(7, 8))
    with pytest.raises(ConfigError, match="sample-count weights make the sensitivity"):
        _strategy(weighting="samples")
    with pytest.raises(ConfigError, match="synchronous rounds use DPFedAvg"):
        fm.simulate(_trainer(), blobs_fed, _strategy(), rounds=1)


def _raw(strategy, privacy):
    return {"rounds": 3, "data": {"dataset": "digits"}, "strategy": strategy,
            "privacy": privacy}


CENTRAL = {"mode": "central", "clip": 1.0, "delta": 1e-5, "noise_multiplier": 1.0}
FEDBUFF = {"schedule": "fedbuff", "buffer_size": 3, "concurrency": 5}


@pytest.mark.parametrize("strategy, privacy, key, fragment", [
    (FEDBUFF, {**CENTRAL, "rate": 0.1}, "privacy.rate", "not Poisson sampling"),
    (FEDBUFF, {**CENTRAL, "sampling": "fixed"}, "privacy.sampling", "not random sampling"),
    (FEDBUFF, {**CENTRAL, "adaptive_clip_quantile": 0.5}, "privacy.adaptive_clip_quantile",
     "per synchronous round only"),
    ({**FEDBUFF, "weighting": "uniform"}, CENTRAL, "strategy.weighting", "by construction"),
    ({**FEDBUFF, "name": "fedprox"}, CENTRAL, "strategy.name", "DP-FedAvg"),
])
def test_config_refusals_name_the_key_and_the_reason(strategy, privacy, key, fragment):
    from fedmosaic.config import validate

    with pytest.raises(ConfigError) as info:
        validate(_raw(strategy, privacy))
    assert info.value.key == key and fragment in str(info.value)


def test_the_experiment_file_builds_async_dp_for_fedbuff_and_fedasync():
    from fedmosaic.build import build_strategy
    from fedmosaic.config import validate

    for sched in (FEDBUFF, {"schedule": "fedasync", "alpha": 0.5, "concurrency": 4}):
        s = build_strategy(validate(_raw(sched, {**CENTRAL, "budget_epsilon": 5.0})))
        assert isinstance(s, AsyncDPFedAvg) and s.weighting == "uniform"
        assert s.noise_multiplier == 1.0 and s.release.budget.epsilon == 5.0
    live = build_strategy(validate(_raw(FEDBUFF, CENTRAL)), deployment=True)
    assert isinstance(live, AsyncDPFedAvg) and live.secure_noise and live.schedule.live
    sync = build_strategy(validate(_raw({}, {**CENTRAL, "rate": 0.5})))
    assert type(sync) is DPFedAvg


def test_inverse_sqrt_weights_never_exceed_one():
    s = InverseSqrtStaleness()
    assert all(0 < s(t) <= 1 for t in range(1000))


def test_live_dp_fedbuff_equals_the_simulated_one_and_the_budget_cancels_open_tasks(blobs_fed):
    """The same schedule code runs over real clients (a LiveTransport; here the fake of
    tests/runtime): seeded noise makes the live run the simulated one bit for bit; a budget
    stop ends the open tasks."""
    from tests.runtime.fake_live import FakeLiveTransport

    sim = _run(blobs_fed, _strategy(), FedBuffSchedule(3, 3), rounds=4)
    trainer = _trainer()
    fake = FakeLiveTransport(trainer, blobs_fed)
    live = fm.simulate(trainer, blobs_fed, _strategy(), rounds=4, seed=3, transport=fake,
                       schedule=FedBuffSchedule(3, 3, live=True, poll=0.25))
    assert torch.equal(sim.weights, live.weights)
    assert [r["dp_epsilon"] for r in live.history] == [r["dp_epsilon"] for r in sim.history]
    budget = (_dp_eps(1.1, 2) + _dp_eps(1.1, 3)) / 2
    trainer = _trainer()
    fake = FakeLiveTransport(trainer, blobs_fed, delay={"c5": 10**6})
    stopped = fm.simulate(trainer, blobs_fed, _strategy(budget_epsilon=budget), rounds=6,
                          seed=3, transport=fake,
                          schedule=FedBuffSchedule(2, 3, live=True, poll=0.25))
    assert len(stopped.history) == 2 and "server step 3 would exceed" in stopped.stopped
    assert len(fake.cancelled) == 1 and "PrivacyBudgetExhausted" in fake.cancelled[0][0]
    assert not fake.open
