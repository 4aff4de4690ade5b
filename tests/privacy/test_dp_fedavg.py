"""Client-level DP-FedAvg: clipping, fixed denominator, noise, sampling, accounting, budget."""

import itertools

import numpy as np
import pytest
import torch

import fedmosaic as fm
from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.core import ClientUpdate
from fedmosaic.core.errors import CheckpointError
from fedmosaic.data import IID, partition
from fedmosaic.models import MLP
from fedmosaic.privacy.accountant import PrivacyAccountant, epsilon_for
from fedmosaic.privacy.dp_fedavg import ClippedSumAggregator, DPFedAvg
from fedmosaic.privacy.local_dp import LocalDP, laplace_mechanism
from fedmosaic.privacy.randomness import SeededNoise
from fedmosaic.runtime import RoundTally, SequentialTransport
from fedmosaic.train import FitConfig
from tests.conftest import make_blobs


def _trainer():
    return fm.TorchTrainer(lambda: MLP(5, [8], 3), lr=0.1, batch_size=8)


@pytest.fixture
def fed():
    return partition(make_blobs(600, 0), IID(), 30, 0, test=make_blobs(200, 1))


def _update(cid, vec):
    return ClientUpdate(cid, torch.as_tensor(vec, dtype=torch.float32), 10, base_round=1)


def test_clipping_bounds_every_update_and_counts_those_within():
    agg = ClippedSumAggregator(clip=1.0)
    tally = RoundTally(agg, 2, 1)
    tally.add(_update("a", [3.0, 4.0]))   # norm 5 -> clipped to norm 1
    tally.add(_update("b", [0.3, 0.4]))   # norm 0.5 -> untouched
    assert torch.allclose(tally.acc.weighted_sum, torch.tensor([0.6 + 0.3, 0.8 + 0.4]))
    assert tally.acc.total_weight == 2.0  # uniform weights
    assert tally.stage_stats["within_clip"] == 1.0


def test_noise_on_the_mean_has_std_z_clip_over_expected_clients():
    s = DPFedAvg(clip=0.5, delta=1e-5, noise_multiplier=1.2, sampling="fixed",
                 clients_per_round=20, population=100)
    s.run_seed = 3
    dim = 50_000
    tally = RoundTally(s.aggregator, dim, 1)
    for i in range(20):
        tally.add(_update(f"c{i}", torch.zeros(dim)))
    new, metrics = s.finish_round(1, torch.zeros(dim), tally)
    assert float(new.std()) == pytest.approx(1.2 * 0.5 / 20, rel=0.03)
    assert abs(float(new.mean())) < 4 * 1.2 * 0.5 / 20 / dim ** 0.5
    assert metrics["dp_noise_std_on_mean"] == pytest.approx(0.03)
    assert metrics["dp_epsilon"] > 0


def test_fixed_denominator_not_the_number_of_updates():
    s = DPFedAvg(clip=10.0, delta=1e-5, noise_multiplier=1e-6, sampling="poisson", rate=0.5,
                 population=8)
    tally = RoundTally(s.aggregator, 3, 1)
    tally.add(_update("a", [1.0, 2.0, 3.0]))
    new, _ = s.finish_round(1, torch.zeros(3), tally)
    assert torch.allclose(new, torch.tensor([1.0, 2.0, 3.0]) / (0.5 * 8), atol=1e-4)


def test_poisson_sampling_draws_a_binomial_number_of_clients():
    s = DPFedAvg(clip=1.0, delta=1e-5, noise_multiplier=1.0, sampling="poisson", rate=0.2)
    ids = [f"c{i:03d}" for i in range(500)]
    rng = np.random.default_rng(0)
    counts = [len(s.configure_fit(r, ids, rng, run_seed=0)) for r in range(1, 41)]
    assert np.mean(counts) == pytest.approx(100, rel=0.05)
    assert np.std(counts) > 3  # random cohort sizes, unlike fixed sampling


def test_run_reports_epsilon_each_round_matching_the_accountant(fed):
    strategy = DPFedAvg(clip=1.0, delta=1e-5, noise_multiplier=1.0, sampling="poisson",
                        rate=0.3)
    res = fm.simulate(_trainer(), fed, strategy, rounds=5, seed=0)
    eps = res.metric("dp_epsilon")
    assert len(eps) == 5 and all(b > a for a, b in itertools.pairwise(eps))
    assert eps[-1] == pytest.approx(epsilon_for(1.0, 5, "poisson", 0.3, delta=1e-5), rel=1e-6)
    g = res.guarantees["differential_privacy"]
    assert g["unit"] == "client" and g["rounds"] == 5 and g["epsilon"] == pytest.approx(eps[-1])
    assert "Poisson" in g["sampling"]


