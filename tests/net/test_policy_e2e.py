"""Issue 24 acceptance with real processes: a task without secure aggregation is refused by a
client whose privacy policy requires it -- no silent downgrade to a plaintext upload."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from fedmosaic.net.certs import create_federation
from tests.net.conftest import Processes, experiment_toml, wait_for_endpoint

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def small_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("policy-e2e-fed")
    create_federation(root, clients=["client_00", "client_01"], ca_passphrase=None)
    return root


def test_a_client_requiring_secure_aggregation_refuses_a_plaintext_task(
        tmp_path: Path, small_federation: Path, processes: Processes) -> None:
    experiment = experiment_toml(tmp_path / "exp.toml", small_federation, rounds=1,
                                 server={"min_clients": 2})
    policy = tmp_path / "policy.toml"
    policy.write_text('[secagg]\nmode = "secagg+"\n')
    out = tmp_path / "out"
    # Server and clients start together (each spends seconds importing torch); the clients
    # retry until the server listens on the port chosen here.
    port = _free_port()
    processes.server(experiment, out, "--port", str(port))
    processes.client("client_00", port, small_federation, experiment, "--policy", str(policy))
    processes.client("client_01", port, small_federation, experiment)  # no policy
    assert wait_for_endpoint(out, processes)["port"] == port
    assert processes.wait("server", 120) == 0, processes.log("server")
    for cid in ("client_00", "client_01"):
        assert processes.wait(cid, 60) == 0, processes.log(cid)
    refusing, plain, server = (processes.log("client_00"), processes.log("client_01"),
                               processes.log("server"))
    # The refusal is logged on both sides, with its reason.
    assert "refusing the task (secagg_required)" in refusing
    assert "client client_00 refused its task (secagg_required): this client's privacy " \
           "policy requires secure aggregation" in server
    # client_00 never uploaded: nothing trained, nothing accepted, no plaintext upload.
    assert "trained rounds [], 0 updates accepted" in refusing and "refused rounds [1]" in refusing
    assert "uploading in plaintext" not in refusing and "round 1: training" not in refusing
    assert "no privacy policy" not in refusing
    # The other client, without a policy, is warned and says it uploads in plaintext.
    assert "warning: no privacy policy" in plain.replace("\n", " ")
    assert "uploading in plaintext" in plain and "trained rounds [1], 1 updates accepted" in plain
    # The round completed without client_00's update (min_updates = 1).
    history = json.loads((out / "metrics.json").read_text())
    assert [(r["round"], r["updates"], r["failures"]) for r in history] == [(1, 1, 1)]
