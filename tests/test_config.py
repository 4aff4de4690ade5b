from pathlib import Path

import pytest

from fedmosaic.build import build_strategy
from fedmosaic.config import load_experiment, validate
from fedmosaic.core import ConfigError

# Experiment files; a client's privacy policy (client_policy.toml) is another format, checked
# in tests/net/test_policy.py.
EXAMPLES = sorted(p for p in (Path(__file__).parent.parent / "examples").glob("*.toml")
                  if p.name != "client_policy.toml")


def _base(**sections):
    raw = {"rounds": 3, "data": {"dataset": "digits"}}
    raw.update(sections)
    return raw


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_shipped_examples_validate(path):
    exp = load_experiment(path)
    assert exp[""]["rounds"] >= 1
    build_strategy(exp)


def test_defaults_are_filled_in():
    exp = validate(_base())
    assert exp[""]["seed"] == 0 and exp["partition"]["method"] == "iid"
    assert exp["strategy"]["name"] == "fedavg" and exp["server_opt"]["name"] == "sgd"
    assert exp.output == Path("runs/experiment")


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        ({"data": {"dataset": "mnist"}, "rounds": 1}, "data.dataset", "'heart_disease'"),
        ({"data": {"dataset": "digits"}}, "rounds", "required"),
        (_base(rounds=0), "rounds", ">= 1"),
        (_base(rounds="ten"), "rounds", "integer"),
        (_base(rounds=True), "rounds", "integer"),
        (_base(epochz=3), "epochz", "known keys"),
        (_base(train={"lr": -1}), "train.lr", "> 0"),
        (_base(train={"btach_size": 3}), "train.btach_size", "batch_size"),
        (_base(strategy={"name": "fedsgd"}), "strategy.name", "'fedprox'"),
        (_base(strategy={"fraction": 1.5}), "strategy.fraction", "(0, 1]"),
        (_base(strategy={"fraction": 0.5, "clients_per_round": 3}), "strategy.fraction",
         "only one"),
        (_base(strategy={"mu": 0.1}), "strategy.mu", "fedprox"),
        (_base(server_opt={"name": "fedadam", "momentum": 0.9}), "server_opt.momentum",
         "beta1"),
        (_base(server_opt={"name": "fedadam", "beta2": 1.0}), "server_opt.beta2", "[0, 1)"),
        (_base(partition={"method": "dirichlet", "alpha": 0}), "partition.alpha", "> 0"),
        (_base(model={"kind": "cnn"}), "model.kind", "fashion_mnist"),
        (_base(model={"hidden": [64, -1]}), "model.hidden", "positive integers"),
        ({"rounds": 2, "data": {"dataset": "heart_disease"}, "partition": {"clients": 3}},
         "partition", "natural clients"),
        ({"rounds": 2, "data": {"dataset": "digits", "alpha": 1.0}}, "data.alpha",
         "test_fraction"),
        (_base(data=[1, 2]), "data", "table"),
        (_base(runtime={"transport": "grpc"}), "runtime.transport", "'batched'"),
        (_base(privacy={"mode": "central", "clip": 1.0, "noise_multiplier": 1.0, "rate": 0.1}),
         "privacy.delta", "required"),
        (_base(privacy={"mode": "central", "clip": 1.0, "delta": 1e-5, "rate": 0.1}),
         "privacy.noise_multiplier", "exactly one"),
        (_base(privacy={"mode": "central", "clip": 1.0, "delta": 1e-5, "noise_multiplier": 1.0}),
         "privacy.rate", "poisson"),
        (_base(privacy={"mode": "central", "clip": 1.0, "delta": 1e-5, "noise_multiplier": 1.0,
                        "rate": 0.1}, strategy={"clients_per_round": 5}),
         "strategy.clients_per_round", "poisson"),
        (_base(privacy={"mode": "central", "clip": 1.0, "delta": 1e-5, "noise_multiplier": 1.0,
                        "rate": 0.1}, strategy={"weighting": "uniform"}),
         "strategy.weighting", "equally"),
        (_base(privacy={"mode": "local", "clip": 1.0, "mechanism": "laplace"}),
         "privacy.epsilon", "laplace"),
        (_base(privacy={"mode": "local", "clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}),
         "privacy.delta", "mode 'local'"),
        (_base(runtime={"transport": "batched", "workers": 2}), "runtime.workers",
         "max_clients_per_chunk"),
        (_base(runtime={"transport": "ray", "workers": 0}), "runtime.workers",
         "from 1 to 4096, or 'auto'"),
        (_base(runtime={"transport": "ray", "workers": "many"}), "runtime.workers", "'auto'"),
        (_base(runtime={"transport": "ray", "gpus": -1}), "runtime.gpus", ">= 0"),
        (_base(runtime={"transport": "ray", "runtime_env": "."}), "runtime.runtime_env",
         "working_dir"),
        (_base(runtime={"transport": "parallel", "cpus": 2}), "runtime.cpus",
         "for transport 'parallel' only"),
        (_base(runtime={"device": "gpu"}), "runtime.device", "'cuda'"),
    ],
)
def test_wrong_values_name_key_value_and_allowed(raw, key, fragment):
    with pytest.raises(ConfigError) as info:
        validate(raw)
    assert info.value.key == key
    assert fragment in str(info.value)
    assert f"config key '{key}'" in str(info.value)


