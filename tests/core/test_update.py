import math

import pytest
import torch

from fedmosaic.core import ClientUpdate, InvalidUpdateError, validate_update


def _update(**kw):
    base = dict(client_id="h1", delta=torch.zeros(5), num_samples=10, base_round=1)
    base.update(kw)
    return ClientUpdate(**base)


def test_valid_update_passes_and_weight_defaults_to_samples():
    up = validate_update(_update(), numel=5, current_round=1)
    assert up.weight == 10.0
    assert up.nbytes == 20


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"delta": torch.zeros(4)}, "shape (4,)"),
        ({"delta": torch.zeros(5, dtype=torch.float64)}, "dtype"),
        ({"delta": torch.tensor([0.0, math.nan, 0, 0, 0])}, "non-finite"),
        ({"delta": torch.tensor([0.0, math.inf, 0, 0, -math.inf])}, "2 non-finite"),
        ({"delta": [0.0] * 5}, "not a torch.Tensor"),
        ({"num_samples": 0}, "num_samples is 0"),
        ({"num_samples": 2.5}, "not an integer"),
        ({"weight": -1.0}, "weight"),
        ({"weight": math.nan}, "weight"),
        ({"base_round": 7}, "ahead"),
        ({"metrics": {"loss": math.inf}}, "metric 'loss'"),
        ({"metrics": {"loss": "low"}}, "metric 'loss'"),
    ],
)
def test_invalid_updates_name_client_and_problem(kwargs, fragment):
    with pytest.raises(InvalidUpdateError) as info:
        validate_update(_update(**kwargs), numel=5, current_round=1)
    assert "'h1'" in str(info.value)
    assert fragment in str(info.value)


def test_non_update_objects_are_refused():
    with pytest.raises(InvalidUpdateError, match="expected a ClientUpdate"):
        validate_update({"delta": [1]}, numel=1)
