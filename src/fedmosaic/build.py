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
from fedmosaic.core.errors import ConfigError
from fedmosaic.models import build_model
from fedmosaic.runtime import BatchedTransport, RayTransport, SequentialTransport
from fedmosaic.train import TorchTrainer


def build_data(exp: Experiment) -> fd.FederatedDataset:
    """The federation; with an ``[attack]`` table the malicious clients train on poisoned data
    (the global test set stays clean)."""
    fed = _clean_data(exp)
    root = _root_samples(exp)
    if root is not None:
        from fedmosaic.robust import hold_out_root

        fed = hold_out_root(fed, root, exp[""]["seed"])[0]  # FLTrust's root set is the server's
    plan = build_attack(exp, fed)
    if plan is None:
        return fed
    from fedmosaic.attacks import poison_federation

    return poison_federation(fed, *plan)


def build_attack(exp: Experiment, fed: fd.FederatedDataset) -> tuple[Any, frozenset[str],
                                                                    int] | None:
    """``(attack, malicious client ids, seed)`` for the ``[attack]`` table, or None."""
    a = dict(exp["attack"])
    if not a:
        return None
    from fedmosaic.attacks import choose_malicious, make_attack

    kind, fraction = a.pop("kind"), a.pop("fraction")
    seed = a.pop("seed", exp[""]["seed"])
    for key in ("source", "target"):
        if key in a and a[key] >= fed.num_classes:
            raise ConfigError(f"attack.{key}", a[key],
                              f"a class index below the data set's {fed.num_classes} classes")
    opt = exp["server_opt"]
    if kind == "backdoor" and opt["name"] == "sgd":
        a["server_lr"] = opt.get("lr", 1.0)  # eta in the replacement scale n / eta
    try:
        attack = make_attack(kind, **a)
    except ConfigError as exc:
        raise ConfigError(f"attack.{exc.key}", exc.value, exc.allowed) from exc
    return attack, choose_malicious(fed.client_ids, fraction, seed), seed


def _clean_data(exp: Experiment) -> fd.FederatedDataset:
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


def build_transport(exp: Experiment, fed: fd.FederatedDataset, trainer: TorchTrainer,
                    strategy: FedAvg | None = None) -> Any:
    """The transport named in ``[runtime]`` (sequential, batched or ray).

    With an ``[attack]`` table the malicious clients' uploads go through an
    ``AdversarialTransport`` (inside secure aggregation: attackers are clients), and an
    ``AttackMonitor`` is appended to ``strategy``'s server stages, so every round's record
    says the run was attacked; ``strategy`` is required then.
    """
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
    plan = build_attack(exp, fed)
    if plan is not None:
        from fedmosaic.attacks import AdversarialTransport, AttackMonitor

        if strategy is None:
            raise ConfigError("attack", exp["attack"]["kind"], "build_transport(exp, fed, "
                              "trainer, strategy): the strategy records the attack each round")
        transport = AdversarialTransport(transport, plan[0], plan[1])
        strategy.server_stages = (*strategy.server_stages,
                                  AttackMonitor(transport, trainer, fed.test))
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
            dropout_rate=secagg.get("dropout_rate", 0.1),
            **({"corrupted_fraction": secagg["corrupted_fraction"]}
               if "corrupted_fraction" in secagg else {}),
            secure_noise=bool(exp["privacy"].get("secure_noise", False)))
    return transport


def _watermark(exp: Experiment, fed: fd.FederatedDataset | None) -> dict[str, Any]:
    """Strategy arguments for the ``[watermark]`` section (WAFFLE stage, fingerprints)."""
    if not exp["watermark"]:
        return {}
    if fed is None:
        raise ConfigError("watermark", "<no data>", "build_strategy(exp, fed): the watermark's "
                          "triggers need the data's input shape and classes")
    from fedmosaic.watermark.from_config import build_watermark

    m = exp["model"]
    model_fn = partial(build_model, m["kind"], tuple(fed.feature_shape), fed.num_classes,
                       hidden=tuple(m["hidden"]))
    stage, fingerprint = build_watermark(exp["watermark"], model_fn=model_fn,
                                         input_shape=tuple(fed.feature_shape),
                                         num_classes=fed.num_classes,
                                         device=exp["runtime"]["device"])
    return {"server_stages": (stage,) if stage else (), "dispatch_transform": fingerprint}


def _root_samples(exp: Experiment) -> int | None:
    r = exp["robust"]
    return r.get("root_samples") if r.get("aggregator") == "fltrust" else None


