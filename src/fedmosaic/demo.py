"""The demo: four hospitals train a heart-disease predictor without pooling their patients.

Compares each hospital training alone, FedAvg, FedProx and FedAdam (Reddi et al. 2021)
against centralized training on the pooled data (the upper bound that federation approaches
without moving any record).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedmosaic.algorithms.server_opt import FedAdam, ServerSGD
from fedmosaic.algorithms.strategy import FedAvg, FedProx
from fedmosaic.data import ClientData, FederatedDataset, load_heart_disease
from fedmosaic.models import MLP
from fedmosaic.runtime.result import RunResult, plot_histories, write_json
from fedmosaic.runtime.simulate import simulate
from fedmosaic.train import TorchTrainer

HOSPITAL_NAMES = {
    "cleveland": "Cleveland",
    "hungary": "Hungary",
    "va_long_beach": "VA Long Beach",
    "switzerland": "Switzerland",
}


@dataclass(frozen=True)
class DemoSettings:
    """Hyperparameters shared by every method, so the comparison is like for like."""

    rounds: int = 30
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    hidden: int = 16
    fedprox_mu: float = 0.1
    fedadam_lr: float = 0.03


def _single_client(fed: FederatedDataset, client: ClientData, name: str) -> FederatedDataset:
    return FederatedDataset(name=name, clients=[client], test=fed.test,
                            num_classes=fed.num_classes, feature_shape=fed.feature_shape)


def run_demo(output: Path, *, rounds: int = 30, seed: int = 0,
             console: Console | None = None) -> dict[str, Any]:
    """Run every method, print the accuracy table, write ``results.json`` and ``demo.png``."""
    console = console or Console()
    torch.set_num_threads(1)  # tiny models: threads cost more than they give
    cfg = DemoSettings(rounds=rounds)
    fed = load_heart_disease(seed=seed)
    console.print(f"[bold]UCI Heart Disease[/]: {len(fed.clients)} hospitals, "
                  f"{sum(fed.sizes().values())} training patients, {len(fed.test)} test patients")
    for row in fed.summary():
        console.print(f"  {HOSPITAL_NAMES.get(str(row['id']), row['id']):<14} "
                      f"train {row['train']:>3}  test {row['test']:>3}  "
                      f"labels {row['histogram']}")

    def trainer() -> TorchTrainer:
        in_features = fed.feature_shape[0]
        return TorchTrainer(lambda: MLP(in_features, [cfg.hidden], fed.num_classes),
                            lr=cfg.lr, epochs=cfg.local_epochs, batch_size=cfg.batch_size)

    common = dict(local_epochs=cfg.local_epochs, batch_size=cfg.batch_size)
    runs: dict[str, tuple[FederatedDataset, Any]] = {}
    for client in fed.clients:
        label = f"Local: {HOSPITAL_NAMES.get(client.client_id, client.client_id)}"
        runs[label] = (_single_client(fed, client, label), FedAvg(**common))
    runs["FedAvg"] = (fed, FedAvg(**common))
    runs["FedProx"] = (fed, FedProx(mu=cfg.fedprox_mu, **common))
    runs["FedAdam"] = (fed, FedAvg(server_opt=FedAdam(lr=cfg.fedadam_lr), **common))
    pooled = ClientData("pooled", fed.pooled_train())
    runs["Centralized (pooled)"] = (_single_client(fed, pooled, "centralized"),
                                    FedAvg(server_opt=ServerSGD(lr=1.0), **common))

    results: dict[str, RunResult] = {}
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description:<22}"), BarColumn(),
                  TextColumn("round {task.completed:.0f}/{task.total:.0f}"),
                  TextColumn("{task.fields[acc]}"), TimeElapsedColumn(),
                  console=console) as progress:
        for label, (data, strategy) in runs.items():
            task = progress.add_task(label, total=cfg.rounds, acc="")

            def on_round(rec: dict[str, Any], task: Any = task) -> None:
                progress.update(task, completed=rec["round"],
                                acc=f"acc {rec.get('test_accuracy', 0.0):.3f}")

            results[label] = simulate(trainer(), data, strategy, cfg.rounds, seed=seed,
                                      callbacks=[on_round])
    elapsed = time.perf_counter() - t0

    evaluator = trainer()
    columns = [HOSPITAL_NAMES.get(c.client_id, c.client_id) for c in fed.clients] + ["Overall"]
    table_rows: dict[str, dict[str, float]] = {}
    for label, res in results.items():
        row = {}
        for client, col in zip(fed.clients, columns):
            assert client.test is not None
            row[col] = evaluator.evaluate(res.weights, client.test)["accuracy"]
        row["Overall"] = evaluator.evaluate(res.weights, fed.test)["accuracy"]
        table_rows[label] = row

    table = Table(title=f"Test accuracy after {cfg.rounds} rounds "
                        f"({cfg.local_epochs} local epoch each), seed {seed}")
    table.add_column("method")
    for col in columns:
        table.add_column(col, justify="right")
    for label, row in table_rows.items():
        style = "bold" if not label.startswith("Local") else None
        table.add_row(label, *[f"{row[c]:.3f}" for c in columns], style=style)
    console.print(table)

    output.mkdir(parents=True, exist_ok=True)
    plot = plot_histories({k: v.history for k, v in results.items()}, output / "demo.png",
                          metrics=("test_accuracy", "test_loss"),
                          title="UCI Heart Disease, 4 hospitals: pooled test set")
    summary = {"settings": cfg.__dict__, "seed": seed, "accuracy": table_rows,
               "histories": {k: v.history for k, v in results.items()},
               "seconds": elapsed}
    write_json(output / "results.json", summary)
    console.print(f"{len(runs)} runs in {elapsed:.1f}s. Plot: {plot}; numbers: "
                  f"{output / 'results.json'}")
    return json.loads(json.dumps(table_rows))
