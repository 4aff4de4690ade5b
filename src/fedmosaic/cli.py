"""The ``fedmosaic`` command: run, resume and report federated experiments."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedmosaic import __version__
from fedmosaic.audit.cli import audit_app
from fedmosaic.core.errors import FedmosaicError
from fedmosaic.net.certs_cli import certs_app
from fedmosaic.net.commands import client as client_command
from fedmosaic.net.commands import server as server_command
from fedmosaic.net.commands import status as status_command
from fedmosaic.watermark.cli import watermark_app

# Every command and group answers -h as well as --help (click passes this to subcommands).
CONTEXT = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(add_completion=False, no_args_is_help=True, context_settings=CONTEXT,
                  help="fedmosaic: federated learning that moves the model, not the data.")
app.add_typer(certs_app, name="certs")
app.command("server")(server_command)
app.command("client")(client_command)
app.command("status")(status_command)
app.add_typer(watermark_app, name="watermark")
app.add_typer(audit_app, name="audit")
# Off a terminal (pipes, CI logs) rich would wrap tables at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
# Errors are one line however long (soft_wrap: rich never inserts line breaks), so that a pipe,
# a log file or `grep` sees the whole message.
err = Console(stderr=True, soft_wrap=True)

CONFIG_COPY = "experiment.toml"
#: The exit status of a command stopped by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int = 2) -> None:
    # escape: messages name TOML tables ("[data]"), which rich would take for markup and drop.
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        print(f"fedmosaic {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option(
        "--version", "-V", callback=_version, is_eager=True,
        help="print the version and exit")] = False,
) -> None:
    """fedmosaic: federated learning that moves the model, not the data."""


class RoundProgress:
    """A live bar (round, accuracy, ETA) on a terminal; one plain line per round otherwise."""

    def __init__(self, total: int, done: int, label: str) -> None:
        self.total, self.label = total, label
        self.live = console.is_terminal
        self.progress: Progress | None = None
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(),
                TextColumn("round {task.completed:.0f}/{task.total:.0f}"),
                TextColumn("{task.fields[acc]}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=console,
            )
            self.task = self.progress.add_task(label, total=total, completed=done, acc="")

    def __enter__(self) -> RoundProgress:
        if self.progress:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress:
            self.progress.__exit__(*exc)  # type: ignore[arg-type]

    def __call__(self, record: dict[str, Any]) -> None:
        acc, name = record.get("test_accuracy"), "acc"
        if acc is None:  # no central test set: the clients' federated evaluation
            acc, name = record.get("fed_test_accuracy"), "fed acc"
        acc_text = f"{name} {acc:.4f}" if acc is not None else ""
        if self.progress:
            self.progress.update(self.task, completed=record["round"], acc=acc_text)
        else:
            loss = record.get("train_loss")
            loss_text = f" train_loss {loss:.4f}" if loss is not None else ""
            print(f"round {record['round']}/{self.total} {acc_text}{loss_text} "
                  f"time {record['wall_time']:.2f}s", flush=True)


def _execute(exp: Any, out: Path, resume: bool) -> None:
    import torch

    from fedmosaic.build import (
        build_data,
        build_strategy,
        build_trainer,
        driver_federation,
        loads_on_workers,
        simulate_experiment,
    )
    from fedmosaic.runtime.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    if exp[""]["threads"] > 0:
        torch.set_num_threads(exp[""]["threads"])
    rounds = exp[""]["rounds"]
    done = int(load_checkpoint(out)["round"]) if resume else 0
    if done > rounds:
        _fail(f"the run already completed {done} rounds; rounds = {rounds} in "
              f"{out / CONFIG_COPY} is fewer (raise it to train further; "
              f"'fedmosaic report {out}' shows the {done} rounds run)")
    if done == rounds:
        console.print(f"{out}: all {rounds} rounds already complete; nothing to resume.")
        return
    if loads_on_workers(exp):
        # The Ray workers load the clients' data where they train it; this process holds the
        # client ids and the central test set only (issue #21).
        fed, task = driver_federation(exp)
        trainer = task.trainer
        strategy = build_strategy(exp, profile=task.profile)
        where = "loaded on the Ray workers"
    else:
        fed = build_data(exp)
        trainer = build_trainer(exp, fed)
        strategy = build_strategy(exp, fed)
        where = fed.name
    cohort, population = strategy.clients_per_round, len(fed.client_ids)
    if cohort is not None and cohort > population:
        # The sampler would quietly take everyone; a config that asks for more clients than
        # exist is a mistake (a typo, or a partition that changed), so say so before training.
        _fail(f"[strategy] clients_per_round = {cohort} but the federation has {population} "
              f"clients: at most {population}")
    console.print(f"[bold]{exp.name}[/]: {where}, {population} clients, "
                  f"{trainer.spec.numel:,} parameters, strategy {strategy.name}, "
                  f"server optimizer {strategy.server_opt.name}"
                  + (f"; resuming after round {done}" if resume else ""))
    with RoundProgress(rounds, done, exp.name) as progress:
        result = simulate_experiment(exp, fed, trainer, strategy, out_dir=out, resume=resume,
                                     callbacks=[progress], announce=_print_transport)
    _print_table(result.history[-10:], title=f"{exp.name}: last rounds")
    dp = result.guarantees.get("differential_privacy")
    if dp:
        console.print(f"[bold]privacy:[/] ({dp['epsilon']:.3f}, {dp['delta']:g})-DP per "
                      f"{dp['unit']}, {dp['accountant'].upper()} accountant, {dp['sampling']}, "
                      f"{dp['rounds']} rounds")
    if result.stopped:
        console.print(f"[yellow]stopped early:[/] {escape(result.stopped)}")
    if attack := result.guarantees.get("simulated_attack"):
        console.print(f"[bold red]simulated attack:[/] {attack['name']} on "
                      f"{attack['malicious_clients']} of {attack['clients']} clients; these "
                      "figures are not a clean run's")
    plot = result.plot(out / "report.png", title=exp.name)
    console.print(f"done in {time.perf_counter() - t0:.1f}s; model, metrics and checkpoint in "
                  f"{out}; plot {plot}")


def _print_transport(record: dict[str, Any]) -> None:
    """The run's transport, and why when ``auto`` chose it (also in guarantees.json)."""
    kind = record["transport"]
    if "workers" in record:
        n = record.get("nodes")
        nodes = f" on {n} nodes" if isinstance(n, int) and n > 1 else ""
        kind += f" ({record['workers']} workers{nodes})"
    if "client_data" in record:
        kind += f"; client data {record['client_data']}"
    if record.get("chosen_by") == "auto":
        console.print(f"transport {kind}, chosen by auto: {escape(record['reason'])}")
    else:
        console.print(f"transport {kind}")


