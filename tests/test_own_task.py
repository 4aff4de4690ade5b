"""The user's own model and data through build.py and `fedmosaic run` (issue #10):
build_data / client_data / server_task for [data] dataset = "files" and "custom" with
[model] factory, and a user module with its own nn.Module and a CSV per client run by the CLI.
"""

from __future__ import annotations

import json
import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedmosaic.build import (
    build_data,
    build_strategy,
    build_trainer,
    client_data,
    server_task,
    trainer_factory,
)
from fedmosaic.cli import app
from fedmosaic.config import load_experiment
from fedmosaic.core.errors import ConfigError, FedmosaicError

CLIENTS = ["hospital_a", "hospital_b", "hospital_c"]
FEATURES = ["f0", "f1", "f2", "f3"]

TASK = '''
"""A user's task: its own model (not from fedmosaic.models) and data loaders."""
from pathlib import Path

import torch
from torch import nn

import fedmosaic as fm
from fedmosaic.data import load_table

HERE = Path(__file__).parent


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.value = nn.Linear(4, 12)
        self.gate = nn.Linear(4, 12)
        self.head = nn.Linear(12, {classes})

    def forward(self, x):
        return self.head(torch.tanh(self.value(x)) * torch.sigmoid(self.gate(x)))


def make_trainer():
    return fm.TorchTrainer(GatedNet, lr=0.2, epochs=2, batch_size=8)


def load_data(client_id):
    return load_table(HERE / "data" / f"{{client_id}}.csv", label="diagnosis")


def load_test():
    return load_table(HERE / "data" / "test.csv", label="diagnosis")
'''


