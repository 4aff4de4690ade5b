"""Randomness by role: SecureNoise is ChaCha20 keyed from the OS; SeededNoise reproduces the
seeded draws fedmosaic always made; stages take either."""

import pickle

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.privacy import randomness
from fedmosaic.privacy.local_dp import DistributedNoiseShare, LocalDP
from fedmosaic.privacy.randomness import NoiseSource, SecureNoise, SeededNoise, as_noise_source
from fedmosaic.train import FitConfig


def _chacha20_words(key: bytes, n: int) -> np.ndarray:
    """The RFC 8439 ChaCha20 keystream (counter 0, zero nonce) from ``cryptography``, as
    little-endian 64-bit words."""
    # cryptography's 16-byte nonce is the 4-byte block counter then the 12-byte nonce.
    enc = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(8 * n)), dtype="<u8")


def test_secure_noise_stream_is_chacha20_keyed_from_os_urandom(monkeypatch):
    key = bytes(range(7, 39))  # a known key in place of the operating system's bytes
    asked = []

    def fake_urandom(n):
        asked.append(n)
        return key

    monkeypatch.setattr(randomness.os, "urandom", fake_urandom)
    source = SecureNoise()
    assert asked == [32]  # a 256-bit key
    raw = source.numpy().bit_generator.random_raw(1000)  # 1000 words: crosses 125 blocks
    assert np.array_equal(raw, _chacha20_words(key, 1000))


def test_secure_noise_is_keyed_afresh_and_never_pickles_its_key():
    a, b = SecureNoise(), SecureNoise()
    assert not torch.equal(a.gaussian(64, 1.0), b.gaussian(64, 1.0))
    copy = pickle.loads(pickle.dumps(a))
    assert b"key" not in pickle.dumps(a) and len(pickle.dumps(a)) < 200
    # The copy draws from a new key: it does not continue a's stream.
    state = a.numpy().bit_generator.state
    next_a = a.gaussian(64, 1.0)
    a.numpy().bit_generator.state = state
    assert not torch.equal(copy.gaussian(64, 1.0), next_a)


def test_secure_noise_matches_no_seeded_stream():
    # Unpredictable from any seed: its first draws match no seeded generator, whether the
    # attacker guesses a torch seed or a NumPy seed (10,000 candidates each).
    first = SecureNoise().gaussian(8, 1.0, torch.float64)
    for seed in range(10_000):
        assert not torch.allclose(first, SeededNoise(seed).gaussian(8, 1.0, torch.float64))
    firsts = SecureNoise().numpy().random(4)
    for seed in range(10_000):
        assert not np.allclose(firsts, np.random.default_rng(seed).random(4))


@pytest.mark.parametrize("make", [SecureNoise, lambda: SeededNoise(5)], ids=["secure", "seeded"])
def test_samplers_have_the_right_distribution(make):
    source = make()
    n = 200_000
    g = source.gaussian(n, 2.0, torch.float64)
    assert g.dtype == torch.float64 and g.shape == (n,)
    assert float(g.mean()) == pytest.approx(0.0, abs=0.02)
    assert float(g.std()) == pytest.approx(2.0, rel=0.01)
    # Normal tails: P(|X| > 3 sigma) = 0.0027.
    assert float((g.abs() > 6.0).double().mean()) == pytest.approx(0.0027, rel=0.15)
    lap = source.laplace(n, 1.5, torch.float64)
    assert float(lap.abs().mean()) == pytest.approx(1.5, rel=0.01)  # E|X| = b
    assert float(lap.var()) == pytest.approx(2 * 1.5 ** 2, rel=0.03)
    e = source.exponential(n, 0.5, torch.float64)
    assert float(e.min()) >= 0 and float(e.mean()) == pytest.approx(0.5, rel=0.01)
    u = source.numpy().random(n)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    assert source.gaussian((3, 4), 1.0).shape == (3, 4)
    assert source.gaussian(5, 0.0).abs().sum() == 0


def test_seeded_noise_draws_what_the_torch_generator_drew():
    # Simulations keep their results: the same numbers as torch.randn / exponential_.
    gen = torch.Generator().manual_seed(11)
    expected = torch.randn(100, generator=gen) * 0.3
    e1 = torch.empty(100).exponential_(generator=gen)
    e2 = torch.empty(100).exponential_(generator=gen)
    source = SeededNoise(11)
    assert torch.equal(source.gaussian(100, 0.3), expected)
    assert torch.equal(source.laplace(100, 2.0), (e1 - e2) * 2.0)
    assert np.array_equal(SeededNoise(11).numpy().random(3), SeededNoise(11).numpy().random(3))


def test_bad_scales_and_sources_are_refused():
    for source in (SeededNoise(0), SecureNoise()):
        with pytest.raises(ValueError, match="std"):
            source.gaussian(3, -1.0)
        with pytest.raises(ValueError, match="scale"):
            source.laplace(3, float("nan"))
    with pytest.raises(TypeError, match="NoiseSource"):
        as_noise_source(np.random.default_rng(0))
    with pytest.raises(ValueError, match="exactly one"):
        SeededNoise()
    gen = torch.Generator().manual_seed(1)
    assert isinstance(as_noise_source(gen), SeededNoise)
    assert isinstance(SecureNoise(), NoiseSource) and SecureNoise.secure
    assert not SeededNoise.secure


def test_stages_accept_a_noise_source_or_a_generator():
    delta = torch.randn(500)
    for stage in (LocalDP(clip=1.0, noise_multiplier=0.5),
                  LocalDP(clip=1.0, mechanism="laplace", epsilon=2.0),
                  DistributedNoiseShare(clip=1.0, noise_std=0.2)):
        legacy = stage.apply(delta, torch.Generator().manual_seed(4))
        assert torch.equal(stage.apply(delta, SeededNoise(4)), legacy)
        secure = stage.apply(delta, SecureNoise())
        assert secure.shape == delta.shape and not torch.equal(secure, legacy)


def test_client_task_finish_is_seeded_by_default_and_secure_on_request():
    stage = LocalDP(clip=1.0, noise_multiplier=1.0)
    task = ClientTask("c", FitConfig(round=1, seed=123), (stage,))
    delta = torch.randn(1000)
    assert torch.equal(task.finish(delta), task.finish(delta))  # reproducible simulation
    assert torch.equal(task.finish(delta), stage.apply(delta, SeededNoise(123 ^ 0x5EED5EED)))
    a, b = task.finish(delta, noise=SecureNoise()), task.finish(delta, noise=SecureNoise())
    assert not torch.equal(a, b)


def test_laplace_mechanism_takes_a_noise_source():
    from fedmosaic.privacy.local_dp import laplace_mechanism

    values = np.array([laplace_mechanism(0.0, 1.0, 2.0, SecureNoise()) for _ in range(4000)])
    assert np.mean(np.abs(values)) == pytest.approx(0.5, rel=0.08)  # E|Laplace(b)| = b = 1/2
    seeded = [laplace_mechanism(1.0, 1.0, 1.0, SeededNoise(3)) for _ in range(2)]
    assert seeded[0] == seeded[1]
