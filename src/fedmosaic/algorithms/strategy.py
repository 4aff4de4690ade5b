"""Strategies: what the server decides each round (who trains, how, and how to combine).

A strategy composes a client sampler, a straggler simulation, an aggregator and a server
optimizer. It knows nothing about transports or processes, and round bookkeeping (which
round it is, staleness, checkpoints) stays in the server loop, so asynchronous variants can
reuse the same aggregator and server optimizer.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from fedmosaic.algorithms.aggregate import FedAvgAggregator
from fedmosaic.algorithms.sampling import ClientSampler, StragglerSimulation
from fedmosaic.algorithms.server_opt import ServerOptimizer, ServerSGD
from fedmosaic.train.base import FitConfig

if TYPE_CHECKING:
    from fedmosaic.privacy.randomness import NoiseSource
    from fedmosaic.robust.anomaly import AnomalyDetector
    from fedmosaic.robust.base import RobustAggregator
    from fedmosaic.robust.pipeline import DefendedRound


class ServerStage(Protocol):
    """A transformation the server applies to the new global model after each round's update
    (e.g. re-embedding a watermark); it returns the weights and metrics to record."""

    def apply(self, round_num: int, weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        ...


class ClientStage(Protocol):
    """A transformation a client applies to its own update before upload (e.g. local DP):
    it runs on the client, so the server never sees the untransformed update. Randomness comes
    from ``noise`` (``fedmosaic.privacy.randomness``): ``SecureNoise`` on a deployed client,
    ``SeededNoise`` in simulation."""

    def apply(self, delta: torch.Tensor, noise: NoiseSource) -> torch.Tensor: ...


class DispatchTransform(Protocol):
    """What the server does to the global weights it sends one client (e.g. a per-client
    fingerprint); the client's update is relative to what it received."""

    def __call__(self, client_id: str, weights: torch.Tensor) -> torch.Tensor: ...


# Simulated client stages draw from the round seed XOR this constant (a separate stream from
# the seed's use in training).
_STAGE_SEED = 0x5EED5EED

#: What the round records do with the clients' reported training metrics.
CLIENT_METRICS = ("record", "suppress")

#: Where client-side DP noise comes from (said in the guarantees of runs with client stages).
CLIENT_NOISE_NOTICE = (
    "drawn by each client: in a simulated transport from its round seed (deterministic noise: "
    "simulation only; the server knows that seed); on a deployed fedmosaic client from its "
    "own SecureNoise (ChaCha20 keyed from os.urandom)")


@dataclass(frozen=True)
class ClientTask:
    """One client's assignment for a round: training settings, the client-side stages
    to apply to its update before upload, and the server's per-client dispatch transform."""

    client_id: str
    config: FitConfig
    stages: tuple[ClientStage, ...] = ()
    dispatch: DispatchTransform | None = None

    def received(self, weights: torch.Tensor) -> torch.Tensor:
        """The weights this client is sent (the global weights, or their transform)."""
        return weights if self.dispatch is None else self.dispatch(self.client_id, weights)

    def finish(self, delta: torch.Tensor, noise: NoiseSource | None = None) -> torch.Tensor:
        """Apply the client stages to ``delta``, drawing their randomness from ``noise``.

        ``noise=None`` is the simulation path: ``SeededNoise`` derived from the client's round
        seed, so a simulated run is bit-reproducible -- and the server, which computed that
        seed and sent it in ``FitConfig.seed``, can regenerate the noise and remove it. A
        deployed client must therefore call ``finish(delta, noise=SecureNoise())``.
        """
        if not self.stages:
            return delta
        # Imported here: fedmosaic.privacy imports this module.
        from fedmosaic.privacy.randomness import SeededNoise

        source = noise if noise is not None else SeededNoise(self.config.seed ^ _STAGE_SEED)
        for stage in self.stages:
            delta = stage.apply(delta, source)
        return delta