def test_guarantees_name_the_noise_source_and_what_dp_does_not_cover(fed):
    def run(**kw):
        s = DPFedAvg(clip=1.0, delta=1e-5, noise_multiplier=1.0, sampling="poisson", rate=0.3,
                     **kw)
        return fm.simulate(_trainer(), fed, s, rounds=2, seed=0)

    seeded, secure = run(), run(secure_noise=True, client_metrics="suppress")
    g = seeded.guarantees["differential_privacy"]
    assert g["noise_seed"] == "deterministic noise: simulation only"
    assert any("participation" in n for n in g["not_covered"])
    assert any("training metrics" in n for n in g["not_covered"])
    assert "train_loss" in seeded.history[-1]  # recorded by default
    g = secure.guarantees["differential_privacy"]
    assert "os.urandom" in g["noise_seed"] and g["client_metrics"] == "suppress"
    assert not any("training metrics" in n for n in g["not_covered"])
    # Suppressed: no per-client metric (computed from private data without noise) is kept.
    assert all("train_loss" not in r and "train_accuracy" not in r for r in secure.history)
    assert "dp_epsilon" in secure.history[-1] and "test_accuracy" in secure.history[-1]
    # Secure noise: the same seed no longer gives the same model (nor the same cohorts).
    again = run(secure_noise=True, client_metrics="suppress")
    assert not torch.equal(again.weights, secure.weights)
    with pytest.raises(ValueError, match="client_metrics"):
        DPFedAvg(clip=1.0, delta=1e-5, noise_multiplier=1.0, rate=0.3, client_metrics="noisy")


def test_local_dp_run_reports_its_guarantee_and_noise_source(fed):
    stage = LocalDP(clip=1.0, noise_multiplier=3.0)
    res = fm.simulate(_trainer(), fed, fm.FedAvg(client_stages=[stage], fraction=0.2), rounds=1,
                      seed=0)
    (g,) = res.guarantees["local_differential_privacy"]
    assert g["epsilon_per_round"] == stage.guarantee(1)["epsilon_per_round"]
    assert "deterministic noise: simulation only" in g["noise_seed"]
    assert any("training metrics" in n for n in g["not_covered"])


def test_target_epsilon_calibrates_noise_for_the_planned_rounds(fed):
    strategy = DPFedAvg(clip=1.0, delta=1e-5, target_epsilon=2.0, rounds=6,
                        sampling="fixed", clients_per_round=6)
    res = fm.simulate(_trainer(), fed, strategy, rounds=6, seed=0)
    assert res.metric("dp_epsilon")[-1] <= 2.0
    assert res.metric("dp_epsilon")[-1] > 1.9  # calibrated, not grossly over-noised


def test_budget_stops_training_before_it_is_exceeded(fed):
    strategy = DPFedAvg(clip=1.0, delta=1e-5, noise_multiplier=1.2, sampling="poisson",
                        rate=0.3, budget_epsilon=4.5)
    res = fm.simulate(_trainer(), fed, strategy, rounds=50, seed=0)
    assert res.stopped is not None and "budget" in res.stopped
    assert len(res.history) == 5  # epsilon after 5 rounds is 4.42, after 6 it would be 4.74
    assert res.metric("dp_epsilon")[-1] <= 4.5
    assert epsilon_for(1.2, 6, "poisson", 0.3, delta=1e-5) > 4.5


def test_adaptive_clipping_moves_the_clip_towards_the_target_quantile():
    for start, direction in ((0.05, 1), (20.0, -1)):
        s = DPFedAvg(clip=start, delta=1e-5, noise_multiplier=1.0, sampling="fixed",
                     clients_per_round=50, population=50, adaptive_clip_quantile=0.5,
                     adaptive_clip_noise=2.5, adaptive_clip_lr=1.0)
        s.run_seed = 0
        for r in range(1, 30):
            tally = RoundTally(s.aggregator, 4, r)
            for i in range(50):  # every update has norm 1
                tally.add(_update(f"c{i}", [0.5, 0.5, 0.5, 0.5]))
            s.finish_round(r, torch.zeros(4), tally)
        moved = s.clip_aggregator.clip - start
        assert moved * direction > 0
        assert 0.2 < s.clip_aggregator.clip < 5.0  # converging on the median norm (1.0)


