"""Turn a validated ``Experiment`` into the pieces of a run: data, trainer, strategy.

Built-in data sets and models come from ``[data] dataset`` and ``[model] kind``; the user's
own come from ``[data] dataset = "files"`` (one file per client) or ``"custom"`` (a loader
function) and ``[model] factory`` (a Trainer or a zero-argument factory), loaded with
``fedmosaic.task`` relative to the experiment file's directory (docs/own-model.md).

Three views of one experiment: ``build_data`` is the whole federation (simulation: every
client's data in this process); ``client_data`` is what one client process loads (its own
data only); ``server_task`` is what ``fedmosaic server`` builds -- the trainer, the central
test set if any and the ``TaskProfile`` that joining clients are checked against -- and it
never opens the clients' files, which live on the clients' machines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fedmosaic import data as fd
from fedmosaic.algorithms.server_opt import make_server_optimizer
from fedmosaic.algorithms.strategy import FedAvg, FedProx
from fedmosaic.compat import TaskProfile, describe_shape, model_outputs
from fedmosaic.config import USER_DATASETS, Experiment
from fedmosaic.core.errors import ConfigError, FedmosaicError
from fedmosaic.models import build_model
from fedmosaic.runtime import BatchedTransport, RayTransport, SequentialTransport
from fedmosaic.train import TorchTrainer, Trainer


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


def experiment_dir(exp: Experiment) -> Path:
    """The directory the experiment's relative paths and user modules are found in:
    ``exp.base_dir`` if set, else the experiment file's, or the working directory for an
    experiment built in memory."""
    base_dir = getattr(exp, "base_dir", None)
    if base_dir is not None:
        return Path(base_dir).resolve()
    return exp.source.resolve().parent if exp.source is not None else Path.cwd()


def _data_path(exp: Experiment, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else experiment_dir(exp) / p


def _user_test_set(exp: Experiment) -> fd.ArrayDataset | None:
    """The central test set of a "files" or "custom" data set (``test`` / ``test_loader``)."""
    d = exp["data"]
    if d["dataset"] == "files":
        if "test" not in d:
            return None
        return fd.load_table(_data_path(exp, d["test"]), label=d.get("label"),
                             features=d.get("features"))
    spec = d.get("test_loader")
    if spec is None:
        return None
    from fedmosaic.data.files import as_array_dataset
    from fedmosaic.task import describe, load_object

    fn = load_object(spec, experiment_dir(exp))
    if not callable(fn):
        raise FedmosaicError(f"{spec!r} is {describe(fn)}, not a function returning the test set")
    try:
        out = fn()
    except FedmosaicError as exc:
        raise FedmosaicError(f"{spec}(): {exc}") from None
    except Exception as exc:  # the user's loader failed: one line, no trace
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise FedmosaicError(f"{spec}() raised {type(exc).__name__}"
                             + (f": {detail}" if detail else "")) from None
    if isinstance(out, fd.ArrayDataset):
        return out
    if isinstance(out, tuple) and len(out) == 2:
        return as_array_dataset(out[0], out[1], f"{spec}()")
    raise FedmosaicError(f"{spec}() returned {describe(out)}; a test loader returns an "
                         "ArrayDataset or an (x, y) pair")


def _check_feature_shape(exp: Experiment, shape: tuple[int, ...], what: str) -> None:
    declared = exp["data"].get("feature_shape")
    if declared is not None and tuple(declared) != tuple(shape):
        raise ConfigError("data.feature_shape", declared, f"the shape of the data: {what} has "
                          f"{describe_shape(tuple(shape))}")


def _user_data(exp: Experiment) -> fd.FederatedDataset:
    """The whole federation of a "files" or "custom" data set (simulation)."""
    d, seed = exp["data"], exp[""]["seed"]
    test = _user_test_set(exp)
    common = dict(test=test, test_fraction=d.get("test_fraction"),
                  num_classes=d.get("num_classes"), seed=seed, name=d["dataset"])
    if d["dataset"] == "files":
        fed = fd.federation_from_files(
            {cid: _data_path(exp, path) for cid, path in d["clients"].items()},
            label=d.get("label"), features=d.get("features"), **common)
    else:
        from fedmosaic.task import describe, load_object

        loader = load_object(d["loader"], experiment_dir(exp))
        if not callable(loader):
            raise FedmosaicError(f"{d['loader']!r} is {describe(loader)}, not a function "
                                 "load_data(client_id)")
        fed = fd.federation_from_loader(loader, list(d["clients"]), what=d["loader"], **common)
    _check_feature_shape(exp, fed.feature_shape, "the clients' data")
    return fed


def client_data(exp: Experiment, client_id: str) -> fd.ClientData:
    """What the client process ``client_id`` trains and evaluates on: for a built-in data set
    its partition (as ``build_data`` makes it); for "files" its own file, split into train and
    a local test split with ``[data] test_fraction``; for "custom" what ``loader(client_id)``
    returns. Only this client's data is read."""
    d = exp["data"]
    name, seed = d["dataset"], exp[""]["seed"]
    where = str(exp.source) if exp.source is not None else exp.name
    if name in USER_DATASETS:
        ids = list(d["clients"])
        if client_id not in ids:
            shown = ", ".join(ids[:10]) + (", ..." if len(ids) > 10 else "")
            raise FedmosaicError(f"'{client_id}' is not a client of {where} (clients: {shown})")
        if name == "files":
            train = fd.load_table(_data_path(exp, d["clients"][client_id]), label=d.get("label"),
                                  features=d.get("features"))
            test = None
            if d.get("test_fraction") is not None:
                train, test = fd.local_test_split(train, d["test_fraction"], seed, client_id)
            return fd.ClientData(client_id, train, test)
        from fedmosaic.task import load_object

        loader = load_object(d["loader"], experiment_dir(exp))
        return fd.client_from_loader(loader, client_id, test_fraction=d.get("test_fraction"),
                                     seed=seed, what=d["loader"])
    fed = build_data(exp)
    if client_id not in fed.client_ids:
        shown = ", ".join(fed.client_ids[:10]) + (", ..." if len(fed.clients) > 10 else "")
        raise FedmosaicError(f"'{client_id}' is not a client of {where} (clients: {shown})")
    return fed.client(client_id)