def _blobs(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    centers = np.array([[2, 0, 0, 1], [0, 2, 0, -1], [0, 0, 2, 0]], dtype=float)
    x = centers[y] + rng.normal(scale=0.7, size=(n, 4))
    return pd.DataFrame({**{f: x[:, i] for i, f in enumerate(FEATURES)}, "diagnosis": y})


def _project(root: Path, classes: int = 3, **data) -> Path:
    (root / "data").mkdir(parents=True)
    for i, cid in enumerate(CLIENTS):
        _blobs(30 + 6 * i, seed=i).to_csv(root / "data" / f"{cid}.csv", index=False)
    _blobs(45, seed=99).to_csv(root / "data" / "test.csv", index=False)
    (root / "task.py").write_text(textwrap.dedent(TASK).format(classes=classes))
    table = data or {"dataset": "files", "label": "diagnosis", "test": "data/test.csv",
                     "clients": {c: f"data/{c}.csv" for c in CLIENTS}}
    lines = ["[data]"]
    nested = {}
    for key, value in table.items():
        if isinstance(value, dict):
            nested[key] = value
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    for key, value in nested.items():
        lines.append(f"[data.{key}]")
        lines += [f'{k} = "{v}"' for k, v in value.items()]
    text = "\n".join(['name = "own"', "seed = 3", "rounds = 3", "",
                      "[model]", 'factory = "task:make_trainer"', "", *lines, ""])
    (root / "experiment.toml").write_text(text)
    return root / "experiment.toml"


@pytest.fixture(autouse=True)
def _forget_task_module():
    saved = list(sys.path)
    yield
    sys.path[:] = saved
    sys.modules.pop("task", None)


def test_files_build_data_and_client_data_agree(tmp_path):
    exp = load_experiment(_project(tmp_path))
    fed = build_data(exp)
    assert fed.client_ids == CLIENTS and fed.sizes() == {"hospital_a": 30, "hospital_b": 36,
                                                         "hospital_c": 42}
    assert fed.num_classes == 3 and fed.feature_shape == (4,) and len(fed.test) == 45
    # A client process reads only its own file: the others may be absent on its machine.
    (tmp_path / "data" / "hospital_a.csv").unlink()
    mine = client_data(exp, "hospital_b")
    np.testing.assert_array_equal(mine.train.x, fed.client("hospital_b").train.x)
    assert mine.test is None
    with pytest.raises(FedmosaicError) as info:
        client_data(exp, "hospital_z")
    assert str(info.value) == (f"'hospital_z' is not a client of {exp.source} (clients: "
                               "hospital_a, hospital_b, hospital_c)")


def test_custom_loader_equals_files_and_splits_locally(tmp_path):
    files = build_data(load_experiment(_project(tmp_path / "files")))
    sys.modules.pop("task", None)
    exp = load_experiment(_project(tmp_path / "custom", dataset="custom",
                                   loader="task:load_data", clients=CLIENTS,
                                   test_loader="task:load_test", test_fraction=0.25))
    fed = build_data(exp)
    for cid in CLIENTS:
        c, whole = fed.client(cid), files.client(cid).train
        assert len(c.train) + len(c.test) == len(whole)
        one = client_data(exp, cid)  # the client process's view: the same split
        np.testing.assert_array_equal(one.train.x, c.train.x)
        np.testing.assert_array_equal(one.test.y, c.test.y)
    np.testing.assert_array_equal(fed.test.x, files.test.x)


def test_server_task_never_opens_the_clients_files(tmp_path):
    exp = load_experiment(_project(tmp_path))
    for cid in CLIENTS:
        (tmp_path / "data" / f"{cid}.csv").unlink()  # they live on the clients' machines
    task = server_task(exp)
    assert task.data is None and len(task.test) == 45
    assert task.profile.feature_shape == (4,)
    assert task.profile.num_classes == 3  # the user's model has 3 outputs
    assert task.trainer.spec.numel == 2 * (4 * 12 + 12) + 12 * 3 + 3
    with pytest.raises(FedmosaicError, match="no such file"):
        build_data(exp)  # the simulation does need them


def test_server_task_without_a_test_set(tmp_path):
    path = _project(tmp_path, dataset="custom", loader="task:load_data", clients=CLIENTS,
                    feature_shape=[4])
    task = server_task(load_experiment(path))
    assert task.test is None and task.profile.feature_shape == (4,)
    assert task.profile.num_classes == 3  # from the model's outputs
    path.write_text(path.read_text().replace("feature_shape = [4]", "num_classes = 3"))
    task = server_task(load_experiment(path))  # no shape known: no probe of the model
    assert task.profile.feature_shape is None and task.profile.num_classes == 3


def test_server_task_for_builtin_data_keeps_the_federation():
    from fedmosaic.config import validate

    task = server_task(validate({"rounds": 1, "data": {"dataset": "heart_disease"}}))
    assert task.data is not None and task.test is task.data.test
    assert (task.profile.feature_shape, task.profile.num_classes) == ((16,), 2)


@pytest.mark.parametrize(
    ("data", "extra", "message"),
    [
        ({"dataset": "custom", "loader": "task:load_data", "clients": CLIENTS}, "",
         "config key 'data.feature_shape': got '<missing>'; allowed: required for fedmosaic "
         "server with [model] kind and dataset 'custom': the server builds the model without "
         "the clients' data, so give a test set (data.test / data.test_loader) or "
         "data.feature_shape"),
        ({"dataset": "custom", "loader": "task:load_data", "clients": CLIENTS,
          "test_loader": "task:load_test"}, "",
         "config key 'data.num_classes': got '<missing>'; allowed: required for fedmosaic "
         "server with [model] kind and dataset 'custom': the server builds the model without "
         "the clients' data, so give data.num_classes"),
        ({"dataset": "custom", "loader": "task:load_data", "clients": CLIENTS,
          "test_loader": "task:load_test", "num_classes": 3}, "[attack]\nkind = 'gaussian'\n"
         "fraction = 0.3\n",
         "config key 'attack': got 'gaussian'; allowed: no [attack] table for fedmosaic server "
         "with dataset 'custom': a simulated attack poisons the clients' data, which stays on "
         "their machines (run it with fedmosaic run)"),
        ({"dataset": "custom", "loader": "task:load_data", "clients": CLIENTS,
          "test_loader": "task:load_test", "num_classes": 3}, "[robust]\n"
         "aggregator = 'fltrust'\n",
         "config key 'robust.aggregator': got 'fltrust'; allowed: another rule for fedmosaic "
         "server with dataset 'custom': FLTrust's root data set is held out of the clients' "
         "data, which the server does not have"),
        ({"dataset": "custom", "loader": "task:load_data", "clients": CLIENTS,
          "test_loader": "task:load_test", "num_classes": 2}, "",
         "config key 'data.num_classes': got 2; allowed: more than the test set's largest "
         "label, 2"),
    ],
)
def test_server_task_refusals(tmp_path, data, extra, message):
    path = _project(tmp_path, **data)
    text = path.read_text().replace('[model]\nfactory = "task:make_trainer"\n', "")
    path.write_text(text + extra)
    with pytest.raises(ConfigError) as info:
        server_task(load_experiment(path))
    assert str(info.value) == message


def test_feature_shape_must_match_the_data(tmp_path):
    path = _project(tmp_path, dataset="custom", loader="task:load_data", clients=CLIENTS,
                    test_loader="task:load_test", feature_shape=[5])
    with pytest.raises(ConfigError) as info:
        server_task(load_experiment(path))
    assert str(info.value) == ("config key 'data.feature_shape': got [5]; allowed: the shape of "
                               "the data: the test set has 4 features")


def test_server_refuses_a_model_with_fewer_outputs_than_the_test_labels(tmp_path):
    exp = load_experiment(_project(tmp_path, classes=2))
    with pytest.raises(ConfigError) as info:
        server_task(exp)
    assert str(info.value) == ("config key 'model.factory': got 'task:make_trainer'; allowed: "
                               "a model with an output per class: the data has 3 classes "
                               "(labels 0 to 2), the model 2 outputs")


def test_a_model_that_does_not_fit_the_data_is_refused_at_build(tmp_path):
    exp = load_experiment(_project(tmp_path, classes=2))
    fed = build_data(exp)
    with pytest.raises(ConfigError) as info:
        build_trainer(exp, fed)
    assert str(info.value) == ("config key 'model.factory': got 'task:make_trainer'; allowed: "
                               "a model with an output per class: the data has 3 classes "
                               "(labels 0 to 2), the model 2 outputs")
    (tmp_path / "task.py").write_text((tmp_path / "task.py").read_text().replace(
        "nn.Linear(4, 12)", "nn.Linear(7, 12)"))
    sys.modules.pop("task", None)
    with pytest.raises(ConfigError) as info:
        build_trainer(exp, fed)
    assert str(info.value).startswith("config key 'model.factory': got 'task:make_trainer'; "
                                      "allowed: a model that takes the data's 4 features (it "
                                      "raised RuntimeError: ")


def test_trainer_factory_is_picklable_and_loads_where_called(tmp_path):
    exp = load_experiment(_project(tmp_path))
    factory = pickle.loads(pickle.dumps(trainer_factory(exp, build_data(exp))))
    sys.modules.pop("task", None)  # as in a fresh Ray worker
    assert factory().spec.numel == server_task(exp).trainer.spec.numel


def test_secure_aggregation_needs_a_max_weight_without_client_data(tmp_path):
    from fedmosaic.net.server import _secagg_driver

    path = _project(tmp_path)
    path.write_text(path.read_text() + "[runtime]\nsecure_aggregation = true\n")
    exp = load_experiment(path)
    with pytest.raises(ConfigError) as info:
        _secagg_driver(exp, server_task(exp).data, settings=None)
    assert str(info.value) == ("config key 'runtime.secagg_max_weight': got '<missing>'; "
                               "allowed: required with secure aggregation and sample weighting "
                               "when the server does not have the clients' data (dataset "
                               "'files'): the largest sample count a client may claim")
    path.write_text(path.read_text() + "secagg_max_weight = 50.0\n")
    exp = load_experiment(path)
    assert _secagg_driver(exp, None, settings=None) is not None


def test_watermark_triggers_from_the_profile(tmp_path):
    from fedmosaic.watermark.keys import WatermarkKey

    key = tmp_path / "wm.key"
    WatermarkKey.generate().save(key)
    path = _project(tmp_path)
    path.write_text(path.read_text() + f'[watermark]\nkey_file = "{key}"\nmax_epochs = 2\n')
    exp = load_experiment(path)
    task = server_task(exp)
    strategy = build_strategy(exp, task.data, deployment=True, profile=task.profile)
    assert len(strategy.server_stages) == 1


def test_fedmosaic_run_with_own_module_and_a_csv_per_client(tmp_path):
    path = _project(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(path), "--output", str(out)])
    assert result.exit_code == 0, result.output
    history = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in history] == [1, 2, 3]
    assert [r["updates"] for r in history] == [3, 3, 3]
    assert history[-1]["test_accuracy"] > 0.8  # three well-separated classes; chance is 1/3