def test_adaptive_clipping_pays_for_its_count_noise():
    s = DPFedAvg(clip=1.0, delta=1e-5, noise_multiplier=1.0, sampling="fixed",
                 clients_per_round=100, population=1000, adaptive_clip_quantile=0.5)
    z_update = s.update_noise_multiplier(1000)
    sigma_b = 100 / 20
    assert z_update == pytest.approx((1.0 - (2 * sigma_b) ** -2) ** -0.5)
    assert z_update > 1.0


class _Recording:
    """A NoiseSource that records the std of every Gaussian draw (noise on: seeded, or
    zero with ``zero=True``)."""

    secure = False

    def __init__(self, seed=0, zero=False):
        self.inner, self.zero, self.draws = SeededNoise(seed), zero, []

    def gaussian(self, shape, std, dtype=torch.float32):
        self.draws.append((tuple(torch.Size(shape) if not isinstance(shape, int)
                                 else (shape,)), std))
        out = self.inner.gaussian(shape, std, dtype)
        return torch.zeros_like(out) if self.zero else out

    def numpy(self):
        return self.inner.numpy()


def _released_count(strategy, updates, population):
    """The count adaptive clipping released (noise set to zero), before adding expected/2."""
    strategy.round_noise = lambda r: _Recording(zero=True)
    tally = RoundTally(strategy.aggregator, 3, 1)
    for i, u in enumerate(updates):
        tally.add(_update(f"c{i}", u))
    _, metrics = strategy.finish_round(1, torch.zeros(3), tally)
    expected = strategy.expected_clients(population)
    return metrics["dp_within_clip_fraction"] * expected - expected / 2


_BASE = [[0.1, 0.2, 0.0], [3.0, 0.0, 4.0], [0.0, 0.5, 0.5], [9.0, 9.0, 9.0]]
_ADVERSARIES = [[0.0, 0.0, 0.0], [1e-30, 0.0, 0.0], [1e30, -1e30, 1e30], [0.6, 0.8, 0.0],
                [-3.0, 0.0, -4.0]]


def _poisson_adaptive(**kw):
    return DPFedAvg(clip=1.0, delta=1e-5, noise_multiplier=1.0, sampling="poisson", rate=0.2,
                    population=20, adaptive_clip_quantile=0.5, adaptive_clip_noise=2.0, **kw)


def _count_move_poisson():
    """The largest move of the released count when one client is added (add/remove)."""
    base = _released_count(_poisson_adaptive(), _BASE, 20)
    return max(abs(_released_count(_poisson_adaptive(), [*_BASE, adv], 20) - base)
               for adv in _ADVERSARIES)


def test_adaptive_clipping_count_moves_by_at_most_half_with_poisson_sampling():
    # TF-Privacy's estimator releases sum(b_i - 1/2): one added client moves it by exactly
    # 1/2, whether its norm is within the clip (b = 1) or not (b = 0).
    assert _count_move_poisson() == pytest.approx(0.5)
    assert _poisson_adaptive().count_sensitivity() == 0.5
    base = _released_count(_poisson_adaptive(), _BASE, 20)
    for drop in range(len(_BASE)):  # removing a client: also at most 1/2
        rest = _BASE[:drop] + _BASE[drop + 1:]
        assert abs(_released_count(_poisson_adaptive(), rest, 20) - base) <= 0.5
    # The fraction is recovered: 2 of the 4 base updates are within the clip of 1.
    s = _poisson_adaptive()
    s.round_noise = lambda r: _Recording(zero=True)
    tally = RoundTally(s.aggregator, 3, 1)
    for i, u in enumerate(_BASE):
        tally.add(_update(f"c{i}", u))
    _, metrics = s.finish_round(1, torch.zeros(3), tally)
    assert metrics["dp_within_clip_fraction"] == pytest.approx((2 - 4 / 2 + 4 / 2) / 4)


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_reported_epsilon_equals_epsilon_of_the_noise_actually_drawn(sampling):
    # Recompute epsilon, with the same accountant, from the std of every Gaussian the server
    # drew and the sensitivity measured on the real code (add/remove: 1/2 for the count,
    # the clip for the sum; replace-one: 1 and twice the clip).
    population, dim, rounds = 20, 6, 5
    kw = ({"rate": 0.2} if sampling == "poisson" else {"clients_per_round": 4})
    s = DPFedAvg(clip=1.0, delta=1e-5, noise_multiplier=1.0, sampling=sampling,
                 population=population, adaptive_clip_quantile=0.5, adaptive_clip_noise=2.0,
                 **kw)
    if sampling == "poisson":
        count_sens, sum_factor = _count_move_poisson(), 1.0
    else:
        def replaced(adv):
            s2 = DPFedAvg(clip=1.0, delta=1e-5, noise_multiplier=1.0, sampling="fixed",
                          clients_per_round=4, population=20, adaptive_clip_quantile=0.5,
                          adaptive_clip_noise=2.0)
            return _released_count(s2, [adv, *_BASE[1:]], 20)
        counts = [replaced(a) for a in _ADVERSARIES]
        count_sens = max(counts) - min(counts)
        sum_factor = 2.0
    recorder = _Recording(seed=1)
    s.round_noise = lambda r: recorder
    rng = np.random.default_rng(0)
    ids = [f"c{i:02d}" for i in range(population)]
    weights, reported = torch.zeros(dim), None
    accountant = PrivacyAccountant("rdp", neighboring=s.neighboring)
    for r in range(1, rounds + 1):
        tally = RoundTally(s.aggregator, dim, r)
        for t in s.configure_fit(r, ids, rng, run_seed=0):
            gen = torch.Generator().manual_seed(r * 100 + int(t.client_id[1:]))
            tally.add(_update(t.client_id, torch.randn(dim, generator=gen)))
        start = len(recorder.draws)
        weights, metrics = s.finish_round(r, weights, tally)
        (_, update_std), (count_shape, count_std) = recorder.draws[start:]
        assert count_shape == ()
        z_update = update_std / (sum_factor * metrics["dp_clip"])
        z_count = count_std / count_sens
        effective = (z_update ** -2 + z_count ** -2) ** -0.5
        sampling_args = ({"sampling": "poisson", "rate": 0.2} if sampling == "poisson" else
                         {"sampling": "fixed", "population": population, "sample_size": 4})
        accountant.record_gaussian_round(effective, **sampling_args)
        reported = metrics["dp_epsilon"]
    assert reported == pytest.approx(accountant.epsilon(1e-5), rel=1e-9)


