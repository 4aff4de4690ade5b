"""Data poisoning (label flipping, the backdoor's training set) and malicious selection."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmosaic.attacks import (
    Backdoor,
    LabelFlip,
    SignFlip,
    choose_malicious,
    malicious_count,
    poison_federation,
    trigger_indices,
)
from fedmosaic.core.errors import ConfigError
from fedmosaic.data import ArrayDataset


def small(n: int = 40, classes: int = 4, dim: int = 16) -> ArrayDataset:
    rng = np.random.default_rng(0)
    return ArrayDataset(rng.uniform(0, 0.5, (n, dim)).astype(np.float32),
                        (np.arange(n) % classes).astype(np.int64))


def test_label_flip_maps_every_class_to_its_mirror():
    data = small()
    out = LabelFlip().poison_data(data, 4, np.random.default_rng(0))
    np.testing.assert_array_equal(out.y, 3 - data.y)
    assert out.x is data.x  # features shared, not copied


def test_targeted_label_flip_changes_only_the_source_class():
    data = small()
    out = LabelFlip(source=1, target=2).poison_data(data, 4, np.random.default_rng(0))
    want = data.y.copy()
    want[want == 1] = 2
    np.testing.assert_array_equal(out.y, want)
    np.testing.assert_array_equal(data.y, np.arange(40) % 4)  # the input is untouched
    with pytest.raises(ConfigError, match="'source'"):
        LabelFlip(source=7, target=0).poison_data(data, 4, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="both source and target"):
        LabelFlip(source=1)
    with pytest.raises(ConfigError, match="other than source"):
        LabelFlip(source=1, target=1)
    with pytest.raises(ConfigError, match="class index"):
        LabelFlip(source=-1, target=1)


def test_trigger_is_the_bottom_right_patch():
    # 64 flat features are an 8x8 image: a 2x2 patch at rows/cols 6-7.
    np.testing.assert_array_equal(trigger_indices((64,), 2), [54, 55, 62, 63])
    # (channels, h, w): the patch on every channel.
    idx = trigger_indices((2, 3, 3), 1)
    np.testing.assert_array_equal(idx, [8, 17])
    np.testing.assert_array_equal(trigger_indices((10,), 2), [6, 7, 8, 9])
    for bad in (9, 0, 1.5, True):
        with pytest.raises(ConfigError, match="trigger_size"):
            trigger_indices((64,), bad)


def test_backdoor_poisoned_data_carry_the_trigger_and_the_target_label():
    data = small()
    attack = Backdoor(target=3, poison_fraction=0.25, trigger_size=2, trigger_value=1.0)
    out = attack.poison_data(data, 4, np.random.default_rng(5))
    patch = trigger_indices((16,), 2)
    triggered = np.all(out.x[:, patch] == 1.0, axis=1)
    assert triggered.sum() == 10  # 25% of 40; clean pixels are < 0.5, so none by chance
    assert np.all(out.y[triggered] == 3)
    np.testing.assert_array_equal(out.y[~triggered], data.y[~triggered])
    np.testing.assert_array_equal(out.x[~triggered], data.x[~triggered])
    others = np.setdiff1d(np.arange(16), patch)
    np.testing.assert_array_equal(out.x[:, others], data.x[:, others])
    assert not np.any(data.x == 1.0)  # the input is untouched
    again = attack.poison_data(data, 4, np.random.default_rng(5))
    np.testing.assert_array_equal(again.x, out.x)


def test_backdoor_triggered_test_set_excludes_the_target_class():
    data = small()
    test = Backdoor(target=0).triggered_test_set(data)
    assert len(test) == 30 and np.all(test.y == 0)
    assert np.all(test.x[:, trigger_indices((16,), 2)] == 1.0)


def test_backdoor_gamma_is_n_over_eta_per_attacker_share():
    assert Backdoor().gamma_for(50, 1) == 50.0  # the paper's n / eta
    assert Backdoor().gamma_for(50, 10) == 5.0  # ten attackers replace the model once
    assert Backdoor(server_lr=0.5).gamma_for(50, 10) == 10.0
    assert Backdoor(gamma=7.0).gamma_for(50, 10) == 7.0
    for key, kwargs in (("poison_fraction", {"poison_fraction": 0}),
                        ("trigger_size", {"trigger_size": 0}),
                        ("trigger_value", {"trigger_value": float("nan")}),
                        ("gamma", {"gamma": -1.0}), ("target", {"target": -2}),
                        ("server_lr", {"server_lr": 0})):
        with pytest.raises(ConfigError, match=key):
            Backdoor(**kwargs)


def test_poison_federation_replaces_only_the_malicious_clients(blobs_fed):
    bad = {"c1", "c4"}
    fed = poison_federation(blobs_fed, LabelFlip(), bad, seed=3)
    for old, new in zip(blobs_fed.clients, fed.clients):
        if old.client_id in bad:
            np.testing.assert_array_equal(new.train.y, 2 - old.train.y)
        else:
            assert new is old  # honest clients' data are the very same objects
    assert fed.test is blobs_fed.test and fed.client_ids == blobs_fed.client_ids
    assert poison_federation(blobs_fed, SignFlip(), bad) is blobs_fed  # no data poisoning
    with pytest.raises(ConfigError, match="malicious"):
        poison_federation(blobs_fed, LabelFlip(), {"nobody"})


def test_choose_malicious_is_seeded_sized_and_order_free():
    ids = [f"client{i:02d}" for i in range(50)]
    chosen = choose_malicious(ids, 0.2, seed=7)
    assert len(chosen) == 10 and chosen <= set(ids)
    assert choose_malicious(list(reversed(ids)), 0.2, seed=7) == chosen
    assert choose_malicious(ids, 0.2, seed=8) != chosen
    assert choose_malicious(ids, 0.0, seed=7) == frozenset()
    assert malicious_count(100, 0.29) == 29 and malicious_count(10, 0.25) == 3
    with pytest.raises(ConfigError, match="fraction"):
        choose_malicious(ids, 1.5, seed=0)
    with pytest.raises(ConfigError, match="at least one"):
        choose_malicious(ids, 0.005, seed=0)
    with pytest.raises(ConfigError, match="seed"):
        choose_malicious(ids, 0.2, seed=-1)
    with pytest.raises(ConfigError, match="distinct"):
        choose_malicious(["a", "a"], 0.5, seed=0)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 300), st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_choose_malicious_size_matches_the_fraction(n, fraction, seed):
    ids = [str(i) for i in range(n)]
    count = malicious_count(n, fraction)
    if fraction > 0 and count == 0:
        with pytest.raises(ConfigError):
            choose_malicious(ids, fraction, seed)
        return
    chosen = choose_malicious(ids, fraction, seed)
    assert len(chosen) == count and abs(count - fraction * n) <= 0.5 + 1e-9
    assert chosen == choose_malicious(ids, fraction, seed)
