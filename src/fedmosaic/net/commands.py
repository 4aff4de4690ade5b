"""``fedmosaic server``, ``fedmosaic client`` and ``fedmosaic status`` (issue #5).

Registered in ``fedmosaic.cli``; heavy modules (torch, grpc) are imported inside the commands
so that ``fedmosaic --help`` stays fast.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

console = Console(width=None if sys.stdout.isatty() else 160)
# One line per error however long: a log collector or `grep` on a pipe sees the whole message.
err = Console(stderr=True, soft_wrap=True)

CONFIG_COPY = "experiment.toml"
_json_logs = False  # set by _setup_logging: the final error goes to the JSON log stream too


def _fail(message: str) -> None:
    if _json_logs:
        # A log pipeline reading JSON lines must see why the process ended, not only the
        # plain line for a person; both go to stderr.
        import logging

        logging.getLogger("fedmosaic.cli").error(message)
    err.print(f"[bold red]error:[/] {escape(message)}")  # escape: "[data]" is not markup
    raise typer.Exit(2)


def _quick_exit() -> None:
    """Let the process exit promptly once the command returns.

    At interpreter exit, module finalization runs several full cyclic garbage collections
    over the whole heap. A server or client has torch, scipy, pandas and scikit-learn loaded
    (about 2,700 modules and 300,000 tracked objects), so each pass took about a second and
    the process lingered 4 s (13-16 s on a loaded machine) after its last output, the main
    thread in ``gc_collect_main`` under ``finalize_modules``. ``gc.freeze`` at exit moves
    every object to the permanent generation, which those passes skip. Nothing is lost:
    objects are still freed by reference counting as the modules are cleared, the other
    ``atexit`` handlers (``logging.shutdown`` flushing the log) still run, the outputs were
    written atomically and closed before the command returned, and the gRPC server and its
    threads were stopped and joined (``RunningServer.stop``); only unreachable reference
    cycles are left to the operating system, whose finalizers Python never promises to run
    at exit anyway.
    """
    import atexit
    import gc

    atexit.register(gc.freeze)  # runs before the handlers registered earlier (LIFO)


def _setup_logging(json_logs: bool, level: str = "INFO") -> None:
    """Plain or structured (one JSON object per line) logs on stderr."""
    from fedmosaic.net.monitoring import configure_logging

    global _json_logs
    _json_logs = json_logs
    configure_logging(level=level, json=json_logs)


def server(
    experiment: Annotated[Path, typer.Argument(help="experiment .toml file")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="output directory")] = None,
    port: Annotated[int | None, typer.Option(help="listen port (0: any free port)")] = None,
    address: Annotated[str | None, typer.Option(help="listen address")] = None,
    credentials: Annotated[Path | None, typer.Option(
        help="federation directory (ca.pem, server.pem, server.key, crl.pem)")] = None,
    metrics_port: Annotated[int | None, typer.Option(
        help="serve Prometheus metrics on this port (0: any free port)")] = None,
    min_clients: Annotated[int | None, typer.Option(
        min=1, help="connected clients needed before a round starts")] = None,
    json_logs: Annotated[bool, typer.Option(help="structured JSON log lines")] = False,
    trainer: Annotated[str | None, typer.Option(
        help="module:attr (or file.py:attr) of your Trainer or a zero-argument factory of "
             "one; replaces the experiment's [model]")] = None,
) -> None:
    """Serve an experiment to remote clients over gRPC with mutual TLS.

    Resumes automatically from a checkpoint of the same experiment in the output directory.
    """
    from fedmosaic.config import load_experiment
    from fedmosaic.core.errors import FedmosaicError
    from fedmosaic.net.server import serve
    from fedmosaic.net.settings import DeploySettings

    _setup_logging(json_logs)
    _quick_exit()
    try:
        from fedmosaic.config import trainer_override

        exp = load_experiment(experiment, trainer=trainer_override(trainer)
                              if trainer is not None else None)
        settings = DeploySettings.from_section(
            exp["server"], port=port, address=address, metrics_port=metrics_port,
            min_clients=min_clients,
            credentials=str(credentials) if credentials is not None else None)
        out = output or exp.output
        out.mkdir(parents=True, exist_ok=True)
        if not (out / CONFIG_COPY).is_file():
            shutil.copyfile(experiment, out / CONFIG_COPY)
        metrics = _metrics(settings)
        # Failed TLS handshakes never reach fedmosaic as calls: counted from gRPC's log
        # lines on this process's standard error (net/handshake_tap.py).
        from fedmosaic.net.handshake_tap import TAP

        TAP.install()
        if metrics is not None:
            TAP.listeners.append(metrics.handshake_failed)
        result = serve(exp, out, settings, metrics=metrics)
        last = result.history[-1] if result.history else {}
        which, acc = ("test accuracy", last.get("test_accuracy")) \
            if "fed_test_accuracy" not in last or "test_accuracy" in last \
            else ("federated test accuracy", last["fed_test_accuracy"])
        console.print(f"done: {len(result.history)} rounds; {which} "
                      f"{float('nan') if acc is None else acc:.4f}; results in {out}")
    except FedmosaicError as exc:
        _fail(str(exc))


def _metrics(settings: Any) -> Any:
    """The Prometheus endpoint, when a metrics port is configured."""
    if settings.metrics_port is None:
        return None
    from fedmosaic.net.monitoring import ServerMetrics

    metrics = ServerMetrics()
    metrics.start_http(settings.metrics_port)  # loopback only: plain, unauthenticated HTTP
    return metrics


def client(
    server: Annotated[str, typer.Option("--server", help="HOST:PORT of the federation server")],
    credentials: Annotated[Path | None, typer.Option(
        help="federation directory: use ca.pem and clients/ID.pem/.key from it")] = None,
    client_id: Annotated[str | None, typer.Option(
        "--id", help="this client's id: which certificate (with --credentials) and which "
                     "client's data (with --config; default: the certificate's id)")] = None,
    ca: Annotated[Path | None, typer.Option(help="federation CA certificate")] = None,
    cert: Annotated[Path | None, typer.Option(help="this client's certificate")] = None,
    key: Annotated[Path | None, typer.Option(help="this client's private key")] = None,
    data: Annotated[Path | None, typer.Option(
        help="training data: .npz (arrays x and y), .csv or .parquet (with --label)")] = None,
    label: Annotated[str | None, typer.Option(
        help="the label column of a .csv or .parquet --data file")] = None,
    test_data: Annotated[Path | None, typer.Option(
        help="local test split for federated evaluation (same format as --data)")] = None,
    config: Annotated[Path | None, typer.Option(
        help="experiment .toml: train on this client's data as the experiment describes it, "
             "with the experiment's model unless --trainer is given")] = None,
    trainer: Annotated[str | None, typer.Option(
        help="module:attr or file.py:attr of a Trainer or a zero-argument factory")] = None,
    server_name: Annotated[str | None, typer.Option(
        help="name to verify in the server certificate (default: the host dialled)")] = None,
    retry_budget: Annotated[float, typer.Option(
        help="give up after this many seconds without progress with the server")] = 300.0,
    policy: Annotated[Path | None, typer.Option(
        help="this client's privacy policy (.toml): tasks that violate it are refused")] = None,
    json_logs: Annotated[bool, typer.Option(help="structured JSON log lines")] = False,
) -> None:
    """Join a federation, train on local data each round, until the server says done.

    Exit status: 0 done, 2 usage or configuration error, 3 refused or incompatible
    (credentials, model, data: retrying cannot help), 4 server unreachable within
    --retry-budget, 5 local training failed, 130 interrupted (docs/troubleshooting.md).
    """
    import logging

    from fedmosaic.core.errors import FedmosaicError
    from fedmosaic.net.client_errors import ClientError, ExitCode

    _setup_logging(json_logs)
    _quick_exit()
    try:
        _check_client_usage(data, label, test_data, config, trainer)
        ca, cert, key = _credential_paths(credentials, client_id, ca, cert, key)
        from fedmosaic.net.client_errors import PermanentError
        from fedmosaic.net.preflight import check_credentials, check_server, expected_server_name

        # Before anything slow (torch, the data): credentials that cannot work, and a server
        # that will not have them (or that this client does not trust), say so now.
        the_policy = None
        if policy is not None:  # a usage error: before the credentials and the network
            from fedmosaic.net.policy import PrivacyPolicy

            the_policy = PrivacyPolicy.load(policy)
        credential = check_credentials(ca, cert, key)
        verdict = check_server(server, ca, cert, key, timeout=3.0,
                               server_name=expected_server_name(credential, server, server_name))
        if verdict is not None:
            raise PermanentError(verdict.message, reason=verdict.reason)
        if the_policy is None:
            warning = ("no privacy policy (--policy FILE): this client accepts every task the "
                       "server sends, including plaintext uploads without secure aggregation "
                       "and any noise level")
            if _json_logs:
                logging.getLogger("fedmosaic.client").warning(warning)
            err.print(f"[bold yellow]warning:[/] {warning}")
        the_trainer, train, test = _client_setup(cert, data, label, test_data, config, trainer,
                                                 client_id)
        from fedmosaic.net.client import run_client

        report = run_client(server, ca=ca, cert=cert, key=key, trainer=the_trainer, data=train,
                            test_data=test, server_name=server_name,
                            retry_budget=retry_budget, policy=the_policy)
        refused = f", refused rounds {report.refused}" if report.refused else ""
        console.print(f"client {report.client_id}: trained rounds {report.rounds}, "
                      f"{report.accepted} updates accepted, joined {report.joins} times"
                      f"{refused}")
    except ClientError as exc:
        _client_exit(exc.message, exc.exit_code, exc.reason)
    except FedmosaicError as exc:
        _client_exit(str(exc), ExitCode.USAGE, "usage")
    except KeyboardInterrupt:
        _client_exit("interrupted", ExitCode.INTERRUPTED, "interrupted")


def _client_exit(message: str, code: int, reason: str) -> None:
    """End ``fedmosaic client`` with one line (and, with --json-logs, a JSON log record
    carrying ``exit_code`` and ``reason``): no traceback for what is not a bug."""
    if _json_logs:
        import logging

        logging.getLogger("fedmosaic.client").error(
            message, extra={"exit_code": int(code), "reason": reason})
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(int(code))


def _usage(message: str) -> None:
    from fedmosaic.net.client_errors import ClientError, ExitCode

    raise ClientError(message, reason="usage", exit_code=ExitCode.USAGE)


def _credential_paths(credentials: Path | None, client_id: str | None, ca: Path | None,
                      cert: Path | None, key: Path | None) -> tuple[Path, Path, Path]:
    if credentials is not None:
        from fedmosaic.net.certs import FederationPaths

        if client_id is None:
            _usage("--credentials needs --id (which client's certificate to use)")
        paths = FederationPaths(credentials)
        ca = ca or paths.ca_cert
        cert = cert or paths.client_cert(str(client_id))
        key = key or paths.client_key(str(client_id))
    if ca is None or cert is None or key is None:
        _usage("give --ca, --cert and --key, or --credentials DIR --id ID")
    return ca, cert, key  # type: ignore[return-value]


def _check_client_usage(data: Path | None, label: str | None, test_data: Path | None,
                        config: Path | None, trainer_spec: str | None) -> None:
    """Options that do not go together, said before anything is loaded."""
    if (data is None) == (config is None):
        _usage("give exactly one of --data FILE (.npz, .csv or .parquet) and --config "
               "EXPERIMENT.toml")
    if config is not None and (label is not None or test_data is not None):
        _usage("--label and --test-data go with --data; with --config the experiment's [data] "
               "table names the data")
    if data is not None:
        if label is None and data.suffix.lower() in (".csv", ".parquet"):
            _usage(f"--data {data} needs --label COLUMN (the column that holds the labels)")
        if trainer_spec is None:
            _usage("--data needs --trainer module:attr or file.py:attr (the model to train)")


def _client_setup(cert: Path, data: Path | None, label: str | None, test_data: Path | None,
                  config: Path | None, trainer_spec: str | None,
                  client_id: str | None) -> tuple[Any, Any, Any]:
    """The trainer, the training data and the local test split (or None) of a client."""
    from fedmosaic.task import load_trainer

    if config is None:
        from fedmosaic.data import load_table

        train = load_table(data, label=label)  # type: ignore[arg-type]
        test = load_table(test_data, label=label) if test_data is not None else None
        return load_trainer(str(trainer_spec), Path.cwd()), train, test
    return _config_setup(cert, config, trainer_spec, client_id)


def _config_setup(cert: Path, config: Path, trainer_spec: str | None,
                  client_id: str | None) -> tuple[Any, Any, Any]:
    """``--config``: this client's data as the experiment describes it (``build.client_data``;
    for a built-in data set, its partition) and the experiment's model."""
    import torch

    from fedmosaic import build
    from fedmosaic.config import USER_DATASETS, load_experiment
    from fedmosaic.core.errors import ConfigError, FedmosaicError
    from fedmosaic.net.certs import certificate_id
    from fedmosaic.task import load_trainer

    exp = load_experiment(config)
    if exp[""]["threads"] > 0:
        torch.set_num_threads(exp[""]["threads"])
    cid = client_id or certificate_id(cert.read_bytes())
    d = exp["data"]
    fed = None
    if d["dataset"] in USER_DATASETS:
        local = build.client_data(exp, cid)  # reads this client's data only
    else:
        fed = build.build_data(exp)  # a built-in data set: partitioned as in simulation
        if cid not in fed.client_ids:
            raise FedmosaicError(f"'{cid}' is not a client of {config} (clients: "
                                 f"{', '.join(fed.client_ids[:5])}, ...)")
        local = fed.client(cid)
    if trainer_spec is not None:
        the_trainer = load_trainer(trainer_spec, Path.cwd())
    elif "factory" in exp["model"]:
        the_trainer = build.trainer_factory(exp)()
    elif fed is not None:
        the_trainer = build.build_trainer(exp, fed)
    else:
        # [model] kind with the clients' own files: the model the server builds, from the
        # experiment's declared shape and classes (not from this client's data, which may
        # differ: the join then names the difference).
        if d.get("num_classes") is None:
            raise ConfigError("data.num_classes", "<missing>", f"required for fedmosaic "
                              f"client with [model] kind and dataset '{d['dataset']}'")
        shape = tuple(d["feature_shape"]) if "feature_shape" in d \
            else tuple(local.train.x.shape[1:])
        the_trainer = build.trainer_factory(exp, feature_shape=shape,
                                            num_classes=d["num_classes"])()
    return the_trainer, local.train, local.test


