"""fedmosaic.task: the user's objects named by "module:attr" or "path/file.py:attr"."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from fedmosaic.core.errors import FedmosaicError
from fedmosaic.net.client import load_trainer as client_load_trainer
from fedmosaic.task import describe, load_object, load_trainer, split_spec
from fedmosaic.train import TorchTrainer

PARTS = "(a Trainer has spec, initial_weights, full_steps, fit and evaluate)"

TASK = '''
import torch
from torch import nn
import fedmosaic as fm

VALUE = "{tag}"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x)


def make_trainer():
    return fm.TorchTrainer(Net, lr=0.1)


TRAINER = make_trainer()


def make_int():
    return 7


def needs_args(width):
    return make_trainer()


def broken():
    raise ValueError("no GPU here")


class Holder:
    trainer = TRAINER


NUMBER = 3
'''


def _write(directory: Path, name: str = "task.py", tag: str = "a", text: str = TASK) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text).replace("{tag}", tag))
    return path


@pytest.fixture(autouse=True)
def _clean_modules():
    """Each test imports its own 'task' module from its own directory."""
    saved = list(sys.path)
    yield
    sys.path[:] = saved
    for name in [n for n in sys.modules if n in ("task", "other_task", "badmod", "sibling")
                 or n.startswith("_fedmosaic_user_")]:
        del sys.modules[name]


def test_module_spec_is_found_in_base_dir(tmp_path):
    _write(tmp_path)
    assert load_object("task:VALUE", tmp_path) == "a"
    trainer = load_trainer("task:make_trainer", tmp_path)
    assert isinstance(trainer, TorchTrainer) and trainer.spec.numel == 3 * 2 + 2


def test_instance_dotted_attr_and_class_are_accepted(tmp_path):
    _write(tmp_path)
    assert isinstance(load_trainer("task:TRAINER", tmp_path), TorchTrainer)
    assert isinstance(load_trainer("task:Holder.trainer", tmp_path), TorchTrainer)


def test_file_spec_relative_to_base_dir(tmp_path):
    _write(tmp_path / "code", name="my-task.py", tag="file")  # not a module name
    assert load_object("code/my-task.py:VALUE", tmp_path) == "file"
    assert isinstance(load_trainer("code/my-task.py:make_trainer", tmp_path), TorchTrainer)


def test_file_spec_imports_its_siblings(tmp_path):
    _write(tmp_path / "pkg", name="sibling.py", text="ANSWER = 42\n")
    _write(tmp_path / "pkg", name="task.py", text="from sibling import ANSWER\n")
    assert load_object("pkg/task.py:ANSWER", tmp_path) == 42


def test_two_experiments_with_a_task_py_each_get_their_own(tmp_path):
    _write(tmp_path / "one", tag="one")
    _write(tmp_path / "two", tag="two")
    assert load_object("task:VALUE", tmp_path / "one") == "one"
    assert load_object("task:VALUE", tmp_path / "two") == "two"
    assert load_object("task:VALUE", tmp_path / "one") == "one"


def test_installed_module_without_base_dir():
    assert load_object("fedmosaic.task:split_spec") is split_spec


@pytest.mark.parametrize("spec", ["task", "task:", ":make", "task:not-an-attr", 3])
def test_malformed_spec(spec):
    with pytest.raises(FedmosaicError) as info:
        load_object(spec)
    if isinstance(spec, str):
        assert str(info.value) == (f"{spec!r} must be 'module:attribute' or "
                                   "'path/to/file.py:attribute' (e.g. 'task:make_trainer')")
    else:
        assert str(info.value) == "3 must be a string 'module:attribute'"


def test_missing_module_names_where_it_looked(tmp_path):
    with pytest.raises(FedmosaicError) as info:
        load_object("nosuchtask:make", tmp_path)
    assert str(info.value) == (f"'nosuchtask:make': no module 'nosuchtask' in {tmp_path} or "
                               "among the installed packages")


def test_missing_file(tmp_path):
    with pytest.raises(FedmosaicError) as info:
        load_object("code/task.py:make", tmp_path)
    assert str(info.value) == f"'code/task.py:make': no such file {tmp_path / 'code/task.py'}"


def test_missing_attribute(tmp_path):
    path = _write(tmp_path)
    with pytest.raises(FedmosaicError) as info:
        load_object("task:make_traner", tmp_path)
    assert str(info.value) == f"'task:make_traner': {path.resolve()} has no attribute 'make_traner'"


def test_import_error_inside_the_users_module_is_one_line(tmp_path):
    _write(tmp_path, name="badmod.py", text="import os\n\nimport torchvisionn\n")
    with pytest.raises(FedmosaicError) as info:
        load_object("badmod:make", tmp_path)
    assert str(info.value) == ("'badmod:make': importing module 'badmod' failed: badmod.py "
                               "line 3: ModuleNotFoundError: No module named 'torchvisionn'")
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_exception_and_syntax_error_at_import(tmp_path):
    _write(tmp_path, name="badmod.py", text="x = 1\ny = {}['k']\n")
    with pytest.raises(FedmosaicError) as info:
        load_object("badmod:x", tmp_path)
    assert str(info.value) == ("'badmod:x': importing module 'badmod' failed: badmod.py line 2: "
                               "KeyError: 'k'")
    _write(tmp_path / "syn", name="badmod.py", text="def f(:\n    pass\n")
    with pytest.raises(FedmosaicError) as info:
        load_object("badmod:f", tmp_path / "syn")
    assert str(info.value).startswith("'badmod:f': importing module 'badmod' failed: badmod.py "
                                      "line 1: SyntaxError: ")


def test_a_module_named_like_the_standard_library_is_refused(tmp_path):
    _write(tmp_path, name="json.py", text="X = 1\n")
    with pytest.raises(FedmosaicError) as info:
        load_object("json:X", tmp_path)
    assert str(info.value) == (f"'json:X': json.py in {tmp_path} has the name of Python's own "
                               "module 'json'; rename it")


def test_factory_returning_something_else(tmp_path):
    _write(tmp_path)
    with pytest.raises(FedmosaicError) as info:
        load_trainer("task:make_int", tmp_path)
    assert str(info.value) == f"'task:make_int' returned an int, not a Trainer {PARTS}"


def test_attribute_that_is_neither_trainer_nor_factory(tmp_path):
    _write(tmp_path)
    with pytest.raises(FedmosaicError) as info:
        load_trainer("task:NUMBER", tmp_path)
    assert str(info.value) == ("'task:NUMBER' is an int, not a Trainer or a zero-argument "
                               f"factory of one {PARTS}")


def test_factory_with_arguments_and_failing_factory(tmp_path):
    _write(tmp_path)
    with pytest.raises(FedmosaicError) as info:
        load_trainer("task:needs_args", tmp_path)
    assert str(info.value) == ("'task:needs_args' needs arguments (width); a trainer factory is "
                               "called with none")
    with pytest.raises(FedmosaicError) as info:
        load_trainer("task:broken", tmp_path)
    assert str(info.value) == "'task:broken' raised task.py line 34: ValueError: no GPU here"


def test_client_load_trainer_delegates(tmp_path, monkeypatch):
    _write(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(client_load_trainer("task:make_trainer"), TorchTrainer)
    with pytest.raises(FedmosaicError, match="returned an int, not a Trainer"):
        client_load_trainer("task:make_int")


def test_describe():
    assert [describe(v) for v in (None, 1, [], object())] == ["None", "an int", "a list",
                                                             "an object"]
