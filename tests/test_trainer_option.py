"""``--trainer module:attr`` on ``fedmosaic run`` (and ``server``): the user's own trainer in
place of the experiment's [model], found from the working directory, and kept for resume."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmosaic.cli import app
from fedmosaic.config import TRAINER_FILE, load_experiment, trainer_override

TASK = textwrap.dedent('''
    import fedmosaic as fm
    from torch import nn


    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 10))

        def forward(self, x):
            return self.body(x)


    def make_trainer():
        return fm.TorchTrainer(Wide, lr=0.1, batch_size=32)
''')


def _experiment(path: Path, rounds: int) -> Path:
    path.write_text(textwrap.dedent(f"""\
        name = "trainer-option"
        seed = 1
        rounds = {rounds}

        [data]
        dataset = "digits"

        [partition]
        clients = 4

        [model]
        kind = "logreg"
    """))
    return path


def test_trainer_option_replaces_the_model_and_resume_keeps_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project, elsewhere = tmp_path / "project", tmp_path / "configs"
    project.mkdir()
    elsewhere.mkdir()
    (project / "task.py").write_text(TASK)
    experiment = _experiment(elsewhere / "exp.toml", rounds=2)
    out = tmp_path / "out"
    monkeypatch.chdir(project)
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(experiment), "--output", str(out), "--trainer",
                              "task:make_trainer"])
    assert res.exit_code == 0, res.output
    # Wide has 64*20 + 20 + 20*10 + 10 parameters; the experiment's logreg has 650.
    assert "1,510 parameters" in res.output
    recorded = (out / TRAINER_FILE).read_text().strip()
    assert recorded == f"{(project / 'task.py').resolve()}:make_trainer"
    # The run directory's copy resumes with the same trainer, from any working directory.
    monkeypatch.chdir(tmp_path)
    copy = out / "experiment.toml"
    assert load_experiment(copy)["model"] == {"factory": recorded}
    copy.write_text(copy.read_text().replace("rounds = 2", "rounds = 3"))
    res = runner.invoke(app, ["resume", str(out)])
    assert res.exit_code == 0, res.output
    assert [r["round"] for r in json.loads((out / "metrics.json").read_text())] == [1, 2, 3]
    # Replaced without --trainer: the override is gone with the old run.
    res = runner.invoke(app, ["run", str(experiment), "--output", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (out / TRAINER_FILE).exists() and "650 parameters" in res.output


def test_trainer_option_errors_are_one_line(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "task.py").write_text("make_trainer = 3\n")
    experiment = _experiment(tmp_path / "exp.toml", rounds=1)
    res = CliRunner().invoke(app, ["run", str(experiment), "--output", str(tmp_path / "o"),
                                   "--trainer", "task:make_trainer"])
    assert res.exit_code == 2
    assert "not a Trainer" in res.output and "Traceback" not in res.output


def test_trainer_override_resolution(tmp_path: Path) -> None:
    (tmp_path / "task.py").write_text("")
    assert trainer_override("task:f", tmp_path) == f"{(tmp_path / 'task.py').resolve()}:f"
    assert trainer_override("sub/m.py:f", tmp_path) == f"{(tmp_path / 'sub/m.py').resolve()}:f"
    # Not in the working directory: an installed module, left as given.
    assert trainer_override("tests.net.helpers:slow_trainer", tmp_path) == \
        "tests.net.helpers:slow_trainer"
