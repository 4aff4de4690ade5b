import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedmosaic.core.errors import ConfigError
from fedmosaic.watermark import TriggerSpec, WatermarkKey, chance_tail, waffle_pattern_triggers
from fedmosaic.watermark.verify import verdict_from_predictions, verify_watermark

KEY = WatermarkKey(bytes(range(32)))


def test_chance_tail_known_values():
    assert chance_tail(3, 2, 2) == pytest.approx(0.5)  # P[Bin(3, 1/2) >= 2]
    assert chance_tail(10, 10, 10) == pytest.approx(1e-10)
    assert chance_tail(5, 0, 10) == 1.0 and chance_tail(5, 6, 10) == 0.0
    # Far tails do not underflow to 0 through floating-point products.
    assert 0 < chance_tail(100, 100, 10) <= 1e-99


@given(n=st.integers(0, 60), k=st.integers(0, 61), classes=st.integers(2, 12))
def test_chance_tail_is_a_binomial_tail(n, k, classes):
    p = 1 / classes
    tail = chance_tail(n, k, classes)
    assert 0.0 <= tail <= 1.0
    assert chance_tail(n, k + 1, classes) <= tail
    if k <= n:
        pmf = math.comb(n, k) * p**k * (1 - p) ** (n - k)
        assert tail - chance_tail(n, k + 1, classes) == pytest.approx(pmf, abs=1e-12)


def _verdict(predictions, spec=None, threshold=0.5):
    spec = spec or TriggerSpec()
    t = waffle_pattern_triggers(KEY, (64,), 10, spec)
    return verdict_from_predictions(predictions(t), t, num_classes=10, spec=spec,
                                    threshold=threshold, key_fingerprint=KEY.fingerprint)


def test_verdict_for_a_marked_and_an_unmarked_model():
    marked = _verdict(lambda t: t.y.copy())
    assert marked.owned and marked.accuracy == 1.0 and marked.patterns_matched == 10
    assert marked.p_value < 1e-90 and marked.false_claim_probability < 1e-20
    constant = _verdict(lambda t: np.zeros_like(t.y))  # agrees with one class in ten
    assert not constant.owned and constant.accuracy == pytest.approx(0.1)
    assert constant.p_value > 0.4


def test_threshold_is_validated():
    with pytest.raises(ConfigError, match=r"watermark\.threshold"):
        _verdict(lambda t: t.y, threshold=0.0)


def test_verify_accepts_a_module_and_checks_inputs():
    class Oracle(torch.nn.Module):
        """Looks the triggers up: a stand-in for a perfectly watermarked model."""

        def __init__(self) -> None:
            super().__init__()
            t = waffle_pattern_triggers(KEY, (64,), 10)
            self.register_buffer("x", torch.as_tensor(t.x))
            self.register_buffer("y", torch.as_tensor(t.y))

        def forward(self, x):
            idx = torch.cdist(x, self.x).argmin(1)
            return torch.nn.functional.one_hot(self.y[idx], 10).float()

    v = verify_watermark(Oracle(), KEY, input_shape=(64,), num_classes=10)
    assert v.owned and v.accuracy == 1.0
    other = verify_watermark(Oracle(), WatermarkKey(bytes(32 * [7])), input_shape=(64,),
                             num_classes=10)
    assert not other.owned
    with pytest.raises(ConfigError, match="trainer"):
        verify_watermark(torch.zeros(10), KEY, input_shape=(64,), num_classes=10)
    with pytest.raises(ConfigError, match="model"):
        verify_watermark("model.pt", KEY, input_shape=(64,), num_classes=10)  # type: ignore