def loads_on_workers(exp: Experiment) -> bool:
    """Whether the clients' data is loaded on the workers, never by this process: the user's
    own data ("files" or "custom") trained by Ray workers (issue #21)."""
    return exp["runtime"]["transport"] == "ray" and exp["data"]["dataset"] in USER_DATASETS


def client_source(exp: Experiment) -> Any:
    """The client source of a "files" or "custom" data set (``fedmosaic.data.source``): the
    recipe that workers load each client from, with the experiment's local test split."""
    from fedmosaic.data.source import FileSource, LoaderSource

    d, seed = exp["data"], exp[""]["seed"]
    if d["dataset"] == "files":
        return FileSource({cid: str(_data_path(exp, path)) for cid, path in d["clients"].items()},
                          label=d.get("label"),
                          features=tuple(d["features"]) if d.get("features") else None,
                          test_fraction=d.get("test_fraction"), seed=seed)
    return LoaderSource(d["loader"], tuple(d["clients"]), base_dir=str(experiment_dir(exp)),
                        test_fraction=d.get("test_fraction"), seed=seed)


def driver_federation(exp: Experiment) -> tuple[Any, ServerTask]:
    """What the driver of a run whose workers load the data holds (``loads_on_workers``):
    a ``LazyFederation`` over ``client_source(exp)`` that it never loads a client from (the
    client ids and the central test set only), and the ``server_task`` -- the trainer and
    the task's shape, from the test set or ``[data] feature_shape`` / ``num_classes``, as
    ``fedmosaic server`` builds them without the clients' data."""
    from fedmosaic.data.source import LazyFederation, check_source

    _refuse_server_side_client_data(exp, "a Ray run whose workers load the data")
    task = server_task(exp)
    return LazyFederation(check_source(client_source(exp)), cache_bytes=0, test=task.test), task


def _clean_data(exp: Experiment) -> fd.FederatedDataset:
    d = dict(exp["data"])
    name = d.pop("dataset")
    seed = exp[""]["seed"]
    if name in USER_DATASETS:
        return _user_data(exp)
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