@app.command()
def run(
    experiment: Annotated[Path, typer.Argument(help="experiment .toml file")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="output directory")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run in the output")] = False,
    trainer: Annotated[str | None, typer.Option(
        help="module:attr (or file.py:attr) of your Trainer or a zero-argument factory of "
             "one; replaces the experiment's [model]")] = None,
) -> None:
    """Run a federated experiment described by a TOML file."""
    from fedmosaic.config import load_experiment, trainer_override

    out: Path | None = output
    try:
        if trainer is not None:
            trainer = trainer_override(trainer)
        exp = load_experiment(experiment, trainer=trainer)
        out = output or exp.output
        from fedmosaic.runtime.checkpoint import clear_run, holds_run

        if holds_run(out) and not overwrite:
            _fail(f"{out} already holds a run; use 'fedmosaic resume {out}' to continue it, "
                  "--overwrite to replace it, or --output for another directory")
        if overwrite and out.exists():
            clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(experiment, out / CONFIG_COPY)
        from fedmosaic.config import record_base_dir

        # The copy's relative paths (data files, the task module) stay the original's.
        record_base_dir(experiment, out)
        from fedmosaic.config import TRAINER_FILE, record_trainer

        if trainer is not None:
            record_trainer(out, trainer)
        else:
            (out / TRAINER_FILE).unlink(missing_ok=True)  # a replaced run's override
        _execute(exp, out, resume=False)
    except FedmosaicError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _interrupted(out, f"fedmosaic run {experiment}")


