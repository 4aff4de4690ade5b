"""Trainers for client subprocesses in the deployment tests (``--trainer tests.net.helpers:...``).

``FEDMOSAIC_TEST_EXPERIMENT`` names the experiment file; ``FEDMOSAIC_TEST_FIT_DELAY`` adds
seconds to every local fit, so a test can act while a round is certainly in progress.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from fedmosaic.build import build_data, build_trainer
from fedmosaic.config import load_experiment
from fedmosaic.train.base import Dataset, FitConfig, FitResult, Trainer, TrainerWrapper


class SlowTrainer(TrainerWrapper):
    """A trainer that takes ``delay`` seconds longer to fit; results are unchanged."""

    def __init__(self, inner: Trainer, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay

    def fit(self, weights: torch.Tensor, data: Dataset, config: FitConfig) -> FitResult:
        time.sleep(self.delay)
        return self.inner.fit(weights, data, config)

    def evaluate(self, weights: torch.Tensor, data: Dataset) -> dict[str, Any]:
        return self.inner.evaluate(weights, data)


def slow_trainer() -> SlowTrainer:
    exp = load_experiment(os.environ["FEDMOSAIC_TEST_EXPERIMENT"])
    return SlowTrainer(build_trainer(exp, build_data(exp)),
                       float(os.environ.get("FEDMOSAIC_TEST_FIT_DELAY", "1.0")))


# Where a client process dies inside SecAgg+: on receiving the neighbours' keys (so after
# advertising its own, before sharing), or on receiving its shares (before masking its input).
_SECAGG_DEATHS = {"share_keys": "handle_keys", "masked_input": "handle_shares"}


def secagg_dropout_trainer() -> Trainer:
    """The experiment's trainer; with ``FEDMOSAIC_TEST_SECAGG_DROP`` set to a stage, the process
    exits abruptly (like a crash or a pulled cable) at that stage of the secure aggregation."""
    stage = os.environ.get("FEDMOSAIC_TEST_SECAGG_DROP")
    if stage:
        from fedmosaic.privacy.secagg.protocol import SecAggPlusClient

        def die(*args: Any, **kwargs: Any) -> Any:
            os._exit(17)

        setattr(SecAggPlusClient, _SECAGG_DEATHS[stage], die)
    exp = load_experiment(os.environ["FEDMOSAIC_TEST_EXPERIMENT"])
    return build_trainer(exp, build_data(exp))
