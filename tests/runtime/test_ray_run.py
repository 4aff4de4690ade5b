"""`fedmosaic run` with `[runtime] transport = "ray"` and the user's own data (issue #21): the
workers load each client where they train it, the CLI process never does, and the model is
the sequential transport's. A private local Ray per run (the two-node cluster cases are in
test_ray_cluster.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmosaic.build import driver_federation, loads_on_workers
from fedmosaic.config import load_experiment
from fedmosaic.core.errors import ConfigError
from fedmosaic.data import IID, load_digits, partition

pytest.importorskip("ray")

CLIENTS = [f"c{i}" for i in range(10)]


def _project(root: Path, runtime: str, dataset: str = "custom", extra: str = "") -> Path:
    train, test = load_digits()
    fed = partition(train, IID(), len(CLIENTS), seed=0, test=test, name="digits")
    (root / "data").mkdir(parents=True, exist_ok=True)
    for cid, client in zip(CLIENTS, fed.clients, strict=True):
        np.savez(root / "data" / f"{cid}.npz", x=client.train.x, y=client.train.y)
    np.savez(root / "data" / "test.npz", x=test.x, y=test.y)
    (root / "task.py").write_text(textwrap.dedent(f"""
        import os
        import numpy as np
        from fedmosaic.data import ArrayDataset

        def load_data(client_id):
            with open({str(root / "loads.log")!r}, "a") as fh:
                fh.write(f"{{os.getpid()}} {{client_id}}\\n")
            arrays = np.load({str(root / "data")!r} + f"/{{client_id}}.npz")
            return ArrayDataset(arrays["x"], arrays["y"])

        def load_test():
            arrays = np.load({str(root / "data" / "test.npz")!r})
            return ArrayDataset(arrays["x"], arrays["y"])
    """))
    if dataset == "custom":
        data = (f'dataset = "custom"\nloader = "task:load_data"\nclients = {CLIENTS!r}\n'
                'test_loader = "task:load_test"\nnum_classes = 10\n')
    else:
        files = "\n".join(f'{cid} = "data/{cid}.npz"' for cid in CLIENTS)
        data = f'dataset = "files"\ntest = "data/test.npz"\nnum_classes = 10\n' \
               f'[data.clients]\n{files}\n'
    exp = root / "exp.toml"
    exp.write_text(textwrap.dedent(f"""\
        name = "ray-own-data"
        rounds = 2
        seed = 0
        threads = 1
        [strategy]
        clients_per_round = 6
        [model]
        kind = "mlp"
        hidden = [32]
        [train]
        lr = 0.05
        batch_size = 32
        [runtime]
        {runtime}
        {extra}
        """) + "[data]\n" + data)
    return exp


def _run(exp: Path, out: Path) -> subprocess.CompletedProcess:
    """The CLI in a process of its own; ``.args`` is replaced by its pid."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with subprocess.Popen([sys.executable, "-m", "fedmosaic", "run", str(exp), "-o", str(out)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env) as proc:
        stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.pid, proc.returncode, stdout, stderr)


def _weights(out: Path) -> torch.Tensor:
    state = torch.load(out / "model.pt")
    return torch.cat([v.flatten() for v in state.values()])


@pytest.mark.parametrize("dataset,inner", [("custom", "batched"), ("files", "sequential")])
def test_fedmosaic_run_loads_the_clients_on_the_ray_workers_only(tmp_path, dataset, inner):
    exp = _project(tmp_path / "ray", f'transport = "ray"\nworkers = 2\ninner = "{inner}"',
                   dataset)
    proc = _run(exp, tmp_path / "ray_out")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "loaded on the Ray workers, 10 clients" in proc.stdout
    record = json.loads((tmp_path / "ray_out" / "guarantees.json").read_text())["transport"]
    assert record["transport"] == "ray" and record["workers"] == 2
    assert record["client_data"] == "loaded on the workers"
    if inner == "batched":
        assert record["batching"] == ["batched: a flatten/Linear/ReLU chain on CPU (one bmm per "
                                      "layer; 5-40x faster than sequential on the digits MLP)"]
    if dataset == "custom":
        loads = [line.split() for line in (tmp_path / "ray" / "loads.log").read_text()
                 .splitlines()]
        pids = {int(pid) for pid, _ in loads}
        assert loads and proc.args not in pids, "the CLI process loaded client data"
        assert len(pids) == 2  # the two workers
    seq = _project(tmp_path / "seq", 'transport = "sequential"', dataset)
    proc = _run(seq, tmp_path / "seq_out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.allclose(_weights(tmp_path / "ray_out"), _weights(tmp_path / "seq_out"),
                          atol=1e-5)
    got = json.loads((tmp_path / "ray_out" / "metrics.json").read_text())
    want = json.loads((tmp_path / "seq_out" / "metrics.json").read_text())
    assert [r["updates"] for r in got] == [6, 6]
    assert got[-1]["test_accuracy"] == pytest.approx(want[-1]["test_accuracy"], abs=1e-3)


def test_the_driver_federation_holds_ids_and_the_test_set_only(tmp_path):
    exp = load_experiment(_project(tmp_path, 'transport = "ray"'))
    assert loads_on_workers(exp)
    fed, task = driver_federation(exp)
    assert fed.client_ids == CLIENTS and len(fed.test) > 0 and fed.loaded == {}
    assert task.profile.num_classes == 10 and not (tmp_path / "loads.log").exists()
    assert not loads_on_workers(load_experiment(_project(tmp_path / "s", 'transport = "auto"')))


def test_what_needs_the_clients_data_on_the_driver_is_refused(tmp_path):
    exp = load_experiment(_project(tmp_path, 'transport = "ray"',
                                   extra="secure_aggregation = true"))
    from fedmosaic.build import build_strategy, build_transport

    fed, task = driver_federation(exp)
    with pytest.raises(ConfigError, match=r"secagg_max_weight.*the driver cannot read"):
        build_transport(exp, fed, task.trainer, build_strategy(exp, profile=task.profile))
    attacked = _project(tmp_path / "a", 'transport = "ray"')
    attacked.write_text(attacked.read_text() +
                        '[attack]\nkind = "label_flip"\nfraction = 0.2\n')
    with pytest.raises(ConfigError, match="a Ray run whose workers load the data"):
        driver_federation(load_experiment(attacked))
