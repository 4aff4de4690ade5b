import pytest
import torch
from torch import nn

from fedmosaic.core import ParamSpec, SpecMismatchError


def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def test_flatten_unflatten_round_trip_keeps_values_and_dtypes():
    model = _bn_model()
    spec = ParamSpec.from_module(model)
    vec = spec.flatten(model.state_dict())
    assert vec.dtype == torch.float32 and vec.shape == (spec.numel,)
    back = spec.unflatten(vec)
    for name, tensor in back.items():
        assert torch.equal(tensor, model.state_dict()[name])


def test_float_buffers_are_federated_integer_buffers_are_not():
    spec = ParamSpec.from_module(_bn_model())
    names = set(spec.names)
    assert "1.running_mean" in names and "1.running_var" in names
    assert "1.num_batches_tracked" not in names
    assert {e.name for e in spec.entries if e.is_buffer} == {"1.running_mean", "1.running_var"}
    # 4*3+3 (linear) + 3+3 (bn affine) + 3+3 (bn stats) + 3*2+2 (linear)
    assert spec.numel == 15 + 6 + 6 + 8


def test_load_into_writes_in_place_without_new_tensors():
    model = _bn_model()
    spec = ParamSpec.from_module(model)
    ptr = model[0].weight.data_ptr()
    vec = torch.arange(spec.numel, dtype=torch.float32)
    spec.load_into(model, vec)
    assert model[0].weight.data_ptr() == ptr
    assert torch.equal(spec.read_from(model), vec)
    # integer buffer untouched
    assert model[1].num_batches_tracked.item() == 0


def test_trainable_only_skips_frozen_parameters_and_buffers():
    model = _bn_model()
    for p in model[0].parameters():
        p.requires_grad_(False)
    spec = ParamSpec.from_module(model, trainable_only=True)
    assert "0.weight" not in spec.names and "1.running_mean" not in spec.names
    assert "2.weight" in spec.names


def test_views_share_memory_with_vector():
    spec = ParamSpec.from_module(nn.Linear(3, 2))
    vec = torch.zeros(spec.numel)
    spec.views(vec)["weight"][0, 0] = 5.0
    assert vec[0] == 5.0


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(8, dtype=torch.float64),
                                 torch.zeros(2, 4)])
def test_wrong_vectors_are_refused(bad):
    spec = ParamSpec.from_module(nn.Linear(3, 2))
    with pytest.raises(SpecMismatchError):
        spec.unflatten(bad)


def test_flatten_refuses_wrong_shapes_and_missing_tensors():
    spec = ParamSpec.from_module(nn.Linear(3, 2))
    with pytest.raises(SpecMismatchError, match="weight"):
        spec.flatten({"weight": torch.zeros(3, 3), "bias": torch.zeros(2)})
    with pytest.raises(SpecMismatchError, match="lacks"):
        spec.flatten({"weight": torch.zeros(2, 3)})


def test_json_round_trip():
    spec = ParamSpec.from_module(_bn_model())
    assert ParamSpec.from_json(spec.to_json()) == spec


def test_mixed_precision_tensors_come_back_in_their_dtype():
    state = {"a": torch.ones(2, dtype=torch.float16), "b": torch.ones(3, dtype=torch.float64),
             "step": torch.tensor(3)}
    spec = ParamSpec.from_state_dict(state)
    assert spec.names == ("a", "b")
    back = spec.unflatten(spec.flatten(state))
    assert back["a"].dtype == torch.float16 and back["b"].dtype == torch.float64