def test_dp_run_resumes_to_the_same_model_and_epsilon(fed, tmp_path):
    def strategy():
        return DPFedAvg(clip=1.0, delta=1e-5, noise_multiplier=1.0, sampling="poisson",
                        rate=0.3, adaptive_clip_quantile=0.5, adaptive_clip_noise=2.0)

    full = fm.simulate(_trainer(), fed, strategy(), rounds=4, seed=1)
    fm.simulate(_trainer(), fed, strategy(), rounds=4, seed=1, out_dir=tmp_path, stop_after=2)
    resumed = fm.simulate(_trainer(), fed, strategy(), rounds=4, seed=1, out_dir=tmp_path,
                          resume=True)
    assert torch.equal(full.weights, resumed.weights)
    assert full.metric("dp_epsilon") == resumed.metric("dp_epsilon")
    assert full.metric("dp_clip") == resumed.metric("dp_clip")


def test_secure_noise_run_resumes_with_the_same_ledger_and_refuses_a_seeded_checkpoint(
        fed, tmp_path):
    def strategy(secure=True):
        return DPFedAvg(clip=1.0, delta=1e-5, noise_multiplier=1.0, sampling="poisson",
                        rate=0.3, secure_noise=secure)

    fm.simulate(_trainer(), fed, strategy(), rounds=4, seed=1, out_dir=tmp_path, stop_after=2)
    resumed = fm.simulate(_trainer(), fed, strategy(), rounds=4, seed=1, out_dir=tmp_path,
                          resume=True)
    assert [r["round"] for r in resumed.history] == [1, 2, 3, 4]
    assert resumed.metric("dp_epsilon")[-1] == pytest.approx(
        epsilon_for(1.0, 4, "poisson", 0.3, delta=1e-5), rel=1e-6)
    with pytest.raises(CheckpointError, match="different experiment"):
        fm.simulate(_trainer(), fed, strategy(secure=False), rounds=6, seed=1,
                    out_dir=tmp_path, resume=True)


@pytest.mark.parametrize("kwargs", [
    {"clip": 0, "delta": 1e-5, "noise_multiplier": 1.0, "rate": 0.1},
    {"clip": 1, "delta": 2.0, "noise_multiplier": 1.0, "rate": 0.1},
    {"clip": 1, "delta": 1e-5, "rate": 0.1},
    {"clip": 1, "delta": 1e-5, "noise_multiplier": 1.0, "target_epsilon": 1.0, "rounds": 3,
     "rate": 0.1},
    {"clip": 1, "delta": 1e-5, "noise_multiplier": 1.0, "rate": 1.5},
    {"clip": 1, "delta": 1e-5, "noise_multiplier": 1.0, "sampling": "fixed"},
    {"clip": 1, "delta": 1e-5, "noise_multiplier": 1.0, "sampling": "bernoulli"},
])
def test_bad_dp_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        DPFedAvg(**kwargs)


