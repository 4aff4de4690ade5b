"""The README's quickstart and the demo behind `make demo` really run."""

import json
import re
from pathlib import Path

from rich.console import Console

from fedmosaic.demo import run_demo

ROOT = Path(__file__).parent.parent


def test_readme_python_quickstart_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    result = scope["result"]
    assert len(result.history) == 20 and result.final["test_accuracy"] > 0.6
    assert (tmp_path / "runs/digits/accuracy.png").is_file()
    assert (tmp_path / "runs/digits/checkpoint.pt").is_file()


def test_demo_compares_all_methods_per_hospital(tmp_path):
    with open(tmp_path / "log.txt", "w") as log_file:
        console = Console(file=log_file, width=200)
        table = run_demo(tmp_path / "out", rounds=12, seed=0, console=console)
    methods = set(table)
    assert {"FedAvg", "FedProx", "FedAdam", "Centralized (pooled)"} <= methods
    assert sum(m.startswith("Local:") for m in methods) == 4
    for row in table.values():
        assert set(row) == {"Cleveland", "Hungary", "VA Long Beach", "Switzerland", "Overall"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
    # Federation must beat the weakest hospital alone on the pooled test set.
    worst_local = min(r["Overall"] for m, r in table.items() if m.startswith("Local:"))
    assert table["FedAvg"]["Overall"] > worst_local
    saved = json.loads((tmp_path / "out/results.json").read_text())
    assert saved["accuracy"]["FedAvg"]["Overall"] == table["FedAvg"]["Overall"]
    assert (tmp_path / "out/demo.png").read_bytes()[:4] == b"\x89PNG"
    log = (tmp_path / "log.txt").read_text()
    assert "Overall" in log and "Centralized" in log


def test_readme_security_snippet_builds_a_defended_strategy():
    import fedmosaic as fm

    readme = (ROOT / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S)
                if "make_robust" in block)
    scope: dict = {"fm": fm}
    exec(compile(code, "README.md", "exec"), scope)
    strategy = scope["strategy"]
    assert strategy.robust.name == "bulyan" and strategy.anomaly is not None
    assert not strategy.aggregator.streaming  # individual updates reach the rule
