"""``simulate``: a whole federated run in one process, from Python."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedmosaic.algorithms.strategy import FedAvg
from fedmosaic.core.errors import CheckpointError
from fedmosaic.runtime.auto import (
    central_eval_threads,
    central_evaluator,
    close_transport,
    describe_transport,
)
from fedmosaic.runtime.checkpoint import clear_run, holds_run
from fedmosaic.runtime.evaluation import FederatedEvaluation, evaluation_guarantee
from fedmosaic.runtime.result import RunResult
from fedmosaic.runtime.schedule import Schedule
from fedmosaic.runtime.server import RoundCallback, Server
from fedmosaic.runtime.transport import Transport
from fedmosaic.train.base import Trainer


def simulate(
    trainer: Trainer,
    federated_data: Any,
    strategy: FedAvg,
    rounds: int,
    *,
    seed: int = 0,
    transport: Transport | str | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    eval_every: int = 1,
    initial_weights: torch.Tensor | None = None,
    callbacks: Sequence[RoundCallback] = (),
    identity: dict[str, Any] | None = None,
    stop_after: int | None = None,
    federated_eval: FederatedEvaluation | None = None,
    central_eval: bool = True,
    schedule: Schedule | None = None,
) -> RunResult:
    """Run federated training over ``federated_data`` (a ``fedmosaic.data.FederatedDataset``).

    The global model is evaluated on ``federated_data.test`` (unless ``central_eval`` is
    False or there is none) and, with ``federated_eval``, by the clients on their local test
    splits (``ClientData.test``; record keys ``fed_test_*``), on the same rounds; evaluation
    never changes the model. With ``out_dir``, a checkpoint is written after every round and
    ``resume=True`` continues an interrupted run; the same ``seed`` gives the same model,
    interrupted or not. An ``out_dir`` that already holds a run is refused unless ``resume``
    continues it or ``overwrite=True`` replaces it (as ``fedmosaic run`` does).
    The strategy (and a DP-SGD trainer's accounting) start each fresh run from the state
    they had before their first one, so one object can serve several runs.
    ``schedule`` (``fedmosaic.runtime.schedule``) decides when clients train and when the
    server aggregates; by default synchronous rounds, and ``rounds`` counts server steps.
    ``transport`` None (or "auto") is ``auto`` (``fedmosaic.runtime.auto``): sequential,
    batched, parallel or parallel-batched, chosen from the model, the device, the cohort,
    ``rounds`` and the usable cores; one of those names builds that one. A transport built
    here is closed when the run ends. Every run records its transport and why in
    ``RunResult.transport`` (and ``guarantees.json``).
    """
    own: Any = None
    if transport is None or isinstance(transport, str):
        from fedmosaic.runtime.auto import build_chosen, choose_transport, named_choice

        choice = (choose_transport(trainer, federated_data, strategy, rounds, schedule=schedule)
                  if transport in (None, "auto") else named_choice(str(transport)))
        transport = own = build_chosen(choice, trainer, federated_data)
    try:
        return _simulate(trainer, federated_data, strategy, rounds, seed=seed,
                         transport=transport, out_dir=out_dir, resume=resume,
                         overwrite=overwrite, eval_every=eval_every,
                         initial_weights=initial_weights, callbacks=callbacks,
                         identity=identity, stop_after=stop_after,
                         federated_eval=federated_eval, central_eval=central_eval,
                         schedule=schedule)
    finally:
        close_transport(own)


def _simulate(
    trainer: Trainer, federated_data: Any, strategy: FedAvg, rounds: int, *, seed: int,
    transport: Transport, out_dir: str | Path | None, resume: bool, overwrite: bool,
    eval_every: int, initial_weights: torch.Tensor | None,
    callbacks: Sequence[RoundCallback], identity: dict[str, Any] | None,
    stop_after: int | None, federated_eval: FederatedEvaluation | None,
    central_eval: bool, schedule: Schedule | None,
) -> RunResult:
    the_schedule = schedule if schedule is not None else getattr(strategy, "schedule", None)
    test = getattr(federated_data, "test", None) if central_eval else None
    server = Server(
        trainer=trainer,
        strategy=strategy,
        transport=transport,
        eval_threads=central_eval_threads(transport, the_schedule),
        central_evaluate=central_evaluator(transport, trainer, test, the_schedule),
        rounds=rounds,
        seed=seed,
        test_data=test,
        eval_every=eval_every,
        out_dir=out_dir,
        identity=identity,
        callbacks=callbacks,
        federated_eval=federated_eval,
        schedule=schedule,
    )
    if out_dir is not None and not resume and holds_run(out_dir):
        if not overwrite:
            raise CheckpointError(f"{out_dir} already holds a run; pass resume=True to continue "
                                  "it or overwrite=True to replace it")
        clear_run(out_dir)
    state = server.run(resume=resume, initial_weights=initial_weights, stop_after=stop_after)
    guarantees = strategy.guarantees()
    transport_guarantees = getattr(server.transport, "guarantees", None)
    if transport_guarantees is not None:
        extra = transport_guarantees()
        if extra.get("secure_aggregation") and guarantees.get("differential_privacy"):
            # The DP strategy's own "server sees" assumes no secure aggregation.
            extra["server_sees"] += "; DP noise: " + str(
                guarantees["differential_privacy"].get("noise_added_by", "the server"))
        guarantees.update(extra)
    if federated_eval is not None:
        _add_federated_eval(guarantees, federated_eval)
    result = RunResult(history=state.history, weights=state.weights, spec=trainer.spec,
                       guarantees=guarantees, stopped=state.stopped,
                       transport=describe_transport(transport))
    if out_dir is not None:
        result.save(out_dir)
    return result


def _add_federated_eval(guarantees: dict[str, Any], fed_eval: FederatedEvaluation) -> None:
    """Say in the run's guarantees what federated evaluation shows the server."""
    guarantees["federated_evaluation"] = evaluation_guarantee(fed_eval)
    seen = "each evaluating client's test metrics and test sample count (federated evaluation)"
    # Under SecAgg+ in particular: it hides updates, not evaluation reports, so "only the sum
    # of the surviving clients' updates" would no longer be the whole truth.
    guarantees["server_sees"] = f"{guarantees.get('server_sees', '')}; also {seen}"
    for ldp in guarantees.get("local_differential_privacy") or []:
        ldp.setdefault("not_covered", []).append(
            "clients' federated evaluation metrics and test sample counts (computed without "
            "noise)")
