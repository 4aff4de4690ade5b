"""Runs under a virtual clock are plotted against server steps and simulated time (issue #11)."""

from __future__ import annotations

from typing import Any

import matplotlib
import numpy as np
import pytest

from fedmosaic.runtime.result import plot_histories

matplotlib.use("Agg")


@pytest.fixture
def saved(monkeypatch) -> list[Any]:
    """The figures plot_histories saves, kept open for inspection."""
    from matplotlib.figure import Figure

    figs: list[Figure] = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig",
                        lambda fig, *a, **k: (figs.append(fig), original(fig, *a, **k))[1])
    return figs


def _async(steps: int, dt: float) -> list[dict[str, Any]]:
    # FedBuff-like records: every other step evaluated, simulated time not a multiple of steps.
    out: list[dict[str, Any]] = []
    for v in range(1, steps + 1):
        rec: dict[str, Any] = {"round": v, "version": v, "sim_time": dt * v ** 1.5,
                               "updates": 10}
        if v % 2 == 0 or v == steps:
            rec.update(test_accuracy=v / (steps + 1), test_loss=1.0 / v)
        out.append(rec)
    return out


def _lines(ax) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {ln.get_label(): (np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float))
            for ln in ax.get_lines()}


def test_steps_row_and_simulated_time_row(tmp_path, saved):
    buff, sync = _async(7, 3.0), [
        {"round": r, "sim_time": 40.0 * r, "test_accuracy": 0.1 * r, "test_loss": 2.0 / r}
        for r in range(1, 4)]
    path = plot_histories({"fedbuff": buff, "sync": sync}, tmp_path / "p.png")
    assert path.is_file() and path.stat().st_size > 0
    (fig,) = saved
    axes = fig.axes
    assert len(axes) == 4
    assert [ax.get_xlabel() for ax in axes] == ["server step"] * 2 + ["simulated time (s)"] * 2
    assert [ax.get_ylabel() for ax in axes] == ["test accuracy", "test loss"] * 2
    evaluated = [r for r in buff if "test_accuracy" in r]
    steps, timed = _lines(axes[0]), _lines(axes[2])
    np.testing.assert_array_equal(steps["fedbuff"][0], [r["round"] for r in evaluated])
    np.testing.assert_allclose(timed["fedbuff"][0], [r["sim_time"] for r in evaluated])
    np.testing.assert_allclose(timed["fedbuff"][1], [r["test_accuracy"] for r in evaluated])
    np.testing.assert_allclose(timed["sync"][0], [40.0, 80.0, 120.0])
    np.testing.assert_allclose(_lines(axes[3])["sync"][1], [2.0, 1.0, 2.0 / 3])
    for ax in axes[:2]:  # steps are whole numbers; seconds are not forced to be
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert axes[0].get_legend() is not None


def test_no_time_row_without_a_clock(tmp_path, saved):
    # An asynchronous run without [clock] records sim_time 0 throughout: no time axis to show.
    untimed = [dict(r, sim_time=0.0) for r in _async(4, 1.0)]
    plot_histories({"run": untimed}, tmp_path / "p.png")
    (fig,) = saved
    assert [ax.get_xlabel() for ax in fig.axes] == ["server step", "server step"]


def test_histories_without_time_are_left_out_of_the_time_row_only(tmp_path, saved):
    plain = [{"round": r, "test_accuracy": 0.2 * r, "test_loss": 1.0} for r in (1, 2)]
    plot_histories({"plain": plain, "timed": _async(4, 2.0)}, tmp_path / "p.png")
    (fig,) = saved
    assert set(_lines(fig.axes[0])) == {"plain", "timed"}
    assert set(_lines(fig.axes[2])) == {"timed"}


def test_a_fedbuff_run_under_a_clock_is_plotted_against_simulated_time(tmp_path, saved):
    from fedmosaic.build import build_data, build_strategy, build_trainer
    from fedmosaic.config import load_experiment
    from fedmosaic.runtime.simulate import simulate

    path = tmp_path / "e.toml"
    path.write_text('rounds = 4\n[data]\ndataset = "synthetic"\nnum_devices = 12\n'
                    '[model]\nkind = "logreg"\n[strategy]\nschedule = "fedbuff"\n'
                    'buffer_size = 3\nconcurrency = 6\n[clock]\nspeed_sigma = 1.0\n')
    exp = load_experiment(path)
    fed = build_data(exp)
    result = simulate(build_trainer(exp, fed), fed, build_strategy(exp, fed), 4, seed=0)
    times = result.metric("sim_time")
    assert len(times) == 4 and times == sorted(times) and times[0] > 0
    result.plot(tmp_path / "run.png")
    (fig,) = saved
    assert [ax.get_xlabel() for ax in fig.axes] == ["server step"] * 2 + ["simulated time (s)"] * 2
    (line,) = fig.axes[2].get_lines()
    np.testing.assert_allclose(line.get_xdata(), times)
    np.testing.assert_allclose(line.get_ydata(), result.metric("test_accuracy"))
