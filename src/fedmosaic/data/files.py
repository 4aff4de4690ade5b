"""Client data from files and from the user's own loader.

``load_table`` reads one data set from ``.npz`` (arrays ``x`` and ``y``; pickled objects are
never loaded), ``.csv`` or ``.parquet`` (pandas; a named label column and numeric feature
columns). ``federation_from_files`` and ``federation_from_loader`` build a
``FederatedDataset`` from one file (or one loader call) per client -- the simulation of what
``fedmosaic client`` loads on each data holder's machine (``fedmosaic.build.client_data``).

Everything is validated once, here, with one line naming the file and the problem (a missing
label column lists the columns; a non-numeric feature column, NaN or infinite values and
labels that are not class indices are named with their column), because the person who reads
the message is a data holder, not a framework developer.

``local_test_split`` holds out a seeded, deterministic fraction of one client's data as its
local test split (federated evaluation): it depends only on the seed, the client id and the
data, so a client process and a simulation split the same file the same way.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedmosaic.core.errors import FedmosaicError
from fedmosaic.data.dataset import ArrayDataset, ClientData, FederatedDataset

__all__ = [
    "TABLE_SUFFIXES",
    "as_array_dataset",
    "client_from_loader",
    "federation_from_files",
    "federation_from_loader",
    "load_table",
    "local_test_split",
]

TABLE_SUFFIXES = (".npz", ".csv", ".parquet")
ACCEPTED = ".npz (arrays x and y), .csv or .parquet (a label column and feature columns)"
_MAX_COLUMNS_LISTED = 20

PathLike = str | Path


def _columns(names: Iterable[Any]) -> str:
    names = [str(n) for n in names]
    shown = ", ".join(names[:_MAX_COLUMNS_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_COLUMNS_LISTED else "")


def _rows(n: int) -> str:
    return f"{n} row{'s' if n != 1 else ''}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _non_numeric(values: list[object]) -> object:
    """The first value that is not a number (a text column holds '2' and 'x': 'x')."""
    for v in values:
        if isinstance(v, (bool, int, float)):
            continue
        try:
            float(str(v))
        except ValueError:
            return v
    return values[0] if values else None


def _check_labels(what: str, y: np.ndarray, column: str | None = None) -> np.ndarray:
    """Labels as int64 class indices, or a ``FedmosaicError`` saying why they are not."""
    name = f"label column '{column}'" if column is not None else "y"
    if y.dtype.kind == "b":
        return y.astype(np.int64)
    if y.dtype.kind not in "iuf":
        example = _non_numeric(y.tolist())
        raise FedmosaicError(f"{what}: {name} is not numeric (e.g. {example!r}); labels must be "
                             "class indices 0, 1, ...")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y)
        if bad.any():
            raise FedmosaicError(f"{what}: {name} has missing (NaN) or infinite values in "
                                 f"{_rows(int(bad.sum()))}")
        fractional = y != np.round(y)
        if fractional.any():
            raise FedmosaicError(f"{what}: {name} has non-integer values (e.g. "
                                 f"{float(y[fractional][0]):g}); labels must be class indices "
                                 "0, 1, ...")
    if y.size and y.min() < 0:
        raise FedmosaicError(f"{what}: {name} has negative labels (e.g. {int(y.min())}): "
                             "negative labels are not class indices")
    return y.astype(np.int64)


def _check_features(what: str, x: np.ndarray, names: Sequence[str] | None) -> np.ndarray:
    """Features as float32 with every value finite (after the cast: 1e300 overflows)."""
    if x.dtype.kind not in "iufb":
        raise FedmosaicError(f"{what}: x has dtype {x.dtype}; features must be numbers")
    with np.errstate(over="ignore"):  # overflow to inf is reported just below
        x32 = x.astype(np.float32)
    bad = ~np.isfinite(x32.reshape(len(x32), -1))
    if bad.any():
        col = int(np.flatnonzero(bad.any(axis=0))[0])
        count = int(bad[:, col].sum())
        where = f"feature column '{names[col]}'" if names is not None else f"x feature {col}"
        raise FedmosaicError(f"{what}: {where} has missing (NaN) or infinite values in "
                             f"{_rows(count)}; fill or drop them first")
    return x32


def as_array_dataset(x: Any, y: Any, what: str) -> ArrayDataset:
    """Validated ``ArrayDataset`` of array-likes ``x`` (samples first) and ``y`` (labels);
    ``what`` names the source in errors."""
    try:
        x_arr, y_arr = np.asarray(x), np.asarray(y)
    except (ValueError, TypeError) as exc:
        raise FedmosaicError(f"{what}: x and y must be arrays of numbers "
                             f"({_first_line(exc)})") from None
    if x_arr.ndim < 2:
        raise FedmosaicError(f"{what}: x has shape {x_arr.shape}; it must be (samples, "
                             "features...)")
    if y_arr.ndim != 1:
        raise FedmosaicError(f"{what}: y has shape {y_arr.shape}; it must be (samples,)")
    if len(x_arr) != len(y_arr):
        raise FedmosaicError(f"{what}: x has {len(x_arr)} samples but y has {len(y_arr)}")
    if len(y_arr) == 0:
        raise FedmosaicError(f"{what}: no samples")
    return ArrayDataset(_check_features(what, x_arr, None), _check_labels(what, y_arr))


def _load_npz(path: Path) -> ArrayDataset:
    with path.open("rb") as fh:
        if fh.read(4) != b"PK\x03\x04":  # np.load would try a non-zip file as a pickle
            raise FedmosaicError(f"{path}: not a readable .npz file (not a zip archive; "
                                 "write it with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            if "x" not in names or "y" not in names:
                raise FedmosaicError(f"{path}: an .npz data file needs arrays 'x' and 'y' "
                                     f"(found: {_columns(names) or 'none'})")
            x, y = npz["x"], npz["y"]
    except FedmosaicError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):
            raise FedmosaicError(f"{path}: holds pickled Python objects, which are never "
                                 "loaded (save arrays of numbers)") from None
        raise FedmosaicError(f"{path}: not a readable .npz file ({_first_line(exc)})") from None
    except (OSError, EOFError) as exc:
        raise FedmosaicError(f"{path}: not a readable .npz file ({_first_line(exc)})") from None
    return as_array_dataset(x, y, str(path))


def _read_frame(path: Path, suffix: str) -> Any:
    import pandas as pd

    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        return pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise FedmosaicError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        kind = "CSV" if suffix == ".csv" else "Parquet"
        raise FedmosaicError(f"{path}: not a readable {kind} file ({_first_line(exc)})") from None
    except Exception as exc:  # pyarrow's own errors (ArrowInvalid, ...)
        kind = "CSV" if suffix == ".csv" else "Parquet"
        raise FedmosaicError(f"{path}: not a readable {kind} file ({_first_line(exc)})") from None


def _load_frame(path: Path, suffix: str, label: str | None,
                features: Sequence[str] | None) -> ArrayDataset:
    import pandas as pd

    if label is None:
        raise FedmosaicError(f"{path}: a {suffix} data file needs the name of its label column "
                             "(label = ...)")
    frame = _read_frame(path, suffix)
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    if label not in columns:
        raise FedmosaicError(f"{path}: no label column '{label}' (columns: "
                             f"{_columns(columns)})")
    if features is None:
        names = [c for c in columns if c != label]
        # pandas names a column without a header "Unnamed: N": usually a saved row index,
        # which must not become a feature unnoticed.
        unnamed = [i for i, c in enumerate(columns) if c.startswith("Unnamed: ")]
        if unnamed:
            raise FedmosaicError(f"{path}: column {unnamed[0] + 1} has no name in the header "
                                 "(a saved row index?); name it, drop it, or list the feature "
                                 "columns (features = [...])")
        if not names:
            raise FedmosaicError(f"{path}: no feature columns besides the label '{label}'")
    else:
        names = [str(f) for f in features]
        if not names:
            raise FedmosaicError(f"{path}: features is empty; name at least one column")
        if label in names:
            raise FedmosaicError(f"{path}: the label column '{label}' is also listed as a "
                                 "feature")
        missing = [n for n in names if n not in columns]
        if missing:
            raise FedmosaicError(f"{path}: no feature column '{missing[0]}' (columns: "
                                 f"{_columns(columns)})")
    if len(frame) == 0:
        raise FedmosaicError(f"{path}: no data rows, only a header")
    for name in names:
        col = frame[name]
        if not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
            example = _non_numeric(col.tolist())
            raise FedmosaicError(f"{path}: feature column '{name}' is not numeric (e.g. "
                                 f"{example!r}); encode it as numbers first")
    x = frame[names].to_numpy(dtype=np.float64)
    y = frame[label].to_numpy()
    if y.dtype == object:  # numbers and blanks mixed, or text
        with contextlib.suppress(ValueError, TypeError):
            y = frame[label].astype(np.float64).to_numpy()
    what = str(path)
    return ArrayDataset(_check_features(what, x, names), _check_labels(what, y, label))


def load_table(path: PathLike, *, label: str | None = None,
               features: Sequence[str] | None = None) -> ArrayDataset:
    """One data set from a file: ``.npz`` (arrays ``x`` and ``y``; ``label`` and ``features``
    do not apply) or ``.csv`` / ``.parquet`` (``label`` names the label column, required;
    ``features`` selects the feature columns, by default every other column).

    Raises ``FedmosaicError`` with one line naming the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise FedmosaicError(f"{path}: no such file")
    if path.is_dir():
        raise FedmosaicError(f"{path}: is a directory, not a data file")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        hint = " (save x and y together with numpy.savez)" if suffix == ".npy" else ""
        raise FedmosaicError(f"{path}: unsupported data file type '{path.suffix or path.name}'"
                             f"{hint}; accepted: {ACCEPTED}")
    if path.stat().st_size == 0:
        raise FedmosaicError(f"{path}: the file is empty")
    if suffix == ".npz":
        return _load_npz(path)
    return _load_frame(path, suffix, label, features)