def test_unreadable_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="existing"):
        load_experiment(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = [1,\n")
    with pytest.raises(ConfigError, match="valid TOML"):
        load_experiment(bad)


def test_identity_ignores_rounds_output_and_runtime_only():
    a = validate(_base(rounds=3)).identity()
    assert a == validate(_base(rounds=9, output="elsewhere")).identity()
    assert a == validate(_base(runtime={"transport": "batched"})).identity()
    assert a != validate(_base(seed=1)).identity()


def test_privacy_modes_build_the_right_strategy():
    from fedmosaic.privacy.dp_fedavg import DPFedAvg
    from fedmosaic.privacy.local_dp import LocalDP

    central = build_strategy(validate(_base(privacy={
        "mode": "central", "clip": 0.5, "delta": 1e-5, "target_epsilon": 3.0, "rate": 0.2,
        "adaptive_clip_quantile": 0.5})))
    assert isinstance(central, DPFedAvg) and central.planned_rounds == 3
    assert central.min_updates == 0 and central.adaptive_quantile == 0.5
    local = build_strategy(validate(_base(privacy={"mode": "local", "clip": 1.0,
                                                   "noise_multiplier": 2.0})))
    assert local.client_stages == (LocalDP(clip=1.0, noise_multiplier=2.0),)


def test_secure_noise_and_client_metrics_from_config():
    central = {"mode": "central", "clip": 0.5, "delta": 1e-5, "noise_multiplier": 1.0,
               "rate": 0.2}
    # Simulation: seeded noise unless asked; a deployment: secure noise unless refused.
    assert build_strategy(validate(_base(privacy=central))).secure_noise is False
    assert build_strategy(validate(_base(privacy=central)), deployment=True).secure_noise
    on = build_strategy(validate(_base(privacy={**central, "secure_noise": True,
                                                "client_metrics": "suppress"})))
    assert on.secure_noise and on.client_metrics == "suppress"
    off = validate(_base(privacy={**central, "secure_noise": False}))
    assert build_strategy(off).secure_noise is False
    with pytest.raises(ConfigError, match=r"privacy\.secure_noise.*insecure_seeded_noise"):
        build_strategy(off, deployment=True)
    opted_out = validate(_base(privacy={**central, "secure_noise": False,
                                        "insecure_seeded_noise": True}))
    assert build_strategy(opted_out, deployment=True).secure_noise is False
    with pytest.raises(ConfigError, match=r"privacy\.insecure_seeded_noise"):
        validate(_base(privacy={**central, "secure_noise": True,
                                "insecure_seeded_noise": True}))
    with pytest.raises(ConfigError, match=r"privacy\.secure_noise"):
        validate(_base(privacy={**central, "secure_noise": "yes"}))
    with pytest.raises(ConfigError, match=r"privacy\.client_metrics"):
        validate(_base(privacy={**central, "client_metrics": "noised"}))
    local = build_strategy(validate(_base(privacy={"mode": "local", "clip": 1.0,
                                                   "noise_multiplier": 2.0,
                                                   "client_metrics": "suppress"})))
    assert local.client_metrics == "suppress"
    with pytest.raises(ConfigError, match=r"privacy\.secure_noise"):  # clients noise local DP
        validate(_base(privacy={"mode": "local", "clip": 1.0, "noise_multiplier": 2.0,
                                "secure_noise": True}))


def test_secure_aggregation_and_distributed_dp_from_config():
    from fedmosaic.build import build_data, build_strategy, build_trainer, build_transport
    from fedmosaic.privacy.secagg.transport import SecAggPlusTransport

    exp = validate(_base(
        partition={"clients": 6},
        runtime={"secure_aggregation": True, "secagg_clip": 2.0},
        privacy={"mode": "distributed", "clip": 0.5, "delta": 1e-5, "noise_multiplier": 1.0,
                 "rate": 0.5, "min_contributors": 2}))
    fed = build_data(exp)
    trainer = build_trainer(exp, fed)
    transport = build_transport(exp, fed, trainer)
    assert isinstance(transport, SecAggPlusTransport) and transport.max_weight == 1.0
    strategy = build_strategy(exp)
    assert strategy.distributed and strategy.min_contributors == 2
    with pytest.raises(ConfigError, match="secure aggregation"):
        validate(_base(runtime={"secure_aggregation": True},
                       privacy={"mode": "central", "clip": 1.0, "delta": 1e-5,
                                "noise_multiplier": 1.0, "rate": 0.5}))
    with pytest.raises(ConfigError, match="secure_aggregation = true"):
        validate(_base(privacy={"mode": "distributed", "clip": 1.0, "delta": 1e-5,
                                "noise_multiplier": 1.0, "rate": 0.5, "min_contributors": 2}))
    with pytest.raises(ConfigError, match="only with secure_aggregation"):
        validate(_base(runtime={"secagg_clip": 1.0}))


def test_fedmosaic_server_refuses_dp_with_seeded_noise(tmp_path):
    from fedmosaic.net.server import serve
    from fedmosaic.net.settings import DeploySettings

    exp = validate(_base(privacy={"mode": "central", "clip": 0.5, "delta": 1e-5,
                                  "noise_multiplier": 1.0, "rate": 0.2,
                                  "secure_noise": False}))
    # Refused while building the run, before any port is opened or credential read.
    with pytest.raises(ConfigError, match="insecure_seeded_noise"):
        serve(exp, tmp_path / "out", DeploySettings(credentials=tmp_path / "none"))
    assert not (tmp_path / "out").exists()


def test_accountant_conversion_and_orders_from_config_reproduce_a_paper():
    # McMahan et al. 2018, Table 1 (K = 10^5, C = 10^2, z = 1, delta = K^-1.1): after 10^4
    # rounds the paper's 1.18 needs the classic conversion over integer orders.
    central = {"mode": "central", "clip": 1.0, "delta": 1e5 ** -1.1, "noise_multiplier": 1.0,
               "rate": 1e-3, "accountant_conversion": "classic",
               "accountant_orders": "moments_accountant"}
    strategy = build_strategy(validate(_base(privacy=central)))
    acc = strategy.accountant
    assert acc.conversion == "classic" and acc.orders == tuple(float(o) for o in range(2, 34))
    acc.record_gaussian_round(1.0, "poisson", 1e-3, count=10_000)
    assert round(acc.epsilon(strategy.delta), 2) == 1.18
    report = strategy.guarantees()["differential_privacy"]
    assert report["accountant_conversion"] == "classic"
    assert report["epsilon_by_accountant"]["rdp_classic"] == pytest.approx(acc.epsilon(
        strategy.delta))
    assert report["epsilon_by_accountant"]["pld"] < report["epsilon"]
    # Non-default options enter the run identity; defaults leave earlier identities alone.
    described = strategy.describe()
    assert described["accountant_conversion"] == "classic"
    plain = {k: v for k, v in central.items() if not k.startswith("accountant_")}
    assert "accountant_conversion" not in build_strategy(validate(_base(privacy=plain))).describe()
    custom = build_strategy(validate(_base(privacy={**central, "accountant_orders": [2, 4.5]})))
    assert custom.accountant.orders == (2.0, 4.5)


@pytest.mark.parametrize(
    ("extra", "key", "fragment"),
    [
        ({"accountant_conversion": "tight"}, "privacy.accountant_conversion", "'classic'"),
        ({"accountant_orders": "abadi"}, "privacy.accountant_orders", "grid name"),
        ({"accountant_orders": [1.0, 2.0]}, "privacy.accountant_orders", "> 1"),
        ({"accountant_orders": []}, "privacy.accountant_orders", "non-empty"),
        ({"accountant": "pld", "accountant_conversion": "classic"},
         "privacy.accountant_conversion", "only with privacy.accountant = 'rdp'"),
    ],
)
def test_bad_accountant_options_are_refused(extra, key, fragment):
    central = {"mode": "central", "clip": 1.0, "delta": 1e-5, "noise_multiplier": 1.0,
               "rate": 0.1}
    with pytest.raises(ConfigError) as err:
        validate(_base(privacy={**central, **extra}))
    assert err.value.key == key and fragment in str(err.value)


# ------------------------------------------------- [data] files / custom, [model] factory (#10)

FILES = {"dataset": "files", "clients": {"hospital_a": "data/a.csv", "hospital_b": "data/b.npz"},
         "label": "diagnosis"}


def _own(data=None, **sections):
    return {"rounds": 2, "data": data or dict(FILES), **sections}


def test_files_and_factory_validate_without_builtin_defaults():
    exp = validate(_own(model={"factory": "task:make_trainer"}, train={"epochs": 3}))
    assert exp["data"] == FILES
    assert exp["model"] == {"factory": "task:make_trainer"}  # no kind/hidden defaults
    assert exp["train"] == {"epochs": 3}  # only what was given: the rest is the trainer's
    custom = validate(_own({"dataset": "custom", "loader": "task.py:load_data",
                            "clients": ["a", "b"], "test_loader": "task:load_test",
                            "test_fraction": 0.2, "num_classes": 2, "feature_shape": [13]}))
    assert custom["data"]["clients"] == ["a", "b"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_own({"dataset": "files", "label": "y"}),
         "config key 'data.clients': got '<missing>'; allowed: required for dataset 'files': "
         "a table {client id = data file}"),
        (_own({"dataset": "files", "clients": {"a": "a.csv"}}),
         "config key 'data.label': got '<missing>'; allowed: required with .csv/.parquet files "
         "(data.clients.a): the name of the label column"),
        (_own({"dataset": "files", "clients": ["a", "b"], "label": "y"}),
         "config key 'data.clients': got ['a', 'b']; allowed: a table {client id = data file} "
         "for dataset 'files' (a list of ids is for dataset 'custom')"),
        (_own({"dataset": "files", "clients": {"a": "a.npy"}}),
         "config key 'data.clients.a': got 'a.npy'; allowed: a .npz (arrays x and y), .csv or "
         ".parquet file"),
        (_own({"dataset": "files", "clients": {"a": "a.npz"}, "test": "test.txt"}),
         "config key 'data.test': got 'test.txt'; allowed: a .npz (arrays x and y), .csv or "
         ".parquet file"),
        (_own({"dataset": "files", "clients": {"site a": "a.npz"}}),
         "config key 'data.clients': got 'site a'; allowed: client ids of letters, digits, '.', "
         "'_' and '-', starting with a letter or digit, at most 64 characters (each names a "
         "client certificate in deployment)"),
        (_own({**FILES, "features": ["age", "diagnosis"]}),
         "config key 'data.features': got ['age', 'diagnosis']; allowed: feature columns other "
         "than the label column 'diagnosis'"),
        (_own({**FILES, "loader": "task:load"}),
         "config key 'data.loader': got 'task:load'; allowed: for dataset 'files' only: "
         "clients, feature_shape, features, label, num_classes, test, test_fraction"),
        (_own({"dataset": "custom", "clients": ["a"]}),
         "config key 'data.loader': got '<missing>'; allowed: required for dataset 'custom': "
         "'module:attribute' or 'path/to/file.py:attribute' (e.g. 'task:make_trainer')"),
        (_own({"dataset": "custom", "loader": "task:load", "clients": {"a": "a.csv"}}),
         "config key 'data.clients': got {'a': 'a.csv'}; allowed: a list of client ids for "
         "dataset 'custom' (a table of files is for dataset 'files')"),
        (_own({"dataset": "custom", "loader": "task:load", "clients": ["a", "b", "a"]}),
         "config key 'data.clients': got 'a'; allowed: each client id once"),
        (_own({"dataset": "custom", "loader": "task", "clients": ["a"]}),
         "config key 'data.loader': got 'task'; allowed: 'module:attribute' or "
         "'path/to/file.py:attribute' (e.g. 'task:make_trainer')"),
        (_own({**FILES, "feature_shape": [13, 0]}),
         "config key 'data.feature_shape': got [13, 0]; allowed: a non-empty list of positive "
         "integers (one sample's shape, e.g. [13])"),
        (_own(partition={"clients": 3}),
         "config key 'partition': got {'clients': 3}; allowed: no [partition] table: dataset "
         "'files' has its natural clients"),
        (_own(model={"factory": "task:make_trainer", "kind": "mlp"}),
         "config key 'model.kind': got 'mlp'; allowed: not with model.factory (the factory's "
         "trainer builds the model)"),
        (_own(model={"factory": "task:make_trainer", "hidden": [8]}),
         "config key 'model.hidden': got [8]; allowed: not with model.factory (the factory's "
         "trainer builds the model)"),
        (_own(model={"factory": "task:make_trainer"}, train={"optimizer": "adam"}),
         "config key 'train.optimizer': got 'adam'; allowed: not with model.factory (the "
         "factory's trainer builds its own optimizer); [train] may set only lr, epochs, "
         "batch_size, sent to every client each round"),
        (_own(model={"factory": "task:make_trainer"}, runtime={"device": "cuda"}),
         "config key 'runtime.device': got 'cuda'; allowed: not with model.factory (the "
         "factory's trainer chooses its own device)"),
        (_own(model={"factory": "make_trainer"}),
         "config key 'model.factory': got 'make_trainer'; allowed: 'module:attribute' or "
         "'path/to/file.py:attribute' (e.g. 'task:make_trainer')"),
    ],
)
def test_own_data_and_model_errors(raw, message):
    with pytest.raises(ConfigError) as err:
        validate(raw)
    assert str(err.value) == message


