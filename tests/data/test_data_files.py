"""fedmosaic.data.files: the user's own data files and loaders, and every bad-input message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmosaic.core.errors import FedmosaicError
from fedmosaic.data import (
    ArrayDataset,
    ClientData,
    client_from_loader,
    federation_from_files,
    federation_from_loader,
    load_table,
    local_test_split,
)

ACCEPTED = ".npz (arrays x and y), .csv or .parquet (a label column and feature columns)"


def _frame(n: int = 20, seed: int = 0, classes: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"age": rng.normal(50, 10, n), "chol": rng.normal(200, 30, n),
                         "smoker": rng.integers(0, 2, n),
                         "label": np.arange(n) % classes})


def _csv(path: Path, frame: pd.DataFrame) -> Path:
    frame.to_csv(path, index=False)
    return path


def _fails(path, message: str, **kwargs) -> None:
    with pytest.raises(FedmosaicError) as info:
        load_table(path, **kwargs)
    assert str(info.value) == message


# ---------------------------------------------------------------- reading each format


def test_csv_all_other_columns_are_features(tmp_path):
    frame = _frame()
    ds = load_table(_csv(tmp_path / "a.csv", frame), label="label")
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.feature_shape == (3,)
    np.testing.assert_allclose(ds.x, frame[["age", "chol", "smoker"]].to_numpy(), rtol=1e-6)
    np.testing.assert_array_equal(ds.y, frame["label"].to_numpy())


def test_csv_selected_features_in_the_given_order(tmp_path):
    frame = _frame()
    ds = load_table(_csv(tmp_path / "a.csv", frame), label="label", features=["smoker", "age"])
    np.testing.assert_allclose(ds.x, frame[["smoker", "age"]].to_numpy(), rtol=1e-6)


def test_parquet_and_npz_read_the_same_data(tmp_path):
    frame = _frame()
    frame.to_parquet(tmp_path / "a.parquet")
    from_parquet = load_table(tmp_path / "a.parquet", label="label")
    np.savez(tmp_path / "a.npz", x=frame[["age", "chol", "smoker"]].to_numpy(),
             y=frame["label"].to_numpy())
    from_npz = load_table(tmp_path / "a.npz")
    np.testing.assert_array_equal(from_parquet.x, from_npz.x)
    np.testing.assert_array_equal(from_parquet.y, from_npz.y)


def test_whole_float_labels_and_boolean_labels_are_class_indices(tmp_path):
    frame = _frame()
    frame["label"] = frame["label"].astype(float)
    assert load_table(_csv(tmp_path / "f.csv", frame), label="label").y.dtype == np.int64
    frame["label"] = frame["label"] > 0
    assert set(load_table(_csv(tmp_path / "b.csv", frame), label="label").y) == {0, 1}


# ---------------------------------------------------------------- every error, exactly


def test_missing_file_directory_and_unsupported_suffix(tmp_path):
    _fails(tmp_path / "none.csv", f"{tmp_path / 'none.csv'}: no such file", label="y")
    _fails(tmp_path, f"{tmp_path}: is a directory, not a data file")
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    _fails(tmp_path / "x.npy", f"{tmp_path / 'x.npy'}: unsupported data file type '.npy' (save "
           f"x and y together with numpy.savez); accepted: {ACCEPTED}")
    (tmp_path / "x.txt").write_text("1 2 3\n")
    _fails(tmp_path / "x.txt", f"{tmp_path / 'x.txt'}: unsupported data file type '.txt'; "
           f"accepted: {ACCEPTED}")


def test_empty_file_and_header_only(tmp_path):
    (tmp_path / "e.csv").write_text("")
    _fails(tmp_path / "e.csv", f"{tmp_path / 'e.csv'}: the file is empty", label="y")
    (tmp_path / "h.csv").write_text("a,b,y\n")
    _fails(tmp_path / "h.csv", f"{tmp_path / 'h.csv'}: no data rows, only a header", label="y")


def test_binary_content_is_not_csv(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"\x93NUMPY\x01\x00\xff\xfe\x00\x00binary")
    with pytest.raises(FedmosaicError) as info:
        load_table(path, label="y")
    assert str(info.value).startswith(f"{path}: not a readable CSV file (")
    assert "\n" not in str(info.value)
    (tmp_path / "bad.parquet").write_text("not parquet at all")
    with pytest.raises(FedmosaicError) as info:
        load_table(tmp_path / "bad.parquet", label="y")
    assert str(info.value).startswith(f"{tmp_path / 'bad.parquet'}: not a readable Parquet file")


def test_label_column_required_and_must_exist(tmp_path):
    path = _csv(tmp_path / "a.csv", _frame())
    _fails(path, f"{path}: a .csv data file needs the name of its label column (label = ...)")
    _fails(path, f"{path}: no label column 'diagnosis' (columns: age, chol, smoker, label)",
           label="diagnosis")


def test_feature_selection_errors(tmp_path):
    path = _csv(tmp_path / "a.csv", _frame())
    _fails(path, f"{path}: no feature column 'bmi' (columns: age, chol, smoker, label)",
           label="label", features=["age", "bmi"])
    _fails(path, f"{path}: the label column 'label' is also listed as a feature",
           label="label", features=["age", "label"])
    only = _csv(tmp_path / "only.csv", _frame()[["label"]])
    _fails(only, f"{only}: no feature columns besides the label 'label'", label="label")


def test_an_unnamed_column_is_not_taken_for_a_feature(tmp_path):
    frame = _frame()
    path = tmp_path / "indexed.csv"
    frame.to_csv(path)  # pandas writes the row index as a column without a name
    _fails(path, f"{path}: column 1 has no name in the header (a saved row index?); name it, "
           "drop it, or list the feature columns (features = [...])", label="label")
    ds = load_table(path, label="label", features=["age", "chol"])
    assert ds.feature_shape == (2,)


def test_non_numeric_feature_column_is_named(tmp_path):
    frame = _frame()
    frame["sex"] = ["male", "female"] * 10
    path = _csv(tmp_path / "a.csv", frame)
    _fails(path, f"{path}: feature column 'sex' is not numeric (e.g. 'male'); encode it as "
           "numbers first", label="label")


def test_the_example_is_the_first_value_that_is_not_a_number(tmp_path):
    # A column of numbers with one typo is read as text: name the typo, not a number.
    path = tmp_path / "typo.csv"
    path.write_text("a,b,label\n1,2,0\n3,x,1\n4,5,1\n")
    _fails(path, f"{path}: feature column 'b' is not numeric (e.g. 'x'); encode it as "
           "numbers first", label="label")
    path.write_text("a,b,label\n1,2,0\n3,4,1\n4,5,z\n")
    _fails(path, f"{path}: label column 'label' is not numeric (e.g. 'z'); labels must be "
           "class indices 0, 1, ...", label="label")


def test_nan_and_inf_say_which_column_and_how_many_rows(tmp_path):
    frame = _frame()
    frame.loc[[2, 5, 7], "chol"] = np.nan
    path = _csv(tmp_path / "a.csv", frame)
    _fails(path, f"{path}: feature column 'chol' has missing (NaN) or infinite values in 3 rows; "
           "fill or drop them first", label="label")
    frame = _frame()
    frame.loc[4, "age"] = 1e300  # finite in float64, infinite in float32
    path = _csv(tmp_path / "b.csv", frame)
    _fails(path, f"{path}: feature column 'age' has missing (NaN) or infinite values in 1 row; "
           "fill or drop them first", label="label")
    frame = _frame()
    frame.loc[[1, 3], "label"] = np.nan
    path = _csv(tmp_path / "c.csv", frame)
    _fails(path, f"{path}: label column 'label' has missing (NaN) or infinite values in 2 rows",
           label="label")


def test_labels_that_are_not_class_indices(tmp_path):
    frame = _frame()
    frame.loc[3, "label"] = -1
    path = _csv(tmp_path / "neg.csv", frame)
    _fails(path, f"{path}: label column 'label' has negative labels (e.g. -1): negative labels "
           "are not class indices", label="label")
    frame = _frame()
    frame["label"] = frame["label"] + 0.5
    path = _csv(tmp_path / "frac.csv", frame)
    _fails(path, f"{path}: label column 'label' has non-integer values (e.g. 0.5); labels must "
           "be class indices 0, 1, ...", label="label")
    frame = _frame()
    frame["label"] = ["yes", "no"] * 10
    path = _csv(tmp_path / "text.csv", frame)
    _fails(path, f"{path}: label column 'label' is not numeric (e.g. 'yes'); labels must be "
           "class indices 0, 1, ...", label="label")


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "a.npz", features=np.zeros((3, 2)), labels=np.zeros(3))
    _fails(tmp_path / "a.npz", f"{tmp_path / 'a.npz'}: an .npz data file needs arrays 'x' and "
           "'y' (found: features, labels)")
    np.savez(tmp_path / "p.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    _fails(tmp_path / "p.npz", f"{tmp_path / 'p.npz'}: holds pickled Python objects, which are "
           "never loaded (save arrays of numbers)")
    np.savez(tmp_path / "n.npz", x=np.array([[1.0, np.nan], [np.inf, 2], [0, 0]]),
             y=np.array([0, 1, 1]))
    _fails(tmp_path / "n.npz", f"{tmp_path / 'n.npz'}: x feature 0 has missing (NaN) or "
           "infinite values in 1 row; fill or drop them first")
    np.savez(tmp_path / "neg.npz", x=np.zeros((3, 2)), y=np.array([0, -2, 1]))
    _fails(tmp_path / "neg.npz", f"{tmp_path / 'neg.npz'}: y has negative labels (e.g. -2): "
           "negative labels are not class indices")
    np.savez(tmp_path / "len.npz", x=np.zeros((3, 2)), y=np.array([0, 1]))
    _fails(tmp_path / "len.npz", f"{tmp_path / 'len.npz'}: x has 3 samples but y has 2")
    np.savez(tmp_path / "flat.npz", x=np.zeros(3), y=np.array([0, 1, 1]))
    _fails(tmp_path / "flat.npz", f"{tmp_path / 'flat.npz'}: x has shape (3,); it must be "
           "(samples, features...)")
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip archive")
    with pytest.raises(FedmosaicError, match=r"junk\.npz: not a readable \.npz file"):
        load_table(tmp_path / "junk.npz")


# ---------------------------------------------------------------- federations


def _hospitals(tmp_path: Path, n: int = 3) -> dict[str, Path]:
    return {f"h{i}": _csv(tmp_path / f"h{i}.csv", _frame(20 + 5 * i, seed=i))
            for i in range(n)}


def test_federation_from_files(tmp_path):
    files = _hospitals(tmp_path)
    test = _csv(tmp_path / "test.csv", _frame(10, seed=9))
    fed = federation_from_files(files, label="label", test=test)
    assert fed.client_ids == ["h0", "h1", "h2"] and fed.sizes() == {"h0": 20, "h1": 25, "h2": 30}
    assert fed.num_classes == 3 and fed.feature_shape == (3,) and len(fed.test) == 10
    assert all(c.test is None for c in fed.clients)
    no_test = federation_from_files(files, label="label", num_classes=5)
    assert no_test.test is None and no_test.num_classes == 5


def test_test_fraction_gives_local_splits_that_match_a_client_process(tmp_path):
    files = _hospitals(tmp_path)
    fed = federation_from_files(files, label="label", test_fraction=0.2, seed=4)
    for cid, path in files.items():
        client = fed.client(cid)
        whole = load_table(path, label="label")
        assert len(client.train) + len(client.test) == len(whole)
        assert len(client.test) == round(0.2 * len(whole))
        train, test = local_test_split(whole, 0.2, 4, cid)  # what one client process does
        np.testing.assert_array_equal(train.x, client.train.x)
        np.testing.assert_array_equal(test.y, client.test.y)
    other = federation_from_files(files, label="label", test_fraction=0.2, seed=5)
    assert not np.array_equal(other.client("h1").test.x, fed.client("h1").test.x)


def test_local_test_split_needs_a_sample_on_each_side():
    tiny = ArrayDataset.create(np.zeros((2, 1)), np.array([0, 1]))
    with pytest.raises(FedmosaicError) as info:
        local_test_split(tiny, 0.1, 0, "a")
    assert str(info.value) == ("client 'a': 2 samples are too few for test_fraction 0.1 (each "
                               "split needs at least one)")


def test_federation_errors_name_the_client(tmp_path):
    files = _hospitals(tmp_path, 2)
    files["wide"] = _csv(tmp_path / "wide.csv", _frame().assign(extra=1.0))
    with pytest.raises(FedmosaicError) as info:
        federation_from_files(files, label="label")
    assert str(info.value) == (f"client 'wide' ({files['wide']}) has 4 features; client 'h0' "
                               "has 3 features")
    with pytest.raises(FedmosaicError) as info:
        federation_from_files(_hospitals(tmp_path, 2), label="label", num_classes=2)
    assert str(info.value) == (f"client 'h0' ({tmp_path / 'h0.csv'}) has label 2, but "
                               "num_classes = 2 (labels 0 to 1)")
    with pytest.raises(FedmosaicError) as info:
        federation_from_files({}, label="label")
    assert str(info.value) == "files: no clients (give at least one client id and its file)"


def test_federation_from_loader_accepts_every_return_form(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), np.arange(30) % 2

    def loader(cid: str):
        part = slice(0, 10) if cid == "a" else slice(10, 20) if cid == "b" else slice(20, 30)
        ds = ArrayDataset.create(x[part], y[part])
        return {"a": (x[part], y[part]), "b": ds,
                "c": ClientData("c", ds.subset(np.arange(7)), ds.subset(np.arange(7, 10))),
                "d": (ds.subset(np.arange(6)), ds.subset(np.arange(6, 10)))}[cid]

    fed = federation_from_loader(loader, ["a", "b", "c", "d"], test=(x[:5], y[:5]))
    assert fed.sizes() == {"a": 10, "b": 10, "c": 7, "d": 6}
    assert len(fed.client("c").test) == 3 and len(fed.client("d").test) == 4
    assert fed.client("a").test is None and len(fed.test) == 5 and fed.num_classes == 2
    split = federation_from_loader(loader, ["a", "b"], test_fraction=0.3)
    assert len(split.client("a").test) == 3


def test_loader_errors(tmp_path):
    def bad(cid: str):
        if cid == "boom":
            raise OSError("disk not mounted")
        if cid == "int":
            return 5
        if cid == "nan":
            return np.array([[np.nan], [1.0]]), np.array([0, 1])
        return ClientData("someone_else", ArrayDataset.create(np.zeros((2, 1)), [0, 1]))

    cases = {
        "boom": "task:load_data('boom') raised OSError: disk not mounted",
        "int": "task:load_data('int') returned an int; a loader returns an ArrayDataset, an "
               "(x, y) pair, a ClientData or a (train, test) pair",
        "nan": "task:load_data('nan'): x feature 0 has missing (NaN) or infinite values in 1 "
               "row; fill or drop them first",
        "other": "task:load_data('other') returned the data of client 'someone_else'",
    }
    for cid, message in cases.items():
        with pytest.raises(FedmosaicError) as info:
            client_from_loader(bad, cid, what="task:load_data")
        assert str(info.value) == message

    def with_test(cid: str):
        ds = ArrayDataset.create(np.zeros((4, 1)), [0, 1, 0, 1])
        return ds, ds

    with pytest.raises(FedmosaicError) as info:
        federation_from_loader(with_test, ["a"], test_fraction=0.5)
    assert str(info.value) == ("client 'a' has its own test split; test_fraction would split "
                               "its data again (give one or the other)")
