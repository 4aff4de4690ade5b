"""Batched only where it pays (issue #23): the speed rule, the timed probe, the reason."""

import logging
import warnings
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from torch import nn

import fedmosaic as fm
from fedmosaic.data import ArrayDataset, ClientData, FederatedDataset, partition
from fedmosaic.models import MLP, SmallCNN
from fedmosaic.runtime.batched import BatchedTransport, BatchingFallbackWarning
from tests.conftest import make_blobs


def _images(n: int = 48) -> FederatedDataset:
    rng = np.random.default_rng(0)
    x = rng.random((n, 1, 28, 28), dtype=np.float32)
    data = ArrayDataset(x, rng.integers(0, 10, n).astype(np.int64))
    return partition(data, fm.data.IID(), 4, 0, test=data)


def _blobs(clients: int = 8) -> FederatedDataset:
    return FederatedDataset(
        name="blobs", clients=[ClientData(f"c{i}", make_blobs(24 + 4 * i, seed=i))
                               for i in range(clients)],
        test=make_blobs(40, seed=99), num_classes=3, feature_shape=(5,))


class _TanhNet(nn.Module):
    """Neither a Linear/ReLU chain nor a convolution: no rule covers it, the probe decides."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_convolution_on_cpu_falls_back_with_a_logged_reason_and_equals_sequential(caplog):
    fed = _images()
    tr = fm.TorchTrainer(SmallCNN, lr=0.05, batch_size=16)
    with caplog.at_level(logging.WARNING, logger="fedmosaic.runtime.batched"), \
            pytest.warns(BatchingFallbackWarning, match="convolution"):
        transport = BatchedTransport(tr, fed)
    assert not transport.batched
    assert "features.0" in transport.fallback_reason and "Conv2d" in transport.fallback_reason
    assert transport.decision.startswith("sequential: ")
    lines = [r for r in caplog.records if r.name == "fedmosaic.runtime.batched"]
    assert len(lines) == 1 and "convolution" in lines[0].getMessage()
    got = fm.simulate(tr, fed, fm.FedAvg(fraction=1.0), rounds=2, seed=3, transport=transport)
    want = fm.simulate(fm.TorchTrainer(SmallCNN, lr=0.05, batch_size=16), fed,
                       fm.FedAvg(fraction=1.0), rounds=2, seed=3)
    assert torch.equal(got.weights, want.weights)  # the fallback *is* sequential training


def test_batching_always_forces_vmap_and_gpu_rule_batches_convolutions():
    fed = _images()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BatchingFallbackWarning)
        forced = BatchedTransport(fm.TorchTrainer(SmallCNN, lr=0.05), fed, batching="always")
        # The rule only (nothing runs on the device until the first fit).
        gpu = BatchedTransport(fm.TorchTrainer(SmallCNN, lr=0.05), fed, device="cuda")
    assert forced.batched and "forced" in forced.decision
    assert gpu.batched and "cuda" in gpu.decision


def test_linear_chain_on_cpu_batches_by_rule():
    with warnings.catch_warnings():
        warnings.simplefilter("error", BatchingFallbackWarning)
        transport = BatchedTransport(fm.TorchTrainer(lambda: MLP(5, [8], 3), lr=0.1), _blobs())
    assert transport.batched and "chain" in transport.decision
    assert not transport._timing_pending


def test_bad_batching_value_is_refused():
    with pytest.raises(ValueError, match="batching"):
        BatchedTransport(fm.TorchTrainer(lambda: MLP(5, [8], 3)), _blobs(), batching="never")


def _clock(seq_seconds: float, batched_seconds: float):
    """perf_counter stand-in: the probe reads it twice per timed part (start, end)."""
    ticks = iter([0.0, seq_seconds, 0.0, batched_seconds])
    return lambda: next(ticks)


@pytest.mark.parametrize("batched_slower", [True, False])
def test_timed_probe_decides_once_and_results_equal_sequential(batched_slower, caplog):
    fed = _blobs(8)
    tr = fm.TorchTrainer(_TanhNet, lr=0.1, batch_size=8)
    transport = BatchedTransport(tr, fed)
    assert transport.batched and transport._timing_pending
    assert transport.decision.startswith("pending")
    # 8 clients: 2 timed sequentially, 6 batched; per-step seconds make the verdict certain.
    transport._clock = _clock(1e-6, 1e3) if batched_slower else _clock(1e3, 1e-6)
    warns = pytest.warns(BatchingFallbackWarning, match="slower") if batched_slower \
        else nullcontext()
    with caplog.at_level(logging.WARNING, logger="fedmosaic.runtime.batched"), warns:
        got = fm.simulate(tr, fed, fm.FedAvg(fraction=1.0), rounds=3, seed=4,
                          transport=transport)
    want = fm.simulate(fm.TorchTrainer(_TanhNet, lr=0.1, batch_size=8), fed,
                       fm.FedAvg(fraction=1.0), rounds=3, seed=4)
    torch.testing.assert_close(got.weights, want.weights, rtol=1e-5, atol=1e-6)
    assert not transport._timing_pending  # decided once (the clock has no more ticks)
    warned = [r for r in caplog.records if r.name == "fedmosaic.runtime.batched"]
    if batched_slower:
        assert not transport.batched and "slower" in transport.fallback_reason
        assert "ms per client step" in transport.decision and len(warned) == 1
    else:
        assert transport.batched and transport.decision.startswith("batched: timed")
        assert not warned
