"""Restarts and retries exactly as docs/deployment.md ("Faults and limits") promises (issue #18):
``round_retries`` is a budget per round, and a server restarted on a finished run serves DONE
(lingers) as a normal run's end does, after removing the temporary files an interrupted write
left. The real ``serve`` with mutual TLS on 127.0.0.1, clients as threads of the real client
runtime (``run_client``) with the experiment's own model and data partition."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedmosaic import build
from fedmosaic.config import load_experiment
from fedmosaic.net.certs import FederationPaths, create_federation
from fedmosaic.net.client import ClientReport, run_client
from fedmosaic.net.server import serve
from fedmosaic.net.settings import DeploySettings
from fedmosaic.net.transport import GrpcTransport

_FIT_LOCK = threading.Lock()  # client threads share torch's global RNG: fits must not interleave


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Credentials for the ids of a 2- or 3-client digits partition (client_0..client_2)."""
    root = tmp_path_factory.mktemp("restart-fed")
    create_federation(root, clients=[f"client_{i}" for i in range(3)], ca_passphrase=None)
    return root


def _experiment(path: Path, credentials: Path, *, clients: int, rounds: int,
                min_updates: int, server: dict[str, Any]) -> Path:
    settings = {"address": "127.0.0.1", "port": 0, "credentials": str(credentials),
                "min_clients": clients, "heartbeat_interval": 0.5, "round_deadline": 30.0,
                "wait_for_clients": 10.0, **server}
    lines = "\n".join(f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"'
                      for k, v in settings.items())
    path.write_text(f"""name = "restart-retry"
seed = 3
rounds = {rounds}

[data]
dataset = "digits"

[partition]
method = "iid"
clients = {clients}

[model]
kind = "mlp"
hidden = [8]

[train]
lr = 0.1
epochs = 1
batch_size = 64

[strategy]
min_updates = {min_updates}

[server]
{lines}
""")
    return path


class _Clients:
    """``run_client`` threads for the experiment's clients; ``fails(cid, round, attempt)``
    says whether that client's local training raises on its attempt-th task of that round
    (a MemoryError: reported to the server as ``training_failed``, the client goes on)."""

    def __init__(self, exp: Any, credentials: Path, port_of: Callable[[], int], *,
                 budget: float, fails: Callable[[str, int, int], bool] | None = None) -> None:
        self.paths = FederationPaths(credentials)
        self.fed = build.build_data(exp)
        self.port_of, self.budget = port_of, budget
        self.fails = fails or (lambda cid, rnd, attempt: False)
        self.attempts: dict[tuple[str, int], int] = {}
        self.reports: dict[str, ClientReport] = {}
        self.errors: dict[str, BaseException] = {}
        self.trainers = {cid: self._trainer(exp, cid) for cid in self.fed.client_ids}
        self.threads = [threading.Thread(target=self._run, args=(cid,), daemon=True)
                        for cid in self.fed.client_ids]

    def _trainer(self, exp: Any, cid: str) -> Any:
        trainer = build.build_trainer(exp, self.fed)
        fit = trainer.fit

        def failing_fit(weights: Any, data: Any, config: Any) -> Any:
            key = (cid, config.round)
            self.attempts[key] = self.attempts.get(key, 0) + 1
            if self.fails(cid, config.round, self.attempts[key]):
                raise MemoryError(f"injected: {cid} round {config.round}")
            with _FIT_LOCK:
                return fit(weights, data, config)

        trainer.fit = failing_fit  # type: ignore[method-assign]
        return trainer

    def _run(self, cid: str) -> None:
        while not self.port_of():
            time.sleep(0.05)
        try:
            self.reports[cid] = run_client(
                f"127.0.0.1:{self.port_of()}", ca=self.paths.ca_cert,
                cert=self.paths.client_cert(cid), key=self.paths.client_key(cid),
                trainer=self.trainers[cid], data=self.fed.client(cid).train,
                retry_budget=self.budget, poll_seconds=1.0)
        except BaseException as exc:  # recorded for the test's assertions
            self.errors[cid] = exc

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "clients still running"