def _user_trainer(spec: str, base_dir: str) -> Trainer:
    from fedmosaic.task import load_trainer

    return load_trainer(spec, Path(base_dir))


def trainer_factory(exp: Experiment, fed: fd.FederatedDataset | None = None,
                    feature_shape: tuple[int, ...] | None = None,
                    num_classes: int | None = None) -> Callable[[], Trainer]:
    """A picklable zero-argument factory (Ray workers build their own trainer with it).

    ``[model] factory``: the spec and the experiment's directory, loaded where it is called.
    ``[model] kind``: the shape and classes of ``fed``, or ``feature_shape`` and
    ``num_classes`` when there is no federation at hand (``server_task``)."""
    factory = exp["model"].get("factory")
    if factory is not None:
        return partial(_user_trainer, factory, str(experiment_dir(exp)))
    if fed is not None:
        feature_shape, num_classes = tuple(fed.feature_shape), fed.num_classes
    if feature_shape is None or num_classes is None:
        raise ValueError("trainer_factory: give fed, or feature_shape and num_classes")
    return partial(_trainer, dict(exp["model"]), dict(exp["train"]), tuple(feature_shape),
                   num_classes, exp["runtime"]["device"])


def _check_fits(exp: Experiment, trainer: Trainer, feature_shape: tuple[int, ...],
                num_classes: int | None) -> int | None:
    """The number of outputs of the user's model (when it can say), after checking that it
    takes samples of ``feature_shape`` and has an output per class."""
    spec = exp["model"]["factory"]
    try:
        outputs = model_outputs(trainer, tuple(feature_shape))
    except Exception as exc:  # the user's model rejected the input: say so, no trace
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError("model.factory", spec, f"a model that takes the data's "
                          f"{describe_shape(tuple(feature_shape))} (it raised "
                          f"{type(exc).__name__}: {detail})") from None
    if outputs is not None and outputs >= 2 and num_classes is not None \
            and outputs < num_classes:
        raise ConfigError("model.factory", spec, f"a model with an output per class: the data "
                          f"has {num_classes} classes (labels 0 to {num_classes - 1}), the "
                          f"model {outputs} outputs")
    return outputs


def build_trainer(exp: Experiment, fed: fd.FederatedDataset) -> Trainer:
    """The trainer; the user's (``[model] factory``) is checked against ``fed``'s shape and
    classes first, so that a mismatch is one line now instead of a failure in every round."""
    trainer = trainer_factory(exp, fed)()
    if "factory" in exp["model"]:
        _check_fits(exp, trainer, fed.feature_shape, fed.num_classes)
    return trainer


@dataclass
class ServerTask:
    """What ``fedmosaic server`` runs: the ``trainer`` (its model is the task's), the central
    ``test`` set or None, the ``profile`` joining clients are checked against, and the whole
    federation ``data`` -- only for built-in data sets, whose partitions the server can
    compute; None for "files" and "custom", whose data stays on the clients' machines."""

    trainer: Trainer
    test: fd.ArrayDataset | None
    profile: TaskProfile
    data: fd.FederatedDataset | None = None


def _refuse_server_side_client_data(exp: Experiment, who: str = "fedmosaic server") -> None:
    """Deployment with the clients' own data (or a Ray run whose workers load it): what would
    need that data on the server (``who``)."""
    dataset = exp["data"]["dataset"]
    elsewhere = "on their machines (run it with fedmosaic run)" if who == "fedmosaic server" \
        else "on the workers (use another transport)"
    if exp["attack"]:
        raise ConfigError("attack", exp["attack"].get("kind"), f"no [attack] table for "
                          f"{who} with dataset '{dataset}': a simulated attack poisons the "
                          f"clients' data, which stays {elsewhere}")
    if _root_samples(exp) is not None:
        raise ConfigError("robust.aggregator", "fltrust", f"another rule for {who} with "
                          f"dataset '{dataset}': FLTrust's root data set is held out of the "
                          "clients' data, which the server does not have")


