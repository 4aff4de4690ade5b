"""Turn a validated ``Experiment`` into the pieces of a run: data, trainer, strategy."""

from __future__ import annotations

from typing import Any

import torch

from fedmosaic import data as fd
from fedmosaic.algorithms.server_opt import make_server_optimizer
from fedmosaic.algorithms.strategy import FedAvg, FedProx
from fedmosaic.config import Experiment
from fedmosaic.models import build_model
from fedmosaic.train import TorchTrainer


def build_data(exp: Experiment) -> fd.FederatedDataset:
    d = dict(exp["data"])
    name = d.pop("dataset")
    seed = exp[""]["seed"]
    if name == "heart_disease":
        return fd.load_heart_disease(seed=seed, **d)
    if name == "synthetic":
        alpha, beta = d.pop("alpha", 1.0), d.pop("beta", 1.0)
        return fd.synthetic_fedprox(alpha, beta, seed=seed, **d)
    if name == "digits":
        train, test = fd.load_digits(seed=seed, **d)
    else:
        train, test = fd.load_fashion_mnist(**d)
    p = exp["partition"]
    partitioner: Any
    if p["method"] == "iid":
        partitioner = fd.IID()
    elif p["method"] == "dirichlet":
        partitioner = fd.Dirichlet(alpha=p["alpha"], min_size=p["min_size"])
    else:
        partitioner = fd.Shards(shards_per_client=p["shards_per_client"])
    return fd.partition(train, partitioner, p["clients"], seed, test=test, name=name)


def build_trainer(exp: Experiment, fed: fd.FederatedDataset) -> TorchTrainer:
    m, t = exp["model"], exp["train"]

    def model_fn() -> torch.nn.Module:
        return build_model(m["kind"], fed.feature_shape, fed.num_classes, hidden=m["hidden"])

    momentum, wd = t["momentum"], t["weight_decay"]

    def optimizer(params: Any, lr: float) -> torch.optim.Optimizer:
        if t["optimizer"] == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=wd)
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)

    plain = t["optimizer"] == "sgd" and not momentum and not wd
    return TorchTrainer(model_fn, "cross_entropy", lr=t["lr"], epochs=t["epochs"],
                        batch_size=t["batch_size"], optimizer=None if plain else optimizer)


def build_strategy(exp: Experiment) -> FedAvg:
    s, t = dict(exp["strategy"]), exp["train"]
    opt = dict(exp["server_opt"])
    server_opt = make_server_optimizer(opt.pop("name"), **opt)
    name = s.pop("name")
    common = dict(server_opt=server_opt, local_epochs=t["epochs"], batch_size=t["batch_size"], **s)
    if name == "fedprox":
        return FedProx(**common)
    return FedAvg(**common)
