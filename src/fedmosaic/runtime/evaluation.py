"""Federated evaluation: clients evaluate the global model on their local test split.

Without a central test set (the server holds no data), the model is judged where the data is,
as Flower's ``evaluate`` round does (Beutel et al. 2020, "Flower: A Friendly Federated
Learning Framework"): selected clients evaluate the global model on their own test split and
report loss, accuracy and sample count; the server averages each metric weighted by sample
count, which is the metric of the pooled test data for any metric that is a per-sample mean
(loss, accuracy). ``EvalReport`` is what one client reports; transports yield it (or a
``ClientFailure``) from ``Transport.evaluate``. ``FederatedEvaluation`` chooses the
evaluating clients and turns their reports into round-record entries.

What it reveals: each evaluating client's metrics and test sample count reach the server in
plaintext and without noise (secure aggregation and DP protect model updates, not these), so
the server refuses federated evaluation under central or distributed DP, and a run's
guarantees say what the server saw.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmosaic.algorithms.sampling import ClientSampler
from fedmosaic.runtime.tally import ClientFailure

log = logging.getLogger(__name__)

# The evaluation cohort's generator is seeded from (run seed, round, this constant): a stream
# of its own, so evaluating never moves the training generator (and with it the model).
_EVAL_STREAM = 0xE7A1

#: Prefix of the round-record keys of federated evaluation metrics (``fed_test_accuracy``).
PREFIX = "fed_test_"


@dataclass(frozen=True)
class EvalReport:
    """One client's evaluation of the global model on its local test split."""

    client_id: str
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


def report_problem(report: EvalReport) -> str | None:
    """Why a report cannot be counted (None if it can): a sample count that is not a positive
    integer, or a metric that is not a finite number."""
    n = report.num_samples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        return f"num_samples {n!r} is not a positive integer"
    for key, value in report.metrics.items():
        if not isinstance(key, str) or not key:
            return f"metric name {key!r} is not a non-empty string"
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            return f"metric '{key}' is {value!r}, not a finite number"
    return None


def weighted_metrics(reports: Sequence[EvalReport]) -> dict[str, float]:
    """Sample-weighted mean of each metric over ``reports``: ``sum n_i m_i / sum n_i``.

    A metric only some clients report is averaged over those clients (weighted by their
    sample counts). Sums are exact (``math.fsum``), so the result does not depend on the
    order in which reports arrived.
    """
    names = sorted({k for r in reports for k in r.metrics})
    out: dict[str, float] = {}
    for name in names:
        have = [r for r in reports if name in r.metrics]
        total = math.fsum(r.num_samples for r in have)
        out[name] = math.fsum(r.num_samples * float(r.metrics[name]) for r in have) / total
    return out