def server_task(exp: Experiment) -> ServerTask:
    """The server's side of ``exp`` (see ``ServerTask``). For "files" and "custom" it reads
    the test set (``test`` / ``test_loader``) and nothing of the clients'; the profile's
    feature shape comes from the test set or ``[data] feature_shape``, its classes from
    ``[data] num_classes`` or the outputs of the user's model."""
    d = exp["data"]
    if d["dataset"] not in USER_DATASETS:
        fed = build_data(exp)
        return ServerTask(build_trainer(exp, fed), fed.test,
                          TaskProfile(tuple(fed.feature_shape), fed.num_classes), fed)
    _refuse_server_side_client_data(exp)
    test = _user_test_set(exp)
    shape: tuple[int, ...] | None = tuple(d["feature_shape"]) if "feature_shape" in d else None
    if test is not None:
        _check_feature_shape(exp, test.feature_shape, "the test set")
        shape = test.feature_shape
    num_classes: int | None = d.get("num_classes")
    if test is not None and num_classes is not None and len(test) \
            and int(test.y.max()) >= num_classes:
        raise ConfigError("data.num_classes", num_classes, f"more than the test set's largest "
                          f"label, {int(test.y.max())}")
    if "factory" in exp["model"]:
        trainer = trainer_factory(exp)()
        if shape is not None:
            # The test set's labels need an output each too (else evaluating it fails).
            seen = int(test.y.max()) + 1 if test is not None and len(test) else None
            outputs = _check_fits(exp, trainer, shape, num_classes or seen)
            if num_classes is None and outputs is not None and outputs >= 2:
                num_classes = outputs  # a classifier has one output per class
    else:
        need = "a test set (data.test / data.test_loader) or data.feature_shape" \
            if shape is None else "data.num_classes"
        if shape is None or num_classes is None:
            key = "data.feature_shape" if shape is None else "data.num_classes"
            raise ConfigError(key, "<missing>", f"required for fedmosaic server with [model] "
                              f"kind and dataset '{d['dataset']}': the server builds the model "
                              f"without the clients' data, so give {need}")
        trainer = trainer_factory(exp, feature_shape=shape, num_classes=num_classes)()
    return ServerTask(trainer, test, TaskProfile(shape, num_classes))


