"""Every quantity a DP mode releases moves by at most the sensitivity its accountant assumes
(issue #20 item 2), under both neighbouring relations, with adversarial values.

The release is computed by the real code with the noise set to zero (a NoiseSource that
returns zeros), so what is measured is exactly the un-noised quantity the Gaussian or Laplace
noise is calibrated to. Neighbouring data sets: add/remove one client (Poisson sampling) and
replace one client (fixed-size cohorts; local DP, where any two reports are compared).
"""

import numpy as np
import pytest
import torch

from fedmosaic.core import ClientUpdate
from fedmosaic.privacy.accountant import epsilon_for
from fedmosaic.privacy.dp_fedavg import DPFedAvg
from fedmosaic.privacy.local_dp import LocalDP
from fedmosaic.runtime import RoundTally
from fedmosaic.train import FitConfig

DIM = 16
TOL = 1e-5


class ZeroNoise:
    """A NoiseSource whose every draw is zero: the release without its noise."""

    secure = False

    def gaussian(self, shape, std, dtype=torch.float32):
        return torch.zeros(shape if not isinstance(shape, int) else (shape,), dtype=dtype)

    def laplace(self, shape, scale, dtype=torch.float32):
        return self.gaussian(shape, scale, dtype)

    def exponential(self, shape, scale=1.0, dtype=torch.float32):
        return self.gaussian(shape, scale, dtype)

    def numpy(self):
        return np.random.default_rng(0)


def _vec(seed, scale=1.0):
    return torch.randn(DIM, generator=torch.Generator().manual_seed(seed)) * scale


_BASE = [_vec(i, s) for i, s in enumerate([0.3, 2.0, 0.9, 50.0, 1.0, 0.01])]
_DIRECTION = sum(_BASE) / float(sum(_BASE).norm())


def _adversaries():
    """Updates chosen to move the release as far as possible (all finite)."""
    return {
        "zero": torch.zeros(DIM),
        "tiny": _vec(90) * 1e-30,
        "huge": _vec(91) * 1e30,
        "float32-max": torch.full((DIM,), 3e38),
        "aligned": _DIRECTION * 1e6,
        "anti-aligned": -_DIRECTION * 1e6,
        "at-the-clip": _DIRECTION * 1.0,
        "one-coordinate": torch.eye(DIM)[0] * 1e20,
    }


def _central(sampling, *, adaptive, cap=None, distributed=False):
    kw = ({"rate": 0.5} if sampling == "poisson" else {"clients_per_round": len(_BASE)})
    if adaptive:
        kw.update(adaptive_clip_quantile=0.5, adaptive_clip_noise=3.0)
    if distributed:
        kw.update(distributed=True, min_contributors=1)
    s = DPFedAvg(clip=1.0, delta=1e-5, noise_multiplier=1.0, sampling=sampling,
                 population=12, **kw)
    if cap is not None:
        s.clip_aggregator.cap = cap
    s.round_noise = lambda r: ZeroNoise()
    # The release does not depend on accounting (checked in test_dp_fedavg.py); skipping the
    # epsilon computation of every round keeps these many rounds fast.
    s.accountant = _NoAccounting()
    return s


class _NoAccounting:
    steps = 0

    def record_gaussian_round(self, *args, **kwargs):
        pass

    def epsilon(self, delta):
        return 0.0


def _release(strategy, updates):
    """(update sum, centred count or None) that a DP-FedAvg round releases, noise zero."""
    if strategy.distributed:
        # Clients clip (and would noise) their own updates: the server sums the shares.
        strategy.configure_fit(1, [f"c{i:02d}" for i in range(12)],
                               np.random.default_rng(0), run_seed=0)
        stage = strategy.client_stages[0]
        updates = [stage.apply(u, ZeroNoise()) for u in updates]
    tally = RoundTally(strategy.aggregator, DIM, 1)
    for i, u in enumerate(updates):
        tally.add(ClientUpdate(f"c{i:02d}", u, 10, base_round=1))
    assert tally.count == len(updates) and not tally.rejected
    expected = strategy.expected_clients(12)
    new, metrics = strategy.finish_round(1, torch.zeros(DIM), tally)
    summed = new.double() * expected
    count = None
    if "dp_within_clip_fraction" in metrics:
        count = metrics["dp_within_clip_fraction"] * expected - expected / 2
    return summed, count


def _moves(make, neighbours):
    """The largest L2 move of the released sum and of the released count."""
    base_sum, base_count = _release(make(), list(_BASE))
    worst_sum, worst_count = 0.0, 0.0
    for data in neighbours:
        summed, count = _release(make(), data)
        worst_sum = max(worst_sum, float((summed - base_sum).norm()))
        if count is not None:
            worst_count = max(worst_count, abs(count - base_count))
    return worst_sum, worst_count


def _added():
    return [[*_BASE, adv] for adv in _adversaries().values()]


def _removed():
    return [_BASE[:i] + _BASE[i + 1:] for i in range(len(_BASE))]


