"""Turn a validated ``Experiment`` into the pieces of a run: data, trainer, strategy."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from fedmosaic import data as fd
from fedmosaic.algorithms.server_opt import make_server_optimizer
from fedmosaic.algorithms.strategy import FedAvg, FedProx
from fedmosaic.config import Experiment
from fedmosaic.models import build_model
from fedmosaic.runtime import BatchedTransport, RayTransport, SequentialTransport
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


def _optimizer(kind: str, momentum: float, weight_decay: float, params: Any,
               lr: float) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _trainer(model: dict[str, Any], train: dict[str, Any], feature_shape: tuple[int, ...],
             num_classes: int, device: str) -> TorchTrainer:
    model_fn = partial(build_model, model["kind"], feature_shape, num_classes,
                       hidden=tuple(model["hidden"]))
    momentum, wd = train["momentum"], train["weight_decay"]
    plain = train["optimizer"] == "sgd" and not momentum and not wd
    optimizer = None if plain else partial(_optimizer, train["optimizer"], momentum, wd)
    return TorchTrainer(model_fn, "cross_entropy", lr=train["lr"], epochs=train["epochs"],
                        batch_size=train["batch_size"], optimizer=optimizer, device=device)


def trainer_factory(exp: Experiment, fed: fd.FederatedDataset) -> Callable[[], TorchTrainer]:
    """A picklable zero-argument factory (Ray workers build their own trainer with it)."""
    return partial(_trainer, dict(exp["model"]), dict(exp["train"]), tuple(fed.feature_shape),
                   fed.num_classes, exp["runtime"]["device"])


def build_trainer(exp: Experiment, fed: fd.FederatedDataset) -> TorchTrainer:
    return trainer_factory(exp, fed)()


def build_transport(exp: Experiment, fed: fd.FederatedDataset, trainer: TorchTrainer) -> Any:
    """The transport named in ``[runtime]`` (sequential, batched or ray)."""
    rt = dict(exp["runtime"])
    kind = rt.pop("transport")
    rt.pop("device")
    secure = rt.pop("secure_aggregation")
    secagg = {k.removeprefix("secagg_"): rt.pop(k) for k in list(rt) if k.startswith("secagg_")}
    transport: Any
    if kind == "batched":
        transport = BatchedTransport(trainer, fed, **rt)
    elif kind == "ray":
        transport = RayTransport(trainer_factory(exp, fed), fed,
                                 num_workers=rt.get("workers", 2), address=rt.get("address"),
                                 torch_threads=max(1, exp[""]["threads"]))
    else:
        transport = SequentialTransport(trainer, fed)
    if secure:
        from fedmosaic.privacy.secagg.transport import SecAggPlusTransport

        # W: the largest weight a client may claim; by default the largest client data set,
        # which a real deployment would fix in its configuration instead.
        uniform = exp["privacy"]["mode"] == "distributed" or \
            exp["strategy"]["weighting"] == "uniform"
        default_w = 1.0 if uniform else float(max(fed.sizes().values()))
        transport = SecAggPlusTransport(
            transport, clip=secagg.get("clip", 1.0), max_weight=secagg.get("max_weight",
                                                                          default_w),
            dropout_rate=secagg.get("dropout_rate", 0.1))
    return transport


def build_strategy(exp: Experiment) -> FedAvg:
    s, t = dict(exp["strategy"]), exp["train"]
    opt = dict(exp["server_opt"])
    server_opt = make_server_optimizer(opt.pop("name"), **opt)
    name = s.pop("name")
    privacy = dict(exp["privacy"])
    mode = privacy.pop("mode")
    if mode in ("central", "distributed"):
        from fedmosaic.privacy.dp_fedavg import DPFedAvg

        if mode == "distributed":
            privacy["distributed"] = True
        s.pop("weighting", None)
        if "min_updates" not in exp.raw.get("strategy", {}):
            s.pop("min_updates")  # Poisson rounds may have no clients: DPFedAvg allows 0
        return DPFedAvg(server_opt=server_opt, local_epochs=t["epochs"],
                        batch_size=t["batch_size"], rounds=exp[""]["rounds"], **privacy, **s)
    stages = ()
    if mode == "local":
        from fedmosaic.privacy.local_dp import LocalDP

        stages = (LocalDP(**privacy),)
    common = dict(server_opt=server_opt, local_epochs=t["epochs"], batch_size=t["batch_size"],
                  client_stages=stages, **s)
    if name == "fedprox":
        return FedProx(**common)
    return FedAvg(**common)