def build_transport(exp: Experiment, fed: fd.FederatedDataset, trainer: TorchTrainer,
                    strategy: FedAvg | None = None) -> Any:
    """The transport named in ``[runtime]``: auto (the default), sequential, batched,
    parallel or ray.

    ``auto`` (``fedmosaic.runtime.auto.choose_transport``) picks sequential, batched, parallel
    or parallel-batched from the model, the device, the cohort, the rounds and the usable
    cores; the transport carries its choice and reason as ``auto_choice``, which the run
    records. ``parallel`` builds a ``ParallelTransport`` whose workers build their trainer
    with ``trainer_factory``; a trainer it cannot run with (DP-SGD's per-client accounting, a
    factory that cannot be pickled) is refused with the reason.

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
    aggregators = rt.pop("shares_aggregators", 2)
    transport: Any
    uniform = exp["privacy"]["mode"] == "distributed" or exp["strategy"]["weighting"] == "uniform"
    if secure and not isinstance(fed, fd.FederatedDataset) and not uniform \
            and "max_weight" not in secagg:
        # The driver holds no client data (driver_federation): nothing here may need it.
        raise ConfigError("runtime.secagg_max_weight", "<missing>", "required when the "
                          "workers load the clients' data: the driver cannot read the "
                          "largest client's sample count")
    if kind == "auto":
        from fedmosaic.runtime.auto import build_chosen, choose_transport

        factory = trainer_factory(exp, fed)  # picklable: each worker builds its own trainer
        choice = choose_transport(trainer, fed, strategy, exp[""]["rounds"],
                                  schedule=getattr(strategy, "schedule", None),
                                  max_workers=_workers(rt), trainer_factory=factory)
        transport = build_chosen(choice, trainer, fed, trainer_factory=factory)
    elif kind == "parallel":
        transport = _parallel(exp, fed, trainer, rt)
    elif kind == "batched":
        transport = BatchedTransport(trainer, fed, **rt)
    elif kind == "ray":
        transport = _ray(exp, fed, rt)
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
        # W: the largest weight a client may claim; by default the largest client data set,
        # which a real deployment would fix in its configuration instead.
        default_w = 1.0 if uniform or "max_weight" in secagg else \
            float(max(fed.sizes().values()))
    if secure == "shares":
        from fedmosaic.privacy.shares_transport import SecretSharingTransport

        return SecretSharingTransport(
            transport, aggregators=aggregators,
            clip=secagg.get("clip", 1.0), max_weight=secagg.get("max_weight", default_w),
            secure_noise=bool(exp["privacy"].get("secure_noise", False)))
    if secure:
        from fedmosaic.privacy.secagg.transport import SecAggPlusTransport

        transport = SecAggPlusTransport(
            transport, clip=secagg.get("clip", 1.0), max_weight=secagg.get("max_weight",
                                                                          default_w),
            dropout_rate=secagg.get("dropout_rate", 0.1),
            **({"corrupted_fraction": secagg["corrupted_fraction"]}
               if "corrupted_fraction" in secagg else {}),
            secure_noise=bool(exp["privacy"].get("secure_noise", False)))
    return transport


def _ray(exp: Experiment, fed: Any, rt: dict[str, Any]) -> RayTransport:
    """``transport = "ray"``: the cluster named by ``address`` or ``RAY_ADDRESS`` (else a
    private local Ray), ``workers`` actors (or "auto": as many as its free resources hold),
    each with ``cpus`` / ``gpus`` / ``memory_mb``; a relative ``runtime_env.working_dir`` is
    the experiment file's directory's. ``fed`` is the whole federation, which goes to the
    workers through the object store, or a driver's ``LazyFederation``
    (``driver_federation``), whose source each worker loads its clients from."""
    from fedmosaic.data.source import LazyFederation

    lazy = isinstance(fed, LazyFederation)
    env = dict(rt["runtime_env"]) if "runtime_env" in rt else None
    if env is not None and isinstance(env.get("working_dir"), str):
        env["working_dir"] = str((experiment_dir(exp) / env["working_dir"]).resolve())
    memory = rt.get("memory_mb")
    if lazy:
        d = exp["data"]
        factory = trainer_factory(exp, feature_shape=(
            fed.test.feature_shape if fed.test is not None else d.get("feature_shape")),
            num_classes=d.get("num_classes"))
    else:
        factory = trainer_factory(exp, fed)
    return RayTransport(
        factory, None if lazy else fed, source=fed.source if lazy else None,
        num_workers=rt.get("workers", 2),
        address=rt.get("address"), cpus_per_worker=float(rt.get("cpus", 1.0)),
        gpus_per_worker=float(rt.get("gpus", 0.0)),
        memory_per_worker=None if memory is None else int(memory * 2**20),
        runtime_env=env, torch_threads=max(1, exp[""]["threads"]),
        inner=rt.get("inner", "sequential"),
        start_timeout_s=float(rt.get("start_timeout_s", 60.0)),
        round_timeout_s=float(rt.get("round_timeout_s", 3600.0)))


def _parallel(exp: Experiment, fed: fd.FederatedDataset, trainer: Trainer,
              rt: dict[str, Any]) -> Any:
    """``transport = "parallel"``: refused with the reason where workers cannot run it."""
    from fedmosaic.runtime.auto import parallel_refusal
    from fedmosaic.runtime.parallel import ParallelTransport

    factory = trainer_factory(exp, fed)  # picklable: each worker builds its own trainer
    why = parallel_refusal(trainer, factory)
    if why is not None:
        raise ConfigError("runtime.transport", "parallel", f"a transport that can run this "
                          f"experiment: {why} (use 'auto' or 'sequential')")
    return ParallelTransport(factory, fed,
                             num_workers=_workers(rt), inner=rt.get("inner", "sequential"))


def _workers(rt: dict[str, Any]) -> int | None:
    """``[runtime] workers`` for a local pool: "auto" (or none) is one per usable core."""
    workers = rt.get("workers")
    return None if workers == "auto" else workers


def _user_model_fn(exp: Experiment) -> Callable[[], torch.nn.Module]:
    """The model builder of the user's trainer (a ``TorchTrainer``, possibly wrapped)."""
    from fedmosaic.train.base import TrainerWrapper

    trainer = trainer_factory(exp)()
    while isinstance(trainer, TrainerWrapper):
        trainer = trainer.inner
    if not isinstance(trainer, TorchTrainer):
        raise ConfigError("model.factory", exp["model"]["factory"], "a factory of a "
                          "TorchTrainer here (the torch model itself is needed: a [watermark] "
                          f"retrains or verifies it; got a {type(trainer).__name__})")
    return trainer.model_fn


