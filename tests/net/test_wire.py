"""Wire format: chunked tensors, fit settings and client stages round-trip exactly, and every
malformed input is refused (hypothesis property tests), plus the settings and data loaders."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmosaic.config import validate
from fedmosaic.core.errors import ConfigError, FedmosaicError
from fedmosaic.net.client import Backoff, ServerUnreachableError, load_npz
from fedmosaic.net.proto import fedmosaic_pb2 as pb
from fedmosaic.net.settings import DeploySettings
from fedmosaic.net.wire import (
    BufferPool,
    ChunkAssembler,
    WireError,
    fit_config_from_wire,
    fit_config_to_wire,
    iter_chunks,
    stage_from_wire,
    stage_to_wire,
)
from fedmosaic.privacy.local_dp import DistributedNoiseShare, LocalDP
from fedmosaic.train.base import FitConfig

finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=30, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=300), chunk_values=st.integers(1, 64))
def test_chunks_reassemble_exactly(values: list[float], chunk_values: int) -> None:
    vector = torch.tensor(values, dtype=torch.float32)
    chunk_bytes = 4 * chunk_values
    chunks = list(iter_chunks(vector, chunk_bytes))
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    # Raw little-endian float32 bytes, nothing else.
    assert b"".join(c.data for c in chunks) == vector.numpy().astype("<f4").tobytes()
    asm = ChunkAssembler(torch.empty(len(values)), len(values), chunk_bytes)
    for chunk in chunks:
        asm.add(chunk)
    assert torch.equal(asm.finish(), vector)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(8, 200), chunk_values=st.integers(1, 16), data=st.data())
def test_reordered_dropped_or_duplicated_chunks_are_refused(n: int, chunk_values: int,
                                                            data: st.DataObject) -> None:
    chunks = list(iter_chunks(torch.arange(n, dtype=torch.float32), 4 * chunk_values))
    sequence = data.draw(st.lists(st.sampled_from(range(len(chunks))), max_size=len(chunks) + 2))
    asm = ChunkAssembler(torch.empty(n), n, 4 * chunk_values)
    if sequence == list(range(len(chunks))):
        for i in sequence:
            asm.add(chunks[i])
        asm.finish()
        return
    with pytest.raises(WireError):
        for i in sequence:
            asm.add(chunks[i])
        asm.finish()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_chunks_are_refused(bad: float) -> None:
    values = np.zeros(8, dtype="<f4")
    values[5] = bad
    asm = ChunkAssembler(torch.zeros(8), 8, 64)
    with pytest.raises(WireError, match="non-finite"):
        asm.add(pb.TensorChunk(offset=0, data=values.tobytes()))
    assert asm.filled == 0 and torch.equal(asm.buffer, torch.zeros(8))  # nothing written


def test_buffer_pool_bounds_the_buffers_in_flight() -> None:
    pool = BufferPool(numel=10, slots=2)
    with pool.slot(1.0) as a, pool.slot(1.0) as b:
        assert a.data_ptr() != b.data_ptr()
        with pytest.raises(TimeoutError), pool.slot(0.05):
            pass
    seen: set[int] = set()

    def use() -> None:
        with pool.slot(5.0) as buf:
            seen.add(buf.data_ptr())

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) <= 2  # reused, never more than ``slots`` allocations


@settings(max_examples=30, deadline=None)
@given(round_num=st.integers(1, 10**6), epochs=st.none() | st.integers(1, 50),
       batch=st.none() | st.integers(1, 4096), steps=st.none() | st.integers(1, 10**5),
       lr=st.none() | st.floats(1e-6, 10), mu=st.floats(0, 10), seed=st.integers(0, 2**32 - 1))
def test_fit_config_round_trips(round_num: int, epochs: int | None, batch: int | None,
                                steps: int | None, lr: float | None, mu: float,
                                seed: int) -> None:
    config = FitConfig(round=round_num, epochs=epochs, batch_size=batch, max_steps=steps, lr=lr,
                       proximal_mu=mu, seed=seed, extra={"x": 1.5})
    wire = pb.FitSettings.FromString(fit_config_to_wire(config).SerializeToString())
    assert fit_config_from_wire(wire) == config


def test_impossible_fit_settings_are_refused() -> None:
    with pytest.raises(WireError):
        fit_config_from_wire(pb.FitSettings(round=1, epochs=0))
    with pytest.raises(WireError):
        fit_config_from_wire(pb.FitSettings(round=1, lr=float("nan")))


@pytest.mark.parametrize("stage", [
    LocalDP(clip=1.0, noise_multiplier=0.5),
    LocalDP(clip=2.0, mechanism="laplace", epsilon=3.0),
    DistributedNoiseShare(clip=0.5, noise_std=0.1),
])
def test_client_stages_round_trip(stage: object) -> None:
    wire = pb.StageSpec.FromString(stage_to_wire(stage).SerializeToString())  # type: ignore[arg-type]
    assert stage_from_wire(wire) == stage


def test_unknown_or_invalid_stages_are_refused() -> None:
    with pytest.raises(ConfigError):
        stage_to_wire(object())  # type: ignore[arg-type]
    for msg in (pb.StageSpec(kind="run_code", params={"clip": 1.0}),
                pb.StageSpec(kind="local_dp", params={"clip": -1.0, "noise_multiplier": 1.0},
                             mechanism="gaussian"),
                pb.StageSpec(kind="distributed_noise", params={"clip": 1.0})):
        with pytest.raises(WireError):
            stage_from_wire(msg)


def test_server_settings_are_validated() -> None:
    base = {"rounds": 1, "data": {"dataset": "heart_disease"}}
    exp = validate({**base, "server": {"port": 7000, "credentials": "fed"}})
    settings_ = DeploySettings.from_section(exp["server"], port=0)
    assert settings_.port == 0 and settings_.credentials == Path("fed")
    assert settings_.max_message_bytes == settings_.chunk_bytes + 64 * 1024
    with pytest.raises(ConfigError, match=r"server\.port"):
        validate({**base, "server": {"port": 70000}})
    with pytest.raises(ConfigError, match=r"server\.credentials"):
        DeploySettings.from_section(validate(base)["server"])
    # Deployment settings do not change the experiment's identity (a resume may change them).
    assert exp.identity() == validate(base).identity()


def test_client_data_is_checked(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, x=np.ones((4, 3)), y=np.array([0, 1, 0, 1]))
    data = load_npz(good)
    assert data.x.dtype == np.float32 and len(data) == 4
    bad = {"nan": dict(x=np.full((2, 3), np.nan), y=np.array([0, 1])),
           "labels": dict(x=np.ones((2, 3)), y=np.array([0.5, 1.0])),
           "length": dict(x=np.ones((3, 3)), y=np.array([0, 1])),
           "pickle": dict(x=np.array([{"a": 1}], dtype=object), y=np.array([0]))}
    for name, arrays in bad.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(FedmosaicError):
            load_npz(path)


def test_backoff_grows_with_jitter_and_gives_up() -> None:
    backoff = Backoff(base=0.001, cap=0.004, budget=0.05)
    for _ in range(3):
        backoff.wait("test")
    assert backoff.attempts == 3
    backoff.progress()
    assert backoff.attempts == 0
    backoff.since -= 1.0
    with pytest.raises(ServerUnreachableError):
        backoff.wait("still down")
