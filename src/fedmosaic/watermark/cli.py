"""``fedmosaic watermark keygen | verify``: create a watermark key; check a suspect model.

Only typer is imported at module level: heavy modules load inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

watermark_app = typer.Typer(no_args_is_help=True,
                            help="Model-theft protection: WAFFLE watermark keys and checks.")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@watermark_app.command()
def keygen(
    path: Annotated[Path, typer.Argument(help="key file to create (never overwritten)")],
) -> None:
    """Create a random 256-bit watermark key file (owner-readable only)."""
    from fedmosaic.watermark.keys import WatermarkKey

    if path.exists():
        _fail(f"{path} exists; a key file is never overwritten")
    key = WatermarkKey.generate()
    key.save(path)
    typer.echo(f"key written to {path} (fingerprint {key.fingerprint}); keep it secret")


@watermark_app.command()
def verify(
    model: Annotated[Path, typer.Argument(help="suspect model: a state dict (.pt), e.g. a "
                                               "run's model.pt")],
    experiment: Annotated[Path, typer.Option("--experiment", "-e",
                                             help="the experiment .toml the model was trained "
                                                  "with (architecture, data, [watermark])")],
    key_file: Annotated[Path | None, typer.Option(
        help="key file (default: the experiment's watermark.key_file)")] = None,
    threshold: Annotated[float | None, typer.Option(
        help="watermark accuracy needed to claim ownership (default: watermark.threshold)",
    )] = None,
) -> None:
    """Check MODEL for the experiment's watermark; exit 0 if present, 1 if absent."""
    import torch

    from fedmosaic.build import build_data
    from fedmosaic.config import load_experiment
    from fedmosaic.core.errors import FedmosaicError
    from fedmosaic.models import build_model
    from fedmosaic.watermark.from_config import settings, trigger_spec
    from fedmosaic.watermark.keys import WatermarkKey
    from fedmosaic.watermark.verify import verify_watermark

    try:
        exp = load_experiment(experiment)
        section = dict(exp["watermark"])
        if key_file is not None:
            section["key_file"] = str(key_file)
        s = settings(section)
        key = WatermarkKey.from_file(s["key_file"])
        if not model.is_file():
            _fail(f"{model} is not a file")
        try:
            state = torch.load(model, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt or foreign file: say so, no traceback
            _fail(f"{model} is not a readable PyTorch state dict ({type(exc).__name__})")
        fed = build_data(exp)
        net = build_model(exp["model"]["kind"], fed.feature_shape, fed.num_classes,
                          hidden=tuple(exp["model"]["hidden"]))
        try:
            net.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            _fail(f"{model} does not fit the experiment's model: {exc}")
        verdict = verify_watermark(net, key, input_shape=tuple(fed.feature_shape),
                                   num_classes=fed.num_classes, spec=trigger_spec(s),
                                   threshold=threshold if threshold is not None
                                   else s["threshold"])
    except FedmosaicError as exc:
        _fail(str(exc))
    typer.echo(verdict.summary())
    raise typer.Exit(0 if verdict.owned else 1)