def model_builder(exp: Experiment, feature_shape: tuple[int, ...],
                  num_classes: int) -> Callable[[], torch.nn.Module]:
    """A zero-argument builder of the experiment's torch model: ``[model] kind`` for the given
    shape and classes, or the ``model_fn`` of the ``TorchTrainer`` that ``[model] factory``
    returns (``ConfigError`` for another kind of trainer)."""
    m = exp["model"]
    if "factory" in m:
        return _user_model_fn(exp)
    return partial(build_model, m["kind"], tuple(feature_shape), num_classes,
                   hidden=tuple(m["hidden"]))


def _watermark(exp: Experiment, fed: fd.FederatedDataset | None,
               profile: TaskProfile | None = None) -> dict[str, Any]:
    """Strategy arguments for the ``[watermark]`` section (WAFFLE stage, fingerprints)."""
    if not exp["watermark"]:
        return {}
    if fed is not None:
        shape, classes = tuple(fed.feature_shape), fed.num_classes
    elif profile is not None and profile.feature_shape and profile.num_classes:
        shape, classes = tuple(profile.feature_shape), profile.num_classes
    else:
        raise ConfigError("watermark", "<no data>", "the input shape and classes of the data "
                          "for the watermark's triggers: build_strategy(exp, fed), or, for a "
                          "server without the clients' data, [data] feature_shape (or a test "
                          "set) and num_classes")
    from fedmosaic.watermark.from_config import build_watermark

    model_fn = model_builder(exp, shape, classes)
    stage, fingerprint = build_watermark(exp["watermark"], model_fn=model_fn,
                                         input_shape=shape, num_classes=classes,
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
                                        epochs=t.get("epochs"), batch_size=t.get("batch_size"),
                                        seed=seed)
        elif rule == "norm_bound":
            out["robust"] = make_robust(rule, seed=seed, **r)
        else:
            out["robust"] = make_robust(rule, **r)
    if a.get("enabled", False):
        from fedmosaic.robust import AnomalyDetector

        out["anomaly"] = AnomalyDetector(**{k: v for k, v in a.items() if k != "enabled"})
    return out


def build_schedule(exp: Experiment, *, live: bool = False) -> Any:
    """The ``[strategy] schedule`` (fedmosaic.runtime.schedule) with the ``[clock]`` timing
    model, if any, or None for synchronous rounds without a clock (the server's default).
    The clock is built once the server knows the model's size (``[clock] model_bytes``
    defaults to it).

    ``live=True`` (``fedmosaic server``: real clients over a ``LiveTransport``): FedBuff and
    FedAsync in live mode, None for synchronous rounds; a ``[clock]`` is refused, since the
    clients' time is real (and would otherwise be silently ignored)."""
    from fedmosaic.algorithms.staleness import make_staleness
    from fedmosaic.runtime.clock import build_clock
    from fedmosaic.runtime.schedule import FedAsyncSchedule, FedBuffSchedule, SyncSchedule

    s = exp["strategy"]
    kind = s.get("schedule", "sync")
    if live and exp["clock"]:
        raise ConfigError("clock", "<table>", "no [clock] table with fedmosaic server: the "
                          "clients are real and so is their time; [clock] simulates client "
                          "speeds for fedmosaic run only")
    if live and kind != "sync" and exp["runtime"]["secure_aggregation"]:
        # Before the server listens; Server's check refuses it too (runtime/schedule.py).
        raise ConfigError("strategy.schedule", kind, "'sync' with secure aggregation on "
                          "fedmosaic server: SecAgg+ over each FedBuff buffer runs in "
                          "simulation only (fedmosaic run); over gRPC a SecAgg+ instance is "
                          "one synchronous cohort, with no per-buffer instance among "
                          "asynchronous clients yet")
    clock = partial(build_clock, exp) if exp["clock"] else None
    if kind == "sync":
        return SyncSchedule(clock=clock) if clock is not None else None
    staleness = None
    if "staleness" in s:
        params = {k.removeprefix("staleness_"): s[k] for k in ("staleness_a", "staleness_b")
                  if k in s}
        try:
            staleness = make_staleness(s["staleness"], **params)
        except ValueError as exc:  # e.g. hinge's slope a must be > 0
            raise ConfigError("strategy.staleness_a", s.get("staleness_a"),
                              f"parameters the '{s['staleness']}' staleness function accepts "
                              f"({exc})") from exc
    if kind == "fedbuff":
        return FedBuffSchedule(s["buffer_size"], s["concurrency"], staleness=staleness,
                               clock=clock, live=live)
    return FedAsyncSchedule(s["alpha"], s["concurrency"], staleness=staleness, clock=clock,
                            live=live)


