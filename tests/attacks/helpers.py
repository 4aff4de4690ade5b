"""A transport that returns hand-made updates, so attacks can be checked exactly."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.core.update import ClientUpdate
from fedmosaic.runtime.tally import PartialAggregate, RoundTally, Weighting
from fedmosaic.train.base import FitConfig


class ListTransport:
    """Every client uploads its fixed delta; records the ``weighting`` it was called with."""

    def __init__(self, deltas: Mapping[str, torch.Tensor], samples: int = 10) -> None:
        self.deltas, self.samples = dict(deltas), samples
        self.weightings: list[Weighting | None] = []

    def available_clients(self) -> list[str]:
        return list(self.deltas)

    def full_steps(self, client_id: str, config: FitConfig) -> int:
        return 1

    def fit(self, weights: torch.Tensor, tasks: Sequence[ClientTask],
            weighting: Weighting | None = None) -> Iterator[ClientUpdate | PartialAggregate]:
        self.weightings.append(weighting)
        if weighting is not None:  # sums where it "trains", like Ray or the batched transport
            tally = RoundTally(weighting, weights.numel(), tasks[0].config.round)
            for t in tasks:
                tally.add(self._update(t))
            yield tally.to_partial()
            return
        for t in tasks:
            yield self._update(t)

    def _update(self, task: ClientTask) -> ClientUpdate:
        return ClientUpdate(task.client_id, self.deltas[task.client_id].clone(),
                            num_samples=self.samples, base_round=task.config.round)


def tasks_for(ids: Sequence[str], round_num: int = 1) -> list[ClientTask]:
    return [ClientTask(c, FitConfig(round=round_num, seed=1000 * round_num + i))
            for i, c in enumerate(ids)]