class FederatedEvaluation:
    """Which clients evaluate the global model, and how their reports are combined.

    Cohort: every available client (the default), ``fraction`` of them (``ceil(fraction *
    n)``, at least one) or ``clients`` of them (all if fewer are available), drawn uniformly
    without replacement. The draw uses a generator seeded from (run seed, round) and nothing
    else, so it is reproducible, survives a resume, and never touches the training
    generator: the same seed trains the same model with or without evaluation.

    ``min_clients``: a round with fewer valid reports records no ``fed_test_*`` metrics (a
    mean over too few clients is not a figure of the federation) and says so in
    ``fed_eval_skipped``; the run goes on.

    Record keys (``summarize``): ``fed_test_<metric>`` (sample-weighted means:
    ``fed_test_loss``, ``fed_test_accuracy``, user metrics), ``fed_eval_clients`` (valid
    reports), ``fed_eval_samples`` (their total test samples), ``fed_eval_failures`` (selected
    clients without a valid report: failed, refused, no local test split, invalid report or
    no answer), ``fed_eval_bytes_down`` (the model sent to each selected client) and, when
    the metrics are withheld, ``fed_eval_skipped`` (why).
    """

    def __init__(
        self, *, fraction: float | None = None, clients: int | None = None,
        min_clients: int = 1,
    ) -> None:
        if fraction is not None and clients is not None:
            raise ValueError("give at most one of fraction and clients")
        if isinstance(min_clients, bool) or not isinstance(min_clients, int) or min_clients < 1:
            raise ValueError(f"min_clients must be an integer >= 1, got {min_clients!r}")
        if fraction is None and clients is None:
            fraction = 1.0
        # ClientSampler validates both (fraction in (0, 1], clients an integer >= 1).
        self._sampler = ClientSampler(clients_per_round=clients, fraction=fraction)
        self.fraction = None if fraction is None else float(fraction)
        self.clients, self.min_clients = clients, min_clients

    def select(self, available: Sequence[str], *, seed: int, round_num: int) -> list[str]:
        """The round's evaluating clients, sorted by id (all of them when ``fraction`` is 1)."""
        if not available:
            return []
        if self.fraction == 1.0:
            return sorted(set(available))
        rng = np.random.default_rng(np.random.SeedSequence([seed, round_num, _EVAL_STREAM]))
        return self._sampler.sample(available, rng)

    def summarize(
        self, results: Iterable[EvalReport | ClientFailure], selected: Sequence[str],
        round_num: int, *, model_bytes: int = 0,
    ) -> dict[str, Any]:
        """Round-record entries from a transport's evaluation results.

        A report from a client that was not selected, a second report from the same client
        and a report with a bad sample count or metric are not counted (logged); a
        transport that raises part-way leaves the clients it had not reported as failures.
        """
        wanted = set(selected)
        reports: dict[str, EvalReport] = {}
        try:
            for result in results:
                if isinstance(result, ClientFailure):
                    log.warning("client %s did not evaluate round %d: %s", result.client_id,
                                round_num, result.reason)
                    continue
                problem = self._problem(result, wanted, reports)
                if problem is not None:
                    log.warning("evaluation report of round %d not counted: %s", round_num,
                                problem)
                    continue
                reports[result.client_id] = result
        except Exception as exc:  # the transport broke: keep what arrived, the run goes on
            log.warning("federated evaluation of round %d stopped after %d reports: %s: %s",
                        round_num, len(reports), type(exc).__name__, exc, exc_info=True)
        got = [reports[c] for c in sorted(reports)]
        record: dict[str, Any] = {
            "fed_eval_clients": len(got),
            "fed_eval_samples": sum(r.num_samples for r in got),
            "fed_eval_failures": len(wanted) - len(got),
            "fed_eval_bytes_down": len(wanted) * model_bytes,
        }
        if len(got) < self.min_clients:
            record["fed_eval_skipped"] = (
                f"{len(got)} of {len(wanted)} selected clients reported an evaluation, "
                f"fewer than min_clients = {self.min_clients}")
            log.warning("round %d: %s", round_num, record["fed_eval_skipped"])
            return record
        record.update({PREFIX + k: v for k, v in weighted_metrics(got).items()})
        return record

    @staticmethod
    def _problem(result: object, wanted: set[str], seen: dict[str, EvalReport]) -> str | None:
        if not isinstance(result, EvalReport):
            return f"a {type(result).__name__} is not an EvalReport"
        if result.client_id not in wanted:
            return f"client '{result.client_id}' was not selected to evaluate"
        if result.client_id in seen:
            return f"client '{result.client_id}' reported twice"
        problem = report_problem(result)
        return None if problem is None else f"client '{result.client_id}': {problem}"

    def describe(self) -> dict[str, Any]:
        """The settings, for the run's guarantees and logs."""
        cohort: Any = "all available clients" if self.fraction == 1.0 else \
            {"fraction": self.fraction} if self.fraction is not None else \
            {"clients": self.clients}
        return {"clients": cohort, "min_clients": self.min_clients}

    def __repr__(self) -> str:
        size = f"fraction={self.fraction}" if self.fraction is not None else \
            f"clients={self.clients}"
        return f"FederatedEvaluation({size}, min_clients={self.min_clients})"


def evaluation_guarantee(fed_eval: FederatedEvaluation) -> dict[str, Any]:
    """What federated evaluation reveals, for a run's guarantees."""
    return {
        **fed_eval.describe(),
        "server_sees": "each evaluating client's test metrics (loss, accuracy, ...) and test "
                       "sample count, in plaintext and without noise",
        "aggregation": "sample-weighted mean of each metric over the clients' reports",
    }