# [strategy] keys that configure the schedule, not the strategy object.
_SCHEDULE_KEYS = ("schedule", "concurrency", "buffer_size", "alpha", "staleness", "staleness_a",
                  "staleness_b")


def build_strategy(exp: Experiment, fed: fd.FederatedDataset | None = None, *,
                   deployment: bool = False, profile: TaskProfile | None = None) -> FedAvg:
    """The strategy; ``fed`` (or, for a server without the clients' data, the task's
    ``profile`` with its feature shape and classes) is needed only with a ``[watermark]``
    section.

    The experiment's schedule (``build_schedule``: ``[strategy] schedule`` and ``[clock]``) is
    attached as ``strategy.schedule``, which ``Server`` and ``simulate`` run unless given
    another. With ``deployment=True`` it is the live schedule (``build_schedule(exp,
    live=True)``: FedBuff or FedAsync over a ``LiveTransport``; a ``[clock]`` is refused);
    synchronous rounds attach nothing.

    With ``[model] factory`` the ``[train]`` keys given (lr, epochs, batch_size) go to every
    client in its ``FitConfig``; keys not given leave the trainer's own settings.

    ``deployment=True`` (``fedmosaic server``): central and distributed DP draw noise and
    cohorts from ``SecureNoise`` unless ``privacy.secure_noise = false``, which is refused
    unless ``privacy.insecure_seeded_noise = true`` says loudly that the run is a test (seeded
    noise can be regenerated by anyone who finds the run seed). In simulation the default is
    seeded noise, for reproducibility.
    """
    strategy = _build_strategy(exp, fed, deployment=deployment, profile=profile)
    schedule = build_schedule(exp, live=deployment)
    if schedule is not None:
        strategy.schedule = schedule  # type: ignore[attr-defined]
    return strategy


def _build_strategy(exp: Experiment, fed: fd.FederatedDataset | None, *, deployment: bool,
                    profile: TaskProfile | None) -> FedAvg:
    wm = _watermark(exp, fed, profile)
    wm.update(_defences(exp))
    s, t = dict(exp["strategy"]), exp["train"]
    for key in _SCHEDULE_KEYS:
        s.pop(key, None)
    if "factory" in exp["model"] and "lr" in t:
        s["lr"] = t["lr"]  # the built-in trainers get lr at construction instead
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
            return DistributedSkellam(server_opt=server_opt, local_epochs=t.get("epochs"),
                                      batch_size=t.get("batch_size"), rounds=exp[""]["rounds"],
                                      **privacy, **s, **wm)
        if mode == "distributed":
            privacy["distributed"] = True
        s.pop("weighting", None)
        if exp["strategy"].get("schedule", "sync") != "sync":
            # Central DP per asynchronous server step (config refused the sampling keys).
            from fedmosaic.privacy.async_dp import AsyncDPFedAvg

            s.pop("min_updates", None)
            return AsyncDPFedAvg(server_opt=server_opt, local_epochs=t.get("epochs"),
                                 batch_size=t.get("batch_size"), rounds=exp[""]["rounds"],
                                 **privacy, **s, **wm)
        if "min_updates" not in exp.raw.get("strategy", {}):
            s.pop("min_updates")  # Poisson rounds may have no clients: DPFedAvg allows 0
        return DPFedAvg(server_opt=server_opt, local_epochs=t.get("epochs"),
                        batch_size=t.get("batch_size"), rounds=exp[""]["rounds"], **privacy, **s,
                        **wm)
    stages = ()
    if mode == "local":
        from fedmosaic.privacy.local_dp import LocalDP

        stages = (LocalDP(**privacy),)
    common = dict(server_opt=server_opt, local_epochs=t.get("epochs"),
                  batch_size=t.get("batch_size"),
                  client_stages=stages, **s, **wm)
    if name == "fedprox":
        return FedProx(**common)
    return FedAvg(**common)


