"""Empirical privacy audit of client-level DP federated training with canary clients.

Two published one-run methods, measured on one training run with canary clients inserted:

- **Steinke, Nasr and Jagielski 2023**, "Privacy Auditing with One (1) Training Run"
  (NeurIPS): ``m`` canaries, each included independently with probability 1/2; after training
  the auditor guesses "in" for the ``k+`` highest-scoring canaries and "out" for the ``k-``
  lowest, abstaining on the rest. If the mechanism is (epsilon, delta)-DP with respect to each
  canary, the number of correct guesses ``W`` among ``r = k+ + k-`` guesses satisfies
  (their Theorem 3.1, with the delta term of their Appendix D)
  ``P[W >= v] <= P[Bin(r, e^eps/(1+e^eps)) >= v] + 2 m delta max_i P[v-i <= Bin(...) < v]/i``.
  Every epsilon whose bound is below ``1 - confidence`` is rejected, so the largest rejected
  epsilon is a **statistical lower bound** on the true epsilon at that confidence
  (``steinke_lower_bound``). Several guess counts are tried; the confidence is split over
  them (Bonferroni), so picking the best one after the fact stays valid.
- **Andrew, Kairouz, Oh, Oprea, McMahan and Suriyakumar 2024**, "One-shot Empirical Privacy
  Estimation for Federated Learning" (ICLR): a canary *client* submits a fixed random
  direction, clipped by the server like any other update; the cosine between each inserted
  canary's direction and the final model delta is compared with the cosines of directions
  that were never inserted; Gaussians fitted to both give the epsilon of the Gaussian pair
  that separates them (``gaussian_pair_epsilon``). This is an **estimate**, not a bound: the
  Gaussian fit is an approximation.

Canary clients enter through the real code path: ``CanaryTransport`` adds them to the
transport's clients, so the strategy samples them, runs their client stages, clips, counts and
noises their updates, and the accountant charges for them exactly as for real clients. The
scores only look at the final model (the threat model of a released model), which is weaker
than the all-iterates model the accountant bounds, so the audit's numbers are expected to sit
below the accounted epsilon; an implementation bug that adds too little noise shows as a
lower bound *above* it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from scipy.optimize import brentq

from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.audit.errors import AuditError
from fedmosaic.core.update import ClientUpdate
from fedmosaic.runtime.tally import Weighting
from fedmosaic.train.base import FitConfig

CANARY_PREFIX = "__canary_"
EXCLUDED = ("absent", "mirror")
CANARY_STREAM = 0xCA7A_0001  # separates the canaries' random stream from the run's
EPS_CAP = 50.0  # search range for epsilon; beyond this a lower bound is reported as the cap


# -- Steinke, Nasr and Jagielski 2023: the one-run lower bound ------------------------------
def steinke_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on ``P[W >= v]`` for an (epsilon, delta)-DP mechanism (Steinke et al. 2023,
    Theorem 3.1 and Appendix D): ``m`` canaries, ``r`` guesses, ``v`` of them correct."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    p = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, p))  # P[Bin(r, p) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    # max over i in 1..v of P[v - i <= Bin(r, p) < v] / i
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # pmf(v-1), pmf(v-2), ..., pmf(0)
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * alpha, 1.0)


def steinke_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95,
                        tol: float = 1e-6) -> float:
    """The largest epsilon that ``v`` correct guesses out of ``r`` reject at ``confidence``:
    the mechanism is not (epsilon, delta)-DP for any smaller epsilon, except with probability
    at most ``1 - confidence``. 0 when no epsilon is rejected."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1.0 - confidence
    if steinke_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    if steinke_p_value(m, r, v, EPS_CAP, delta) < beta:
        return EPS_CAP
    lo, hi = 0.0, EPS_CAP  # p_value(lo) < beta <= p_value(hi); p_value grows with epsilon
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if steinke_p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def default_guess_counts(m: int) -> list[int]:
    """Numbers of "in" guesses tried: a fixed grid (chosen before looking at the scores)."""
    counts = {max(1, round(m * f)) for f in (0.02, 0.05, 0.1, 0.2, 0.35, 0.5)}
    return sorted(c for c in counts if c <= m)