def test_client_id_pattern_is_the_certificates():
    from fedmosaic.config import CLIENT_ID
    from fedmosaic.net.certs import CLIENT_ID_PATTERN

    assert CLIENT_ID.pattern == CLIENT_ID_PATTERN.pattern


def test_factory_train_keys_reach_the_clients_fit_config():
    strategy = build_strategy(validate(_base(model={"factory": "task:make_trainer"},
                                             train={"epochs": 3, "lr": 0.2})))
    assert (strategy.local_epochs, strategy.batch_size, strategy.lr) == (3, None, 0.2)
    plain = build_strategy(validate(_base(model={"factory": "task:make_trainer"})))
    assert (plain.local_epochs, plain.batch_size, plain.lr) == (None, None, None)


def test_ray_cluster_keys_validate():
    exp = validate(_base(runtime={
        "transport": "ray", "workers": "auto", "address": "127.0.0.1:6379", "cpus": 0.5,
        "gpus": 0, "memory_mb": 512, "runtime_env": {"working_dir": "."}, "inner": "batched",
        "start_timeout_s": 5, "round_timeout_s": 60}))
    rt = exp["runtime"]
    assert rt["workers"] == "auto" and rt["runtime_env"] == {"working_dir": "."}
    assert rt["inner"] == "batched" and rt["start_timeout_s"] == 5
