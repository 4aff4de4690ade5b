"""The attacks of issue #24 (items 1 and 2), run against the real code.

Each test runs the attack twice: on the simulation path (seeded noise), where it must succeed
-- that is why seeded noise is "simulation only" -- and on the deployment path (SecureNoise),
where it must fail: the regenerated noise is uncorrelated with the noise that was added, so
subtracting it leaves an error of the size of the noise.

The attackers are written from what they know (the FitConfig seed a server sends, the seed
derivations of fedmosaic's simulation path) and re-implement the derivations themselves
rather than calling the code under test.
"""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedmosaic.algorithms.strategy import FedAvg, client_seed
from fedmosaic.core import ClientUpdate
from fedmosaic.data import ArrayDataset
from fedmosaic.privacy.dp_fedavg import DPFedAvg
from fedmosaic.privacy.local_dp import LocalDP
from fedmosaic.privacy.randomness import SecureNoise
from fedmosaic.runtime import RoundTally
from fedmosaic.train import FitConfig

DIM = 10_000
PATHS = ["seeded", "secure"]


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def _regenerated_stage_noise(seed: int, std: float, n: int = DIM) -> torch.Tensor:
    """What a server that knows FitConfig.seed regenerates for a client's DP stage."""
    gen = torch.Generator().manual_seed(seed ^ 0x5EED5EED)
    return torch.randn(n, generator=gen) * std


def _clipped(delta: torch.Tensor, clip: float) -> torch.Tensor:
    norm = float(delta.norm())
    return delta if norm <= clip else delta * (clip / norm)


def _noise_arg(path: str):
    return None if path == "seeded" else SecureNoise()


def _ids(n: int) -> list[str]:
    return [f"c{i:02d}" for i in range(n)]


@pytest.mark.parametrize("path", PATHS)
def test_server_cannot_remove_a_clients_local_dp_noise(path):
    z, clip = 5.0, 1.0
    strategy = FedAvg(client_stages=(LocalDP(clip=clip, noise_multiplier=z),))
    task = strategy.configure_fit(1, _ids(5), np.random.default_rng(0), run_seed=7)[2]
    delta = torch.randn(DIM, generator=torch.Generator().manual_seed(1))
    upload = task.finish(delta, noise=_noise_arg(path))
    # The server's attack: regenerate the noise from the seed it sent, subtract it.
    regenerated = _regenerated_stage_noise(task.config.seed, z * clip)
    recovered = upload - regenerated
    truth = _clipped(delta, clip)
    added = upload - truth
    if path == "seeded":  # the attack of issue #24: the clipped update comes back
        assert float((recovered - truth).abs().max()) < 1e-5
        return
    assert abs(_corr(regenerated, added)) < 0.05
    # Subtracting an independent draw doubles the variance: the error is the noise's size.
    err_std = float((recovered - truth).std())
    assert err_std == pytest.approx(2 ** 0.5 * z * clip, rel=0.05)


@pytest.mark.parametrize("path", PATHS)
def test_server_cannot_remove_distributed_dp_noise_shares(path):
    z, clip, k = 1.0, 1.0, 4
    strategy = DPFedAvg(clip=clip, delta=1e-5, noise_multiplier=z, sampling="poisson",
                        rate=1.0, population=k, distributed=True, min_contributors=k,
                        secure_noise=path == "secure")
    tasks = strategy.configure_fit(1, _ids(k), np.random.default_rng(0), run_seed=3)
    assert len(tasks) == k
    share_std = z * clip / k ** 0.5
    deltas = [torch.randn(DIM, generator=torch.Generator().manual_seed(10 + i)) * 0.1
              for i in range(k)]
    # SecAgg+ would reveal only this sum to the server.
    released = sum(t.finish(d, noise=_noise_arg(path)) for t, d in zip(tasks, deltas))
    regenerated = sum(_regenerated_stage_noise(t.config.seed, share_std) for t in tasks)
    truth = sum(_clipped(d, clip) for d in deltas)
    recovered = released - regenerated
    if path == "seeded":
        assert float((recovered - truth).abs().max()) < 1e-5
        return
    assert abs(_corr(regenerated, released - truth)) < 0.05
    assert float((recovered - truth).std()) == pytest.approx(2 ** 0.5 * z * clip, rel=0.05)


def _dpsgd_noise_regenerated(seed: int, std: float, shapes) -> torch.Tensor:
    """A server's regeneration of DP-SGD noise from FitConfig.seed: the trainer's noise
    stream seed, then Opacus's torch.normal draw per parameter, in parameter order."""
    stream = int(np.random.SeedSequence([seed & (2**64 - 1), 1])
                 .generate_state(1, dtype=np.uint64)[0] >> 1)
    gen = torch.Generator().manual_seed(stream)
    return torch.cat([torch.normal(0.0, std, size=s, generator=gen).flatten() for s in shapes])


