"""WAFFLE in federated runs on digits: embedding, ownership, accuracy cost, resume."""

import pytest
import torch

import fedmosaic as fm
from fedmosaic import data as fd
from fedmosaic.core.errors import ConfigError, SpecMismatchError
from fedmosaic.models import MLP
from fedmosaic.watermark import WaffleStage, WatermarkKey, verify_watermark

KEY = WatermarkKey(bytes(range(32)))
ROUNDS = 20


def _trainer() -> fm.TorchTrainer:
    return fm.TorchTrainer(lambda: MLP(64, [64], 10), lr=0.05, batch_size=32)


def _stage(key: WatermarkKey = KEY) -> WaffleStage:
    return WaffleStage(_trainer(), key, input_shape=(64,), num_classes=10)


@pytest.fixture(scope="module")
def fed() -> fd.FederatedDataset:
    train, test = fd.load_digits()
    return fd.partition(train, fd.IID(), 10, 0, test=test, name="digits")


@pytest.fixture(scope="module")
def runs(fed):
    plain = fm.simulate(_trainer(), fed, fm.FedAvg(), ROUNDS, seed=0)
    marked = fm.simulate(_trainer(), fed, fm.FedAvg(server_stages=[_stage()]), ROUNDS, seed=0)
    return plain, marked


def test_waffle_embeds_a_watermark_that_the_owner_can_prove(runs):
    _, marked = runs
    history = marked.history
    assert history[0]["watermark_accuracy_before"] < 0.3  # round 1: the fresh model is unmarked
    assert history[0]["watermark_epochs"] > 0
    assert all(r["watermark_accuracy"] >= 0.98 for r in history)
    v = verify_watermark(marked.weights, KEY, input_shape=(64,), num_classes=10,
                         trainer=_trainer())
    assert v.owned and v.accuracy >= 0.95 and v.p_value < 1e-50
    assert v.patterns_matched == 10


def test_a_model_trained_without_the_watermark_fails_the_check(runs):
    plain, _ = runs
    v = verify_watermark(plain.weights, KEY, input_shape=(64,), num_classes=10,
                         trainer=_trainer())
    assert not v.owned and v.accuracy < 0.3
    assert v.p_value > 1e-3  # agreement at chance level: no evidence of ownership


def test_watermark_costs_little_test_accuracy(runs):
    plain, marked = runs
    assert plain.final["test_accuracy"] > 0.7
    assert marked.final["test_accuracy"] >= plain.final["test_accuracy"] - 0.05


def test_stage_composes_with_fedadam(fed):
    strategy = fm.FedAvg(server_opt=fm.FedAdam(lr=0.01), server_stages=[_stage()])
    res = fm.simulate(_trainer(), fed, strategy, 8, seed=0)
    assert res.final["watermark_accuracy"] >= 0.98
    assert res.final["test_accuracy"] > 0.5
    assert "WaffleStage(key_fingerprint=" in strategy.describe()["server_stages"][0]


def test_resume_regenerates_the_watermark_and_never_stores_the_key(fed, tmp_path):
    def run(out, **kw):
        return fm.simulate(_trainer(), fed, fm.FedAvg(server_stages=[_stage()]), 6, seed=0,
                           out_dir=out, **kw)

    whole = run(tmp_path / "whole")
    run(tmp_path / "cut", stop_after=3)
    resumed = run(tmp_path / "cut", resume=True)
    torch.testing.assert_close(resumed.weights, whole.weights, rtol=0, atol=0)
    secret = bytes(range(32))
    for path in (tmp_path / "cut").iterdir():
        blob = path.read_bytes()
        assert secret not in blob and secret.hex().encode() not in blob, path.name
    # Another key is another experiment: resume refuses it.
    other = WaffleStage(_trainer(), WatermarkKey(bytes(32 * [9])), input_shape=(64,),
                        num_classes=10)
    with pytest.raises(fm.FedmosaicError, match="different experiment"):
        fm.simulate(_trainer(), fed, fm.FedAvg(server_stages=[other]), 6, seed=0,
                    out_dir=tmp_path / "cut", resume=True)


def test_stage_validates_its_inputs():
    with pytest.raises(ConfigError, match=r"watermark\.target_accuracy"):
        WaffleStage(_trainer(), KEY, input_shape=(64,), num_classes=10, target_accuracy=1.5)
    with pytest.raises(ConfigError, match=r"watermark\.max_epochs"):
        WaffleStage(_trainer(), KEY, input_shape=(64,), num_classes=10, max_epochs=0)
    with pytest.raises(ConfigError, match=r"watermark\.key"):
        WaffleStage(_trainer(), "secret", input_shape=(64,), num_classes=10)  # type: ignore
    with pytest.raises(SpecMismatchError, match="watermark trainer"):
        _stage().apply(1, torch.zeros(10))


def test_epoch_cap_bounds_the_retraining():
    stage = WaffleStage(_trainer(), KEY, input_shape=(64,), num_classes=10, max_epochs=2,
                        target_accuracy=1.0, lr=1e-4)
    _, metrics = stage.apply(1, _trainer().initial_weights(0))
    assert metrics["watermark_epochs"] == 2 and metrics["watermark_steps"] == 4