def test_local_dp_noises_each_update_on_the_client(fed):
    tr = _trainer()
    stage = LocalDP(clip=0.5, noise_multiplier=2.0)
    w = tr.initial_weights(0)
    tasks = [ClientTask(c, FitConfig(round=1, seed=i), (stage,))
             for i, c in enumerate(fed.client_ids[:3])]
    plain = [ClientTask(t.client_id, t.config) for t in tasks]
    noisy = list(SequentialTransport(tr, fed).fit(w, tasks))
    clean = list(SequentialTransport(tr, fed).fit(w, plain))
    for a, b in zip(noisy, clean):
        diff = a.delta - b.delta * min(1.0, 0.5 / float(b.delta.norm()))
        assert float(diff.std()) == pytest.approx(1.0, rel=0.2)  # z * clip = 1.0


def test_local_dp_laplace_clips_in_l1_and_reports_pure_dp():
    stage = LocalDP(clip=1.0, mechanism="laplace", epsilon=2.0)
    gen = torch.Generator().manual_seed(0)
    out = stage.apply(torch.zeros(200_000), gen)
    # Laplace(b) has std b*sqrt(2); b = 2*clip/epsilon = 1.
    assert float(out.std()) == pytest.approx(2 ** 0.5, rel=0.02)
    g = stage.guarantee(rounds=10)
    assert g["epsilon_total"] == 20.0 and g["delta"] == 0.0
    gauss = LocalDP(clip=1.0, noise_multiplier=4.0).guarantee(rounds=10)
    assert gauss["epsilon_total"] > gauss["epsilon_per_round"] > 0
    with pytest.raises(ValueError):
        LocalDP(clip=1.0, mechanism="laplace", noise_multiplier=1.0)


def test_laplace_mechanism_scale_is_sensitivity_over_epsilon():
    rng = np.random.default_rng(0)
    draws = laplace_mechanism(np.zeros(100_000), sensitivity=3.0, epsilon=1.5, rng=rng)
    assert float(np.mean(np.abs(draws))) == pytest.approx(2.0, rel=0.02)  # E|L(b)| = b
    assert isinstance(laplace_mechanism(5.0, 1.0, 1.0, rng), float)
    with pytest.raises(ValueError, match="epsilon"):
        laplace_mechanism(1.0, 1.0, 0.0, rng)


def test_fixed_size_sampling_is_accounted_under_replace_one_with_twice_the_sensitivity():
    from fedmosaic.privacy.accountant import epsilon_for as eps_for

    s = DPFedAvg(clip=1.0, delta=1e-5, noise_multiplier=2.0, sampling="fixed",
                 clients_per_round=10, population=100)
    s.run_seed = 0
    tally = RoundTally(s.aggregator, 3, 1)
    tally.add(_update("a", [0.1, 0.1, 0.1]))
    _, metrics = s.finish_round(1, torch.zeros(3), tally)
    want = eps_for(1.0, 1, "fixed", population=100, sample_size=10, delta=1e-5,
                   neighboring="replace_one")
    assert metrics["dp_epsilon"] == pytest.approx(want)


@pytest.mark.slow
def test_dp_on_the_peer_task_stays_within_the_documented_margin_of_plain_fedavg():
    """docs/privacy.md promises DP-FedAvg (q=0.1, clip 0.2, z=1) loses at most 6 points of
    accuracy against plain FedAvg on the digits peer task after 150 rounds."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    from peer_fedmosaic import peer_partition

    from fedmosaic.data import load_digits

    train, test = load_digits()
    fed = peer_partition(train, test, 1000, 0)

    def run(strategy):
        tr = fm.TorchTrainer(lambda: MLP(64, [64], 10), lr=0.05, batch_size=32)
        return fm.simulate(tr, fed, strategy, 150, seed=0,
                           transport=fm.BatchedTransport(tr, fed))

    plain = run(fm.FedAvg(clients_per_round=100))
    dp = run(DPFedAvg(clip=0.2, delta=1e-5, noise_multiplier=1.0, sampling="poisson",
                      rate=0.1))
    assert plain.final["test_accuracy"] > 0.75
    assert dp.final["test_accuracy"] >= plain.final["test_accuracy"] - 0.06
    assert len(dp.metric("dp_epsilon")) == 150 and dp.metric("dp_epsilon")[-1] < 10