def _plans(m: int, guess_counts: Sequence[int] | None) -> list[tuple[int, int]]:
    """The guessers ``(k+, k-)``: top ``k`` "in" only, and top ``k`` in with bottom ``k`` out."""
    counts = list(guess_counts) if guess_counts is not None else default_guess_counts(m)
    if not counts or min(counts) < 1 or max(counts) > m:
        raise ValueError(f"guess counts must be in 1..{m}, got {counts}")
    return [(k, 0) for k in counts] + [(k, k) for k in counts if 2 * k <= m]


def largest_lower_bound(m: int, delta: float, confidence: float = 0.95, scores: int = 1,
                        guess_counts: Sequence[int] | None = None) -> float:
    """The largest lower bound ``guessing_game`` can return with ``m`` canaries: every guess
    right. A mechanism that claims more than this cannot be caught by an audit of this size,
    however badly it is broken: the bound grows only like log m, and the delta term
    ``2 m delta`` stops it growing at all once ``m`` nears ``(1 - confidence) / delta``."""
    plans = _plans(m, guess_counts)
    per_test = 1.0 - (1.0 - confidence) / (len(plans) * scores)
    return max(steinke_lower_bound(m, a + b, a + b, delta, per_test) for a, b in plans)


@dataclass(frozen=True)
class GuessingGame:
    """The best guesser of the one-run game and the lower bound it gives."""

    epsilon_lower_bound: float
    confidence: float
    score: str  # which canary score the best guesser ranked by
    guesses: int  # r
    correct: int  # v
    guesses_in: int  # k+
    guesses_out: int  # k-
    tests: int  # how many guessers shared the confidence (Bonferroni)


def guessing_game(scores: np.ndarray | Mapping[str, np.ndarray], included: np.ndarray,
                  delta: float, confidence: float = 0.95,
                  guess_counts: Sequence[int] | None = None) -> GuessingGame:
    """Play Steinke et al.'s game on canary ``scores`` (higher = more likely included).

    ``scores`` is one array or several named ones (threat models). For each score and each
    ``k`` in ``guess_counts`` two guessers are played: "in" for the top ``k`` only, and "in"
    for the top ``k`` plus "out" for the bottom ``k``. The confidence is split evenly over all
    guessers (Bonferroni), so the best of them is still a lower bound at ``confidence``.
    """
    named = dict(scores) if isinstance(scores, Mapping) else {"score": scores}
    included = np.asarray(included, dtype=bool)
    m = len(included)
    if m == 0 or not named:
        raise ValueError("need at least one canary and one score")
    for name, values in named.items():
        if np.shape(values) != included.shape:
            raise ValueError(f"score {name!r} has shape {np.shape(values)}, expected one "
                             f"value per canary {included.shape}")
    plans = _plans(m, guess_counts)
    tests = len(plans) * len(named)
    per_test = 1.0 - (1.0 - confidence) / tests
    best = GuessingGame(0.0, confidence, next(iter(named)), 0, 0, 0, 0, tests)
    for name, values in named.items():
        order = np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")
        for k_in, k_out in plans:
            right = int(included[order[:k_in]].sum())
            if k_out:
                right += int((~included[order[m - k_out:]]).sum())
            r = k_in + k_out
            bound = steinke_lower_bound(m, r, right, delta, per_test)
            if bound > best.epsilon_lower_bound:
                best = GuessingGame(bound, confidence, name, r, right, k_in, k_out, tests)
    return best


# -- Andrew et al. 2024: the Gaussian epsilon estimate --------------------------------------
def _region_mass(a: float, b: float, c: float, mean: float, std: float) -> float:
    """``P[a x^2 + b x + c > 0]`` for ``x ~ N(mean, std^2)``."""
    cdf = stats.norm(mean, std).cdf
    if abs(a) < 1e-300:
        if b == 0:
            return 1.0 if c > 0 else 0.0
        root = -c / b
        return 1.0 - cdf(root) if b > 0 else cdf(root)
    disc = b * b - 4 * a * c
    if disc <= 0:
        return 1.0 if a > 0 else 0.0
    r1, r2 = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
    inside = cdf(r2) - cdf(r1)
    return 1.0 - inside if a > 0 else inside


