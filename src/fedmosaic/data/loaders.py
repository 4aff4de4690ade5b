"""Dataset loaders: small bundled/local datasets and a synthetic federated benchmark."""

from __future__ import annotations

import csv
import gzip
import math
import os
import struct
import zlib
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from fedmosaic.core.errors import ConfigError
from fedmosaic.data.dataset import ArrayDataset, ClientData, FederatedDataset
from fedmosaic.data.partition import _client_names

__all__ = [
    "FASHION_MNIST_FILES",
    "HEART_DISEASE_FEATURES",
    "HEART_DISEASE_HOSPITALS",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_heart_disease",
    "read_heart_disease_table",
    "read_idx",
    "synthetic_fedprox",
]


def _is_real(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _check_fraction(key: str, value: float) -> float:
    if not _is_real(value) or not 0 < value < 1:
        raise ConfigError(key, value, "a number strictly between 0 and 1")
    return float(value)


# --------------------------------------------------------------------------- digits


# The default split's indices, as scikit-learn's train_test_split(test_size=0.2,
# random_state=0, stratify=y) draws them (a test checks they still agree). Shipping them spares
# the common case the sklearn import: about a second and 100 MB of memory per process.
_DIGITS_DEFAULT_SPLIT = (0.2, 0, "digits_split_test0.2_seed0.npz")


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits exactly as ``sklearn.datasets.load_digits`` returns them, read from
    the CSV that scikit-learn ships, without importing scikit-learn."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the digits data set comes with scikit-learn: pip install "
                                  "scikit-learn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets/data/digits.csv.gz"
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",")
    if table.shape != (1797, 65):
        raise ValueError(f"{path} has shape {table.shape}, expected (1797, 65)")
    return table[:, :-1], table[:, -1].astype(np.int64)