class _PortOf:
    """The port of the server that ``serve`` starts (read from its transport's creation)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.port = 0
        import fedmosaic.net.server as server_module

        start = server_module.start_server

        def recording_start(*args: Any, **kwargs: Any) -> Any:
            running = start(*args, **kwargs)
            self.port = running.port
            return running

        monkeypatch.setattr(server_module, "start_server", recording_start)

    def __call__(self) -> int:
        return self.port


def test_round_retries_is_a_budget_per_round(tmp_path: Path, federation: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             fedlog: pytest.LogCaptureFixture) -> None:
    """min_updates = every client; rounds 1..4 each lose one client once (its first attempt
    of the round fails). Each round is retried once: with round_retries = 3 a budget for the
    whole run dies at round 4; a budget per round completes the run."""
    path = _experiment(tmp_path / "exp.toml", federation, clients=3, rounds=4, min_updates=3,
                       server={"round_retries": 3, "linger": 5.0})
    exp = load_experiment(path)
    port = _PortOf(monkeypatch)
    ids = build.build_data(exp).client_ids
    clients = _Clients(exp, federation, port, budget=30.0,
                       fails=lambda cid, rnd, attempt: attempt == 1 and cid == ids[rnd % 3])
    clients.start()
    out = tmp_path / "out"
    result = serve(exp, out, DeploySettings.from_section(exp["server"]))
    clients.join(timeout=20)

    assert [r["round"] for r in result.history] == [1, 2, 3, 4]  # each aggregated once
    assert all(r["updates"] == 3 for r in result.history)
    # Each round was retried exactly once, and its record says why.
    for record in result.history:
        assert len(record["retries"]) == 1, record
        assert "valid updates, strategy needs at least 3" in record["retries"][0]
    # (fedlog sees each record twice when the root logger propagates it too: de-duplicated)
    retries = list({id(r): r for r in fedlog.records
                    if getattr(r, "code", None) == "round_retry"}.values())
    assert [(r.round, r.attempt) for r in retries] == [(1, 2), (2, 2), (3, 2), (4, 2)]
    assert all("retry 1 of 3 for this round" in r.getMessage() for r in retries)
    assert not clients.errors, clients.errors
    # A client counts its uploads to a failed attempt too (the server discards them).
    assert all(sorted(set(rep.rounds)) == [1, 2, 3, 4] for rep in clients.reports.values())
    # Every round ran twice for every client: the failed attempt and its one retry.
    assert clients.attempts == {(cid, r): 2 for cid in ids for r in range(1, 5)}


def test_a_round_that_fails_past_its_budget_ends_the_run(tmp_path: Path, federation: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget still ends a round that keeps failing: round 2 fails 1 + round_retries
    times and the run stops there (round 1, retried once, does not use round 2's budget)."""
    from fedmosaic.core.errors import RoundFailedError

    path = _experiment(tmp_path / "exp.toml", federation, clients=2, rounds=3, min_updates=2,
                       server={"round_retries": 2, "linger": 0.0})
    exp = load_experiment(path)
    port = _PortOf(monkeypatch)
    ids = build.build_data(exp).client_ids
    clients = _Clients(exp, federation, port, budget=3.0,
                       fails=lambda cid, rnd, attempt: cid == ids[0] and (
                           rnd == 2 or (rnd == 1 and attempt == 1)))
    clients.start()
    with pytest.raises(RoundFailedError, match="round 2: 1 valid updates"):
        serve(exp, tmp_path / "out", DeploySettings.from_section(exp["server"]))
    assert clients.attempts[(ids[0], 1)] == 2
    assert clients.attempts[(ids[0], 2)] == 3  # the first attempt and round_retries = 2 more
    clients.join(timeout=20)


def test_server_restarted_on_a_finished_run_serves_done(tmp_path: Path, federation: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        fedlog: pytest.LogCaptureFixture
                                                        ) -> None:
    """The server stops right after the final round's checkpoint, before any client heard
    DONE (as a kill there does); restarted on the same port and output directory, it finds
    the run finished, removes the temporary files of an interrupted write, and serves DONE
    until the clients, retrying meanwhile, have heard it: they exit cleanly, and it exits
    after ``linger``."""
    path = _experiment(tmp_path / "exp.toml", federation, clients=2, rounds=1, min_updates=2,
                       server={"linger": 6.0})
    exp = load_experiment(path)
    port = _PortOf(monkeypatch)
    clients = _Clients(exp, federation, port, budget=20.0)
    out = tmp_path / "out"
    finish = GrpcTransport.finish

    class Killed(Exception):
        pass

    def killed_before_done(self: GrpcTransport) -> None:
        raise Killed

    monkeypatch.setattr(GrpcTransport, "finish", killed_before_done)
    clients.start()
    with pytest.raises(Killed):
        serve(exp, out, DeploySettings.from_section(exp["server"]))
    first_port = port()
    assert (out / "checkpoint.pt").is_file()
    assert not clients.reports and not clients.errors  # nobody heard DONE: all retrying
    monkeypatch.setattr(GrpcTransport, "finish", finish)
    # What a kill during the checkpoint write (or metrics.json's) leaves behind, and files
    # of the user's that look alike but are not fedmosaic's temporary files.
    stale = [out / ".checkpoint.pt.k2x9_q0a.tmp", out / ".metrics.json.abcd1234.tmp"]
    kept = [out / ".checkpoint.pt.tmp", out / "notes.tmp", out / ".mine.pt.abcd1234.tmp"]
    for f in stale + kept:
        f.write_bytes(b"partial")

    transports: list[GrpcTransport] = []
    original_init = GrpcTransport.__init__

    def recording_init(self: GrpcTransport, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        transports.append(self)

    monkeypatch.setattr(GrpcTransport, "__init__", recording_init)
    started = time.monotonic()
    settings = DeploySettings.from_section(exp["server"]).with_port(first_port)
    result = serve(exp, out, settings)
    took = time.monotonic() - started
    clients.join(timeout=10)

    assert not clients.errors, clients.errors  # none ran out of retries
    assert sorted(clients.reports) == sorted(clients.fed.client_ids)
    assert all(rep.rounds == [1] for rep in clients.reports.values())
    sessions = transports[-1].sessions
    assert sorted(sessions) == sorted(clients.fed.client_ids)
    assert all(s.seen_done for s in sessions.values())
    assert took >= 6.0  # it served DONE for the whole linger, not ~0 s
    assert [r["round"] for r in result.history] == [1]
    assert not any(f.exists() for f in stale)
    assert all(f.exists() for f in kept)
    text = fedlog.text
    assert "removed 2 temporary files left in" in text
    assert "had already finished all 1 rounds: serving DONE for 6s" in text
    assert logging.getLevelName(logging.ERROR) not in [r.levelname for r in fedlog.records
                                                       if r.name.startswith("fedmosaic.net")]
