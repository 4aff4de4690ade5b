"""``fedmosaic certs``: the federation's CA and credentials: create, request, sign, revoke.

Kept free of heavy imports so that ``fedmosaic --help`` stays fast; the work is in
``fedmosaic.net.certs``. Output names files, ids and serials, never key material.

The CA key is encrypted with a passphrase unless ``init --no-passphrase`` says otherwise. The
passphrase comes from ``FEDMOSAIC_CA_PASSPHRASE``, from ``--passphrase-file`` (its first line),
or from a prompt at a terminal -- never from a command-line value, which other users could read
in ``ps`` and which shells keep in their history.
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

PASSPHRASE_ENV = "FEDMOSAIC_CA_PASSPHRASE"

certs_app = typer.Typer(no_args_is_help=True, add_completion=False,
                        help="Create and manage the federation's CA, server and client "
                             "certificates (mutual TLS).")
# Off a terminal rich would wrap the table at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)  # an error stays one line on a pipe

DirOption = Annotated[Path, typer.Option("--dir", "--out", "-d",
                                         help="federation directory (holds ca.pem, crl.pem)")]
PassFileOption = Annotated[Path | None, typer.Option(
    "--passphrase-file", help=f"file whose first line is the CA key's passphrase (else "
                              f"${PASSPHRASE_ENV}, else a prompt)")]


class _NoPassphrase(Exception):
    pass


def _read_passphrase(passphrase_file: Path | None, *, confirm: bool) -> bytes:
    if passphrase_file is not None:
        try:
            lines = passphrase_file.read_bytes().splitlines()
        except OSError as exc:
            raise _NoPassphrase(f"cannot read {passphrase_file}: {exc.strerror}") from None
        if not lines or not lines[0]:
            raise _NoPassphrase(f"{passphrase_file} is empty")
        return lines[0]
    value = os.environ.get(PASSPHRASE_ENV)
    if value:
        return value.encode()
    if not sys.stdin.isatty():
        raise _NoPassphrase(f"the CA key needs a passphrase: set {PASSPHRASE_ENV}, give "
                            "--passphrase-file, or run at a terminal to be prompted")
    first = getpass.getpass("CA key passphrase: ").encode()
    if confirm and getpass.getpass("repeat it: ").encode() != first:
        raise _NoPassphrase("the two passphrases differ")
    return first


def _passphrase_for(out: Path, passphrase_file: Path | None) -> bytes | None:
    """The passphrase to open an existing CA key, asked only if the key is encrypted."""
    from fedmosaic.net.certs import ca_key_is_encrypted

    if not ca_key_is_encrypted(out):
        return None
    return _read_passphrase(passphrase_file, confirm=False)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}")  # escape: "[x]" is not markup
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
    passphrase_file: PassFileOption = None,
    no_passphrase: Annotated[bool, typer.Option(
        "--no-passphrase", help="store the CA key unencrypted (tests and throwaway "
                                "federations only)")] = False,
) -> None:
    """Create the CA, the server certificate, the operator and one credential per client.

    Clients may also be left out here (--clients '') and join later with 'certs request' on
    their machine and 'certs sign' here, so that their keys never leave them.
    """
    from fedmosaic.core.errors import FedmosaicError
    from fedmosaic.net.certs import create_federation

    ids = [c.strip() for c in clients.split(",") if c.strip()]
    try:
        passphrase = None if no_passphrase else _read_passphrase(passphrase_file, confirm=True)
        paths = create_federation(out, ids, server_names=server_name or ["localhost", "127.0.0.1"],
                                  days=days, key_type=key_type,  # type: ignore[arg-type]
                                  overwrite=overwrite, ca_passphrase=passphrase)
    except (FedmosaicError, _NoPassphrase) as exc:
        _fail(str(exc))
        return
    console.print(f"federation created in {paths.root}: CA, server, operator and "
                  f"{len(ids)} client credentials, empty CRL; CA key "
                  f"{'UNENCRYPTED' if no_passphrase else 'encrypted with the passphrase'}.")
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
    passphrase_file: PassFileOption = None,
) -> None:
    """Issue a certificate and key for a new client (prefer 'request' + 'sign': then the
    operator never holds the client's key)."""
    from fedmosaic.core.errors import FedmosaicError
    from fedmosaic.net import certs

    try:
        cert, key = certs.add_client(out, client_id, days,
                                     ca_passphrase=_passphrase_for(out, passphrase_file))
    except (FedmosaicError, _NoPassphrase) as exc:
        _fail(str(exc))
        return
    console.print(f"client {client_id!r}: certificate {cert}, key {key}")


@certs_app.command("revoke")
def revoke(
    client_id: Annotated[str, typer.Argument(help="client id to revoke")],
    out: DirOption,
    passphrase_file: PassFileOption = None,
) -> None:
    """Revoke a client's certificate (reissues the signed CRL; the server reloads it)."""
    from fedmosaic.core.errors import FedmosaicError
    from fedmosaic.net import certs

    try:
        serial = certs.revoke(out, client_id,
                              ca_passphrase=_passphrase_for(out, passphrase_file))
    except (FedmosaicError, _NoPassphrase) as exc:
        _fail(str(exc))
        return
    console.print(f"revoked {client_id!r} (serial {serial:x}); copy "
                  f"{certs.FederationPaths(out).crl} to the server")


@certs_app.command("request")
def request(
    client_id: Annotated[str, typer.Argument(help="this client's id (as agreed with the "
                                                  "operator); ignored with --server")],
    out: Annotated[Path, typer.Option("--out", "-o", help="where to write <id>.key and "
                                                          "<id>.csr")] = Path("."),
    key_type: Annotated[str, typer.Option(help="ec-p256, ec-p384, rsa-3072 or rsa-4096")
                        ] = "ec-p256",
    server: Annotated[bool, typer.Option("--server", help="a request for the server "
                                                          "certificate (certs renew-server)")
                      ] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing key")] = False,
) -> None:
    """On the client: make a private key (kept here, mode 0600) and a CSR for the operator."""
    from fedmosaic.core.errors import FedmosaicError
    from fedmosaic.net.certs import request_certificate

    try:
        key, csr = request_certificate(out, client_id, key_type,  # type: ignore[arg-type]
                                       role="server" if server else "client",
                                       overwrite=overwrite)
    except FedmosaicError as exc:
        _fail(str(exc))
        return
    console.print(f"key {key} (keep it here, never send it); send {csr} to the operator, "
                  "who runs 'fedmosaic certs sign'")


@certs_app.command("sign")
def sign(
    csr: Annotated[Path, typer.Argument(help="the client's .csr file")],
    client_id: Annotated[str, typer.Option("--id", help="the client id to certify (must match "
                                                        "the request's subject)")],
    out: DirOption,
    days: Annotated[int | None, typer.Option(help="validity in days (default: as at init)")
                    ] = None,
    cert_out: Annotated[Path | None, typer.Option(
        "--cert-out", help="where to write the certificate (default clients/<id>.pem)")] = None,
    passphrase_file: PassFileOption = None,
) -> None:
    """On the operator's machine: issue a client certificate from a CSR (our profile only)."""
    from fedmosaic.core.errors import FedmosaicError
    from fedmosaic.net import certs

    try:
        cert = certs.sign_request(out, csr, client_id, days, out=cert_out,
                                  ca_passphrase=_passphrase_for(out, passphrase_file))
    except (FedmosaicError, _NoPassphrase) as exc:
        _fail(str(exc))
        return
    paths = certs.FederationPaths(out)
    console.print(f"client {client_id!r}: certificate {cert}; send it with {paths.ca_cert.name} "
                  f"and {paths.crl.name} to the client")


@certs_app.command("renew-server")
def renew_server(
    out: DirOption,
    csr: Annotated[Path | None, typer.Option(
        "--csr", help="the server host's CSR ('certs request server --server'); without it a "
                      "new server.key is made here")] = None,
    server_name: Annotated[list[str] | None, typer.Option(
        "--server-name", help="DNS name or IP (repeatable; default: the current ones)")] = None,
    days: Annotated[int | None, typer.Option(help="validity in days (default: as at init)")
                    ] = None,
    passphrase_file: PassFileOption = None,
) -> None:
    """Revoke the server certificate and issue the next generation (e.g. after a key leak)."""
    from fedmosaic.core.errors import FedmosaicError
    from fedmosaic.net import certs

    try:
        serial, generation = certs.renew_server(
            out, csr=csr, server_names=server_name, days=days,
            ca_passphrase=_passphrase_for(out, passphrase_file))
    except (FedmosaicError, _NoPassphrase) as exc:
        _fail(str(exc))
        return
    paths = certs.FederationPaths(out)
    console.print(f"server certificate {serial:x} revoked; generation {generation} in "
                  f"{paths.server_cert}. Install it on the server and restart it, then give "
                  f"every client the new {paths.crl.name}: clients holding it refuse the old "
                  "certificate.")


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