def load_digits(test_size: float = 0.2, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), as (train, test).

    Pixels (0..16) are scaled to [0, 1]; ``x`` has shape ``(n, 64)``. The split is stratified
    by label with ``train_test_split(random_state=seed)``: 1,437 train / 360 test by default.
    """
    test_size = _check_fraction("test_size", test_size)
    x, y = _digits_arrays()
    if (test_size, seed) == _DIGITS_DEFAULT_SPLIT[:2]:
        with resources.files("fedmosaic.data").joinpath(
            "resources", _DIGITS_DEFAULT_SPLIT[2]
        ).open("rb") as fh:
            split = np.load(fh)
            train_idx, test_idx = split["train"].astype(np.int64), split["test"].astype(np.int64)
    else:
        # Imported here: scikit-learn takes a second to import and most runs never need it.
        from sklearn.model_selection import train_test_split

        train_idx, test_idx = train_test_split(
            np.arange(len(y)), test_size=test_size, random_state=seed, stratify=y
        )
    x = x / 16.0
    return (ArrayDataset.create(x[train_idx], y[train_idx]),
            ArrayDataset.create(x[test_idx], y[test_idx]))


# --------------------------------------------------------------------------- IDX / Fashion-MNIST

# IDX type codes (third magic byte) -> big-endian numpy dtypes, per the MNIST file format.
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_FASHION_HINT = "install the files with `apt-get install dataset-fashion-mnist`"
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


def _read_maybe_gzip(path: Path) -> bytes:
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: corrupt gzip stream ({exc})") from exc


def read_idx(path: str | os.PathLike[str], expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (the MNIST container format), gzip-compressed or not.

    Header: two zero bytes, a type code, the number of dimensions ``d``, then ``d``
    big-endian uint32 sizes; the data follow in big-endian C order. The magic number
    (first four bytes as a big-endian int), the type code and the exact data length are
    validated; ``ValueError`` names the file and the problem. Returns a native-endian array.
    """
    p = Path(path)
    raw = _read_maybe_gzip(p)
    if len(raw) < 4:
        raise ValueError(f"{p}: {len(raw)} bytes is too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{p}: invalid IDX magic number 0x{magic:08x}")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"{p}: IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{p}: truncated IDX header ({len(raw)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = math.prod(dims)
    expected = count * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        kind = "truncated" if actual < expected else "has trailing bytes"
        raise ValueError(
            f"{p}: IDX data {kind}: {actual} bytes for dims {dims}, expected {expected}"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def _fashion_split(root: Path, images_key: str, labels_key: str) -> ArrayDataset:
    paths = {k: root / FASHION_MNIST_FILES[k] for k in (images_key, labels_key)}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(f"Fashion-MNIST file {path} is missing; {_FASHION_HINT}")
    images = read_idx(paths[images_key], expected_magic=_IDX_IMAGES_MAGIC)
    labels = read_idx(paths[labels_key], expected_magic=_IDX_LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{paths[images_key]}: images are {images.shape[1:]}, expected (28, 28)")
    if len(images) != len(labels):
        raise ValueError(
            f"{paths[images_key]} has {len(images)} images but {paths[labels_key]} has "
            f"{len(labels)} labels"
        )
    if labels.size and int(labels.max()) > 9:
        raise ValueError(f"{paths[labels_key]}: label {int(labels.max())} outside 0..9")
    x = images.astype(np.float32)[:, None, :, :]
    x /= 255.0
    return ArrayDataset(x, labels.astype(np.int64))


def load_fashion_mnist(
    root: str | os.PathLike[str] = "/usr/share/datasets/fashion-mnist",
    limit_train: int | None = None,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, arXiv:1708.07747) as (train, test).

    Reads the four gzip IDX files under ``root`` (60,000 train / 10,000 test images).
    ``x`` is float32 in [0, 1] with shape ``(n, 1, 28, 28)``. ``limit_train`` keeps only the
    first that many train samples (the file order is already shuffled).
    """
    if limit_train is not None and (
        isinstance(limit_train, bool) or not isinstance(limit_train, int) or limit_train < 1
    ):
        raise ConfigError("limit_train", limit_train, "None or an integer >= 1")
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder {base} does not exist; {_FASHION_HINT}")
    train = _fashion_split(base, "train_images", "train_labels")
    test = _fashion_split(base, "test_images", "test_labels")
    if limit_train is not None and limit_train < len(train):
        train = ArrayDataset(train.x[:limit_train].copy(), train.y[:limit_train].copy())
    return train, test


# --------------------------------------------------------------------------- heart disease

# (client id, value of the `dataset` column, number of patients), in client order.
HEART_DISEASE_HOSPITALS: tuple[tuple[str, str, int], ...] = (
    ("cleveland", "Cleveland", 304),
    ("hungary", "Hungary", 293),
    ("va_long_beach", "VA Long Beach", 200),
    ("switzerland", "Switzerland", 123),
)
_HEART_COLUMNS = (
    "age", "sex", "dataset", "cp", "trestbps", "chol", "fbs", "restecg", "thalch", "exang",
    "oldpeak", "num",
)  # fmt: skip
_HEART_NUMERIC = ("age", "trestbps", "chol", "thalch", "oldpeak")
_HEART_BOOLEAN: dict[str, dict[str, float]] = {
    "sex": {"male": 1.0, "female": 0.0},
    "fbs": {"true": 1.0, "false": 0.0},
    "exang": {"true": 1.0, "false": 0.0},
}
_HEART_CATEGORICAL: dict[str, tuple[str, ...]] = {
    "cp": ("typical angina", "atypical angina", "non-anginal", "asymptomatic"),
    "restecg": ("normal", "st-t abnormality", "lv hypertrophy"),
}
HEART_DISEASE_FEATURES: tuple[str, ...] = (
    "age", "sex_male",
    "cp_typical_angina", "cp_atypical_angina", "cp_non_anginal", "cp_asymptomatic",
    "trestbps", "chol", "chol_missing", "fbs",
    "restecg_normal", "restecg_st_t_abnormality", "restecg_lv_hypertrophy",
    "thalch", "exang", "oldpeak",
)  # fmt: skip
_HEART_ROWS = sum(h[2] for h in HEART_DISEASE_HOSPITALS)


def _heart_csv_path() -> Any:
    return resources.files("fedmosaic.data").joinpath("resources", "heart_disease_uci.csv")


def read_heart_disease_table(
    path: str | os.PathLike[str] | None = None,
) -> dict[str, np.ndarray]:
    """Parse and validate the UCI Heart Disease table (the copy shipped with fedmosaic by default).

    Returns one float64 array per column (NaN = missing; booleans as 0/1; ``cp``/``restecg``
    as category codes in the order of ``_HEART_CATEGORICAL``; ``dataset`` as the hospital
    position in ``HEART_DISEASE_HOSPITALS``). Raises ``ValueError`` if columns are missing,
    a value cannot be parsed, or the row count or hospitals differ from the 920-patient,
    4-hospital original.
    """
    source = Path(path) if path is not None else _heart_csv_path()
    hospital_code = {h[1]: i for i, h in enumerate(HEART_DISEASE_HOSPITALS)}
    with source.open("r", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in _HEART_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{source}: corrupt heart disease table, missing columns {missing}")
        cols: dict[str, list[float]] = {c: [] for c in _HEART_COLUMNS}
        for line, row in enumerate(reader, start=2):
            for c in _HEART_COLUMNS:
                raw = (row.get(c) or "").strip()
                try:
                    cols[c].append(_parse_heart_value(c, raw, hospital_code))
                except (ValueError, KeyError):
                    raise ValueError(
                        f"{source}: line {line}: bad value {raw!r} in column '{c}'"
                    ) from None
    table = {c: np.asarray(v, dtype=np.float64) for c, v in cols.items()}
    n = len(table["num"])
    if n != _HEART_ROWS:
        raise ValueError(f"{source}: corrupt heart disease table, {n} rows, expected {_HEART_ROWS}")
    counts = np.bincount(table["dataset"].astype(np.int64), minlength=len(HEART_DISEASE_HOSPITALS))
    expected = [h[2] for h in HEART_DISEASE_HOSPITALS]
    if counts.tolist() != expected:
        raise ValueError(
            f"{source}: corrupt heart disease table, patients per hospital {counts.tolist()}, "
            f"expected {expected} for {[h[1] for h in HEART_DISEASE_HOSPITALS]}"
        )
    return table


def _parse_heart_value(column: str, raw: str, hospital_code: dict[str, int]) -> float:
    """One cell as a float (NaN = missing); ``ValueError`` if it is not a valid value."""
    if column == "dataset":
        if raw not in hospital_code:
            raise ValueError(raw)
        return float(hospital_code[raw])
    if column == "num":
        value = int(raw)  # the target must be present and a whole number
        if value < 0:
            raise ValueError(raw)
        return float(value)
    if raw == "":
        return math.nan
    if column in _HEART_BOOLEAN:
        return _HEART_BOOLEAN[column][raw.lower()]  # KeyError handled by the caller
    if column in _HEART_CATEGORICAL:
        return float(_HEART_CATEGORICAL[column].index(raw))
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


def _most_frequent(values: np.ndarray) -> float:
    present = values[~np.isnan(values)]
    uniq, counts = np.unique(present, return_counts=True)
    return float(uniq[np.argmax(counts)])  # ties -> smallest value, deterministic


def load_heart_disease(test_fraction: float = 0.3, seed: int = 0) -> FederatedDataset:
    """UCI Heart Disease: 920 patients from 4 hospitals, one client per hospital.

    This is the Fed-Heart-Disease task of FLamby (Ogier du Terrail et al. 2022, "FLamby:
    Datasets and Benchmarks for Cross-Silo Federated Learning in Realistic Healthcare
    Settings", NeurIPS Datasets and Benchmarks). Data: Janosi, Steinbrunn, Pfisterer and
    Detrano (1988), UCI Machine Learning Repository, CC BY 4.0, doi:10.24432/C52P4X; the
    table ships inside the package (``fedmosaic/data/resources``).

    Clients, in order: ``cleveland`` (304), ``hungary`` (293), ``va_long_beach`` (200),
    ``switzerland`` (123). Preprocessing:

    * target: ``num > 0`` (any angiographic disease), 2 classes;
    * features (16, see ``HEART_DISEASE_FEATURES``): age, sex, cp (one-hot, 4), trestbps,
      chol, a 0/1 ``chol_missing`` indicator, fbs, restecg (one-hot, 3), thalch, exang,
      oldpeak. ``slope``, ``ca`` and ``thal`` are dropped: they are mostly missing outside
      Cleveland;
    * ``chol == 0`` means "not measured" (all of Switzerland, part of VA) and is treated as
      missing, as is the physiologically impossible ``trestbps == 0`` (one record);
    * each hospital is split into train/test, stratified by target, with ``test_fraction``
      and ``seed``; the global test set is the four hospital test sets concatenated;
    * missing numeric values get the median, missing booleans/categories the most frequent
      value, and the numeric columns (age, trestbps, chol, thalch, oldpeak) are standardized;
      all these statistics come from the pooled train rows only. Pooling across hospitals
      is a convenience of the benchmark (FLamby likewise applies a fixed preprocessing);
      a strictly federated pipeline would compute them with a federated protocol.

    Features are float32 of shape ``(n, 16)``.
    """
    from sklearn.model_selection import train_test_split  # slow import, see load_digits

    test_fraction = _check_fraction("test_fraction", test_fraction)
    t = read_heart_disease_table()
    hospital = t["dataset"].astype(np.int64)
    target = (t["num"] > 0).astype(np.int64)

    chol_missing = (np.isnan(t["chol"]) | (t["chol"] == 0)).astype(np.float64)
    numeric = {c: t[c].copy() for c in _HEART_NUMERIC}
    numeric["chol"][chol_missing == 1] = np.nan
    numeric["trestbps"][numeric["trestbps"] == 0] = np.nan

    # Per-hospital stratified split; each hospital gets its own derived seed so that the
    # splits are independent yet fully determined by `seed`.
    seeds = np.random.default_rng(seed).integers(0, 2**31 - 1, size=len(HEART_DISEASE_HOSPITALS))
    splits: list[tuple[np.ndarray, np.ndarray]] = []
    for h in range(len(HEART_DISEASE_HOSPITALS)):
        rows = np.flatnonzero(hospital == h)
        tr, te = train_test_split(
            rows, test_size=test_fraction, random_state=int(seeds[h]), stratify=target[rows]
        )
        splits.append((np.sort(tr), np.sort(te)))
    train_rows = np.concatenate([s[0] for s in splits])

    columns: list[np.ndarray] = []

    def add_numeric(name: str) -> None:
        col = numeric[name]
        col[np.isnan(col)] = float(np.nanmedian(col[train_rows]))
        mean = float(col[train_rows].mean())
        std = float(col[train_rows].std())
        columns.append((col - mean) / (std if std > 0 else 1.0))

    def add_boolean(name: str) -> None:
        col = t[name].copy()
        col[np.isnan(col)] = _most_frequent(col[train_rows])
        columns.append(col)

    def add_one_hot(name: str) -> None:
        col = t[name].copy()
        col[np.isnan(col)] = _most_frequent(col[train_rows])
        codes = col.astype(np.int64)
        columns.extend(
            (codes == k).astype(np.float64) for k in range(len(_HEART_CATEGORICAL[name]))
        )

    add_numeric("age")
    add_boolean("sex")
    add_one_hot("cp")
    add_numeric("trestbps")
    add_numeric("chol")
    columns.append(chol_missing)
    add_boolean("fbs")
    add_one_hot("restecg")
    add_numeric("thalch")
    add_boolean("exang")
    add_numeric("oldpeak")
    features = np.stack(columns, axis=1).astype(np.float32)

    def rows_to_dataset(rows: np.ndarray) -> ArrayDataset:
        return ArrayDataset(features[rows], target[rows])

    clients = [
        ClientData(HEART_DISEASE_HOSPITALS[h][0], rows_to_dataset(tr), rows_to_dataset(te))
        for h, (tr, te) in enumerate(splits)
    ]
    return FederatedDataset(
        name="heart_disease",
        clients=clients,
        test=ArrayDataset.concat([c.test for c in clients if c.test is not None]),
        num_classes=2,
        feature_shape=(features.shape[1],),
    )


# --------------------------------------------------------------------------- synthetic

# The lognormal sample-size tail is very heavy (a few devices would get tens of thousands
# of samples), so sizes are capped; the bulk of the distribution (median ~105) is unchanged.
_SYNTHETIC_MAX_SAMPLES = 1000


def synthetic_fedprox(
    alpha: float,
    beta: float,
    num_devices: int = 30,
    dim: int = 60,
    num_classes: int = 10,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> FederatedDataset:
    """Synthetic(alpha, beta) of Li et al. (2020), "Federated Optimization in Heterogeneous
    Networks" (FedProx), MLSys; after Shamir, Srebro and Zhang (2014).

    For device ``k``: ``u_k ~ N(0, alpha)``, ``B_k ~ N(0, beta)``; ``W_k ~ N(u_k, 1)``
    (``num_classes x dim``), ``b_k ~ N(u_k, 1)``; ``v_k ~ N(B_k, 1)`` per coordinate;
    ``x ~ N(v_k, Sigma)`` with diagonal ``Sigma_jj = j^-1.2``; ``y = argmax(W_k x + b_k)``
    (softmax is monotone, so it does not change the argmax). In the paper ``alpha`` is meant
    to control how much local models differ and ``beta`` how much local inputs differ; like
    the reference generator, both are used as standard deviations. Note that ``u_k`` shifts
    every entry of ``W_k`` and ``b_k`` alike, which adds the same amount to every class
    logit: for a given seed, ``alpha`` changes neither inputs nor labels, and the
    heterogeneity comes from ``beta`` and from the independent draws of ``W_k``, ``b_k``
    and ``v_k``. Samples per device follow the LEAF
    power law ``floor(lognormal(4, 2)) + 50``, capped at 1000. Each device's samples are
    i.i.d., so its last ``round(test_fraction * n)`` samples form its local test set; the
    global test set concatenates them. Clients are ``device_00``, ``device_01``, ...
    """
    for key, value in (("alpha", alpha), ("beta", beta)):
        if not _is_real(value) or not (math.isfinite(value) and value >= 0):
            raise ConfigError(key, value, "a finite number >= 0")
    for key, count in (("num_devices", num_devices), ("dim", dim), ("num_classes", num_classes)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(key, count, "an integer >= 1")
    test_fraction = _check_fraction("test_fraction", test_fraction)

    rng = np.random.default_rng(seed)
    sizes = np.minimum(
        rng.lognormal(4.0, 2.0, num_devices).astype(np.int64) + 50, _SYNTHETIC_MAX_SAMPLES
    )
    std_x = np.arange(1, dim + 1, dtype=np.float64) ** -0.6  # sqrt(j^-1.2)
    u = rng.normal(0.0, alpha, num_devices)
    big_b = rng.normal(0.0, beta, num_devices)
    clients: list[ClientData] = []
    for cid, n, u_k, b_mean in zip(
        _client_names(num_devices, "device_"), sizes, u, big_b, strict=True
    ):
        w = rng.normal(u_k, 1.0, (num_classes, dim))
        b = rng.normal(u_k, 1.0, num_classes)
        v = rng.normal(b_mean, 1.0, dim)
        x = v + rng.standard_normal((int(n), dim)) * std_x
        y = np.argmax(x @ w.T + b, axis=1)
        n_test = max(1, round(test_fraction * int(n)))
        data = ArrayDataset.create(x, y)
        n_train = len(data) - n_test
        clients.append(
            ClientData(
                cid,
                data.subset(np.arange(n_train)),
                data.subset(np.arange(n_train, len(data))),
            )
        )
    return FederatedDataset(
        name=f"synthetic_{alpha:g}_{beta:g}",
        clients=clients,
        test=ArrayDataset.concat([c.test for c in clients if c.test is not None]),
        num_classes=num_classes,
        feature_shape=(dim,),
    )


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., Any]] = {
    "digits": load_digits,
    "fashion_mnist": load_fashion_mnist,
    "heart_disease": load_heart_disease,
    "synthetic": synthetic_fedprox,
}


def load_dataset(name: str, **kwargs: Any) -> tuple[ArrayDataset, ArrayDataset] | FederatedDataset:
    """Load a dataset by name, passing ``kwargs`` to its loader.

    ``digits`` and ``fashion_mnist`` return centralized ``(train, test)`` pairs (split them
    with :func:`fedmosaic.data.partition`); ``heart_disease`` and ``synthetic`` return a
    naturally federated :class:`FederatedDataset`.
    """
    try:
        loader = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; allowed: {', '.join(sorted(_REGISTRY))}"
        ) from None
    result: tuple[ArrayDataset, ArrayDataset] | FederatedDataset = loader(**kwargs)
    return result
