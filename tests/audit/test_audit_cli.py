"""`fedmosaic audit leakage` on an experiment file."""

import json

from typer.testing import CliRunner

from fedmosaic.cli import app

CONFIG = """
name = "tiny-audit"
seed = 2
rounds = 1

[data]
dataset = "digits"

[partition]
clients = 4

[model]
kind = "mlp"
hidden = [16]

[train]
lr = 0.1
"""

runner = CliRunner()


def flat(text: str) -> str:
    """CLI output with rich's line wrapping undone (it depends on the terminal width)."""
    return " ".join(text.split())


def test_audit_leakage_writes_the_report(tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "audit"
    result = runner.invoke(app, ["audit", "leakage", str(cfg), "--samples", "2",
                                 "--defences", "none,dp", "--noise", "0.001,10",
                                 "--iterations", "40", "--restarts", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["name"] == "digits, client 'client_0'"
    assert report["settings"]["lr"] == 0.1 and report["settings"]["seed"] == 2
    rows = {(r["defence"], r["attack"]): r for r in report["results"]}
    # By default every attack that applies: the MLP's first layer is fully connected.
    assert set(rows) == {(d, a) for d in ("none", "dp z=0.001", "dp z=10")
                         for a in ("dlg", "idlg", "analytic")}
    assert rows[("none", "analytic")]["psnr"] == 100.0
    assert rows[("none", "idlg")]["label_accuracy"] == 1.0
    assert rows[("none", "idlg")]["leaked_samples"] == 2
    assert rows[("dp z=10", "dlg")]["leaked_samples"] == 0
    assert report["recommendation"]["tested"] == [0.001, 10.0]
    md = (out / "report.md").read_text()
    assert md.startswith("# Gradient-leakage audit") and "| none | idlg | 2 |" in md
    assert "recommendation" in result.output and "report written" in result.output


def test_audit_leakage_attacks_a_trained_checkpoint(tmp_path, monkeypatch):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(CONFIG)
    monkeypatch.chdir(tmp_path)
    trained = runner.invoke(app, ["run", str(cfg), "-o", "run"])
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["audit", "leakage", str(cfg), "--from-run", "run",
                                 "--samples", "1", "--defences", "none", "--attacks", "idlg",
                                 "--iterations", "30"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "runs/tiny-audit/audit/report.json").read_text())
    assert report["settings"]["weights"] == "from the checkpoint in run"
    assert report["results"][0]["label_accuracy"] == 1.0


def test_audit_leakage_names_bad_input(tmp_path):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(CONFIG)
    bad = runner.invoke(app, ["audit", "leakage", str(cfg), "--defences", "none,pruning"])
    assert bad.exit_code == 2 and "unknown defence 'pruning'" in flat(bad.output)
    bad = runner.invoke(app, ["audit", "leakage", str(cfg), "--attacks", "dlg,gan"])
    assert bad.exit_code == 2 and "unknown attack" in flat(bad.output)
    bad = runner.invoke(app, ["audit", "leakage", str(cfg), "--client", "nobody"])
    assert bad.exit_code == 2 and "no client 'nobody'" in flat(bad.output)
    bad = runner.invoke(app, ["audit", "leakage", str(cfg), "--keep", "half"])
    assert bad.exit_code == 2 and "comma-separated list of floats" in flat(bad.output)
    no_run = runner.invoke(app, ["audit", "leakage", str(cfg), "--from-run", str(tmp_path)])
    assert no_run.exit_code == 2 and "no checkpoint at" in flat(no_run.output)
    missing = runner.invoke(app, ["audit", "leakage", str(tmp_path / "none.toml")])
    assert missing.exit_code == 2 and "existing experiment" in flat(missing.output)
    adam = tmp_path / "adam.toml"
    adam.write_text(CONFIG.replace("lr = 0.1", "lr = 0.1\noptimizer = \"adam\""))
    refused = runner.invoke(app, ["audit", "leakage", str(adam)])
    assert refused.exit_code == 2 and "plain SGD" in flat(refused.output)
