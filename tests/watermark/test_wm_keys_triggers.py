import pickle

import numpy as np
import pytest

from fedmosaic.core.errors import ConfigError
from fedmosaic.watermark import TriggerSpec, WatermarkKey, waffle_pattern_triggers

KEY = WatermarkKey(bytes(range(32)))


def test_triggers_are_a_pure_function_of_the_key():
    a = waffle_pattern_triggers(KEY, (64,), 10)
    b = waffle_pattern_triggers(WatermarkKey(bytes(range(32))), (64,), 10)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)


def test_other_keys_give_other_triggers():
    a = waffle_pattern_triggers(KEY, (64,), 10)
    c = waffle_pattern_triggers(WatermarkKey(bytes(range(1, 33))), (64,), 10)
    assert np.abs(a.x - c.x).mean() > 0.1


def test_trigger_set_shape_labels_and_range():
    spec = TriggerSpec(patterns_per_class=2, samples_per_pattern=3, noise=0.2)
    t = waffle_pattern_triggers(KEY, (1, 28, 28), 10, spec)
    assert t.x.shape == (60, 1, 28, 28) and t.x.dtype == np.float32
    assert t.x.min() >= 0.0 and t.x.max() <= 1.0
    # Class-balanced, pattern by pattern: 2 patterns x 3 copies per class.
    np.testing.assert_array_equal(np.bincount(t.y), np.full(10, 6))
    np.testing.assert_array_equal(t.y[:6], 0)
    # Copies of one pattern are closer to each other than to another pattern.
    within = np.abs(t.x[0] - t.x[1]).mean()
    across = np.abs(t.x[0] - t.x[3]).mean()
    assert within < across


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"patterns_per_class": 0}, "watermark.patterns_per_class"),
    ({"samples_per_pattern": True}, "watermark.samples_per_pattern"),
    ({"noise": 1.5}, "watermark.noise"),
    ({"density": 0}, "watermark.density"),
    ({"low": 1.0, "high": 0.0}, "watermark.high"),
])
def test_trigger_spec_validation(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        TriggerSpec(**kwargs)


def test_trigger_inputs_are_validated():
    with pytest.raises(ConfigError, match="num_classes"):
        waffle_pattern_triggers(KEY, (64,), 1)
    with pytest.raises(ConfigError, match="input_shape"):
        waffle_pattern_triggers(KEY, (0, 3), 10)
    with pytest.raises(ConfigError, match="WatermarkKey"):
        waffle_pattern_triggers(b"0" * 32, (64,), 10)  # type: ignore[arg-type]


def test_key_validation_and_no_leak(tmp_path):
    with pytest.raises(ConfigError, match="at least 16"):
        WatermarkKey(b"short")
    with pytest.raises(ConfigError, match="hexadecimal"):
        WatermarkKey.from_hex("zz" * 16)
    with pytest.raises(ConfigError, match="existing key file"):
        WatermarkKey.from_file(tmp_path / "missing")
    secret = bytes(range(32)).hex()
    assert secret not in repr(KEY) and secret not in str(KEY)
    assert KEY.fingerprint in repr(KEY) and len(KEY.fingerprint) == 16
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(KEY)


def test_key_file_round_trip_is_private_and_never_overwritten(tmp_path):
    key = WatermarkKey.generate()
    path = key.save(tmp_path / "wm.key")
    assert (path.stat().st_mode & 0o777) == 0o600
    assert WatermarkKey.from_file(path) == key
    assert WatermarkKey.generate() != key
    with pytest.raises(FileExistsError):
        key.save(path)


def test_derivations_are_separated_by_purpose():
    assert KEY.seed("a") != KEY.seed("b")
    assert KEY.derive("fingerprint", 8).hex() == KEY.fingerprint