def status(
    server: Annotated[str, typer.Option("--server", help="HOST:PORT of the federation server")],
    credentials: Annotated[Path | None, typer.Option(
        help="federation directory: use ca.pem and operator.pem/.key from it")] = None,
    ca: Annotated[Path | None, typer.Option(help="federation CA certificate")] = None,
    cert: Annotated[Path | None, typer.Option(help="operator certificate")] = None,
    key: Annotated[Path | None, typer.Option(help="operator private key")] = None,
    server_name: Annotated[str | None, typer.Option(help="name in the server certificate")
                           ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show a running server's progress (needs the operator credential)."""
    import grpc

    from fedmosaic.net.channel import Stubs, open_channel
    from fedmosaic.net.proto import fedmosaic_pb2 as pb

    if credentials is not None:
        from fedmosaic.net.certs import FederationPaths

        paths = FederationPaths(credentials)
        ca, cert, key = ca or paths.ca_cert, cert or paths.operator_cert, key or paths.operator_key
    if ca is None or cert is None or key is None:
        _fail("give --ca, --cert and --key, or --credentials DIR")
    assert ca is not None and cert is not None and key is not None
    channel = open_channel(server, ca, cert, key, server_name=server_name)
    try:
        reply = Stubs(channel).status(pb.StatusRequest(), timeout=10)
    except grpc.RpcError as exc:
        _fail(f"{server}: {exc.code().name}: {exc.details()}")
        return
    finally:
        channel.close()
    info = {"experiment": reply.experiment, "state": reply.state, "round": reply.round,
            "rounds": reply.rounds, "completed_rounds": reply.completed_rounds,
            "connected_clients": reply.connected_clients, "round_tasks": reply.round_tasks,
            "round_received": reply.round_received, "round_refused": reply.round_refused,
            "uptime_seconds": round(reply.uptime_seconds, 1),
            "last_round": json.loads(reply.last_record_json or "{}"),
            "client_issues": [{"client_id": i.client_id, "code": i.code, "reason": i.reason,
                               "round": i.round, "age_seconds": round(i.age_seconds, 1)}
                              for i in reply.client_issues],
            "refused_messages": dict(sorted(reply.refused_messages.items())),
            "tls_handshake_failures": dict(sorted(reply.tls_handshake_failures.items()))}
    if as_json:
        print(json.dumps(info))
        return
    last = info["last_round"]
    acc, which = last.get("test_accuracy"), "test accuracy"
    if acc is None and last.get("fed_test_accuracy") is not None:
        acc, which = last["fed_test_accuracy"], "federated test accuracy"
    # escape: names and reasons come from the experiment and the clients ("[model]").
    console.print(f"[bold]{escape(info['experiment'])}[/]: {info['state']}, "
                  f"{info['completed_rounds']}/{info['rounds']} rounds complete, "
                  f"{info['connected_clients']} clients connected, round {info['round']}: "
                  f"{info['round_received']}/{info['round_tasks']} updates"
                  + (f" ({info['round_refused']} tasks refused by clients)"
                     if info["round_refused"] else "")
                  + (f"; last {which} {acc:.4f}" if acc is not None else ""),
                  soft_wrap=True)
    for what, counts in (("refused calls", info["refused_messages"]),
                         ("refused TLS handshakes", info["tls_handshake_failures"])):
        if counts:
            console.print(f"  {what}: {sum(counts.values())} ("
                          + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")",
                          soft_wrap=True)
    for issue in info["client_issues"]:
        when = "at join" if issue["round"] == 0 else f"round {issue['round']}"
        console.print(f"  {escape(issue['client_id'])}: {issue['code']} ({when}, "
                      f"{_age(issue['age_seconds'])} ago): {escape(issue['reason'])}",
                      soft_wrap=True)


def _age(seconds: float) -> str:
    """'42s', '7m', '3h' or '2d'."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"