def build_root_data(exp: Experiment,
                    clean: fd.FederatedDataset | None = None) -> fd.ArrayDataset | None:
    """FLTrust's root data set: ``robust.root_samples`` training samples held out from the
    clients (never the test set that reported accuracy uses); None for other rules.
    ``clean`` is the federation before the hold-out (built from ``exp`` when not given)."""
    root = _root_samples(exp)
    if root is None:
        return None
    from fedmosaic.robust import hold_out_root

    return hold_out_root(clean or _clean_data(exp), root, exp[""]["seed"])[1]


def _defences(exp: Experiment) -> dict[str, Any]:
    """Strategy arguments for the ``[robust]`` and ``[anomaly]`` sections."""
    r, a = dict(exp["robust"]), exp["anomaly"]
    out: dict[str, Any] = {}
    if r:
        from fedmosaic.robust import make_robust

        rule = r.pop("aggregator")
        seed = exp[""]["seed"]
        if rule == "fltrust":
            clean = _clean_data(exp)
            root = build_root_data(exp, clean)
            t = exp["train"]
            out["robust"] = make_robust(rule, trainer=build_trainer(exp, clean), root_data=root,
                                        epochs=t["epochs"], batch_size=t["batch_size"],
                                        seed=seed)
        elif rule == "norm_bound":
            out["robust"] = make_robust(rule, seed=seed, **r)
        else:
            out["robust"] = make_robust(rule, **r)
    if a.get("enabled", False):
        from fedmosaic.robust import AnomalyDetector

        out["anomaly"] = AnomalyDetector(**{k: v for k, v in a.items() if k != "enabled"})
    return out


def build_strategy(exp: Experiment, fed: fd.FederatedDataset | None = None, *,
                   deployment: bool = False) -> FedAvg:
    """The strategy; ``fed`` is needed only with a ``[watermark]`` section.

    ``deployment=True`` (``fedmosaic server``): central and distributed DP draw noise and
    cohorts from ``SecureNoise`` unless ``privacy.secure_noise = false``, which is refused
    unless ``privacy.insecure_seeded_noise = true`` says loudly that the run is a test (seeded
    noise can be regenerated by anyone who finds the run seed). In simulation the default is
    seeded noise, for reproducibility.
    """
    wm = _watermark(exp, fed)
    wm.update(_defences(exp))
    s, t = dict(exp["strategy"]), exp["train"]
    opt = dict(exp["server_opt"])
    server_opt = make_server_optimizer(opt.pop("name"), **opt)
    name = s.pop("name")
    privacy = dict(exp["privacy"])
    mode = privacy.pop("mode")
    if "client_metrics" in privacy:
        s["client_metrics"] = privacy.pop("client_metrics")
    if mode in ("central", "distributed"):
        from fedmosaic.privacy.dp_fedavg import DPFedAvg

        insecure = privacy.pop("insecure_seeded_noise", False)
        privacy["secure_noise"] = privacy.get("secure_noise", deployment)
        if deployment and not privacy["secure_noise"] and not insecure:
            raise ConfigError("privacy.secure_noise", False,
                              "true for a deployment (fedmosaic server): seeded noise and "
                              "cohorts can be regenerated by anyone who finds the run seed, "
                              "which a client can search from its own FitConfig seed; set "
                              "privacy.insecure_seeded_noise = true only for a test deployment")
        if privacy.pop("mechanism", "gaussian") == "skellam":
            # Distributed Skellam: its own strategy; each client draws its noise inside
            # SecAggPlusTransport (build_transport passes secure_noise there).
            from fedmosaic.privacy.distributed_skellam import DistributedSkellam

            s.pop("weighting", None)
            if "min_updates" not in exp.raw.get("strategy", {}):
                s.pop("min_updates")
            return DistributedSkellam(server_opt=server_opt, local_epochs=t["epochs"],
                                      batch_size=t["batch_size"], rounds=exp[""]["rounds"],
                                      **privacy, **s, **wm)
        if mode == "distributed":
            privacy["distributed"] = True
        s.pop("weighting", None)
        if "min_updates" not in exp.raw.get("strategy", {}):
            s.pop("min_updates")  # Poisson rounds may have no clients: DPFedAvg allows 0
        return DPFedAvg(server_opt=server_opt, local_epochs=t["epochs"],
                        batch_size=t["batch_size"], rounds=exp[""]["rounds"], **privacy, **s,
                        **wm)
    stages = ()
    if mode == "local":
        from fedmosaic.privacy.local_dp import LocalDP

        stages = (LocalDP(**privacy),)
    common = dict(server_opt=server_opt, local_epochs=t["epochs"], batch_size=t["batch_size"],
                  client_stages=stages, **s, **wm)
    if name == "fedprox":
        return FedProx(**common)
    return FedAvg(**common)