def _per_example_clipped_sum(model: nn.Module, x, y, clip: float) -> torch.Tensor:
    params = list(model.parameters())
    total = torch.zeros(sum(p.numel() for p in params))
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        g = torch.cat([t.flatten() for t in torch.autograd.grad(loss, params)])
        total += g * min(1.0, clip / float(g.norm()))
    return total


@pytest.mark.parametrize("path", PATHS)
def test_server_cannot_remove_dp_sgd_noise(path):
    pytest.importorskip("opacus")
    from fedmosaic.train.dp_trainer import DPSGDTrainer

    n, features, classes = 8, 999, 10  # 10,000 parameters
    sigma, clip, lr = 5.0, 0.1, 1.0
    trainer = DPSGDTrainer(lambda: nn.Linear(features, classes), lr=lr, batch_size=n,
                           noise_multiplier=sigma, max_grad_norm=clip, noise=path)
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.normal(size=(n, features)).astype(np.float32),
                        rng.integers(0, classes, n).astype(np.int64))
    w0 = trainer.initial_weights(0)
    config = FitConfig(round=1, seed=client_seed(0, 1, "victim"), max_steps=1)
    delta = trainer.fit(w0, data, config).weights - w0
    assert delta.numel() == DIM
    # One step with q = 1 (batch size = n): delta = -lr * (clipped sum + noise) / n.
    released = -delta * n / lr
    model = nn.Linear(features, classes)
    trainer.spec.load_into(model, w0)
    truth = _per_example_clipped_sum(model, torch.as_tensor(data.x), torch.as_tensor(data.y),
                                     clip)
    regenerated = _dpsgd_noise_regenerated(config.seed, sigma * clip,
                                           [p.shape for p in model.parameters()])
    recovered = released - regenerated
    if path == "seeded":  # the clipped gradient sum comes back
        assert float((recovered - truth).abs().max()) < 1e-4
        return
    assert abs(_corr(regenerated, released - truth)) < 0.05
    assert float((recovered - truth).std()) == pytest.approx(2 ** 0.5 * sigma * clip, rel=0.05)


def _run_round(strategy, round_num, ids, rng, run_seed, weights, expected):
    tasks = strategy.configure_fit(round_num, ids, rng, run_seed=run_seed)
    tally = RoundTally(strategy.aggregator, DIM, round_num)
    truth = torch.zeros(DIM)
    for t in tasks:
        d = torch.randn(DIM, generator=torch.Generator().manual_seed(int(t.client_id[1:])))
        tally.add(ClientUpdate(t.client_id, d, 10, base_round=round_num))
        truth += _clipped(d, strategy.clip_aggregator.clip)
    new, _ = strategy.finish_round(round_num, weights, tally)
    noise = (new - weights) * expected - truth  # what the server added this round
    return tasks, new, noise


@pytest.mark.parametrize("path", PATHS)
def test_client_cannot_predict_central_noise_or_the_next_cohort(path):
    ids, rate, z, clip, run_seed = _ids(40), 0.5, 1.0, 1.0, 4321
    strategy = DPFedAvg(clip=clip, delta=1e-5, noise_multiplier=z, sampling="poisson",
                        rate=rate, population=len(ids), secure_noise=path == "secure")
    rng = np.random.default_rng(run_seed)  # the server loop's generator (Server.fresh_state)
    expected = rate * len(ids)
    tasks1, w1, _ = _run_round(strategy, 1, ids, rng, run_seed, torch.zeros(DIM), expected)
    tasks2, _, noise2 = _run_round(strategy, 2, ids, rng, run_seed, w1, expected)

    # A client of round 1 searches the run seed from its own FitConfig seed.
    me = tasks1[0]
    found = [s for s in range(10_000) if client_seed(s, 1, me.client_id) == me.config.seed]
    if path == "seeded":
        assert found == [run_seed]
    else:
        assert found == []  # its seed is drawn from the CSPRNG, not derived from the run seed
    # Strongest attacker: it knows the run seed anyway.
    guess = np.random.default_rng(run_seed)
    guess.random(len(ids))  # round 1's draw
    predicted_cohort = [c for c, keep in zip(ids, guess.random(len(ids)) < rate) if keep]
    gen = torch.Generator().manual_seed(client_seed(run_seed, 2, "__dp_noise__"))
    predicted_noise = torch.randn(DIM, generator=gen) * (z * clip)
    actual_cohort = [t.client_id for t in tasks2]
    if path == "seeded":  # the attack of issue #24 item 2
        assert predicted_cohort == actual_cohort
        assert float((predicted_noise - noise2).abs().max()) < 1e-3
        return
    assert predicted_cohort != actual_cohort
    assert abs(_corr(predicted_noise, noise2)) < 0.05
    assert float((noise2 - predicted_noise).std()) == pytest.approx(2 ** 0.5 * z * clip,
                                                                    rel=0.05)
