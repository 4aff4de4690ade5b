"""Randomness by role: where the noise and sampling that protect data come from.

Every mechanism that protects data draws its randomness through a ``NoiseSource``: the client
stages (local DP, distributed-DP noise shares), DP-SGD's per-step noise and lot sampling, and
the server's central DP noise and Poisson cohort sampling. Two sources exist, and which one a
party uses is a question of *role*, not of convenience:

``SeededNoise(seed)``
    A PyTorch generator seeded with ``seed`` (and a NumPy generator derived from it). Runs are
    bit-reproducible, which is what a simulation needs -- and anyone who knows the seed can
    regenerate the noise and subtract it. In fedmosaic the seeds travel: the server computes
    every client's round seed and sends it in ``FitConfig.seed``, and a client can search the
    run seed from its own. Seeded noise is therefore **simulation only**; a run that uses it
    says "deterministic noise: simulation only" in its guarantees.

``SecureNoise()``
    A cryptographically secure stream: ChaCha20 (Bernstein 2008, "ChaCha, a variant of
    Salsa20"; 20 rounds) keyed with 256 bits from ``os.urandom``, through ``randomgen.ChaCha``
    as a NumPy ``BitGenerator``. The key never leaves the process (it is not pickled: a copy
    re-keys itself from the operating system), so neither the server nor another member can
    reproduce the draws. ``tests/privacy/test_randomness.py`` checks that the raw stream is
    exactly the RFC 8439 ChaCha20 keystream that ``cryptography`` computes for the same key.

How uniform bits become samples (``SecureNoise``): NumPy's ``Generator`` turns the ChaCha20
64-bit words into doubles in [0, 1) from their top 53 bits, into standard normals with its
ziggurat sampler (Marsaglia and Tsang 2000, "The Ziggurat Method for Generating Random
Variables", the 256-layer variant NumPy implements), into exponentials with its exponential
ziggurat and into Laplace samples by inversion. Samples are drawn in float64 and then cast to
the requested dtype.

Floating-point caveat (not handled): a Gaussian or Laplace sample in floating point is not the
real-valued sample the DP proofs are about. Mironov 2012 ("On Significance of the Least
Significant Bits for Differential Privacy", CCS) shows that the set of floats a textbook
Laplace sampler can output, and their low-order bits, depend on the un-noised value, so an
observer can sometimes tell neighbouring inputs apart exactly; similar attacks exist on float
Gaussians (Jin et al. 2022, "Are We There Yet? Timing and Floating-Point Attacks on
Differential Privacy Systems"). Neither source here defends against this (no snapping, no
sum-of-several-samples trick). The integer answer is a discrete mechanism on quantised
values (the Skellam / discrete Gaussian mechanisms for distributed DP), where the noise is an
exact integer and no float ever carries it.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["NoiseSource", "SecureNoise", "SeededNoise", "as_noise_source"]

Shape = tuple[int, ...] | torch.Size | int


def _shape(shape: Shape) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


def _check_scale(name: str, value: float) -> float:
    value = float(value)
    if not (value >= 0 and np.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


@runtime_checkable
class NoiseSource(Protocol):
    """Where a privacy mechanism draws its randomness from (see the module docstring)."""

    #: True when nobody else can reproduce the draws (a CSPRNG keyed from the OS).
    secure: bool

    def gaussian(self, shape: Shape, std: float,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """i.i.d. N(0, std^2) samples of ``shape`` (a CPU tensor)."""
        ...

    def laplace(self, shape: Shape, scale: float,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """i.i.d. Laplace(0, scale) samples of ``shape`` (a CPU tensor)."""
        ...

    def exponential(self, shape: Shape, scale: float = 1.0,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """i.i.d. Exponential samples of mean ``scale`` (a CPU tensor)."""
        ...

    def numpy(self) -> np.random.Generator:
        """A NumPy generator on the same source, for samplers (Poisson cohorts, lots)."""
        ...


class SeededNoise:
    """Reproducible noise from a seed: for simulation only (the seed holder can remove it).

    ``gaussian``/``laplace``/``exponential`` draw from a ``torch.Generator`` seeded with
    ``seed`` exactly as fedmosaic's stages always did (``torch.randn`` and the difference of
    two ``exponential_`` draws), so simulations keep their bit-for-bit results. ``numpy()`` is
    a NumPy generator on a separate stream derived from the same seed.
    """

    secure = False

    def __init__(self, seed: int | None = None, *,
                 generator: torch.Generator | None = None) -> None:
        if (seed is None) == (generator is None):
            raise ValueError("SeededNoise needs exactly one of seed and generator")
        if generator is None:
            assert seed is not None
            generator = torch.Generator().manual_seed(int(seed))
        self.seed = seed
        self.generator = generator
        self._numpy: np.random.Generator | None = None

    @classmethod
    def from_generator(cls, generator: torch.Generator) -> SeededNoise:
        """Wrap an existing (seeded) PyTorch generator; draws advance it."""
        return cls(generator=generator)

    def gaussian(self, shape: Shape, std: float,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        std = _check_scale("std", std)
        return torch.randn(_shape(shape), generator=self.generator, dtype=dtype) * std

    def exponential(self, shape: Shape, scale: float = 1.0,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = _check_scale("scale", scale)
        e = torch.empty(_shape(shape), dtype=dtype).exponential_(generator=self.generator)
        return e if scale == 1.0 else e * scale

    def laplace(self, shape: Shape, scale: float,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = _check_scale("scale", scale)
        # Laplace(0, b) as the difference of two unit exponentials, times b.
        e1 = torch.empty(_shape(shape), dtype=dtype).exponential_(generator=self.generator)
        e2 = torch.empty(_shape(shape), dtype=dtype).exponential_(generator=self.generator)
        return (e1 - e2) * scale

    def numpy(self) -> np.random.Generator:
        if self._numpy is None:
            base = self.seed if self.seed is not None else self.generator.initial_seed()
            self._numpy = np.random.default_rng([int(base) & (2**64 - 1), 0x4E50])
        return self._numpy

    def __repr__(self) -> str:
        return f"SeededNoise(seed={self.seed})"


class SecureNoise:
    """Noise no one else can reproduce: ChaCha20 keyed with 256 bits from ``os.urandom``.

    Built on ``randomgen.ChaCha(key=..., rounds=20)`` (a NumPy ``BitGenerator``) and NumPy's
    samplers; see the module docstring for the Gaussian method and its floating-point caveat.
    Thread-safe (NumPy holds the bit generator's lock while drawing). Pickling or copying an
    instance never carries the key: the copy is keyed afresh from the operating system.
    """

    secure = True

    def __init__(self) -> None:
        self._rng = self._keyed()

    @staticmethod
    def _keyed() -> np.random.Generator:
        from randomgen import ChaCha

        key = np.frombuffer(os.urandom(32), dtype="<u8").copy()  # 256-bit key
        return np.random.Generator(ChaCha(key=key, counter=0, rounds=20))

    def _tensor(self, values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values)).to(dtype)

    def gaussian(self, shape: Shape, std: float,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        std = _check_scale("std", std)
        z = self._rng.standard_normal(_shape(shape))
        return self._tensor(z * std, dtype)

    def exponential(self, shape: Shape, scale: float = 1.0,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = _check_scale("scale", scale)
        return self._tensor(self._rng.standard_exponential(_shape(shape)) * scale, dtype)

    def laplace(self, shape: Shape, scale: float,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = _check_scale("scale", scale)
        return self._tensor(self._rng.laplace(0.0, scale, _shape(shape)), dtype)

    def numpy(self) -> np.random.Generator:
        return self._rng

    def __getstate__(self) -> dict[str, Any]:
        return {}  # the key stays in this process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._rng = self._keyed()

    def __repr__(self) -> str:
        return "SecureNoise(ChaCha20, key from os.urandom)"


def as_noise_source(noise: NoiseSource | torch.Generator) -> NoiseSource:
    """``noise`` as a ``NoiseSource``: a bare ``torch.Generator`` (the stage API before
    ``NoiseSource``) is wrapped in ``SeededNoise``, drawing exactly what it drew before."""
    if isinstance(noise, torch.Generator):
        return SeededNoise.from_generator(noise)
    if not isinstance(noise, NoiseSource):
        raise TypeError(f"expected a NoiseSource (SeededNoise or SecureNoise) or a "
                        f"torch.Generator, got {type(noise).__name__}")
    return noise
