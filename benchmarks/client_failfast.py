"""How fast a ``fedmosaic client`` that cannot take part gives up (issue #10, item 3).

A client whose problem retrying cannot fix (credentials from another CA, an expired or revoked
certificate, another model, data of the wrong shape, labels beyond the task's classes) must
exit at once, with one line saying why and a permanent exit code, not retry until its budget
runs out. This script starts a real ``fedmosaic server`` (its own process, mutual TLS on
loopback, a task of 64 features and 10 classes, waiting for clients) and times real
``fedmosaic client`` processes in each of these cases, from process start to exit (Python
start-up and imports included), ``--repeat`` times each; it also times how long a bare
interpreter takes to import what a client imports, which is most of it.

Run: .venv/bin/python benchmarks/client_failfast.py [--repeat 5]
Writes benchmarks/results/client_failfast.json; docs/benchmarks.md is regenerated from it by
benchmarks/report.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
from common import machine, save
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmosaic.net.certs import FederationPaths, create_federation, revoke

TASK = textwrap.dedent('''
    import fedmosaic as fm
    from torch import nn


    def _mlp(hidden):
        return lambda: nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


    def make_trainer():
        return fm.TorchTrainer(_mlp(16), lr=0.1)


    def other_trainer():
        return fm.TorchTrainer(_mlp(24), lr=0.1)
''')


def _npz(path: Path, features: int = 64, top_label: int = 9) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.normal(size=(40, features)).astype(np.float32),
             y=(np.arange(40) % (top_label + 1)).astype(np.int64))
    return path


def _expired(fed: FederationPaths, out: Path) -> tuple[Path, Path]:
    """A client certificate signed by the federation's CA whose validity ended yesterday."""
    ca = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(fed.ca_key.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "late"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "client")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=30))
            .not_valid_after(now - dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    (out / "late.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "late.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return out / "late.pem", out / "late.key"


def _creds(fed: FederationPaths, cid: str) -> list[str]:
    return ["--ca", str(fed.ca_cert), "--cert", str(fed.client_cert(cid)), "--key",
            str(fed.client_key(cid))]


def _time_client(script: str, port: int, args: list[str], cwd: Path) -> dict[str, object]:
    start = time.perf_counter()
    proc = subprocess.run([script, "client", "--server", f"127.0.0.1:{port}",
                           "--retry-budget", "120", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=180)
    seconds = time.perf_counter() - start
    lines = proc.stderr.strip().splitlines()
    return {"seconds": seconds, "exit_code": proc.returncode,
            "message": lines[-1] if lines else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    script = str(Path(sys.executable).with_name("fedmosaic"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fed = create_federation(root / "fed", clients=["c1", "gone"], ca_passphrase=None)
        revoke(root / "fed", "gone")
        foreign = create_federation(root / "foreign", clients=["c1"], ca_passphrase=None)
        late_cert, late_key = _expired(fed, root)
        (root / "task.py").write_text(TASK)
        good = _npz(root / "good.npz")
        narrow = _npz(root / "narrow.npz", features=10)
        label15 = _npz(root / "label15.npz", top_label=15)
        (root / "experiment.toml").write_text(textwrap.dedent(f"""\
            name = "failfast-bench"
            rounds = 1

            [data]
            dataset = "files"
            clients = {{ c1 = "good.npz" }}
            feature_shape = [64]
            num_classes = 10

            [model]
            factory = "task:make_trainer"

            [server]
            address = "127.0.0.1"
            port = 0
            credentials = "{root / 'fed'}"
            min_clients = 50
            wait_for_clients = 3600.0
        """))
        server = subprocess.Popen([script, "server", "experiment.toml", "--output", "out"],
                                  cwd=root, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            endpoint = root / "out" / "endpoint.json"
            for _ in range(600):
                if endpoint.is_file():
                    break
                time.sleep(0.1)
            port = json.loads(endpoint.read_text())["port"]
            trainer = ["--trainer", "task:make_trainer"]
            cases = {
                "credentials from another CA": [*_creds(foreign, "c1"), "--data", str(good),
                                                *trainer],
                "expired certificate": ["--ca", str(fed.ca_cert), "--cert", str(late_cert),
                                        "--key", str(late_key), "--data", str(good),
                                        *trainer],
                "revoked certificate": [*_creds(fed, "gone"), "--data", str(good), *trainer],
                "another model layout": [*_creds(fed, "c1"), "--data", str(good),
                                         "--trainer", "task:other_trainer"],
                "10 features, the task's model expects 64": [*_creds(fed, "c1"), "--data",
                                                             str(narrow), *trainer],
                "label 15 with 10 classes": [*_creds(fed, "c1"), "--data", str(label15),
                                             *trainer],
            }
            results: dict[str, dict[str, object]] = {}
            for name, case in cases.items():
                runs = [_time_client(script, port, case, root) for _ in range(args.repeat)]
                secs = [float(r["seconds"]) for r in runs]  # type: ignore[arg-type]
                results[name] = {"seconds": secs, "median_s": statistics.median(secs),
                                 "max_s": max(secs),
                                 "exit_codes": sorted({int(r["exit_code"]) for r in runs}),
                                 "message": runs[-1]["message"]}
                print(f"{name}: median {statistics.median(secs):.2f} s, exit "
                      f"{results[name]['exit_codes']}: {runs[-1]['message']}", flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        imports = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import torch, pandas, fedmosaic.net.client, "
                            "fedmosaic.net.commands, fedmosaic.build"], check=True)
            imports.append(time.perf_counter() - start)
    save("client_failfast", {
        "command": f"python benchmarks/client_failfast.py --repeat {args.repeat}",
        "machine": {**machine(), "date": dt.datetime.now(dt.timezone.utc).isoformat(),
                    "load_average_1min": os.getloadavg()[0]},
        "repeat": args.repeat, "cases": results,
        "imports": {"seconds": imports, "median_s": statistics.median(imports)}})
    print("wrote benchmarks/results/client_failfast.json")


if __name__ == "__main__":
    main()