def _replaced():
    return [[adv, *_BASE[1:]] for adv in _adversaries().values()] + \
           [[*_BASE[:3], adv, *_BASE[4:]] for adv in _adversaries().values()]


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed-clip", "adaptive-clip"])
def test_central_poisson_add_remove(adaptive):
    s = _central("poisson", adaptive=adaptive)
    assert s.neighboring == "add_remove"
    worst_sum, worst_count = _moves(lambda: _central("poisson", adaptive=adaptive),
                                    _added() + _removed())
    assert worst_sum <= s.sum_sensitivity() * (1 + TOL)
    assert worst_sum >= 0.99 * s.sum_sensitivity()  # the bound is attained: a real test
    if adaptive:
        assert worst_count <= s.count_sensitivity() + TOL and s.count_sensitivity() == 0.5
        assert worst_count == pytest.approx(0.5)


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed-clip", "adaptive-clip"])
def test_central_fixed_cohort_replace_one(adaptive):
    s = _central("fixed", adaptive=adaptive)
    assert s.neighboring == "replace_one" and s.sum_sensitivity() == 2.0
    worst_sum, worst_count = _moves(lambda: _central("fixed", adaptive=adaptive), _replaced())
    assert worst_sum <= s.sum_sensitivity() * (1 + TOL)
    assert worst_sum >= 0.9 * s.sum_sensitivity()  # anti-aligned replacement nearly attains it
    if adaptive:
        assert worst_count <= s.count_sensitivity() + TOL and s.count_sensitivity() == 1.0
        assert worst_count == pytest.approx(1.0)


def test_central_sensitivity_follows_a_tighter_norm_bound():
    s = _central("poisson", adaptive=False, cap=0.25)
    assert s.sum_sensitivity() == 0.25
    worst_sum, _ = _moves(lambda: _central("poisson", adaptive=False, cap=0.25), _added())
    assert 0.99 * 0.25 <= worst_sum <= 0.25 * (1 + TOL)


@pytest.mark.parametrize("sampling,neighbours", [("poisson", "add_remove"),
                                                 ("fixed", "replace_one")])
def test_distributed_noised_sum(sampling, neighbours):
    def make():
        return _central(sampling, adaptive=False, distributed=True)

    s = make()
    data = _added() + _removed() if neighbours == "add_remove" else _replaced()
    worst_sum, _ = _moves(make, data)
    assert s.neighboring == neighbours
    assert worst_sum <= s.sum_sensitivity() * (1 + TOL)
    # Each client's own share (what the server would see if secure aggregation failed) moves
    # by at most twice the clip between any two of its possible inputs.
    s.configure_fit(1, [f"c{i:02d}" for i in range(12)], np.random.default_rng(0), run_seed=0)
    stage = s.client_stages[0]
    shares = [stage.apply(u, ZeroNoise()).double() for u in [*_BASE, *_adversaries().values()]]
    worst_share = max(float((a - b).norm()) for a in shares for b in shares)
    assert worst_share <= 2 * stage.clip * (1 + TOL)


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_local_dp_upload(mechanism):
    kw = {"noise_multiplier": 2.0} if mechanism == "gaussian" else {"epsilon": 1.0}
    stage = LocalDP(clip=1.0, mechanism=mechanism, **kw)
    uploads = [stage.apply(u, ZeroNoise()).double()
               for u in [*_BASE, *_adversaries().values()]]
    order = 2 if mechanism == "gaussian" else 1  # L2 for Gaussian noise, L1 for Laplace
    worst = max(float(torch.linalg.vector_norm(a - b, ord=order))
                for a in uploads for b in uploads)
    # Any two reports are neighbours (local DP): sensitivity 2 * clip, the accountant's.
    assert 1.9 <= worst <= 2 * stage.clip * (1 + TOL)
    g = stage.guarantee(1)
    if mechanism == "gaussian":  # noise z * clip on sensitivity 2 * clip: multiplier z / 2
        assert g["epsilon_per_round"] == pytest.approx(epsilon_for(1.0, 1, "none", delta=1e-5))
    else:  # Laplace scale 2 * clip / epsilon on L1 sensitivity 2 * clip: epsilon-DP
        assert g["epsilon_per_round"] == 1.0


def _dpsgd_step_sum(examples_x, examples_y, clip):
    """The clipped gradient sum DP-SGD releases in one step (noise zero, every example in
    the lot: q = 1)."""
    from fedmosaic.data import ArrayDataset
    from fedmosaic.models import MLP
    from fedmosaic.train.dp_trainer import DPSGDTrainer

    n = len(examples_y)
    trainer = DPSGDTrainer(lambda: MLP(5, [4], 3), lr=1.0, batch_size=64, noise_multiplier=1.0,
                           max_grad_norm=clip, noise=ZeroNoise())
    w0 = trainer.initial_weights(0)
    data = ArrayDataset(np.asarray(examples_x, dtype=np.float32),
                        np.asarray(examples_y, dtype=np.int64))
    new = trainer.fit(w0, data, FitConfig(round=1, seed=0, max_steps=1)).weights
    return -(new - w0).double() * n  # lr = 1; Opacus divides the noised sum by the lot size


def test_dp_sgd_per_step_clipped_gradient_sum():
    pytest.importorskip("opacus")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 5)).astype(np.float32)
    y = rng.integers(0, 3, 10)
    clip = 0.5
    base = _dpsgd_step_sum(x, y, clip)
    extremes = [(np.full(5, 1e6), 0), (np.full(5, -1e6), 2), (x[0], y[0]), (-x[0], y[0]),
                (np.zeros(5), 1), (np.full(5, 1e-30), 1)]
    added = [float((_dpsgd_step_sum(np.vstack([x, ex]), np.append(y, ey), clip) - base).norm())
             for ex, ey in extremes]
    removed = [float((_dpsgd_step_sum(np.delete(x, i, 0), np.delete(y, i), clip) - base).norm())
               for i in range(3)]
    # Add/remove one example (the relation Opacus's accountant assumes): at most C.
    assert max(added + removed) <= clip * (1 + 1e-4)
    assert max(added) >= 0.99 * clip
    # Replace one example (fixed-size lots): at most 2C.
    replaced = []
    for ex, ey in extremes:
        x2, y2 = x.copy(), y.copy()
        x2[0], y2[0] = ex, ey
        replaced.append(float((_dpsgd_step_sum(x2, y2, clip) - base).norm()))
    assert max(replaced) <= 2 * clip * (1 + 1e-4)
