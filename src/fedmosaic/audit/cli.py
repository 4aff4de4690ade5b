"""``fedmosaic audit``: privacy audits of an experiment's own model and data."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

audit_app = typer.Typer(no_args_is_help=True,
                        help="Privacy audits of an experiment's own model and data.")
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)  # an error stays one line on a pipe


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}")  # escape: "[x]" is not markup
    raise typer.Exit(2)


def _numbers(option: str, text: str, kind: type) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of "
                                 f"{kind.__name__}s", param_hint=option) from None
    if not values:
        raise typer.BadParameter("give at least one value", param_hint=option)
    return values


@audit_app.command()
def leakage(
    experiment: Annotated[Path, typer.Argument(help="experiment .toml file")],
    samples: Annotated[int, typer.Option(min=1, help="samples of the client to attack")] = 8,
    label_samples: Annotated[int, typer.Option(
        min=1, help="samples for iDLG's label accuracy (no optimisation: cheap)")] = 200,
    defences: Annotated[str, typer.Option(
        help="comma-separated: none, dp, topk, secagg")] = "none,dp,topk,secagg",
    attacks: Annotated[str | None, typer.Option(
        help="comma-separated: dlg, idlg, analytic (default: all that apply to the model; "
             "analytic needs a fully connected first layer with a bias)")] = None,
    noise: Annotated[str | None, typer.Option(
        help="DP noise multipliers to test, comma-separated")] = None,
    keep: Annotated[str | None, typer.Option(
        help="top-k keep fractions to test, comma-separated")] = None,
    secagg_clients: Annotated[str | None, typer.Option(
        help="numbers of clients summed by secure aggregation, comma-separated")] = None,
    clip: Annotated[float | None, typer.Option(
        help="DP clip (default: each update's own L2 norm)")] = None,
    client: Annotated[str | None, typer.Option(help="client id (default: the first)")] = None,
    from_run: Annotated[Path | None, typer.Option(
        help="attack the model of this run's checkpoint instead of the initial one")] = None,
    local_steps: Annotated[int, typer.Option(min=1, help="client SGD steps per update")] = 1,
    iterations: Annotated[int, typer.Option(min=1, help="L-BFGS iterations")] = 300,
    restarts: Annotated[int, typer.Option(min=1, help="most random starts per attack")] = 4,
    seed: Annotated[int | None, typer.Option(min=0, help="default: the experiment's")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="directory for report.json and report.md")] = None,
) -> None:
    """DLG, iDLG and analytic reconstruction of a client's data from its updates, per
    defence."""
    import torch

    from fedmosaic.audit.defences import DEFAULT_KEEP, DEFAULT_NOISE, DEFAULT_SECAGG_CLIENTS
    from fedmosaic.audit.leakage import leakage_audit
    from fedmosaic.build import build_data, build_trainer
    from fedmosaic.config import load_experiment
    from fedmosaic.core.errors import FedmosaicError

    try:
        exp = load_experiment(experiment)
        if exp[""]["threads"] > 0:
            torch.set_num_threads(exp[""]["threads"])
        fed = build_data(exp)
        trainer = build_trainer(exp, fed)
        data = fed.client(client) if client is not None else fed.clients[0]
        weights = None
        if from_run is not None:
            from fedmosaic.runtime.checkpoint import load_checkpoint

            weights = load_checkpoint(from_run)["weights"].to(torch.float32)
            trainer.spec.check_vector(weights)
        run_seed = exp[""]["seed"] if seed is None else seed
        report = leakage_audit(
            trainer, data.train, samples=samples, label_samples=label_samples,
            defences=[d.strip() for d in defences.split(",") if d.strip()],
            attacks=([a.strip() for a in attacks.split(",") if a.strip()]
                     if attacks is not None else None),
            noise_multipliers=_numbers("--noise", noise, float) if noise else DEFAULT_NOISE,
            keep_fractions=_numbers("--keep", keep, float) if keep else DEFAULT_KEEP,
            secagg_clients=(_numbers("--secagg-clients", secagg_clients, int)
                            if secagg_clients else DEFAULT_SECAGG_CLIENTS),
            clip=clip, local_steps=local_steps, iterations=iterations, restarts=restarts,
            seed=run_seed, weights=weights,
            data_name=f"{fed.name}, client '{data.client_id}'")
        if from_run is not None:
            report.settings["weights"] = f"from the checkpoint in {from_run}"
    except KeyError as exc:  # an unknown --client
        _fail(str(exc.args[0]) if exc.args else str(exc))
        return
    except FedmosaicError as exc:
        _fail(str(exc))
        return
    out = output or exp.output / "audit"
    js, md = report.save(out)
    table = Table(title=f"{exp.name}: gradient leakage ({report.data['name']})")
    for col in ("defence", "attack", "MSE", "PSNR dB", "label acc (n)", "leaked", "verdict"):
        table.add_column(col, justify="left" if col in ("defence", "attack") else "right")
    for r in report.results:
        table.add_row(r.defence, r.attack, f"{r.mse:.4f}", f"{r.psnr:.2f}",
                      f"{r.label_accuracy:.3f} ({r.label_samples})",
                      f"{r.leaked_samples}/{r.samples}",
                      "fails" if r.failed else "[bold red]leaks[/]")
    console.print(table)
    console.print(f"baseline (mean input): PSNR {report.prior['psnr']:.2f} dB; chance label "
                  f"accuracy {report.prior['chance_accuracy']:.3f}")
    console.print("[bold]recommendation:[/] " + report.recommendation["text"])
    console.print(f"report written to {js} and {md}")


@audit_app.command()
def privacy(
    experiment: Annotated[Path, typer.Argument(help="experiment .toml file with client-level "
                                                    "DP (privacy.mode central or distributed)")],
    canaries: Annotated[int, typer.Option(
        min=2, help="canary clients drawn; each is inserted with probability 1/2")] = 1000,
    rounds: Annotated[int | None, typer.Option(
        min=1, help="rounds to train (default: the experiment's)")] = None,
    confidence: Annotated[float, typer.Option(
        min=0.5, max=0.9999, help="confidence of the lower bound")] = 0.95,
    canary_norm: Annotated[float | None, typer.Option(
        help="norm of a canary's raw update (default: 1000 x the clip, so clipping binds)")]
        = None,
    seed: Annotated[int | None, typer.Option(min=0, help="default: the experiment's")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="directory for privacy_audit.json and privacy_audit.md")] = None,
) -> None:
    """Empirical lower bound on epsilon: re-run the experiment with canary clients inserted.

    Steinke, Nasr and Jagielski 2023 (one-run lower bound) and Andrew et al. 2024 (client
    canaries, Gaussian epsilon estimate), next to the accountant's epsilon.
    """
    import torch

    from fedmosaic.audit.privacy_audit import audit_privacy
    from fedmosaic.build import build_data, build_strategy, build_trainer
    from fedmosaic.config import load_experiment
    from fedmosaic.core.errors import FedmosaicError
    from fedmosaic.runtime import BatchedTransport, SequentialTransport

    try:
        exp = load_experiment(experiment)
        if exp["privacy"]["mode"] not in ("central", "distributed"):
            _fail(f"privacy.mode is {exp['privacy']['mode']!r}: the privacy audit needs "
                  "client-level DP (privacy.mode = 'central' or 'distributed')")
        if exp[""]["threads"] > 0:
            torch.set_num_threads(exp[""]["threads"])
        fed = build_data(exp)
        trainer = build_trainer(exp, fed)
        strategy = build_strategy(exp, fed)
        # Real clients train as the experiment says (sequential or batched; Ray runs here
        # sequentially). Secure aggregation is left out: it releases the same sum exactly.
        transport = (BatchedTransport(trainer, fed) if exp["runtime"]["transport"] == "batched"
                     else SequentialTransport(trainer, fed))
        report = audit_privacy(trainer, fed, strategy, rounds or exp[""]["rounds"],
                               canaries=canaries, seed=exp[""]["seed"] if seed is None else seed,
                               transport=transport, canary_norm=canary_norm,
                               confidence=confidence)
        report.settings["experiment"] = str(experiment)
    except FedmosaicError as exc:
        _fail(str(exc))
        return
    out = output or exp.output / "audit"
    js, md = report.save(out)
    s = report.steinke
    table = Table(title=f"{exp.name}: empirical privacy audit ({report.canaries} canaries, "
                        f"{report.inserted} inserted)")
    for col in ("quantity", "epsilon", "how"):
        table.add_column(col, justify="right" if col == "epsilon" else "left")
    table.add_row("accounted", f"{report.accounted_epsilon:.3f}",
                  f"{report.settings.get('accountant', 'accountant')}, delta={report.delta:g}")
    table.add_row("lower bound", f"{s.epsilon_lower_bound:.3f}",
                  f"Steinke et al. 2023, {100 * s.confidence:g}% confidence: {s.correct}/"
                  f"{s.guesses} guesses right ({s.score})")
    table.add_row("estimate", f"{report.andrew_epsilon_estimate:.3f}",
                  "Andrew et al. 2024, Gaussian fit to final-model cosines (not a bound)")
    table.add_row("estimate", f"{report.andrew_equal_variance_estimate:.3f}",
                  "the same with one pooled variance (not a bound)")
    console.print(table)
    console.print(f"with every guess right the lower bound would be "
                  f"{report.largest_possible_bound:.3f}: the most {report.canaries} canaries "
                  "can show")
    if report.violation:
        console.print("[bold red]violation:[/] the lower bound exceeds the accounted epsilon; "
                      "the run releases more than its accountant charges for")
    else:
        console.print("no violation detected: the lower bound is below the accounted epsilon")
    console.print(f"report written to {js} and {md}")