def client_seed(run_seed: int, round_num: int, client_id: str) -> int:
    """A per-(run, round, client) seed, stable across processes and Python versions."""
    entropy = [run_seed, round_num, zlib.crc32(client_id.encode())]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class FedAvg:
    """Federated Averaging (McMahan et al. 2017, "Communication-Efficient Learning of Deep
    Networks from Decentralized Data"), generalised to FedOpt (Reddi et al. 2021) by the
    choice of ``server_opt``: ServerSGD(lr=1) is FedAvg, FedAvgM/FedAdam/FedYogi/FedAdagrad
    the adaptive variants.

    Clients per round: ``clients_per_round`` (a count) or ``fraction`` (of the available
    clients). ``local_epochs``, ``batch_size`` and ``lr`` sent to clients override the
    trainer's own settings when given. ``weighting`` is ``"samples"`` (weight by local sample
    count) or ``"uniform"``.
    ``client_stages`` run on each client before upload; ``server_stages`` run on the new global
    model after every round's update, in order, on every transport. ``dispatch_transform``
    changes the weights sent to each client (per-client fingerprints); only transports with
    ``supports_dispatch`` apply it, and the server refuses the others.
    ``stragglers`` is the fraction of selected clients that, as in the FedProx paper's
    systems-heterogeneity experiments, do fewer local steps; with ``drop_stragglers`` they
    are dropped from the round instead (what the FedProx paper does for FedAvg).
    ``robust`` (a ``fedmosaic.robust`` rule) replaces the weighted mean by a Byzantine-robust
    aggregate; ``anomaly`` scores every update, keeps reputations and quarantines clients
    that keep failing. Either makes the server keep the round's individual updates (and
    refuses secure aggregation); the server optimizer then applies the robust aggregate.
    ``client_metrics`` is ``"record"`` (the round records carry the sample-weighted mean of
    the clients' reported training metrics) or ``"suppress"`` (they do not: under DP those
    metrics are computed from private data without noise, outside the guarantee).
    """

    name = "fedavg"

    def __init__(
        self,
        *,
        clients_per_round: int | None = None,
        fraction: float | None = None,
        min_available: int = 1,
        min_updates: int = 1,
        weighting: str = "samples",
        server_opt: ServerOptimizer | None = None,
        local_epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        stragglers: float = 0.0,
        drop_stragglers: bool = False,
        client_stages: Sequence[ClientStage] = (),
        server_stages: Sequence[ServerStage] = (),
        dispatch_transform: DispatchTransform | None = None,
        robust: RobustAggregator | None = None,
        anomaly: AnomalyDetector | None = None,
        client_metrics: str = "record",
    ) -> None:
        if client_metrics not in CLIENT_METRICS:
            raise ValueError(f"client_metrics must be one of {CLIENT_METRICS}, "
                             f"got {client_metrics!r}")
        self.client_metrics = client_metrics
        self.client_stages = tuple(client_stages)
        self.server_stages = tuple(server_stages)
        self.dispatch_transform = dispatch_transform
        if clients_per_round is None and fraction is None:
            fraction = 1.0
        self.sampler = ClientSampler(
            clients_per_round=clients_per_round, fraction=fraction, min_available=min_available
        )
        self.stragglers = StragglerSimulation(fraction=stragglers, drop=drop_stragglers)
        self.aggregator = FedAvgAggregator(weighting=weighting)
        self.robust, self.anomaly = robust, anomaly
        self.defence: DefendedRound | None = None
        if robust is not None or anomaly is not None:
            from fedmosaic.robust.pipeline import DefendedRound, IndividualUpdates

            self.defence = DefendedRound(robust, anomaly)
            self.aggregator = IndividualUpdates(weighting=weighting)
            if clients_per_round is not None:
                self.defence.check_cohort(clients_per_round)
        self.server_opt = server_opt if server_opt is not None else ServerSGD(lr=1.0)
        if min_updates < 1:
            raise ValueError(f"min_updates must be >= 1, got {min_updates}")
        self.min_updates = min_updates
        # Validates epochs / batch size / lr once, at configuration time.
        FitConfig(round=0, epochs=local_epochs, batch_size=batch_size, lr=lr,
                  proximal_mu=self.proximal_mu)
        self.local_epochs, self.batch_size, self.lr = local_epochs, batch_size, lr
        self.weighting = weighting
        self.clients_per_round, self.fraction = clients_per_round, fraction
        self.straggler_fraction, self.drop_stragglers = stragglers, drop_stragglers

    @property
    def proximal_mu(self) -> float:
        return 0.0

    def configure_fit(
        self,
        round_num: int,
        available: Sequence[str],
        rng: np.random.Generator,
        *,
        run_seed: int,
        full_steps: Mapping[str, int] | None = None,
    ) -> list[ClientTask]:
        """Sample this round's clients and tell each what to do."""
        if self.defence is not None:
            available = self.defence.admit(round_num, available)  # quarantine
        selected = self.sampler.sample(available, rng)
        steps: Mapping[str, int | None] = {c: None for c in selected}
        if self.straggler_fraction > 0:
            if full_steps is None:
                raise ValueError("straggler simulation needs each client's full step count")
            steps = self.stragglers.assign(selected, {c: full_steps[c] for c in selected}, rng)
        tasks = []
        for cid in selected:
            if self.straggler_fraction > 0 and steps[cid] is None:
                continue  # a dropped straggler
            cfg = self.fit_config(round_num, seed=client_seed(run_seed, round_num, cid),
                                  max_steps=steps[cid])
            tasks.append(ClientTask(cid, cfg, self.client_stages))
        if self.defence is not None:
            self.defence.check_cohort(len(tasks))
        return tasks

    def fit_config(self, round_num: int, *, seed: int, max_steps: int | None = None) -> FitConfig:
        """The instructions every selected client gets this round."""
        return FitConfig(round=round_num, epochs=self.local_epochs, batch_size=self.batch_size,
                         max_steps=max_steps, lr=self.lr, proximal_mu=self.proximal_mu, seed=seed)

    def apply(self, weights: torch.Tensor, aggregated_delta: torch.Tensor) -> torch.Tensor:
        """New global weights from the aggregated client delta (the server optimizer step)."""
        return self.server_opt.step(weights, aggregated_delta)

    def finish_round(
        self, round_num: int, weights: torch.Tensor, tally: Any
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """New global weights from a round's tally, and metrics to record.

        FedAvg: the weighted mean of the updates, then the server optimizer. Privacy
        strategies override this to use a fixed denominator and add noise.
        """
        if self.defence is None:
            return self.apply(weights, tally.acc.result()), {}
        delta, metrics = self.defence.finish(round_num, weights, tally)
        if delta is None:
            return weights, metrics
        return self.apply(weights, delta.to(weights.device)), metrics

    def before_round(self, round_num: int, available: Sequence[str]) -> None:
        """Called before a round is configured; may raise ``PrivacyBudgetExhausted``."""

    def guarantees(self) -> dict[str, Any]:
        """What protects the data in this run (reported with the results)."""
        return {"differential_privacy": None, "secure_aggregation": None,
                "server_sees": "every client's update in plaintext",
                **self.local_dp_report(), **self.robustness_report()}

    def local_dp_report(self) -> dict[str, Any]:
        """Each local-DP client stage's per-report guarantee ({} without one)."""
        from fedmosaic.privacy.local_dp import LocalDP

        stages = [s for s in self.client_stages if isinstance(s, LocalDP)]
        if not stages:
            return {}
        not_covered = ["participation (which clients reported, and when)",
                       "clients' sample counts"]
        if self.client_metrics == "record":
            not_covered.append("clients' reported training metrics (computed without noise)")
        return {"local_differential_privacy": [
            {**s.guarantee(1), "composition_over_rounds": "per round a client reports",
             "noise_seed": CLIENT_NOISE_NOTICE,
             "not_covered": not_covered}
            for s in stages]}

    def robustness_report(self) -> dict[str, Any]:
        """The robust rule and the anomaly detector's final state ({} without them)."""
        return {} if self.defence is None else {"robustness": self.defence.report()}

    #: ``state_dict()`` before the first run (taken by :meth:`begin_run`).
    _pristine_state: dict[str, Any] | None = None

    def begin_run(self) -> None:
        """Start a run from the state this object had before its first run.

        A strategy keeps state across rounds: the server optimizer's moments and step count,
        a DP accountant's spend and calibrated noise, anomaly reputations and quarantines.
        Reused for a second run (the quickstart, then the same run on another transport), it
        would start that run where the first ended: same seed, another model, no warning.
        So the server calls this at the start of every run: the first call snapshots
        ``state_dict()``, every later call restores that snapshot (deep copies both ways, so
        neither run can alter it). A resumed run then loads its checkpoint over it.
        """
        if self._pristine_state is None:
            self._pristine_state = copy.deepcopy(self.state_dict())
        else:
            self.load_state_dict(copy.deepcopy(self._pristine_state))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"server_opt": self.server_opt.state_dict()}
        if self.defence is not None:
            state["defence"] = self.defence.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.server_opt.load_state_dict(state["server_opt"])
        if self.defence is not None:
            self.defence.load_state_dict(state["defence"])

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": self.name,
            "clients_per_round": self.clients_per_round,
            "fraction": self.fraction,
            "weighting": self.weighting,
            "local_epochs": self.local_epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "proximal_mu": self.proximal_mu,
            "stragglers": self.straggler_fraction,
            "drop_stragglers": self.drop_stragglers,
            "server_opt": self.server_opt.describe(),
            "client_stages": [repr(s) for s in self.client_stages],
            "server_stages": [repr(s) for s in self.server_stages],
            **({"dispatch_transform": repr(self.dispatch_transform)}
               if self.dispatch_transform is not None else {}),
            **(self.defence.describe() if self.defence is not None else {}),
            # Only when not the default, so that existing runs keep their resume identity.
            **({"client_metrics": self.client_metrics}
               if self.client_metrics != "record" else {}),
        }


class FedProx(FedAvg):
    """FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks").

    FedAvg whose clients minimise ``loss + mu/2 * ||w - w_global||^2``; ``mu`` is sent to
    the clients each round. Stragglers' partial work is kept (not dropped) by default, as
    in the paper. With ``mu = 0`` it is exactly FedAvg.
    """

    name = "fedprox"

    def __init__(self, mu: float = 0.01, **kwargs: Any) -> None:
        if not mu >= 0:
            raise ValueError(f"FedProx mu must be >= 0, got {mu}")
        self.mu = float(mu)
        super().__init__(**kwargs)

    @property
    def proximal_mu(self) -> float:
        return self.mu
