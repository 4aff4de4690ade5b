"""Load the user's own objects -- a trainer factory, a data loader -- named by a spec string.

One user-written module (``task.py`` with ``make_trainer()`` and ``load_data(client_id)``)
drives ``fm.simulate``, ``fedmosaic run``, ``fedmosaic server`` and ``fedmosaic client``; the
experiment file names its objects as ``"module:attr"`` (``[model] factory``, ``[data]
loader``) and ``fedmosaic client --trainer`` takes the same form.

A spec is either

* ``"module:attr"``: the module is imported from ``base_dir`` (the experiment file's
  directory, put first on ``sys.path``) or, failing that, from the installed packages; or
* ``"path/to/file.py:attr"``: the file, relative to ``base_dir``; its directory goes first on
  ``sys.path`` so that it can import its siblings.

``attr`` may be dotted (``"task:Models.small"``). Every failure is one ``FedmosaicError`` line
naming the spec and the problem, never a traceback: a data holder reads these messages.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from fedmosaic.core.errors import FedmosaicError
from fedmosaic.train.base import Trainer

__all__ = ["describe", "load_object", "load_trainer", "split_spec"]

TRAINER_PARTS = "a Trainer has spec, initial_weights, full_steps, fit and evaluate"


def describe(obj: Any) -> str:
    """'an int', 'a list', 'None': what a value is, for error messages."""
    if obj is None:
        return "None"
    name = type(obj).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def split_spec(spec: str) -> tuple[str, str]:
    """``(module or file, attr)`` of ``"module:attr"`` / ``"path/file.py:attr"``."""
    if not isinstance(spec, str):
        raise FedmosaicError(f"{spec!r} must be a string 'module:attribute'")
    target, sep, attr = spec.rpartition(":")  # rpartition: a Windows path has a colon too
    if not sep or not target.strip() or not attr.strip() or \
            not all(part.isidentifier() for part in attr.split(".")):
        raise FedmosaicError(f"{spec!r} must be 'module:attribute' or 'path/to/file.py:attribute' "
                             "(e.g. 'task:make_trainer')")
    return target.strip(), attr.strip()


def _is_file_spec(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _first_on_path(directory: Path) -> None:
    """Put ``directory`` first on ``sys.path`` (moved there if present). It stays: the user's
    module may import its siblings lazily, inside ``fit`` or ``load_data``."""
    entry = str(directory)
    if entry in sys.path:
        sys.path.remove(entry)
    sys.path.insert(0, entry)


def _local_file(name: str, base_dir: Path) -> Path | None:
    """The file ``base_dir`` holds for module ``name``'s top-level package, if any."""
    top = name.split(".")[0]
    for candidate in (base_dir / f"{top}.py", base_dir / top / "__init__.py"):
        if candidate.is_file():
            return candidate.resolve()
    return None


def _forget(top: str) -> None:
    """Drop a cached module (and its submodules) of the same name from another directory, so
    that two experiments with a ``task.py`` each get their own."""
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]


def _where(exc: BaseException) -> str:
    """'task.py line 12: ' for the innermost frame in the user's code, if known."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{Path(exc.filename).name} line {exc.lineno}: "
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "importlib" not in f.filename and f.filename != __file__]
    if user:
        return f"{Path(user[-1].filename).name} line {user[-1].lineno}: "
    return ""


def _import_error(spec: str, module: str, exc: BaseException) -> FedmosaicError:
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return FedmosaicError(f"{spec!r}: importing module '{module}' failed: {_where(exc)}"
                          f"{type(exc).__name__}" + (f": {detail}" if detail else ""))


def _import_module(spec: str, name: str, base_dir: Path | None) -> ModuleType:
    if base_dir is not None:
        local = _local_file(name, base_dir)
        top = name.split(".")[0]
        cached = sys.modules.get(top)
        if local is not None and cached is not None:
            cached_file = getattr(cached, "__file__", None)
            if cached_file is None or Path(cached_file).resolve() != local:
                if top in sys.stdlib_module_names or top in sys.builtin_module_names:
                    raise FedmosaicError(f"{spec!r}: {local.name} in {base_dir} has the name of "
                                         f"Python's own module '{top}'; rename it")
                _forget(top)
        _first_on_path(base_dir)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            where = f"in {base_dir} or " if base_dir is not None else ""
            raise FedmosaicError(f"{spec!r}: no module '{name}' {where}among the installed "
                                 "packages") from None
        raise _import_error(spec, name, exc) from None
    except Exception as exc:  # the user's module failed while importing: one line, no trace
        raise _import_error(spec, name, exc) from None


def _import_file(spec: str, path: Path) -> ModuleType:
    if not path.is_file():
        raise FedmosaicError(f"{spec!r}: no such file {path}")
    path = path.resolve()
    stem = path.stem
    if stem.isidentifier() and stem not in sys.stdlib_module_names:
        # Importable under its own name, as "module:attr" would import it.
        return _import_module(spec, stem, path.parent)
    name = "_fedmosaic_user_" + "".join(c if c.isalnum() else "_" for c in str(path))
    if name in sys.modules:
        return sys.modules[name]
    _first_on_path(path.parent)
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise FedmosaicError(f"{spec!r}: {path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise _import_error(spec, path.name, exc) from None
    return module


def load_object(spec: str, base_dir: Path | None = None) -> Any:
    """The object ``spec`` names (see the module docstring); ``FedmosaicError`` otherwise."""
    target, attr = split_spec(spec)
    base = Path(base_dir) if base_dir is not None else None
    if _is_file_spec(target):
        path = Path(target)
        if not path.is_absolute():
            path = (base or Path.cwd()) / path
        module = _import_file(spec, path)
    else:
        if not all(part.isidentifier() for part in target.split(".")):
            raise FedmosaicError(f"{spec!r}: '{target}' is not a module name (a file must end "
                                 "in .py)")
        module = _import_module(spec, target, base)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            where = getattr(module, "__file__", None) or module.__name__
            raise FedmosaicError(f"{spec!r}: {where} has no attribute '{attr}'") from None
    return obj


def load_trainer(spec: str, base_dir: Path | None = None) -> Trainer:
    """The trainer ``spec`` names: a ``Trainer`` instance, or a zero-argument factory (a
    function or class) that returns one."""
    obj = load_object(spec, base_dir)
    if isinstance(obj, Trainer) and not isinstance(obj, type):
        return obj
    if not callable(obj):
        raise FedmosaicError(f"{spec!r} is {describe(obj)}, not a Trainer or a zero-argument "
                             f"factory of one ({TRAINER_PARTS})")
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # some builtins have none: just call
        signature = None
    if signature is not None:
        required = [p.name for p in signature.parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                           p.POSITIONAL_OR_KEYWORD,
                                                           p.KEYWORD_ONLY)]
        if required:
            raise FedmosaicError(f"{spec!r} needs arguments ({', '.join(required)}); a trainer "
                                 "factory is called with none")
    try:
        trainer = obj()
    except Exception as exc:  # the user's factory failed: one line, no trace
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise FedmosaicError(f"{spec!r} raised {_where(exc)}{type(exc).__name__}"
                             + (f": {detail}" if detail else "")) from None
    if not isinstance(trainer, Trainer) or isinstance(trainer, type):
        raise FedmosaicError(f"{spec!r} returned {describe(trainer)}, not a Trainer "
                             f"({TRAINER_PARTS})")
    return trainer
