"""Plots a reader can use: spelt-out axis labels and whole-number round ticks."""

from __future__ import annotations

import matplotlib
import pytest

from fedmosaic.runtime.result import metric_label, plot_histories

matplotlib.use("Agg")


def _history(rounds: int) -> list[dict[str, float]]:
    return [{"round": r, "test_accuracy": 0.5 + r / 100, "test_loss": 1.0 / r}
            for r in range(1, rounds + 1)]


@pytest.mark.parametrize("rounds", [2, 3, 7])
def test_axis_labels_and_integer_round_ticks(tmp_path, monkeypatch, rounds):
    from matplotlib.figure import Figure

    saved: list[Figure] = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig",
                        lambda fig, *a, **k: (saved.append(fig), original(fig, *a, **k))[1])
    path = plot_histories({"run": _history(rounds)}, tmp_path / "p.png", title="t")
    assert path.is_file() and path.stat().st_size > 0
    (fig,) = saved
    axes = fig.axes
    assert [ax.get_xlabel() for ax in axes] == ["round", "round"]
    assert [ax.get_ylabel() for ax in axes] == ["test accuracy", "test loss"]
    for ax in axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert axes[0].get_legend() is None  # one run: its name is the title, no legend box
    two = plot_histories({"a": _history(3), "b": _history(3)}, tmp_path / "q.png")
    assert two.is_file() and saved[-1].axes[0].get_legend() is not None


def test_metric_labels():
    assert metric_label("fed_test_accuracy") == "test accuracy (federated)"
    assert metric_label("train_loss") == "training loss"
    assert metric_label("robust_clipped") == "robust clipped"