def local_test_split(data: ArrayDataset, fraction: float, seed: int,
                     client_id: str) -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, test)``: a seeded random ``fraction`` of ``data`` held out as the client's
    local test split. Deterministic in ``(seed, client_id, data)``; rows keep their order."""
    if not 0 < fraction < 1:
        raise FedmosaicError(f"test_fraction must be in (0, 1), got {fraction!r}")
    n = len(data)
    n_test = round(n * fraction)
    if n_test < 1 or n - n_test < 1:
        raise FedmosaicError(f"client '{client_id}': {n} samples are too few for test_fraction "
                             f"{fraction:g} (each split needs at least one)")
    # The client id, not its position: a client process knows only its own id.
    rng = np.random.default_rng([int(seed), zlib.crc32(client_id.encode())])
    order = rng.permutation(n)
    return data.subset(np.sort(order[n_test:])), data.subset(np.sort(order[:n_test]))


def _client(client_id: str, train: ArrayDataset, test: ArrayDataset | None,
            test_fraction: float | None, seed: int) -> ClientData:
    if test_fraction is not None:
        if test is not None:
            raise FedmosaicError(f"client '{client_id}' has its own test split; test_fraction "
                                 "would split its data again (give one or the other)")
        train, test = local_test_split(train, test_fraction, seed, client_id)
    return ClientData(client_id, train, test)


def _assemble(clients: list[ClientData], test: ArrayDataset | None, num_classes: int | None,
              name: str, sources: Mapping[str, str]) -> FederatedDataset:
    if not clients:
        raise FedmosaicError(f"{name}: no clients")
    first = clients[0]
    shape = first.train.feature_shape
    parts: list[tuple[str, ArrayDataset]] = []
    for c in clients:
        parts.append((f"client '{c.client_id}' ({sources[c.client_id]})", c.train))
        if c.test is not None:
            parts.append((f"client '{c.client_id}' test split", c.test))
    if test is not None:
        parts.append((f"the test set ({sources.get('', 'test')})", test))
    for what, ds in parts:
        if ds.feature_shape != shape:
            from fedmosaic.compat import describe_shape

            raise FedmosaicError(f"{what} has {describe_shape(ds.feature_shape)}; client "
                                 f"'{first.client_id}' has {describe_shape(shape)}")
    top = max(int(ds.y.max()) for _, ds in parts if len(ds))
    if num_classes is None:
        num_classes = top + 1
    elif num_classes < 1:
        raise FedmosaicError(f"num_classes must be >= 1, got {num_classes}")
    else:
        for what, ds in parts:
            if len(ds) and int(ds.y.max()) >= num_classes:
                raise FedmosaicError(f"{what} has label {int(ds.y.max())}, but num_classes = "
                                     f"{num_classes} (labels 0 to {num_classes - 1})")
    seen: set[str] = set()
    for c in clients:
        if c.client_id in seen:
            raise FedmosaicError(f"{name}: client id '{c.client_id}' appears twice")
        seen.add(c.client_id)
    return FederatedDataset(name=name, clients=clients, test=test, num_classes=num_classes,
                            feature_shape=shape)


def _test_set(test: ArrayDataset | PathLike | tuple[Any, Any] | None, label: str | None,
              features: Sequence[str] | None) -> ArrayDataset | None:
    if test is None or isinstance(test, ArrayDataset):
        return test
    if isinstance(test, (str, Path)):
        return load_table(test, label=label, features=features)
    if isinstance(test, tuple) and len(test) == 2:
        return as_array_dataset(test[0], test[1], "the test set")
    raise FedmosaicError(f"the test set must be a file path, an ArrayDataset or an (x, y) "
                         f"pair, got {type(test).__name__}")


def federation_from_files(
    clients: Mapping[str, PathLike],
    *,
    label: str | None = None,
    features: Sequence[str] | None = None,
    test: ArrayDataset | PathLike | None = None,
    test_fraction: float | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    name: str = "files",
) -> FederatedDataset:
    """A federation with one data file per client (``{client id: path}``; see
    ``load_table`` for the formats, ``label`` and ``features``).

    ``test``: the central test set (a file or an ``ArrayDataset``), or None for none.
    ``test_fraction``: hold out that fraction of each client's data as its local test split
    (``local_test_split``, for federated evaluation). ``num_classes`` defaults to the largest
    label over all clients and the test set, plus one.
    """
    if not clients:
        raise FedmosaicError(f"{name}: no clients (give at least one client id and its file)")
    parts = [_client(str(cid), load_table(path, label=label, features=features), None,
                     test_fraction, seed) for cid, path in clients.items()]
    sources = {str(cid): str(path) for cid, path in clients.items()}
    if isinstance(test, (str, Path)):
        sources[""] = str(test)
    return _assemble(parts, _test_set(test, label, features), num_classes, name, sources)


def client_from_loader(loader: Callable[[str], Any], client_id: str, *,
                       test_fraction: float | None = None, seed: int = 0,
                       what: str | None = None) -> ClientData:
    """One client's ``ClientData`` from ``loader(client_id)``, which returns an
    ``ArrayDataset``, an ``(x, y)`` pair, a ``ClientData`` or a ``(train, test)`` pair of
    ``ArrayDataset``s. ``what`` names the loader in errors (e.g. ``'task:load_data'``)."""
    what = what or getattr(loader, "__qualname__", None) or "the data loader"
    source = f"{what}('{client_id}')"
    try:
        out = loader(client_id)
    except FedmosaicError as exc:
        raise FedmosaicError(f"{source}: {exc}") from None
    except Exception as exc:  # the user's loader failed: one line, no trace
        raise FedmosaicError(f"{source} raised {type(exc).__name__}: "
                             f"{_first_line(exc)}") from None
    test: ArrayDataset | None = None
    if isinstance(out, ClientData):
        if out.client_id != client_id:
            raise FedmosaicError(f"{source} returned the data of client '{out.client_id}'")
        train, test = out.train, out.test
    elif isinstance(out, ArrayDataset):
        train = out
    elif isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], ArrayDataset):
        train, test = out
        if test is not None and not isinstance(test, ArrayDataset):
            raise FedmosaicError(f"{source} returned (train, {type(test).__name__}); the test "
                                 "split must be an ArrayDataset or None")
    elif isinstance(out, tuple) and len(out) == 2:
        train = as_array_dataset(out[0], out[1], source)
    else:
        from fedmosaic.task import describe

        raise FedmosaicError(f"{source} returned {describe(out)}; a loader returns an "
                             "ArrayDataset, an (x, y) pair, a ClientData or a (train, test) "
                             "pair")
    if len(train) == 0:
        raise FedmosaicError(f"{source}: no training samples")
    return _client(client_id, train, test, test_fraction, seed)


def federation_from_loader(
    loader: Callable[[str], Any],
    client_ids: Sequence[str],
    *,
    test: ArrayDataset | tuple[Any, Any] | PathLike | None = None,
    test_fraction: float | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    name: str = "custom",
    what: str | None = None,
) -> FederatedDataset:
    """A federation whose client ``i`` is ``loader(client_ids[i])`` (see
    ``client_from_loader`` for what a loader may return); ``test``, ``test_fraction``,
    ``num_classes`` and ``seed`` as in ``federation_from_files``; ``what`` names the loader
    in errors (default: its qualified name)."""
    ids = [str(c) for c in client_ids]
    if not ids:
        raise FedmosaicError(f"{name}: no clients (give at least one client id)")
    what = what or getattr(loader, "__qualname__", None) or "the data loader"
    parts = [client_from_loader(loader, cid, test_fraction=test_fraction, seed=seed, what=what)
             for cid in ids]
    sources = {cid: f"{what}('{cid}')" for cid in ids}
    return _assemble(parts, _test_set(test, None, None), num_classes, name, sources)
