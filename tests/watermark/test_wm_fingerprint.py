"""Per-client fingerprints: dispatch, aggregation unaffected, tracing a leaked model."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedmosaic as fm
from fedmosaic import data as fd
from fedmosaic.core.errors import ConfigError, SpecMismatchError
from fedmosaic.models import MLP
from fedmosaic.train.base import FitConfig, FitResult
from fedmosaic.watermark import ClientFingerprint, WatermarkKey, trace

KEY = WatermarkKey(bytes(range(32)))


def _trainer() -> fm.TorchTrainer:
    return fm.TorchTrainer(lambda: MLP(64, [64], 10), lr=0.05, batch_size=32)


class _Recorder:
    """A trainer wrapper that remembers the weights each client received."""

    def __init__(self, inner, identity: bool = False) -> None:
        self.inner, self.identity, self.received = inner, identity, {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def fit(self, weights, data, config):
        self.received[len(self.received)] = weights.clone()
        if self.identity:  # the client changes nothing: its delta must be exactly zero
            return FitResult(weights=weights.clone(), num_samples=len(data), steps=1)
        return self.inner.fit(weights, data, config)


def test_each_client_receives_its_own_fingerprint(blobs_fed):
    base = fm.TorchTrainer(lambda: torch.nn.Linear(5, 3))
    rec = _Recorder(base, identity=True)
    fp = ClientFingerprint(KEY, 0.01)
    w0 = base.initial_weights(0)
    res = fm.simulate(rec, blobs_fed, fm.FedAvg(dispatch_transform=fp), 1, seed=0,
                      initial_weights=w0)
    sent = list(rec.received.values())
    assert len(sent) == 6
    for cid, w in zip(blobs_fed.client_ids, sent):
        torch.testing.assert_close(w, fp(cid, w0), rtol=0, atol=0)
    assert all(not torch.equal(sent[0], w) for w in sent[1:])
    # Deltas are relative to what each client received: the fingerprints never reach the
    # aggregate, so clients that change nothing leave the global model exactly as it was.
    torch.testing.assert_close(res.weights, w0, rtol=0, atol=0)


def test_aggregate_is_the_mean_of_deltas_from_the_received_weights(blobs_fed):
    base = fm.TorchTrainer(lambda: torch.nn.Linear(5, 3))
    fp = ClientFingerprint(KEY, 0.05)
    w0 = base.initial_weights(0)
    strategy = fm.FedAvg(dispatch_transform=fp)
    res = fm.simulate(base, blobs_fed, strategy, 1, seed=7, initial_weights=w0)
    from fedmosaic.algorithms.strategy import client_seed

    total, acc = 0, torch.zeros_like(w0)
    for c in blobs_fed.clients:
        sent = fp(c.client_id, w0)
        cfg = strategy.fit_config(1, seed=client_seed(7, 1, c.client_id))
        acc += len(c.train) * (base.fit(sent, c.train, cfg).weights - sent)
        total += len(c.train)
    torch.testing.assert_close(res.weights, w0 + acc / total, rtol=1e-5, atol=1e-6)


def test_trace_finds_the_leaker_after_local_training_and_theft_fine_tuning():
    train, test = fd.load_digits()
    fed = fd.partition(train, fd.IID(), 8, 0, test=test, name="digits")
    trainer = _trainer()
    fp = ClientFingerprint(KEY, 0.01)
    res = fm.simulate(trainer, fed, fm.FedAvg(dispatch_transform=fp), 5, seed=0)
    reference = res.weights
    thief_data = test.subset(torch.arange(180).numpy())
    for leaker in ("client_2", "client_5"):
        received = fp(leaker, reference)
        local = trainer.fit(received, fed.client(leaker).train, FitConfig(round=6, seed=1))
        stolen = trainer.fit(local.weights, thief_data, FitConfig(round=7, epochs=5, seed=2))
        ranking = trace(stolen.weights, reference, fed.client_ids, fp)
        assert ranking[0].client_id == leaker
        assert ranking[0].p_value < 1e-9 and ranking[0].score > 0.5
        assert all(s.p_value > 1e-3 for s in ranking[1:])
    # An unfingerprinted model accuses nobody.
    clean = trainer.fit(reference, thief_data, FitConfig(round=7, epochs=5, seed=2)).weights
    assert all(s.p_value > 1e-3 for s in trace(clean, reference, fed.client_ids, fp))


def test_trace_and_fingerprint_validate_inputs():
    fp = ClientFingerprint(KEY, 0.01)
    w = torch.zeros(20)
    with pytest.raises(SpecMismatchError, match="leaked model has"):
        trace(torch.zeros(21), w, ["a"], fp)
    with pytest.raises(SpecMismatchError, match="non-finite"):
        trace(torch.full((20,), float("nan")), w, ["a"], fp)
    with pytest.raises(ConfigError, match="candidates"):
        trace(w, w, ["a", "a"], fp)
    with pytest.raises(ConfigError, match="fingerprint_strength"):
        ClientFingerprint(KEY, 0.0)
    with pytest.raises(ConfigError, match="client_id"):
        fp("", w)
    assert "key_fingerprint=" in repr(fp) and bytes(range(32)).hex() not in repr(fp)


def test_server_refuses_transports_that_ignore_the_dispatch(blobs_fed):
    base = fm.TorchTrainer(lambda: torch.nn.Linear(5, 3))
    strategy = fm.FedAvg(dispatch_transform=ClientFingerprint(KEY))
    with pytest.raises(ConfigError, match="dispatch_transform"):
        fm.Server(trainer=base, strategy=strategy, rounds=1,
                  transport=fm.BatchedTransport(base, blobs_fed))


@settings(max_examples=25, deadline=None)
@given(numel=st.integers(400, 3000), strength=st.floats(1e-3, 0.1),
       ids=st.lists(st.text("abcdef0123", min_size=1, max_size=6), min_size=2, max_size=8,
                    unique=True), pick=st.integers(0, 7), seed=st.integers(0, 2**16))
def test_an_untouched_fingerprint_is_always_traced_exactly(numel, strength, ids, pick, seed):
    fp = ClientFingerprint(KEY, strength)
    reference = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    leaker = ids[pick % len(ids)]
    ranking = trace(fp(leaker, reference), reference, ids, fp)
    assert ranking[0].client_id == leaker
    assert ranking[0].score == pytest.approx(1.0, rel=1e-3)
    # A fresh +-1 vector is orthogonal to another client's up to sampling noise.
    assert all(abs(s.score) < 6 / numel**0.5 for s in ranking[1:])
