"""Fixed-point encoding of float vectors into Z_(2^bits) for secure aggregation.

Secure aggregation (Bonawitz et al., CCS 2017; Bell et al., CCS 2020, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead") sums vectors of integers modulo ``2**bits``.
A float vector is

1. clipped coordinate-wise to ``[-clip, clip]``;
2. scaled by ``scale = L / clip`` with ``L = floor((2**(bits-1) - 1) / num_clients)`` and
   rounded *stochastically* to an integer ``q`` in ``[-L, L]`` (``floor(v)`` plus one with
   probability ``v - floor(v)``, so ``E[q] = v``: the rounding adds no bias to the mean);
3. stored as ``q mod 2**bits``.

No-wrap bound: the sum of at most ``num_clients`` encodings lies in
``[-num_clients * L, num_clients * L]`` and ``num_clients * L <= 2**(bits-1) - 1``, so the
modular sum read as a signed ``bits``-bit integer *is* the integer sum: decoding never
suffers a wrap-around as long as at most ``num_clients`` vectors are summed.

Error bound: every coordinate of every encoding is off by less than one level (``1/scale``),
so ``|decode(sum of encodings) - sum of clipped inputs| < m / scale`` per coordinate for ``m``
summed vectors (plus float64 rounding of ``x * scale``, relative 2^-53). ``L`` is capped at
2^53 so every level is an exactly representable float.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from fedmosaic.privacy.secagg.crypto import reduce_mod, ring_dtype

_MAX_EXACT_LEVEL = 1 << 53


@runtime_checkable
class IntegerEncoder(Protocol):
    """A client-side encoder that produces the integers mod ``2**bits`` SecAgg+ sums itself,
    and the server-side decoder of their sum: what ``SecAggPlusTransport`` carries instead of
    the float :class:`Quantizer` when the encoding is part of a privacy mechanism (the
    distributed Skellam mechanism, ``fedmosaic.privacy.skellam``, which adds integer noise on
    the client before masking).

    ``encode`` runs on one client with that client's private generator and returns a vector of
    ``encoded_dim`` values in the ring dtype; ``decode`` maps the unmasked sum of at most
    ``max_clients`` encodings back to a float vector of the update's length. The encoder is
    responsible for its own no-wrap guarantee for sums of up to ``max_clients`` vectors.
    """

    bits: int
    max_clients: int

    @property
    def encoded_dim(self) -> int: ...

    def encode(self, values: np.ndarray, rng: np.random.Generator,
               round_num: int) -> np.ndarray: ...

    def decode(self, total: np.ndarray, round_num: int) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Quantizer:
    """Encoder/decoder between float vectors and Z_(2^bits) for sums of ``num_clients`` vectors."""

    clip: float
    bits: int = 32
    num_clients: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive finite number, got {self.clip}")
        if not 2 <= self.bits <= 64:
            raise ValueError(f"bits must be in [2, 64], got {self.bits}")
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {self.num_clients}")
        if self.max_level < 1:
            raise ValueError(
                f"{self.bits} bits cannot hold the sum of {self.num_clients} clients "
                f"(need 2**(bits-1) - 1 >= num_clients)"
            )

    @property
    def max_level(self) -> int:
        """``L``: the largest absolute integer one client's coordinate may take."""
        return min(((1 << (self.bits - 1)) - 1) // self.num_clients, _MAX_EXACT_LEVEL)

    @property
    def scale(self) -> float:
        """Integer levels per unit of the input."""
        return self.max_level / self.clip

    @property
    def step(self) -> float:
        """The float value of one level (the granularity of the encoding)."""
        return self.clip / self.max_level

    def error_bound(self, num_summed: int | None = None) -> float:
        """Strict per-coordinate bound on the decoding error of a sum of ``num_summed`` vectors."""
        m = self.num_clients if num_summed is None else num_summed
        return m * self.step

    def encode(self, values: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Clip, scale and stochastically round ``values`` into the ring dtype (mod 2^bits)."""
        rng = np.random.default_rng() if rng is None else rng
        # One private float64 copy, then in-place steps: this runs on every client for every
        # coordinate, and the temporaries of the plain expression cost about half its time.
        x = np.array(values, dtype=np.float64)
        if not np.isfinite(x).all():
            raise ValueError("cannot encode NaN or infinite values")
        level = float(self.max_level)
        # Clip before and after scaling: x * scale may round just above L for x == clip.
        np.clip(x, -self.clip, self.clip, out=x)
        x *= self.scale
        np.clip(x, -level, level, out=x)
        rounded = np.floor(x)
        x -= rounded  # the fractional part, in [0, 1)
        rounded += rng.random(x.shape) < x  # stochastic rounding: up with that probability
        as_int = rounded.astype(np.int64)
        # Two's complement of the int64 value read as uint64 is its residue mod 2^64.
        residues = reduce_mod(as_int.view(np.uint64), self.bits)
        return residues.astype(ring_dtype(self.bits))

    def decode(self, total: np.ndarray) -> np.ndarray:
        """Map a sum in Z_(2^bits) back to floats, reading it as a signed ``bits``-bit integer."""
        residues = np.asarray(total).astype(np.uint64) & np.uint64((1 << self.bits) - 1)
        if self.bits == 64:
            signed = residues.view(np.int64)
        else:
            signed = residues.astype(np.int64)
            signed[signed >= (1 << (self.bits - 1))] -= 1 << self.bits
        return signed.astype(np.float64) / self.scale


# --------------------------------------------------------------------------- weighted rows


def check_sum_bounds(clip: float, max_weight: float) -> None:
    """``ValueError`` unless ``clip`` and ``max_weight`` (the largest weight a client may
    claim) are > 0: what every fixed-point secure sum of weighted updates needs."""
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if not max_weight > 0:
        raise ValueError(f"max_weight must be > 0, got {max_weight}")


def weighted_row(delta: np.ndarray, weight: float, clip: float, max_weight: float,
                 scale: float = 1.0) -> np.ndarray:
    """What a client submits to a secure sum of weighted updates: ``(w / W) * scale * delta``
    (clipped later, per coordinate, by the quantizer), then ``clip * w / W`` and ``clip``.
    The last two are multiples of ``clip`` and never clipped, so the sum yields the weighted
    sum, the total weight and the number of contributors (``decode_weighted``), and nothing
    per client. ``scale`` is FedBuff's staleness factor (1 in a synchronous round)."""
    wscale = weight / max_weight
    return np.concatenate([delta * (wscale * scale), [wscale * clip, clip]])


def decode_weighted(total: np.ndarray, clip: float,
                    max_weight: float) -> tuple[torch.Tensor, float, int]:
    """``(weighted sum as float32, total weight, count)`` of a decoded sum of
    ``weighted_row``s."""
    return (torch.from_numpy(total[:-2] * max_weight).to(torch.float32),
            float(total[-2] / clip * max_weight), round(float(total[-1]) / clip))
