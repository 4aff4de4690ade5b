"""What SecAgg+ over each FedBuff buffer costs in simulation (docs/privacy.md, "SecAgg+ with
FedBuff"): the same FedBuff run (digits, 50 IID clients, MLP [16], K = 10, concurrency 20,
lognormal client speeds sigma 1, 20 server steps) without and with ``SecAggPlusTransport``.
Prints, for each, the final test accuracy, the mean ``bytes_up`` and updates per step, the
simulated time and the real seconds per step. Takes a few seconds on 2 CPU cores.

    .venv/bin/python benchmarks/secagg_fedbuff_cost.py
"""

from __future__ import annotations

import time

import fedmosaic as fm
from fedmosaic.data import IID, load_digits, partition
from fedmosaic.models import MLP
from fedmosaic.privacy.secagg.transport import SecAggPlusTransport
from fedmosaic.runtime.clock import ClientTimingModel
from fedmosaic.runtime.schedule import FedBuffSchedule


def main() -> None:
    train, test = load_digits()
    fed = partition(train, IID(), 50, 0, test=test)
    for secure in (False, True):
        trainer = fm.TorchTrainer(lambda: MLP(64, [16], 10), lr=0.1, batch_size=16)
        transport: fm.Transport = fm.SequentialTransport(trainer, fed)
        if secure:
            transport = SecAggPlusTransport(transport, clip=1.0,
                                            max_weight=float(max(fed.sizes().values())))
        schedule = FedBuffSchedule(10, 20, clock=ClientTimingModel(seed=1, speed_sigma=1.0))
        tick = time.perf_counter()
        res = fm.simulate(trainer, fed, fm.FedAvg(), rounds=20, seed=0, transport=transport,
                          schedule=schedule)
        seconds = time.perf_counter() - tick
        h = res.history
        print("secure" if secure else "plain ", f"acc {h[-1]['test_accuracy']:.3f}",
              f"bytes_up/step {sum(r['bytes_up'] for r in h) / len(h):.0f}",
              f"updates/step {sum(r['updates'] for r in h) / len(h):.1f}",
              f"sim_time {h[-1]['sim_time']:.1f}", f"real s/step {seconds / len(h):.3f}",
              f"params {trainer.spec.numel}")


if __name__ == "__main__":
    main()
