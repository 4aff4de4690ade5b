"""The [watermark] experiment section and the `fedmosaic watermark` commands."""

import pytest
import torch
from typer.testing import CliRunner

import fedmosaic as fm
from fedmosaic.build import build_data, build_strategy, build_trainer
from fedmosaic.cli import app
from fedmosaic.config import validate
from fedmosaic.core.errors import ConfigError
from fedmosaic.watermark import ClientFingerprint, WaffleStage, WatermarkKey


def _raw(tmp_path, **wm):
    key = tmp_path / "wm.key"
    if not key.exists():
        WatermarkKey(bytes(range(32))).save(key)
    return {"rounds": 2, "data": {"dataset": "digits"}, "partition": {"clients": 4},
            "watermark": {"key_file": str(key), **wm}}


@pytest.mark.parametrize(("wm", "key", "fragment"), [
    ({"threshold": 0}, "watermark.threshold", "(0, 1]"),
    ({"max_epochs": 0}, "watermark.max_epochs", ">= 1"),
    ({"noise": -0.1}, "watermark.noise", "[0, 1]"),
    ({"waffle": "yes"}, "watermark.waffle", "true or false"),
    ({"keyfile": "x"}, "watermark.keyfile", "known keys"),
    ({"fingerprint_strength": 0.01}, "watermark.fingerprint_strength", "fingerprint = true"),
    ({"waffle": False}, "watermark.waffle", "fingerprint = true"),
])
def test_watermark_section_is_validated(tmp_path, wm, key, fragment):
    with pytest.raises(ConfigError, match=key) as info:
        validate(_raw(tmp_path, **wm))
    assert fragment in str(info.value)


def test_key_file_is_required_and_fingerprints_need_the_sequential_transport(tmp_path):
    raw = _raw(tmp_path)
    del raw["watermark"]["key_file"]
    raw["watermark"]["lr"] = 0.1
    with pytest.raises(ConfigError, match=r"watermark\.key_file"):
        validate(raw)
    raw = _raw(tmp_path, fingerprint=True)
    raw["runtime"] = {"transport": "batched"}
    with pytest.raises(ConfigError, match=r"watermark\.fingerprint"):
        validate(raw)


def test_no_section_leaves_the_run_identity_unchanged(tmp_path):
    exp = validate({"rounds": 2, "data": {"dataset": "digits"}})
    assert "watermark" not in exp.identity() and exp["watermark"] == {}
    assert "watermark" in validate(_raw(tmp_path)).identity()


def test_build_strategy_wires_the_stage_and_the_fingerprint(tmp_path):
    exp = validate(_raw(tmp_path, fingerprint=True, max_epochs=5))
    fed = build_data(exp)
    strategy = build_strategy(exp, fed)
    (stage,) = strategy.server_stages
    assert isinstance(stage, WaffleStage) and stage.max_epochs == 5
    assert isinstance(strategy.dispatch_transform, ClientFingerprint)
    with pytest.raises(ConfigError, match="input shape"):
        build_strategy(exp)
    missing = _raw(tmp_path)
    missing["watermark"]["key_file"] = str(tmp_path / "nope.key")
    with pytest.raises(ConfigError, match="existing key file"):
        build_strategy(validate(missing), fed)


def test_cli_keygen_and_verify(tmp_path):
    runner = CliRunner()
    key = tmp_path / "k.key"
    out = runner.invoke(app, ["watermark", "keygen", str(key)])
    assert out.exit_code == 0 and WatermarkKey.from_file(key).fingerprint in out.output
    assert runner.invoke(app, ["watermark", "keygen", str(key)]).exit_code == 2
    toml = tmp_path / "exp.toml"
    toml.write_text(f'rounds = 3\n[data]\ndataset = "digits"\n[partition]\nclients = 4\n'
                    f'[watermark]\nkey_file = "{key}"\n')
    from fedmosaic.config import load_experiment

    exp = load_experiment(toml)
    fed = build_data(exp)
    trainer = build_trainer(exp, fed)
    marked = fm.simulate(trainer, fed, build_strategy(exp, fed), 3, seed=0)
    torch.save(marked.state_dict(), tmp_path / "marked.pt")
    torch.save(trainer.spec.unflatten(trainer.initial_weights(0)),
               tmp_path / "clean.pt")
    ok = runner.invoke(app, ["watermark", "verify", str(tmp_path / "marked.pt"), "-e", str(toml)])
    assert ok.exit_code == 0, ok.output
    assert "watermark present" in ok.output and key.read_text().strip() not in ok.output
    bad = runner.invoke(app, ["watermark", "verify", str(tmp_path / "clean.pt"), "-e", str(toml)])
    assert bad.exit_code == 1 and "no watermark" in bad.output
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    junk = runner.invoke(app, ["watermark", "verify", str(tmp_path / "junk.pt"), "-e", str(toml)])
    assert junk.exit_code == 2 and "not a readable" in junk.output
