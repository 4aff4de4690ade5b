"""IDX parser on hand-written files, and the Fashion-MNIST loader."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from fedmosaic.data import load_fashion_mnist
from fedmosaic.data.loaders import FASHION_MNIST_FILES, read_idx

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
TYPE_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B,
              np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}  # fmt: skip


def idx_bytes(arr: np.ndarray, *, magic: bytes | None = None) -> bytes:
    """Serialize ``arr`` in the IDX format: magic, big-endian uint32 dims, big-endian data."""
    big = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    header = magic if magic is not None else bytes([0, 0, TYPE_CODES[big.dtype], arr.ndim])
    return header + struct.pack(f">{arr.ndim}I", *arr.shape) + big.tobytes()


def write_idx(path: Path, payload: bytes, *, compress: bool = True) -> Path:
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
def test_round_trip(tmp_path: Path, dtype: str, compress: bool) -> None:
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(np.dtype(dtype).newbyteorder("="))
    if dtype == "u1":
        arr = np.abs(arr).astype(np.uint8)
    out = read_idx(write_idx(tmp_path / "a.idx", idx_bytes(arr), compress=compress))
    assert out.shape == (2, 3, 4)
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_expected_magic(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels.gz", idx_bytes(np.arange(3, dtype=np.uint8)))
    assert read_idx(path, expected_magic=0x801).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="magic number 0x00000801, expected 0x00000803"):
        read_idx(path, expected_magic=0x803)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (idx_bytes(np.zeros(3, np.uint8), magic=b"\x01\x00\x08\x01"), "invalid IDX magic"),
        (idx_bytes(np.zeros(3, np.uint8), magic=b"\x00\x00\x07\x01"), "invalid IDX magic"),
        (b"\x00\x00\x08\x00", "invalid IDX magic"),  # zero dimensions
        (b"\x00\x00", "too short"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated IDX header"),
        (idx_bytes(np.zeros((2, 2), np.uint8))[:-1], "truncated"),
        (idx_bytes(np.zeros((2, 2), np.uint8)) + b"\x00", "trailing bytes"),
        (idx_bytes(np.zeros(4, np.dtype(">i4")))[:-2], "truncated: 14 bytes"),
    ],
)
def test_corrupt_files_are_rejected(tmp_path: Path, payload: bytes, message: str) -> None:
    path = write_idx(tmp_path / "bad.gz", payload)
    with pytest.raises(ValueError, match=message) as err:
        read_idx(path)
    assert "bad.gz" in str(err.value)


def test_corrupt_gzip_stream(tmp_path: Path) -> None:
    good = gzip.compress(idx_bytes(np.zeros((50, 50), np.uint8)))
    path = tmp_path / "cut.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt gzip"):
        read_idx(path)


def fake_fashion(root: Path, n_train: int = 5, n_test: int = 3, **override: bytes) -> Path:
    """A tiny Fashion-MNIST folder; ``override`` replaces a file's IDX payload."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)).astype(np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28)).astype(np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    root.mkdir(exist_ok=True)
    for key, arr in arrays.items():
        write_idx(root / FASHION_MNIST_FILES[key], override.get(key, idx_bytes(arr)))
    return root


def test_fashion_loader_on_tiny_files(tmp_path: Path) -> None:
    root = fake_fashion(tmp_path / "fm")
    train, test = load_fashion_mnist(root)
    assert train.x.shape == (5, 1, 28, 28) and test.x.shape == (3, 1, 28, 28)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    raw = read_idx(root / FASHION_MNIST_FILES["train_images"])
    np.testing.assert_allclose(train.x[:, 0], raw / 255.0, rtol=1e-6)
    assert train.y.tolist() == [0, 1, 2, 3, 4]
    limited, _ = load_fashion_mnist(root, limit_train=2)
    assert len(limited) == 2
    np.testing.assert_array_equal(limited.x, train.x[:2])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"train_labels": idx_bytes(np.zeros(4, np.uint8))}, "5 images but .* 4 labels"),
        ({"test_labels": idx_bytes(np.array([0, 10, 1], np.uint8))}, "label 10 outside 0..9"),
        ({"train_images": idx_bytes(np.zeros((5, 27, 28), np.uint8))}, r"\(27, 28\)"),
        ({"train_images": idx_bytes(np.zeros(5, np.uint8))}, "expected 0x00000803"),
    ],
)
def test_fashion_loader_validates_content(
    tmp_path: Path, override: dict[str, bytes], message: str
) -> None:
    root = fake_fashion(tmp_path / "fm", **override)
    with pytest.raises(ValueError, match=message):
        load_fashion_mnist(root)


def test_fashion_missing_folder_or_file_tells_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")
    root = fake_fashion(tmp_path / "fm")
    (root / FASHION_MNIST_FILES["test_labels"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\.gz is missing"):
        load_fashion_mnist(root)


def test_fashion_limit_train_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'limit_train': got 0"):
        load_fashion_mnist(fake_fashion(tmp_path / "fm"), limit_train=0)


@pytest.mark.skipif(
    not FASHION_ROOT.is_dir(),
    reason=f"{FASHION_ROOT} absent (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist() -> None:
    train, test = load_fashion_mnist(FASHION_ROOT)
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.x.dtype == np.float32
    assert float(train.x.min()) == 0.0 and float(train.x.max()) == 1.0
    assert float(test.x.min()) >= 0.0 and float(test.x.max()) <= 1.0
    assert train.label_histogram(10).tolist() == [6000] * 10
    assert test.label_histogram(10).tolist() == [1000] * 10