def _evaluation_plan(exp: Experiment,
                     fed: fd.FederatedDataset | None) -> tuple[bool, bool | None, bool]:
    """(central evaluation on?, federated evaluation on?, do clients hold local test splits
    (None: unknown)?) for ``[evaluation]``; with ``fed`` the data itself decides what it has.
    Refusals name what to add to ``[data]``."""
    from fedmosaic.config import evaluation_data, evaluation_missing, federated_by_default

    ev, data = exp["evaluation"], exp["data"]
    central, local = evaluation_data(data)
    if fed is not None:
        central = fed.test is not None and len(fed.test) > 0
        if isinstance(fed, fd.FederatedDataset):  # else the data is on the workers: unknown
            local = any(c.test is not None and len(c.test) > 0 for c in fed.clients)
    use_central = ev.get("central", central)
    if use_central and not central:
        raise ConfigError("evaluation.central", True, evaluation_missing(data, "central"))
    use_fed = ev.get("federated", federated_by_default(exp["privacy"], central, local))
    if use_fed and local is False:
        raise ConfigError("evaluation.federated", True, evaluation_missing(data, "federated"))
    return use_central, use_fed, local


def build_evaluation(exp: Experiment, fed: fd.FederatedDataset | None = None) -> Any:
    """The ``FederatedEvaluation`` of ``[evaluation]`` (``simulate(..., federated_eval=)``,
    ``Server(..., federated_eval=)``), or None when the clients do not evaluate.

    Federated evaluation is on by default when there is no central test set and the clients
    hold local test splits (never by default under central or distributed DP, where it is
    refused, nor with ``privacy.client_metrics = "suppress"``). ``fed`` is the federation in
    simulation; a server without the clients' data passes None and the ``[data]`` table
    decides (a client without a local test split then reports "no local test split")."""
    from fedmosaic.runtime.evaluation import FederatedEvaluation

    _, use_fed, _ = _evaluation_plan(exp, fed)
    if not use_fed:
        return None
    ev = exp["evaluation"]
    return FederatedEvaluation(fraction=ev.get("fraction"), clients=ev.get("clients"),
                               min_clients=ev.get("min_clients", 1))


def central_evaluation(exp: Experiment, fed: fd.FederatedDataset | None = None) -> bool:
    """Whether the server evaluates on the central test set (``simulate(...,
    central_eval=)``): ``evaluation.central``, by default whenever there is one."""
    return _evaluation_plan(exp, fed)[0]


def simulate_experiment(exp: Experiment, fed: fd.FederatedDataset, trainer: Trainer,
                        strategy: FedAvg, *, out_dir: Path | None = None, resume: bool = False,
                        callbacks: Any = (),
                        announce: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """``simulate`` with everything else the experiment decides: its rounds, seed, evaluation
    (central and federated, every ``eval_every``), resume identity and transport (built here,
    closed afterwards). ``fedmosaic run``/``resume`` and the benchmarks run experiments
    through this one function, so none of them can forget a setting. ``announce`` is called
    with the transport's description (``runtime.auto.describe_transport``: what ``auto``
    chose and why) once it is built, before the first round."""
    from fedmosaic.runtime.auto import close_transport, describe_transport
    from fedmosaic.runtime.simulate import simulate

    transport = build_transport(exp, fed, trainer, strategy)
    if announce is not None:
        announce(describe_transport(transport))
    try:
        return simulate(trainer, fed, strategy, exp[""]["rounds"], seed=exp[""]["seed"],
                        out_dir=out_dir, resume=resume, eval_every=exp[""]["eval_every"],
                        callbacks=callbacks, identity=exp.identity(), transport=transport,
                        federated_eval=build_evaluation(exp, fed),
                        central_eval=central_evaluation(exp, fed))
    finally:
        close_transport(transport)  # with the workers of a parallel transport it wraps
