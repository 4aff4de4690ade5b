"""Multi-server additive secret sharing of client updates (the Prio model).

Each client splits its encoded update ``x`` (integers mod ``2**bits``, from the fixed-point
``Quantizer``) into one additive share per aggregator, ``x = s_1 + ... + s_S mod 2**bits``,
and sends aggregator ``j`` its share ``s_j``. The aggregators are run by different
organisations (two or three); each sums the shares it received, and only the sum of all
aggregators' sums is the sum of the updates (Corrigan-Gibbs and Boneh, "Prio: Private,
Robust, and Scalable Computation of Aggregate Statistics", NSDI 2017; the "two non-colluding
servers" model also used by Mozilla's and ISRG's telemetry aggregation).

Shares from a seeded PRG: all shares but one are ``prg(seed_j)`` (AES-256-CTR keystream,
``fedmosaic.privacy.secagg.crypto.prg``) for a fresh 32-byte seed from the OS CSPRNG, sent as
the seed alone; the last one is ``x - sum_j prg(seed_j)``, sent in full. A client therefore
uploads about one update's worth of bytes in all (``dim * 4`` bytes plus 33 per seed), not
``S`` times it. Which aggregator receives the full share rotates over the clients, so the
aggregators share the traffic.

What each party learns:

* an aggregator alone sees, per client, either a PRG output or ``x`` minus PRG outputs it
  does not know: values indistinguishable from uniform in ``Z_(2^bits)``, and its own sum is
  uniform too; the clients' inputs stay hidden from any coalition of fewer than all ``S``
  aggregators;
* all ``S`` aggregators colluding learn every client's update (sharing hides inputs from
  partial coalitions only; that is the non-collusion assumption);
* whoever combines the ``S`` sums (the coordinator that applies the model update) learns only
  the sum of the included clients' updates, their total weight and their count.

Dropouts cost nothing: a client that did not reach every aggregator is left out by all of
them (each aggregator reports the clients it holds a share of; the sum runs over the
clients every aggregator holds), and no share of anyone else is needed to finish.
Integrity is not protected: a malicious aggregator can add anything to its sum, and a
malicious client can submit any value within the ring (Prio's zero-knowledge validity
proofs are not built here); ``clip`` bounds honest clients only.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedmosaic.privacy.secagg.crypto import (
    SEED_BYTES,
    MaskAccumulator,
    reduce_mod,
    ring_dtype,
    system_random_bytes,
)

__all__ = ["ShareAggregator", "ShareError", "SharedSum", "share_update", "shared_sum"]

RandomBytes = Callable[[int], bytes]

# Message kinds: a 32-byte seed of a PRG share, or a full share vector.
_SEED, _FULL = 0, 1
_HEADER = struct.Struct("<BBI")  # kind, bits, dim


class ShareError(ValueError):
    """A share message that is malformed, of the wrong size, or a client's second one."""


def share_update(encoded: np.ndarray, aggregators: int, bits: int, full_to: int,
                 random_bytes: RandomBytes = system_random_bytes) -> list[bytes]:
    """The messages that carry ``encoded`` (a ring vector mod ``2**bits``) to each of
    ``aggregators`` aggregators: a seed to every aggregator but ``full_to``, which gets
    ``encoded`` minus the seeds' PRG streams. The messages are what goes on the wire: a
    6-byte header (kind, bits, length) and the seed or the little-endian vector."""
    if aggregators < 2:
        raise ValueError(f"secret sharing needs at least 2 aggregators, got {aggregators}")
    if not 0 <= full_to < aggregators:
        raise ValueError(f"full_to must be in [0, {aggregators}), got {full_to}")
    dtype = ring_dtype(bits)
    x = np.asarray(encoded)
    if x.ndim != 1 or x.dtype != dtype:
        raise ValueError(f"encoded must be a 1-D {dtype} vector, got {x.dtype} {x.shape}")
    dim = int(x.size)
    full = MaskAccumulator(dim, bits)
    full.add(x)
    messages: list[bytes] = []
    for j in range(aggregators):
        if j == full_to:
            messages.append(b"")  # filled below, once every seed is subtracted
            continue
        seed = random_bytes(SEED_BYTES)
        full.subtract_stream(seed)
        messages.append(_HEADER.pack(_SEED, bits, dim) + seed)
    share = full.value().astype(dtype.newbyteorder("<"), copy=False)
    messages[full_to] = _HEADER.pack(_FULL, bits, dim) + share.tobytes()
    return messages


