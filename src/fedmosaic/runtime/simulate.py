"""``simulate``: a whole federated run in one process, from Python."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedmosaic.algorithms.strategy import FedAvg
from fedmosaic.runtime.result import RunResult
from fedmosaic.runtime.server import RoundCallback, Server
from fedmosaic.runtime.transport import SequentialTransport, Transport
from fedmosaic.train.base import Trainer


def simulate(
    trainer: Trainer,
    federated_data: Any,
    strategy: FedAvg,
    rounds: int,
    *,
    seed: int = 0,
    transport: Transport | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    eval_every: int = 1,
    initial_weights: torch.Tensor | None = None,
    callbacks: Sequence[RoundCallback] = (),
    identity: dict[str, Any] | None = None,
    stop_after: int | None = None,
) -> RunResult:
    """Run federated training over ``federated_data`` (a ``fedmosaic.data.FederatedDataset``).

    The global model is evaluated on ``federated_data.test``. With ``out_dir``, a checkpoint
    is written after every round and ``resume=True`` continues an interrupted run; the same
    ``seed`` gives the same model, interrupted or not.
    """
    server = Server(
        trainer=trainer,
        strategy=strategy,
        transport=transport or SequentialTransport(trainer, federated_data),
        rounds=rounds,
        seed=seed,
        test_data=getattr(federated_data, "test", None),
        eval_every=eval_every,
        out_dir=out_dir,
        identity=identity,
        callbacks=callbacks,
    )
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
    result = RunResult(history=state.history, weights=state.weights, spec=trainer.spec,
                       guarantees=guarantees, stopped=state.stopped)
    if out_dir is not None:
        result.save(out_dir)
    return result