def _gaussian_delta(epsilon: float, p: tuple[float, float], q: tuple[float, float]) -> float:
    """Hockey-stick divergence ``sup_S P(S) - e^eps Q(S)`` for Gaussians P and Q."""
    (mp, sp), (mq, sq) = p, q
    # log p(x) - log q(x) - epsilon = a x^2 + b x + c
    a = 1 / (2 * sq * sq) - 1 / (2 * sp * sp)
    b = mp / (sp * sp) - mq / (sq * sq)
    c = mq * mq / (2 * sq * sq) - mp * mp / (2 * sp * sp) + math.log(sq / sp) - epsilon
    return max(0.0, _region_mass(a, b, c, mp, sp) - math.exp(epsilon)
               * _region_mass(a, b, c, mq, sq))


def gaussian_pair_epsilon(null: tuple[float, float], observed: tuple[float, float],
                          delta: float) -> float:
    """Smallest epsilon at which the Gaussians ``null`` and ``observed`` (each ``(mean,
    std)``) are (epsilon, delta)-indistinguishable in both directions (Andrew et al. 2024's
    estimate, with unequal variances)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if min(null[1], observed[1]) <= 0:
        raise ValueError("the fitted standard deviations must be > 0")
    best = 0.0
    for p, q in ((observed, null), (null, observed)):
        if _gaussian_delta(0.0, p, q) <= delta:
            continue
        if _gaussian_delta(EPS_CAP, p, q) > delta:
            return EPS_CAP
        best = max(best, brentq(lambda e, p=p, q=q: _gaussian_delta(e, p, q) - delta,
                                0.0, EPS_CAP, xtol=1e-8))
    return best


# -- canary clients --------------------------------------------------------------------------
@dataclass(frozen=True)
class Canaries:
    """``m`` random unit directions in the model's parameter space and which are inserted.

    Each canary is included with probability 1/2, independently (Steinke et al.'s design);
    the excluded ones are the never-inserted directions of Andrew et al.'s null distribution.
    """

    directions: torch.Tensor  # (m, d), unit rows, float32
    included: np.ndarray  # (m,) bool

    @classmethod
    def draw(cls, count: int, dim: int, seed: int) -> Canaries:
        if count < 2:
            raise AuditError(f"need at least 2 canaries, got {count}")
        if dim < 1:
            raise AuditError(f"the model has {dim} parameters")
        # A stream of its own: the run's seed also drives the server's sampling generator and
        # the model's initialisation, and Steinke et al.'s bound needs the inclusion bits to
        # be independent of the mechanism's randomness.
        directions_seq, inclusion_seq = np.random.SeedSequence([seed, CANARY_STREAM]).spawn(2)
        gen = torch.Generator().manual_seed(int(directions_seq.generate_state(1, np.uint64)[0]
                                                & (2**63 - 1)))
        directions = torch.randn(count, dim, generator=gen, dtype=torch.float64)
        directions /= torch.linalg.vector_norm(directions, dim=1, keepdim=True)
        included = np.random.default_rng(inclusion_seq).random(count) < 0.5
        return cls(directions.to(torch.float32), included)

    @property
    def count(self) -> int:
        return int(self.directions.shape[0])

    def client_id(self, index: int) -> str:
        return f"{CANARY_PREFIX}{index:05d}"


class CanaryTransport:
    """Wraps a transport and adds canary clients to its population.

    An included canary's "training" returns ``norm`` times its direction, whatever the
    weights: its update does not depend on data (Andrew et al. 2024). It goes through the
    task's client stages (``task.received`` / ``task.finish``) as a real client's would, and
    the server validates, clips, counts and noises it like any other. An excluded canary is
    either absent (``excluded="absent"``: the add/remove relation that Poisson sampling is
    accounted under) or replaced by its mirror, a client that uploads minus the canary's
    update (``excluded="mirror"``: the replace-one relation of fixed-size cohorts, where the
    population size stays fixed and one replaced client moves the clipped sum by ``2S``).
    """

    def __init__(self, inner: Any, canaries: Canaries, norm: float, *,
                 excluded: str = "absent") -> None:
        if not norm > 0:
            raise AuditError(f"the canary norm must be > 0, got {norm}")
        if excluded not in EXCLUDED:
            raise AuditError(f"excluded must be one of {EXCLUDED}, got {excluded!r}")
        self.inner = inner
        self.canaries = canaries
        self.norm = float(norm)
        # All-iterates score: sum over rounds of max(0, cos(direction, round's model change))^2
        self.iterate_scores = np.zeros(canaries.count)
        self.rounds_seen = 0
        self._previous: torch.Tensor | None = None
        real = set(inner.available_clients())
        self._updates: dict[str, tuple[int, float]] = {}  # id -> (canary index, sign)
        for i in range(canaries.count):
            cid = canaries.client_id(i)
            if cid in real:
                raise AuditError(f"a real client is called {cid!r}; canary ids would collide")
            if canaries.included[i]:
                self._updates[cid] = (i, 1.0)
            elif excluded == "mirror":
                self._updates[cid] = (i, -1.0)

    @property
    def canary_ids(self) -> list[str]:
        return list(self._updates)

    def available_clients(self) -> list[str]:
        return list(self.inner.available_clients()) + list(self._updates)

    def full_steps(self, client_id: str, config: FitConfig) -> int | None:
        if client_id in self._updates:
            return 1
        return self.inner.full_steps(client_id, config)

    def observe(self, weights: torch.Tensor) -> None:
        """Score the model change since the last global model seen (one released round)."""
        current = weights.detach().to(torch.float32).cpu().clone()
        if self._previous is not None:
            cos = canary_scores(self.canaries.directions, current - self._previous)
            self.iterate_scores += np.maximum(cos, 0.0) ** 2
            self.rounds_seen += 1
        self._previous = current

    def fit(self, weights: torch.Tensor, tasks: Sequence[ClientTask],
            weighting: Weighting | None = None) -> Iterator[Any]:
        self.observe(weights)  # the server hands every round's global model to the transport
        real = [t for t in tasks if t.client_id not in self._updates]
        yield from self.inner.fit(weights, real, weighting)
        for task in tasks:
            if task.client_id not in self._updates:
                continue
            index, sign = self._updates[task.client_id]
            sent = task.received(weights)
            raw = (self.canaries.directions[index] * (sign * self.norm)).to(sent.device,
                                                                              sent.dtype)
            yield ClientUpdate(client_id=task.client_id, delta=task.finish(raw), num_samples=1,
                               base_round=task.config.round, metrics={"steps": 1.0})


# -- the audit -------------------------------------------------------------------------------
@dataclass
class PrivacyAuditReport:
    """Accounted epsilon next to the empirical lower bound and estimate of one audited run."""

    accounted_epsilon: float
    delta: float
    steinke: GuessingGame
    andrew_epsilon_estimate: float
    andrew_equal_variance_estimate: float
    canaries: int
    inserted: int
    cosines: dict[str, float]
    largest_possible_bound: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def violation(self) -> bool:
        """True when the lower bound exceeds the accounted epsilon: the run leaked more than
        its accountant says (at the stated confidence)."""
        return self.steinke.epsilon_lower_bound > self.accounted_epsilon

    def to_dict(self) -> dict[str, Any]:
        return {"accounted_epsilon": self.accounted_epsilon, "delta": self.delta,
                "steinke": asdict(self.steinke),
                "andrew_epsilon_estimate": self.andrew_epsilon_estimate,
                "andrew_equal_variance_estimate": self.andrew_equal_variance_estimate,
                "canaries": self.canaries, "inserted": self.inserted, "cosines": self.cosines,
                "largest_possible_bound": self.largest_possible_bound,
                "violation": self.violation, "settings": self.settings}

    def markdown(self) -> str:
        s = self.steinke
        lines = [
            "# Empirical privacy audit (canary clients)", "",
            f"- accounted epsilon: **{self.accounted_epsilon:.3f}** at delta = {self.delta:g}",
            f"- lower bound (Steinke et al. 2023, {100 * s.confidence:g}% confidence): "
            f"**{s.epsilon_lower_bound:.3f}** ({s.correct} of {s.guesses} guesses correct: "
            f"{s.guesses_in} in, {s.guesses_out} out, ranked by the {s.score} score; confidence "
            f"split over {s.tests} guessers)",
            f"- estimate (Andrew et al. 2024, Gaussian fit, not a bound): "
            f"{self.andrew_epsilon_estimate:.3f} (one pooled variance: "
            f"{self.andrew_equal_variance_estimate:.3f})",
            f"- canaries: {self.canaries}, inserted {self.inserted}; with every guess right "
            f"the bound would be {self.largest_possible_bound:.3f}, the most this audit can "
            "show",
            f"- cosine with the final model delta: inserted {self.cosines['inserted_mean']:.4f}"
            f" +- {self.cosines['inserted_std']:.4f}, never inserted "
            f"{self.cosines['null_mean']:.4f} +- {self.cosines['null_std']:.4f}",
            "",
            ("**The lower bound exceeds the accounted epsilon: the run releases more than its "
             "accountant charges for.**" if self.violation else
             "The lower bound is below the accounted epsilon: no violation detected (an audit "
             "can only ever show a violation, never prove a guarantee)."),
        ]
        if self.settings:
            lines += ["", "## Settings", ""]
            lines += [f"- {k}: {v}" for k, v in self.settings.items()]
        return "\n".join(lines) + "\n"

    def save(self, out: str | Path) -> tuple[Path, Path]:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        js, md = out / "privacy_audit.json", out / "privacy_audit.md"
        js.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        md.write_text(self.markdown())
        return js, md


def canary_scores(directions: torch.Tensor, model_delta: torch.Tensor) -> np.ndarray:
    """Cosine between each canary direction (unit rows) and the model delta."""
    d = model_delta.detach().to(torch.float64).cpu()
    norm = float(torch.linalg.vector_norm(d))
    if norm == 0:
        return np.zeros(directions.shape[0])
    return (directions.to(torch.float64) @ d / norm).numpy()


def evaluate_canaries(scores: Mapping[str, np.ndarray], included: np.ndarray, delta: float,
                      *, accounted_epsilon: float, confidence: float = 0.95,
                      settings: dict[str, Any] | None = None) -> PrivacyAuditReport:
    """The report for the canary ``scores`` of one run: the Steinke et al. lower bound over
    all named scores (one Bonferroni family) and Andrew et al.'s estimate from the
    ``"final_model"`` cosines."""
    included = np.asarray(included, dtype=bool)
    if included.all() or not included.any():
        raise AuditError("need both inserted and never-inserted canaries; use more canaries")
    if "final_model" not in scores:
        raise AuditError("Andrew et al.'s estimate needs the 'final_model' cosines")
    game = guessing_game(scores, included, delta, confidence)
    final = np.asarray(scores["final_model"], dtype=np.float64)
    ins, null = final[included], final[~included]
    fit_in = (float(ins.mean()), float(ins.std(ddof=1)) if len(ins) > 1 else 0.0)
    fit_null = (float(null.mean()), float(null.std(ddof=1)) if len(null) > 1 else 0.0)
    estimate = pooled_estimate = float("nan")
    if min(fit_in[1], fit_null[1]) > 0:
        estimate = gaussian_pair_epsilon(fit_null, fit_in, delta)
        # With few canaries or a small model the inserted cosines are a mixture (a canary
        # joins a random number of rounds) and the fitted variances differ; at small delta
        # the epsilon of two unequal-variance Gaussians is set by their tails, where the fit
        # means little. One pooled variance gives the steadier shift-only estimate.
        pooled = math.sqrt(((len(ins) - 1) * fit_in[1] ** 2 + (len(null) - 1) * fit_null[1] ** 2)
                           / (len(ins) + len(null) - 2))
        pooled_estimate = gaussian_pair_epsilon((fit_null[0], pooled), (fit_in[0], pooled),
                                                delta)
    return PrivacyAuditReport(
        accounted_epsilon=float(accounted_epsilon), delta=float(delta), steinke=game,
        andrew_epsilon_estimate=estimate, andrew_equal_variance_estimate=pooled_estimate,
        canaries=len(final), inserted=int(included.sum()),
        cosines={"inserted_mean": fit_in[0], "inserted_std": fit_in[1],
                 "null_mean": fit_null[0], "null_std": fit_null[1]},
        largest_possible_bound=largest_lower_bound(len(final), delta, confidence,
                                                   scores=len(scores)),
        settings=dict(settings or {}))


def _dp_guarantee(guarantees: dict[str, Any]) -> dict[str, Any]:
    dp = guarantees.get("differential_privacy")
    if not dp or "epsilon" not in dp or "delta" not in dp:
        raise AuditError("the strategy reports no (epsilon, delta) guarantee: the privacy "
                         "audit needs a client-level DP strategy (privacy.mode = 'central' or "
                         "'distributed')")
    return dict(dp)


def audit_privacy(trainer: Any, federated_data: Any, strategy: Any, rounds: int, *,
                  canaries: int, seed: int = 0, transport: Any = None,
                  canary_norm: float | None = None, confidence: float = 0.95,
                  excluded: str | None = None) -> PrivacyAuditReport:
    """Train ``rounds`` rounds with ``canaries`` canary clients inserted and audit the result.

    ``strategy`` is a fresh client-level DP strategy (``DPFedAvg``) as the experiment would
    build it; the canaries join its population. ``canary_norm`` is the norm of a canary's
    raw update, by default 1,000 times the strategy's initial clip so that clipping always
    binds and each canary contributes exactly the sensitivity (adaptive clips included).
    ``excluded`` (see ``CanaryTransport``) follows the strategy's neighbouring relation by
    default: "absent" under add/remove (Poisson), "mirror" under replace-one (fixed size).
    """
    from fedmosaic.runtime import SequentialTransport
    from fedmosaic.runtime.simulate import simulate

    if not hasattr(strategy, "guarantees"):
        raise AuditError("the strategy reports no guarantees: the privacy audit needs a "
                         "client-level DP strategy")
    _dp_guarantee(strategy.guarantees())  # refuse non-DP strategies before spending the run
    if rounds < 1:
        raise AuditError(f"rounds must be >= 1, got {rounds}")
    if canary_norm is None:
        clip = getattr(strategy, "initial_clip", None)
        if clip is None:
            raise AuditError("give canary_norm: the strategy has no initial_clip")
        canary_norm = 1000.0 * float(clip)
    if excluded is None:
        excluded = ("mirror" if getattr(strategy, "neighboring", "add_remove") == "replace_one"
                    else "absent")
    draw = Canaries.draw(canaries, trainer.spec.numel, seed)
    inner = transport or SequentialTransport(trainer, federated_data)
    wrapped = CanaryTransport(inner, draw, canary_norm, excluded=excluded)
    start = trainer.initial_weights(seed).to(torch.float32)
    result = simulate(trainer, federated_data, strategy, rounds, seed=seed, transport=wrapped,
                      initial_weights=start.clone(), eval_every=rounds)
    dp = _dp_guarantee(result.guarantees)  # computed once by simulate (PLD can be slow)
    final = result.weights.to(torch.float32).cpu()
    wrapped.observe(final)  # the last round's change
    scores = {"final_model": canary_scores(draw.directions, final - start.cpu()),
              "all_iterates": wrapped.iterate_scores.copy()}
    settings = {"rounds": rounds, "real_clients": len(inner.available_clients()),
                "canary_norm": canary_norm, "excluded_canaries": excluded,
                "model_parameters": trainer.spec.numel, "seed": seed,
                "scores": "final_model: cos(direction, final - initial model); "
                          "all_iterates: sum over rounds of max(0, cos(direction, "
                          "round's model change))^2",
                "rounds_run": len(result.history)}
    for key in ("sampling", "neighboring", "noise_multiplier", "clip", "accountant"):
        if key in dp:
            settings[key] = dp[key]
    return evaluate_canaries(scores, draw.included, float(dp["delta"]),
                             accounted_epsilon=float(dp["epsilon"]), confidence=confidence,
                             settings=settings)