class ShareAggregator:
    """One aggregator: receives each client's share message, and sums the shares of the
    clients it is told to include. It keeps each share (seeds as 32 bytes, full shares as
    vectors) until the round's sum, since a client that did not reach every aggregator is
    left out by all of them."""

    def __init__(self, index: int, dim: int, bits: int) -> None:
        self.index, self.dim, self.bits = index, int(dim), int(bits)
        self._dtype = ring_dtype(bits)
        self._seeds: dict[str, bytes] = {}
        self._full: dict[str, np.ndarray] = {}
        self.bytes_received = 0
        self.seconds = 0.0

    def receive(self, client_id: str, message: bytes) -> None:
        """Take one client's share; ``ShareError`` names what is wrong with a bad one (the
        aggregator's state is unchanged then)."""
        t0 = time.perf_counter()
        if client_id in self._seeds or client_id in self._full:
            raise ShareError(f"aggregator {self.index}: a second share from client "
                             f"'{client_id}'")
        if len(message) < _HEADER.size:
            raise ShareError(f"aggregator {self.index}: a share message of {len(message)} "
                             "bytes is shorter than its header")
        kind, bits, dim = _HEADER.unpack_from(message)
        if bits != self.bits or dim != self.dim:
            raise ShareError(f"aggregator {self.index}: client '{client_id}' sent a share of "
                             f"{dim} values mod 2^{bits}; this round sums {self.dim} values "
                             f"mod 2^{self.bits}")
        body = message[_HEADER.size:]
        if kind == _SEED:
            if len(body) != SEED_BYTES:
                raise ShareError(f"aggregator {self.index}: client '{client_id}' sent a seed "
                                 f"of {len(body)} bytes, not {SEED_BYTES}")
            self._seeds[client_id] = bytes(body)
        elif kind == _FULL:
            if len(body) != self.dim * self._dtype.itemsize:
                raise ShareError(f"aggregator {self.index}: client '{client_id}' sent a share "
                                 f"of {len(body)} bytes, not {self.dim * self._dtype.itemsize}")
            vec = np.frombuffer(body, dtype=self._dtype.newbyteorder("<")).astype(self._dtype)
            self._full[client_id] = reduce_mod(vec, self.bits)
        else:
            raise ShareError(f"aggregator {self.index}: client '{client_id}' sent a share of "
                             f"unknown kind {kind}")
        self.bytes_received += len(message)
        self.seconds += time.perf_counter() - t0

    @property
    def holders(self) -> set[str]:
        """The clients this aggregator holds a share of."""
        return set(self._seeds) | set(self._full)

    def full_share(self, client_id: str) -> np.ndarray | None:
        """A full share held here (what this aggregator sees of that client), if any."""
        return self._full.get(client_id)

    def sum(self, included: Sequence[str]) -> np.ndarray:
        """The sum mod ``2**bits`` of the shares of ``included`` (each held here)."""
        t0 = time.perf_counter()
        missing = [c for c in included if c not in self._seeds and c not in self._full]
        if missing:
            raise ShareError(f"aggregator {self.index} holds no share of {missing[:3]}")
        acc = MaskAccumulator(self.dim, self.bits)
        for cid in included:
            seed = self._seeds.get(cid)
            if seed is not None:
                acc.add_stream(seed)
            else:
                acc.add(self._full[cid])
        out = acc.value()
        self.seconds += time.perf_counter() - t0
        return out


@dataclass
class SharedSum:
    """The outcome of one secret-shared sum: the total mod ``2**bits`` over ``included``
    (row indices), and its costs: bytes each client uploaded, each client's seconds to share,
    each aggregator's seconds to receive and sum."""

    total: np.ndarray
    included: list[int]
    bytes_up_per_client: np.ndarray
    client_seconds: np.ndarray
    aggregator_seconds: list[float]
    aggregator_sums: list[np.ndarray] = field(repr=False, default_factory=list)


def shared_sum(rows: np.ndarray, *, aggregators: int = 2, bits: int = 32,
               reached: Mapping[int, int] | None = None,
               random_bytes: RandomBytes = system_random_bytes) -> SharedSum:
    """Secret-share each row of ``rows`` (ring vectors mod ``2**bits``, one per client) over
    ``aggregators`` aggregators and combine their sums, through the real messages.

    ``reached`` simulates dropouts: client ``i`` reaches only its first ``reached[i]``
    aggregators (0: none) and is left out of the sum by all of them."""
    n, dim = rows.shape
    aggs = [ShareAggregator(j, dim, bits) for j in range(aggregators)]
    ids = [str(i) for i in range(n)]
    up = np.zeros(n, dtype=np.int64)
    client_s = np.zeros(n)
    reached = reached or {}
    for i in range(n):
        t0 = time.perf_counter()
        messages = share_update(rows[i], aggregators, bits, full_to=i % aggregators,
                                random_bytes=random_bytes)
        client_s[i] = time.perf_counter() - t0
        for j, message in enumerate(messages[:reached.get(i, aggregators)]):
            aggs[j].receive(ids[i], message)
            up[i] += len(message)
    common = set.intersection(*(a.holders for a in aggs))
    included = [i for i in range(n) if ids[i] in common]
    sums = [a.sum([ids[i] for i in included]) for a in aggs]
    total = MaskAccumulator(dim, bits)
    for s in sums:
        total.add(s)
    return SharedSum(total.value(), included, up, client_s, [a.seconds for a in aggs], sums)
