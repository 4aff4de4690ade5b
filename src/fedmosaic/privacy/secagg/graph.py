"""The SecAgg+ neighbour graph and the choice of its degree ``k`` and threshold ``t``.

Bell et al., CCS 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
replace the complete graph of Bonawitz et al., CCS 2017 ("Practical Secure Aggregation for
Privacy-Preserving Machine Learning") by a sparse random graph of degree ``k = O(log n)``:
a client agrees pairwise masks with, and Shamir-shares its secrets among, its ``k``
neighbours only. The graph here is the Harary graph ``H(k, n)`` (the circulant graph that
joins ring positions at distance ``1..k//2``, plus the "diameter" edges when ``k`` is odd)
whose nodes are placed on the ring by a uniformly random permutation derived from a public
seed, so server and clients build the same graph from the seed alone. ``k = n - 1`` is the
complete graph, i.e. classic SecAgg.

Parameter rule (:func:`secagg_plus_parameters`)
-----------------------------------------------
The security and correctness arguments of Bell et al. rest on three properties of the
sampled graph; this module checks them numerically (exact probabilities and union bounds, not
the paper's asymptotic constants), each with a failure probability bounded over the random
relabelling:

* **no double reconstruction** -- for every honest client ``u`` with ``c_u`` corrupted
  neighbours, ``2t > k + c_u``. A (possibly malicious) server that asks some honest neighbours
  for ``b_u`` shares and others for ``s_u`` shares then cannot collect ``t`` of both, because
  the ``k - c_u`` honest neighbours reveal one share each and ``2(t - c_u) > k - c_u``. It also
  implies ``c_u < t``: the corrupted clients alone never hold ``t`` shares;
* **connectivity** -- the graph restricted to honest clients that did not drop stays
  connected, otherwise the server learns the sums of the separate components;
* **correctness** -- every client keeps at least ``t`` neighbours that do not drop, so each
  needed secret can be reconstructed.

With ``n`` clients, ``C = ceil(gamma * n)`` corrupted and ``D = ceil(delta * n)`` dropped
(chosen independently of the graph -- static corruption and non-adaptive dropouts, as in the
paper's analysis; the graph seed must therefore not be chosen by an adversary after the fact,
e.g. take it from a public beacon or a commit-reveal), the random relabelling makes the
neighbourhood of any node a uniform ``k``-subset of the other ``n - 1`` nodes, so the number of
corrupted (dropped) neighbours is hypergeometric ``Hyp(n - 1, C, k)`` (``Hyp(n - 1, D, k)``).
The function scans even ``k = 2, 4, ...`` (even ``k`` keeps the Harary graph exactly
``k``-regular) and returns the first ``k`` for which, with the union bound over nodes,

1. ``t = t(k)`` is the smallest integer with ``n * P[Hyp(n-1, C, k) >= 2t - k] <= 2**-(sigma+1)``;
2. ``n * P[Hyp(n-1, D, k) >= k - t + 1] <= 2**-eta`` (correctness);
3. ``n(n-1)/2 * prod_{i<2h} (r - i) / (n - i) <= 2**-(sigma+1)`` with ``h = k // 2`` and
   ``r = C + D`` (connectivity: removing ``r`` random ring positions disconnects the
   circulant graph only if two distinct runs of at least ``h`` consecutive positions are
   removed; each pair of runs contains two disjoint windows of ``h`` positions, and there are
   fewer than ``n(n-1)/2`` pairs of window starts),

so the security failure probability (1 plus 3) is at most ``2**-sigma`` and the correctness
failure probability at most ``2**-eta``. The probabilities are exact hypergeometric and
falling-factorial ratios evaluated in log space (``lgamma`` table, relative error around
1e-12, far below what the 2^-sigma and 2^-eta targets could notice). Choosing the smallest
valid ``t`` leaves the most room for dropouts. If no sparse ``k`` works, the complete graph
is used, where the conditions are deterministic: ``t = floor((n - 1 + C) / 2) + 1`` and
``n - 1 - t >= D``; if even that fails the dropout and corruption rates are too high for
these guarantees and a ``ValueError`` is raised.

Threshold convention and its exact bounds
-----------------------------------------
A client's secrets are shared among its ``k`` neighbours only -- it holds no share of its own
-- and ``t`` of those *neighbours* must answer. Bonawitz et al. count the client's own share
among ``n``; for the same ``t`` this implementation therefore tolerates one dropout fewer.
Exactly, with ``C`` corrupted clients colluding with the server:

* dropouts: the round succeeds iff every survivor, and every dropped client some survivor
  masked with, keeps ``t`` neighbours that answer; on the complete graph (``k = n - 1``) iff
  at least ``t + 1`` clients answer the unmask request, i.e. it survives ``n - 1 - t``
  dropouts (the paper: ``n - t``; 20 clients, ``t = 14``: 5 here, 6 there);
* collusion, honest-but-curious server: a client's input is hidden from the server plus any
  ``t - 1`` of its neighbours (``t`` neighbours hold both of its secrets), as in the paper;
* malicious server (it also chooses who "dropped"): a client is safe iff ``2t > k + c_v``
  for its ``c_v`` corrupted neighbours (see ``protocol.py``); on the complete graph
  ``t >= floor((n - 1 + C) / 2) + 1`` (the paper's condition with its own share would be
  ``2t > n + C``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedmosaic.privacy.secagg.errors import SecAggInfeasibleError, SecAggProtocolError

GRAPH_LABEL = b"fedmosaic/secagg+/v1/graph-permutation/"


class NeighbourGraph:
    """The random-relabelled Harary graph ``H(degree, num_nodes)`` of a public seed.

    Nodes are client indices ``0 .. num_nodes - 1``. ``degree == num_nodes - 1`` is the
    complete graph (Bonawitz et al.); for odd ``degree`` and odd ``num_nodes`` one node has
    degree ``degree + 1``, as in Harary's construction.
    """

    def __init__(self, num_nodes: int, degree: int, seed: bytes) -> None:
        if num_nodes < 2:
            raise ValueError(f"a neighbour graph needs at least 2 nodes, got {num_nodes}")
        if not 1 <= degree <= num_nodes - 1:
            raise ValueError(f"degree must be in [1, {num_nodes - 1}], got {degree}")
        self.num_nodes, self.degree, self.seed = num_nodes, degree, bytes(seed)
        if self.is_complete:
            self._order = self._position = np.arange(num_nodes)
            return
        # A permutation anyone can recompute from the seed, independent of numpy's RNG
        # versions: sort n pseudo-random 64-bit keys from an AES-CTR stream.
        key = hashlib.sha256(GRAPH_LABEL + self.seed).digest()
        stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        keys = np.frombuffer(stream.update(bytes(8 * num_nodes)), dtype="<u8")
        self._order = np.argsort(keys, kind="stable")  # ring position -> node
        self._position = np.empty(num_nodes, dtype=np.int64)  # node -> ring position
        self._position[self._order] = np.arange(num_nodes)

    @property
    def is_complete(self) -> bool:
        return self.degree == self.num_nodes - 1

    def _ring_partners(self, position: int) -> list[int]:
        n, half = self.num_nodes, self.degree // 2
        partners = [(position + d) % n for d in range(1, half + 1)]
        partners += [(position - d) % n for d in range(1, half + 1)]
        if self.degree % 2:
            if n % 2 == 0:
                partners.append((position + n // 2) % n)
            else:
                # Harary H(2r+1, n), n odd: edges (i, i + (n+1)/2) for 0 <= i <= (n-1)/2.
                lift = (n + 1) // 2
                if position <= (n - 1) // 2:
                    partners.append((position + lift) % n)
                back = (position - lift) % n
                if back <= (n - 1) // 2:
                    partners.append(back)
        return partners

    def neighbours(self, node: int) -> tuple[int, ...]:
        """The sorted neighbours of ``node``."""
        if not 0 <= node < self.num_nodes:
            raise ValueError(f"node {node} is not in [0, {self.num_nodes})")
        if self.is_complete:
            return tuple(v for v in range(self.num_nodes) if v != node)
        positions = self._ring_partners(int(self._position[node]))
        return tuple(sorted({int(self._order[p]) for p in positions}))

    def neighbour_sets(self) -> list[frozenset[int]]:
        """Neighbourhoods of all nodes (what the server needs), the ring part vectorised."""
        n = self.num_nodes
        if self.is_complete:
            everyone = frozenset(range(n))
            return [everyone - {u} for u in range(n)]
        if self.degree % 2 and n % 2:
            # The odd-n Harary "diameter" edges are irregular; build those node by node.
            return [frozenset(self.neighbours(u)) for u in range(n)]
        half = self.degree // 2
        offsets = np.concatenate([np.arange(1, half + 1), -np.arange(1, half + 1)])
        if self.degree % 2:
            offsets = np.append(offsets, n // 2)
        ring = self._order[(self._position[:, None] + offsets[None, :]) % n]
        return [frozenset(row) for row in ring.tolist()]


def is_connected(graph: NeighbourGraph, nodes: Iterable[int]) -> bool:
    """Whether the subgraph induced on ``nodes`` is connected (an empty set counts as connected)."""
    alive = set(nodes)
    if not alive:
        return True
    start = next(iter(alive))
    seen, frontier = {start}, [start]
    while frontier:
        u = frontier.pop()
        for v in graph.neighbours(u):
            if v in alive and v not in seen:
                seen.add(v)
                frontier.append(v)
    return seen == alive


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class SecAggParameters:
    """A degree/threshold choice and the failure bounds it was checked against (log2 units)."""

    num_clients: int
    degree: int
    threshold: int
    dropout_rate: float
    corrupted_fraction: float
    log2_security_failure: float
    log2_correctness_failure: float

    @property
    def is_complete(self) -> bool:
        return self.degree == self.num_clients - 1


class _LogFactorials:
    """``log(m!)`` for ``m = 0 .. size`` (natural log), so binomials are sums of table lookups."""

    def __init__(self, size: int) -> None:
        self.table = np.array([math.lgamma(m + 1) for m in range(size + 1)])

    def log_comb(self, a: int | np.ndarray, b: int | np.ndarray) -> np.ndarray:
        t = self.table
        return t[a] - t[b] - t[np.asarray(a) - np.asarray(b)]

    def log2_hypergeometric_tails(self, population: int, marked: int, draws: int) -> np.ndarray:
        """``out[x] = log2 P[X >= x]`` for ``X ~ Hyp(population, marked, draws)``, x = 0..draws+1.

        Exactly 0 below the support and -inf above it; in between, the log-sum-exp of the
        probability mass function, accumulated from the top of the support.
        """
        lowest = max(0, draws - (population - marked))
        highest = min(marked, draws)
        support = np.arange(lowest, highest + 1)
        log_pmf = (
            self.log_comb(marked, support)
            + self.log_comb(population - marked, draws - support)
            - self.log_comb(population, draws)
        )
        tails = np.full(draws + 2, -np.inf)
        tails[lowest : highest + 1] = np.logaddexp.accumulate(log_pmf[::-1])[::-1] / math.log(2)
        tails[: lowest + 1] = 0.0
        return np.minimum(tails, 0.0)

    def log2_all_removed(self, removed: int, total: int, positions: int) -> float:
        """``log2 P[`positions` given slots of `total` all fall among `removed` random ones]``."""
        if positions > removed:
            return -math.inf
        t = self.table
        log_p = (t[removed] - t[removed - positions]) - (t[total] - t[total - positions])
        return float(log_p) / math.log(2)


def _log2_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    high, low = max(a, b), min(a, b)
    return high + math.log2(1.0 + 2.0 ** (low - high))


def _worst_count(rate: float, n: int) -> int:
    # round() first: 0.1 * 100 is 10.000000000000002 in floating point, which is 10 clients.
    return math.ceil(round(rate * n, 9))


@lru_cache(maxsize=256)
def secagg_plus_parameters(
    n: int,
    dropout_rate: float,
    corrupted_fraction: float,
    security_bits: float = 40,
    correctness_bits: float = 20,
) -> SecAggParameters:
    """Smallest degree ``k`` and its threshold ``t`` meeting Bell et al.'s conditions.

    See the module docstring for the exact conditions; ``security_bits`` (sigma) and
    ``correctness_bits`` (eta) bound the failure probabilities by ``2**-sigma`` and
    ``2**-eta``. Raises ``ValueError`` when no graph, not even the complete one, meets them.
    """
    if n < 2:
        raise SecAggInfeasibleError(f"secure aggregation needs at least 2 clients, got {n}")
    if not (0 <= dropout_rate < 1 and 0 <= corrupted_fraction < 1):
        raise ValueError("dropout_rate and corrupted_fraction must be in [0, 1)")
    corrupted = _worst_count(corrupted_fraction, n)
    dropped = _worst_count(dropout_rate, n)
    if corrupted + dropped >= n:
        raise SecAggInfeasibleError(
            f"{corrupted} corrupted plus {dropped} dropped clients leave no honest survivor"
        )
    security_budget = -(security_bits + 1)  # two security events share the 2**-sigma budget
    log2_n = math.log2(n)
    log2_pairs = math.log2(n * (n - 1) / 2)

    table = _LogFactorials(n)
    for k in range(2, n - 1, 2):
        capture_tails = table.log2_hypergeometric_tails(n - 1, corrupted, k)
        # 2t - k >= 1 always: with no corrupted client at all, t = k//2 + 1 still guards
        # against a malicious server collecting t shares of both secrets of one client.
        threshold = next(
            (
                t
                for t in range(k // 2 + 1, k + 1)
                if log2_n + capture_tails[2 * t - k] <= security_budget
            ),
            None,
        )
        if threshold is None:
            continue
        capture = log2_n + float(capture_tails[2 * threshold - k])
        dropout_tails = table.log2_hypergeometric_tails(n - 1, dropped, k)
        correctness = log2_n + float(dropout_tails[k - threshold + 1])
        if correctness > -correctness_bits:
            continue
        disconnect = log2_pairs + table.log2_all_removed(corrupted + dropped, n, 2 * (k // 2))
        if disconnect > security_budget:
            continue
        return SecAggParameters(
            num_clients=n,
            degree=k,
            threshold=threshold,
            dropout_rate=dropout_rate,
            corrupted_fraction=corrupted_fraction,
            log2_security_failure=_log2_add(capture, disconnect),
            log2_correctness_failure=correctness,
        )

    # The complete graph: every other client is a neighbour, the conditions are deterministic.
    k = n - 1
    threshold = (k + corrupted) // 2 + 1
    if threshold > k or k - threshold < dropped:
        raise SecAggInfeasibleError(
            f"no SecAgg+ parameters for n={n}, dropout_rate={dropout_rate}, "
            f"corrupted_fraction={corrupted_fraction}: even the complete graph needs "
            f"t={threshold} > (n-1+C)/2 and n-1-t >= D={dropped}"
        )
    return SecAggParameters(
        num_clients=n,
        degree=k,
        threshold=threshold,
        dropout_rate=dropout_rate,
        corrupted_fraction=corrupted_fraction,
        log2_security_failure=-math.inf,
        log2_correctness_failure=-math.inf,
    )


# --------------------------------------------------------------------- client-side bounds


def prune_members(neighbour_sets: list[frozenset[int]], members: Iterable[int],
                  threshold: int) -> set[int]:
    """Largest subset of ``members`` in which every client keeps >= ``threshold`` neighbours.

    A client whose neighbourhood cannot hold ``t`` shares could never be unmasked, and anyone
    who masked with it could not be unmasked either, so it is removed before anyone masks.
    Deterministic: server and clients compute the same set from the same roster.
    """
    alive = set(members)
    changed = True
    while changed:
        changed = False
        for u in sorted(alive):
            if len(neighbour_sets[u] & alive) < threshold:
                alive.discard(u)
                changed = True
    return alive


def minimum_threshold(
    n: int,
    degree: int,
    corrupted_fraction: float,
    dropout_rate: float,
    security_bits: float = 40,
    *,
    every_graph: bool = False,
) -> int | None:
    """The smallest threshold ``t`` that keeps an ``(n, degree)`` round secure, or ``None``.

    The security conditions of :func:`secagg_plus_parameters` (the module docstring's 1 and
    3) for a *given* degree: ``None`` when no ``t <= degree`` meets them (the degree is too
    small for the tolerated corruption, or the graph may disconnect). The complete graph
    (``degree = n - 1``) needs ``2t > (n - 1) + C`` with ``C = ceil(gamma * n)``: the ``n - 1 - C``
    honest holders of a client's shares reveal one share each, so a server that shows half of
    them one survivor set and half another cannot collect ``t`` shares of both secrets, and
    the ``C < t`` corrupted ones alone hold too few. For an odd sparse degree the Harary graph
    may give a node ``degree + 1`` neighbours; the bound then uses ``degree + 1``.

    ``every_graph`` asks for the conditions to hold for *every* relabelling, not with
    probability ``1 - 2^-sigma`` over a random one: ``2t > k + C`` (no neighbourhood can hold
    ``2t - k`` corrupted members) and ``C + D < 2 * (k // 2)`` (removing fewer than two
    windows of ``k // 2`` ring positions never disconnects the circulant graph). Then no
    party gains anything by grinding the graph seed.
    """
    if not 1 <= degree <= n - 1:
        return None
    corrupted = _worst_count(corrupted_fraction, n)
    if degree == n - 1:
        threshold = (degree + corrupted) // 2 + 1
        return threshold if threshold <= degree else None
    k = degree + degree % 2
    if k > n - 1:
        return None
    dropped = _worst_count(dropout_rate, n)
    if every_graph:
        threshold = (k + corrupted) // 2 + 1
        connected = corrupted + dropped < 2 * (degree // 2)
        return threshold if connected and threshold <= degree else None
    table = _LogFactorials(n)
    budget = -(security_bits + 1)
    disconnect = math.log2(n * (n - 1) / 2) + table.log2_all_removed(
        min(corrupted + dropped, n), n, 2 * (degree // 2))
    if disconnect > budget:
        return None
    tails = table.log2_hypergeometric_tails(n - 1, corrupted, k)
    for t in range(k // 2 + 1, degree + 1):
        if math.log2(n) + tails[2 * t - k] <= budget:
            return t
    return None


@dataclass(frozen=True)
class SecAggBounds:
    """What a client accepts, configured on the client, never taken from the server.

    ``min_clients``/``max_clients`` bound the round's population ``n`` (a round of two
    reveals the other's input to each; a huge ``n`` costs O(n) memory to rebuild the graph).
    ``corrupted_fraction`` (gamma) is the fraction of the ``n`` clients that may collude with
    a malicious server, ``dropout_rate`` (delta) the fraction the graph's connectivity must
    survive (dropouts plus corrupted), ``security_bits`` sigma the failure exponent: the
    client derives from them the minimum threshold :func:`minimum_threshold` for the
    announced degree and refuses any setup below it (Bell et al., CCS 2020, Theorem 4.9's
    conditions as checked in this module; Bonawitz et al., CCS 2017, §4: ``t > (n - 1 + C)/2``
    on the complete graph with this implementation's convention that a client's shares go
    to its ``n - 1`` neighbours only). Defaults: gamma = 0.2 (as the server's default) and
    delta = 0.1. ``every_graph`` (off by default) accepts only setups secure for every
    neighbour graph, so that grinding the graph seed gains a malicious server nothing; the
    default parameters meet it up to n = 150 at gamma = 0.2.
    """

    min_clients: int = 3
    max_clients: int = 1_000_000
    corrupted_fraction: float = 0.2
    dropout_rate: float = 0.1
    security_bits: float = 40
    every_graph: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.min_clients <= self.max_clients:
            raise ValueError("SecAggBounds needs 2 <= min_clients <= max_clients")
        if not (0 <= self.corrupted_fraction < 1 and 0 <= self.dropout_rate < 1):
            raise ValueError("corrupted_fraction and dropout_rate must be in [0, 1)")

    def check(self, num_clients: int, degree: int, threshold: int) -> None:
        """Raise :class:`SecAggProtocolError` naming the problem unless the setup is acceptable."""
        if not self.min_clients <= num_clients <= self.max_clients:
            raise SecAggProtocolError(
                f"setup refused: a round of {num_clients} clients is outside this client's "
                f"accepted population [{self.min_clients}, {self.max_clients}]"
            )
        least = minimum_threshold(num_clients, degree, self.corrupted_fraction,
                                  self.dropout_rate, self.security_bits,
                                  every_graph=self.every_graph)
        if least is None:
            raise SecAggProtocolError(
                f"setup refused: degree k={degree} for n={num_clients} cannot be secure with "
                f"tolerated corrupted fraction {self.corrupted_fraction:g} and dropout rate "
                f"{self.dropout_rate:g} at {self.security_bits:g} bits"
                f"{' for every graph' if self.every_graph else ''} (no threshold works)"
            )
        if threshold < least:
            raise SecAggProtocolError(
                f"setup refused: threshold t={threshold} is below the minimum t={least} this "
                f"client derives for n={num_clients}, k={degree}, tolerated corrupted fraction "
                f"{self.corrupted_fraction:g} (threshold-lowering attack?)"
            )
