"""``fedmosaic new PROJECT``: a working project to start from.

It writes ``task.py`` (the user's own ``nn.Module``, ``make_trainer()``, ``load_data`` and
``load_test``), ``experiment.toml`` (``[data] dataset = "files"``, ``[model] factory``,
FedAvg, a ``[server]`` table for deployment), ``README.md`` (simulate, then deploy the same
files) and ``data/*.csv``: real data, the four UCI Heart Disease hospitals as
``fedmosaic.data.load_heart_disease`` prepares them, one training CSV per hospital and a test
CSV. ``fedmosaic run experiment.toml`` in the new directory runs at once, in seconds.

The templates are package data (``fedmosaic/scaffold_template``); the project name replaces
``{{name}}`` in them.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from fedmosaic.core.errors import FedmosaicError

__all__ = ["TEMPLATE_FILES", "new_project"]

TEMPLATE_FILES = ("task.py", "experiment.toml", "README.md")
LABEL = "disease"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _write_csv(path: Path, header: list[str], x: object, y: object) -> None:
    import numpy as np

    x_arr, y_arr = np.asarray(x), np.asarray(y)
    table = np.column_stack([x_arr.astype(np.float64), y_arr.astype(np.float64)])
    # %.7g keeps float32 features exact enough to round-trip; the label is an integer.
    fmt = ["%.7g"] * x_arr.shape[1] + ["%d"]
    np.savetxt(path, table, delimiter=",", header=",".join(header), comments="", fmt=fmt)


def _write_data(data_dir: Path, seed: int = 0) -> list[Path]:
    from fedmosaic.data import load_heart_disease
    from fedmosaic.data.loaders import HEART_DISEASE_FEATURES

    fed = load_heart_disease(seed=seed)
    header = [*HEART_DISEASE_FEATURES, LABEL]
    data_dir.mkdir()
    written = []
    for client in fed.clients:
        path = data_dir / f"{client.client_id}.csv"
        _write_csv(path, header, client.train.x, client.train.y)
        written.append(path)
    assert fed.test is not None  # the heart disease benchmark always has its test set
    test = data_dir / "test.csv"
    _write_csv(test, header, fed.test.x, fed.test.y)
    return [*written, test]


def new_project(project: str | Path) -> list[Path]:
    """Write a new project into the directory ``project`` (created; it must not exist or be
    empty) and return the files written."""
    root = Path(project)
    if root.exists():
        if not root.is_dir():
            raise FedmosaicError(f"{root} exists and is not a directory")
        if any(root.iterdir()):
            raise FedmosaicError(f"{root} already exists and is not empty; choose a new "
                                 "directory")
    name = root.resolve().name
    if not _NAME.fullmatch(name):
        name = "federation"
    root.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        template = resources.files("fedmosaic").joinpath("scaffold_template")
        for filename in TEMPLATE_FILES:
            text = template.joinpath(filename).read_text(encoding="utf-8")
            path = root / filename
            path.write_text(text.replace("{{name}}", name), encoding="utf-8")
            written.append(path)
        written += _write_data(root / "data")
    except BaseException:
        # Leave nothing half-written: the user reruns the same command.
        for path in reversed(written):
            path.unlink(missing_ok=True)
        for leftover in (root / "data",):
            if leftover.is_dir():
                for f in leftover.iterdir():
                    f.unlink()
                leftover.rmdir()
        if not any(root.iterdir()):
            root.rmdir()
        raise
    return written