def test_a_copy_of_the_experiment_elsewhere_finds_the_data_with_base_dir(tmp_path):
    path = _project(tmp_path / "project")
    copy = tmp_path / "run" / "experiment.toml"  # as a run directory holds it
    copy.parent.mkdir()
    copy.write_text(path.read_text())
    with pytest.raises(FedmosaicError) as info:
        build_data(load_experiment(copy))
    assert str(info.value) == f"{tmp_path / 'run' / 'data' / 'test.csv'}: no such file"
    sys.modules.pop("task", None)
    fed = build_data(load_experiment(copy, base_dir=path.parent))
    assert fed.client_ids == CLIENTS


def test_a_run_directory_copy_with_its_recorded_base_dir(tmp_path):
    from fedmosaic.config import BASE_DIR_FILE, record_base_dir

    path = _project(tmp_path / "project")
    run = tmp_path / "runs" / "own"
    run.mkdir(parents=True)
    (run / "experiment.toml").write_text(path.read_text())
    assert record_base_dir(path, run) == run / BASE_DIR_FILE
    exp = load_experiment(run / "experiment.toml")  # what `fedmosaic resume` loads
    assert exp.base_dir == path.parent.resolve()
    assert build_data(exp).client_ids == CLIENTS


def test_model_builder_for_a_factory_and_for_a_kind(tmp_path):
    from fedmosaic.build import model_builder
    from fedmosaic.config import validate

    exp = load_experiment(_project(tmp_path))
    net = model_builder(exp, (4,), 3)()
    assert type(net).__name__ == "GatedNet"
    builtin = validate({"rounds": 1, "data": {"dataset": "digits"}, "model": {"hidden": [8]}})
    assert sum(p.numel() for p in model_builder(builtin, (64,), 10)().parameters()) == \
        64 * 8 + 8 + 8 * 10 + 10
