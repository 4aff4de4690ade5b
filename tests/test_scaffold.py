"""`fedmosaic new PROJECT`: a project that runs at once, and the README's code that works."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmosaic.core.errors import FedmosaicError
from fedmosaic.data import load_heart_disease, load_table
from fedmosaic.scaffold import new_project


def _fedmosaic(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "fedmosaic"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fedmosaic.cli"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "160"})


@pytest.mark.slow  # two real processes: `fedmosaic new`, then `fedmosaic run`
def test_new_then_run_in_the_new_directory(tmp_path):
    made = _fedmosaic("new", "demo-project", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    project = tmp_path / "demo-project"
    assert sorted(p.name for p in project.iterdir()) == ["README.md", "data", "experiment.toml",
                                                         "task.py"]
    run = _fedmosaic("run", "experiment.toml", cwd=project)
    assert run.returncode == 0, run.stderr
    history = json.loads((project / "runs" / "demo-project" / "metrics.json").read_text())
    assert [r["round"] for r in history] == list(range(1, 11))
    assert [r["updates"] for r in history] == [4] * 10
    assert history[-1]["test_accuracy"] > 0.75  # heart disease; the majority class is 0.55


def test_the_data_are_the_heart_disease_hospitals(tmp_path):
    new_project(tmp_path / "p")
    fed = load_heart_disease(seed=0)
    for client in fed.clients:
        ds = load_table(tmp_path / "p" / "data" / f"{client.client_id}.csv", label="disease")
        np.testing.assert_allclose(ds.x, client.train.x, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(ds.y, client.train.y)
    test = load_table(tmp_path / "p" / "data" / "test.csv", label="disease")
    np.testing.assert_array_equal(test.y, fed.test.y)
    text = (tmp_path / "p" / "experiment.toml").read_text()
    assert 'name = "p"' in text and "{{name}}" not in text
    assert "fedmosaic.models" not in (tmp_path / "p" / "task.py").read_text().replace(
        "(fedmosaic.models is not used)", "")


def test_refuses_a_non_empty_directory_and_accepts_an_empty_one(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FedmosaicError) as info:
        new_project(tmp_path / "busy")
    assert str(info.value) == f"{tmp_path / 'busy'} already exists and is not empty; choose a " \
                              "new directory"
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert len(new_project(tmp_path / "empty")) == 3 + 5
    cli = _fedmosaic("new", "busy", cwd=tmp_path)
    assert cli.returncode == 2
    assert "busy already exists and is not empty" in cli.stderr


def test_readme_python_example_runs(tmp_path, monkeypatch):
    project = tmp_path / "demo"
    new_project(project)
    readme = (project / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    try:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
        accuracy = namespace["result"].history[-1]["test_accuracy"]
        assert accuracy > 0.75
    finally:
        sys.modules.pop("task", None)


def test_own_model_guide_code_and_experiments_run(tmp_path, monkeypatch):
    """docs/own-model.md: its task.py, its Python simulation and both experiment files work in
    a project made by `fedmosaic new`, as the guide says."""
    from fedmosaic.build import build_data, build_trainer
    from fedmosaic.config import load_experiment

    guide = (Path(__file__).parent.parent / "docs" / "own-model.md").read_text()
    task_code, simulation = re.findall(r"```python\n(.*?)```", guide, re.S)
    project = tmp_path / "heart"
    new_project(project)
    (project / "task.py").write_text(task_code)  # the guide's task.py replaces the template's
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    try:
        namespace: dict = {}
        exec(compile(simulation, "own-model.md", "exec"), namespace)
        assert namespace["result"].history[-1]["test_accuracy"] > 0.75
        experiments = re.findall(r"```toml\n(.*?)```", guide, re.S)
        assert len(experiments) == 2
        for i, text in enumerate(experiments):
            path = project / f"guide{i}.toml"
            path.write_text(text)
            exp = load_experiment(path)
            fed = build_data(exp)
            assert fed.client_ids == ["cleveland", "hungary", "va_long_beach", "switzerland"]
            assert build_trainer(exp, fed).spec.numel == 16 * 32 + 32 + 32 * 32 + 32 + 32 * 2 + 2
    finally:
        sys.modules.pop("task", None)
