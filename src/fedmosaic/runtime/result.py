"""The outcome of a run: per-round history, final weights, a table and a plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedmosaic.core.params import ParamSpec
from fedmosaic.runtime.checkpoint import atomic_write_bytes

DEFAULT_COLUMNS = ("round", "updates", "train_loss", "test_loss", "test_accuracy", "wall_time",
                   "bytes_up")


@dataclass
class RunResult:
    """History (one dict per round) and the final global weights of a run."""

    history: list[dict[str, Any]]
    weights: torch.Tensor
    spec: ParamSpec
    guarantees: dict[str, Any] = field(default_factory=dict)
    stopped: str | None = None
    #: The transport that trained the run and why (``runtime.auto.describe_transport``).
    transport: dict[str, Any] | None = None

    @property
    def final(self) -> dict[str, Any]:
        """The last round's record."""
        return self.history[-1] if self.history else {}

    def metric(self, name: str) -> list[float]:
        """One metric across rounds (rounds without it are skipped)."""
        return [r[name] for r in self.history if name in r]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The final model as a PyTorch state dict (federated tensors only)."""
        return self.spec.unflatten(self.weights)

    def table(self, columns: Sequence[str] = DEFAULT_COLUMNS) -> list[list[str]]:
        """Rows of formatted values, header first (for printing or reports)."""
        rows = [list(columns)]
        for rec in self.history:
            rows.append([format_value(rec.get(c)) for c in columns])
        return rows

    def plot(self, path: str | Path, metrics: Sequence[str] | None = None,
             title: str | None = None) -> Path:
        """Write a PNG with one panel per metric against rounds (by default test accuracy and
        loss: central, or federated evaluation's without a central test set), and a second
        row against simulated time when the records carry ``sim_time``."""
        return plot_histories({"run": self.history}, path, metrics=metrics, title=title)

    def save(self, out_dir: str | Path) -> None:
        """Write ``metrics.json``, ``guarantees.json`` (with the transport and why it was
        chosen) and ``model.pt`` (the final state dict) to ``out_dir``."""
        out = Path(out_dir)
        write_json(out / "metrics.json", self.history)
        write_json(out / "guarantees.json", {"guarantees": self.guarantees,
                                             "stopped": self.stopped,
                                             "transport": self.transport})
        import io

        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        atomic_write_bytes(out / "model.pt", buf.getvalue())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, default=float).encode())


def format_value(value: Any) -> str:
    """A table cell: '-' for missing, 4 decimals for floats (3 significant digits if large)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


#: Axis labels for the record keys a plot shows most; others are spelt out from their key.
METRIC_LABELS = {
    "test_accuracy": "test accuracy", "test_loss": "test loss",
    "fed_test_accuracy": "test accuracy (federated)", "fed_test_loss": "test loss (federated)",
    "train_loss": "training loss", "train_accuracy": "training accuracy",
    "dp_epsilon": "privacy spent (epsilon)", "wall_time": "round time (s)",
    "bytes_up": "bytes uploaded", "bytes_down": "bytes downloaded",
}


def metric_label(metric: str) -> str:
    """A readable axis label for a record key ("test_accuracy" -> "test accuracy")."""
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def default_plot_metrics(histories: dict[str, list[dict[str, Any]]]) -> tuple[str, str]:
    """Central test accuracy and loss; the federated evaluation's (``fed_test_*``) when no
    history has central ones (a run without a central test set)."""
    central = any("test_accuracy" in r for h in histories.values() for r in h)
    federated = any("fed_test_accuracy" in r for h in histories.values() for r in h)
    if federated and not central:
        return ("fed_test_accuracy", "fed_test_loss")
    return ("test_accuracy", "test_loss")


def has_sim_time(histories: dict[str, list[dict[str, Any]]]) -> bool:
    """Whether any record carries simulated time (a run under a ``[clock]``; without one an
    asynchronous run records ``sim_time`` 0 throughout, which a time axis could not show)."""
    return any(r.get("sim_time") for h in histories.values() for r in h)


def step_label(histories: dict[str, list[dict[str, Any]]]) -> str:
    """The x label for record ``round``: "server step" when asynchronous records (``version``)
    are shown, where a step is one aggregation, not a round of the same clients."""
    return ("server step" if any("version" in r for h in histories.values() for r in h)
            else "round")


def plot_histories(
    histories: dict[str, list[dict[str, Any]]],
    path: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """One panel per metric, one line per named history; written as PNG.

    When the records carry simulated time (``sim_time``, issue #11) a second row shows the
    same metrics against it: schedules that take different numbers of steps for the same time
    (FedBuff, FedAsync, synchronous rounds waiting for their slowest client) are compared
    there. Histories without ``sim_time`` are left out of that row only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if metrics is None:
        metrics = default_plot_metrics(histories)
    timed = has_sim_time(histories)
    rows = 2 if timed else 1
    fig, axes = plt.subplots(rows, len(metrics), figsize=(5 * len(metrics), 3.6 * rows),
                             squeeze=False)
    xlabel = step_label(histories)
    for ax, metric in zip(axes[0], metrics):
        for label, hist in histories.items():
            pts = [(r["round"], r[metric]) for r in hist if metric in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric_label(metric))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no round 2.5
        ax.grid(alpha=0.3)
    if timed:
        for ax, metric in zip(axes[1], metrics):
            for label, hist in histories.items():
                pts = [(r["sim_time"], r[metric]) for r in hist
                       if metric in r and "sim_time" in r]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=label)
            ax.set_xlabel("simulated time (s)")  # seconds are continuous: default ticks
            ax.set_ylabel(metric_label(metric))
            ax.grid(alpha=0.3)
    if len(histories) > 1:  # one run needs no legend (its name is the title)
        axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