@app.command()
def resume(
    outdir: Annotated[Path, typer.Argument(help="output directory of an earlier run")],
) -> None:
    """Continue an interrupted run from its last completed round."""
    from fedmosaic.config import load_experiment

    try:
        cfg = outdir / CONFIG_COPY
        if not cfg.is_file():
            _fail(f"{outdir} has no {CONFIG_COPY}: not a fedmosaic run directory")
        _execute(load_experiment(cfg), outdir, resume=True)
    except FedmosaicError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _interrupted(outdir, f"fedmosaic resume {outdir}")


def _interrupted(out: Path | None, again: str) -> None:
    """Ctrl-C: no traceback, the round the checkpoint holds and how to go on (exit 130)."""
    from fedmosaic.runtime.checkpoint import load_checkpoint

    try:
        done = int(load_checkpoint(out)["round"]) if out is not None else 0
    except FedmosaicError:  # no checkpoint yet: nothing was saved
        done = 0
    if done:
        message = f"interrupted after round {done}; continue with: fedmosaic resume {out}"
    else:
        message = f"interrupted before the first round completed; start again with: {again}"
    err.print(escape(message))
    raise typer.Exit(EXIT_INTERRUPTED)


# Short headers so the table fits an 80-column terminal.
_COLUMNS = {"round": "round", "updates": "updates", "train_loss": "train loss",
            "test_loss": "test loss", "test_accuracy": "test acc",
            # Federated evaluation (clients' local test splits, sample-weighted).
            "fed_test_loss": "fed loss", "fed_test_accuracy": "fed acc", "wall_time": "time s",
            "bytes_up": "bytes up"}


def _print_table(history: list[dict[str, Any]], title: str) -> None:
    from fedmosaic.runtime.result import format_value  # lazy: keeps `fedmosaic --help` fast

    cols = [c for c in _COLUMNS if any(c in r for r in history)]
    table = Table(title=title)
    for c in cols:
        table.add_column(_COLUMNS[c], justify="right")
    for r in history:
        table.add_row(*[format_value(r.get(c)) for c in cols])
    console.print(table)


@app.command()
def report(
    outdir: Annotated[Path, typer.Argument(help="output directory of a run")],
    plot: Annotated[
        Path | None, typer.Option(help="PNG to write (default OUTDIR/report.png)")
    ] = None,
) -> None:
    """Print the per-round table of a run and write its plot."""
    from fedmosaic.runtime.checkpoint import load_checkpoint
    from fedmosaic.runtime.result import plot_histories

    try:
        metrics = outdir / "metrics.json"
        history: Any = None
        if metrics.is_file():
            try:
                history = json.loads(metrics.read_text())
            except json.JSONDecodeError as exc:
                _fail(f"{metrics} is not valid JSON: {exc}")
        if (outdir / "checkpoint.pt").is_file() or history is None:
            # The checkpoint is written after every round, metrics.json only when a run ends:
            # after a resume that was interrupted, the checkpoint holds more rounds than the
            # metrics of the earlier, shorter run. Show every round that was run.
            saved = load_checkpoint(outdir)["history"]
            if history is None or len(saved) > len(history):
                history = saved
        if not isinstance(history, list) or not history:
            _fail(f"{outdir} holds no completed rounds")
        _print_table(history, title=str(outdir))
        path = plot_histories({outdir.name: history}, plot or outdir / "report.png",
                              title=str(outdir))
        console.print(f"plot written to {path}")
    except FedmosaicError as exc:
        _fail(str(exc))


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("runs/demo"),
    rounds: Annotated[int, typer.Option(min=1)] = 30,
    seed: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """Four UCI heart-disease hospitals: local vs FedAvg/FedProx/FedAdam vs centralized."""
    from fedmosaic.demo import run_demo

    run_demo(output, rounds=rounds, seed=seed, console=console)


@app.command("new")
def new(
    project: Annotated[Path, typer.Argument(help="directory to create (must be new or empty)")],
) -> None:
    """Write a starter project: your own model (task.py), a CSV per hospital, an experiment."""
    from fedmosaic.scaffold import new_project  # lazy: keeps `fedmosaic --help` fast

    try:
        new_project(project)
    except FedmosaicError as exc:
        _fail(str(exc))
    console.print(f"created {project}: task.py, experiment.toml, README.md, data/*.csv\n"
                  f"next: cd {project} && fedmosaic run experiment.toml")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
