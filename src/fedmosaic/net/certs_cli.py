"""``fedmosaic certs``: create a federation's CA and credentials, add and revoke clients.

Kept free of heavy imports so that ``fedmosaic --help`` stays fast; the work is in
``fedmosaic.net.certs``. Output names files, ids and serials, never key material.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

# The CA key is encrypted with this passphrase when the variable is set (read from the
# environment, never from the command line, where other users could see it in `ps`).
PASSPHRASE_ENV = "FEDMOSAIC_CA_PASSPHRASE"

certs_app = typer.Typer(no_args_is_help=True, add_completion=False,
                        help="Create and manage the federation's CA, server and client "
                             "certificates (mutual TLS).")
# Off a terminal rich would wrap the table at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

DirOption = Annotated[Path, typer.Option("--dir", "--out", "-d",
                                         help="federation directory (holds ca.pem, crl.pem)")]


def _passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


@certs_app.command("init")
def init(
    out: DirOption,
    clients: Annotated[str, typer.Option(help="comma-separated client ids, e.g. a,b,c")],
    server_name: Annotated[list[str] | None, typer.Option(
        "--server-name", help="DNS name or IP the clients dial (repeatable; default "
                              "localhost and 127.0.0.1)")] = None,
    days: Annotated[int, typer.Option(help="validity in days")] = 365,
    key_type: Annotated[str, typer.Option(help="ec-p256, ec-p384, rsa-3072 or rsa-4096")
                        ] = "ec-p256",
    overwrite: Annotated[bool, typer.Option(help="replace an existing federation")] = False,
) -> None:
    """Create the CA, the server certificate, the operator and one credential per client."""
    from fedmosaic.core.errors import FedmosaicError
    from fedmosaic.net.certs import create_federation

    ids = [c.strip() for c in clients.split(",") if c.strip()]
    try:
        paths = create_federation(out, ids, server_names=server_name or ["localhost", "127.0.0.1"],
                                  days=days, key_type=key_type,  # type: ignore[arg-type]
                                  overwrite=overwrite, ca_passphrase=_passphrase())
    except FedmosaicError as exc:
        _fail(str(exc))
        return
    console.print(f"federation created in {paths.root}: CA, server, operator and "
                  f"{len(ids)} client credentials, empty CRL.")
    console.print(f"server needs: {paths.ca_cert.name}, {paths.server_cert.name}, "
                  f"{paths.server_key.name}, {paths.crl.name}; each client needs "
                  f"{paths.ca_cert.name} and clients/<id>.pem/.key. Keep {paths.ca_key.name} "
                  "off the server.")


@certs_app.command("add-client")
def add_client(
    client_id: Annotated[str, typer.Argument(help="new client id")],
    out: DirOption,
    days: Annotated[int | None, typer.Option(help="validity in days (default: as at init)")
                    ] = None,
) -> None:
    """Issue a certificate and key for a new client."""
    from fedmosaic.core.errors import FedmosaicError
    from fedmosaic.net import certs

    try:
        cert, key = certs.add_client(out, client_id, days, ca_passphrase=_passphrase())
    except FedmosaicError as exc:
        _fail(str(exc))
        return
    console.print(f"client {client_id!r}: certificate {cert}, key {key}")


@certs_app.command("revoke")
def revoke(
    client_id: Annotated[str, typer.Argument(help="client id to revoke")],
    out: DirOption,
) -> None:
    """Revoke a client's certificate (reissues the signed CRL; the server reloads it)."""
    from fedmosaic.core.errors import FedmosaicError
    from fedmosaic.net import certs

    try:
        serial = certs.revoke(out, client_id, ca_passphrase=_passphrase())
    except FedmosaicError as exc:
        _fail(str(exc))
        return
    console.print(f"revoked {client_id!r} (serial {serial:x}); copy "
                  f"{certs.FederationPaths(out).crl} to the server")


@certs_app.command("list")
def list_(out: DirOption) -> None:
    """List issued credentials: id, role, serial, expiry, revoked."""
    from fedmosaic.core.errors import FedmosaicError
    from fedmosaic.net.certs import list_credentials

    try:
        creds = list_credentials(out)
    except FedmosaicError as exc:
        _fail(str(exc))
        return
    table = Table(title=str(out))
    for col in ("id", "role", "serial", "expires (UTC)", "revoked"):
        table.add_column(col)
    for c in creds:
        table.add_row(c.id, c.role, format(c.serial, "x"), c.not_after.strftime("%Y-%m-%d %H:%M"),
                      "yes" if c.revoked else "no")
    console.print(table)
