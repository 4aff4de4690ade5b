"""SecAgg+ against a lying server over gRPC with mutual TLS (issue #24): clients sign with their
certificate keys and verify the others' certificates against the federation CA; a weaker
setup or substituted keys make them withdraw with the reason; infeasible parameters are a
failed round, never a crash. In one process: server and client threads on loopback."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedmosaic.algorithms.strategy import FedAvg
from fedmosaic.core.errors import RoundFailedError
from fedmosaic.data import FederatedDataset
from fedmosaic.net.certs import FederationPaths, create_federation
from fedmosaic.net.client import run_client
from fedmosaic.net.secagg import SecAggRoundDriver
from fedmosaic.net.server import start_server
from fedmosaic.net.settings import DeploySettings
from fedmosaic.net.transport import GrpcTransport
from fedmosaic.net.wire import spec_hash
from fedmosaic.privacy.secagg import (
    AdvertiseKeys,
    CertificateVerifier,
    SecAggPlusClient,
    SecAggProtocolError,
    SigningIdentity,
)
from fedmosaic.privacy.secagg.identity import verify_signature
from fedmosaic.privacy.secagg.messages import RosterEntry
from fedmosaic.privacy.secagg.protocol import SecAggPlusServer
from fedmosaic.runtime.simulate import simulate
from tests.net.test_inprocess import _client_trainer, _trainer


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("secagg-malicious-fed")
    create_federation(root, clients=[f"c{i}" for i in range(6)], ca_passphrase=None)
    return root


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("foreign-fed")
    create_federation(root, clients=["c0"], ca_passphrase=None)
    return root


def one_round(fed: FederatedDataset, credentials: Path, driver: SecAggRoundDriver) -> Any:
    """One SecAgg+ round in process; returns the result or the RoundFailedError."""
    settings = DeploySettings(credentials=credentials, address="127.0.0.1", port=0,
                              min_clients=len(fed.clients), heartbeat_interval=1.0,
                              round_deadline=60.0, wait_for_clients=60.0, chunk_bytes=256,
                              max_workers=32)
    trainer = _trainer()
    transport = GrpcTransport(settings, numel=trainer.spec.numel, spec_hash=spec_hash(trainer.spec),
                              experiment="blobs", rounds=1, secagg=driver)
    running = start_server(settings, transport)
    paths = FederationPaths(credentials)
    trainers = {cid: _client_trainer() for cid in fed.client_ids}

    def client(cid: str) -> None:
        run_client(f"127.0.0.1:{running.port}", ca=paths.ca_cert, cert=paths.client_cert(cid),
                   key=paths.client_key(cid), trainer=trainers[cid],
                   data=fed.client(cid).train, retry_budget=30, poll_seconds=1.0)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in fed.client_ids]
    for t in threads:
        t.start()
    try:
        try:
            outcome: Any = simulate(trainer, fed, FedAvg(), 1, seed=5, transport=transport)
        except RoundFailedError as exc:
            outcome = exc
        transport.finish()  # clients hear DONE and exit
        for t in threads:
            t.join(timeout=30)
    finally:
        running.stop(0)
    return outcome


def first(fed: FederatedDataset, count: int) -> FederatedDataset:
    return FederatedDataset("blobs", fed.clients[:count], fed.test, fed.num_classes,
                            fed.feature_shape)


def test_three_participants_are_a_failed_round_with_the_reason(
        blobs_fed: FederatedDataset, federation: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    driver = SecAggRoundDriver(clip=1.0, max_weight=64.0, uniform=False)
    outcome = one_round(first(blobs_fed, 3), federation, driver)
    assert isinstance(outcome, RoundFailedError) and "3 clients failed" in str(outcome)
    assert "secure aggregation impossible: no SecAgg+ parameters for n=3" in caplog.text


def test_a_server_that_lowers_the_threshold_is_refused_by_every_client(
        blobs_fed: FederatedDataset, federation: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    # gamma = 0 was the old deployment default; the clients tolerate 0.2 and refuse its t.
    driver = SecAggRoundDriver(clip=1.0, max_weight=64.0, uniform=False, corrupted_fraction=0.0)
    outcome = one_round(blobs_fed, federation, driver)
    assert isinstance(outcome, RoundFailedError) and "6 clients failed" in str(outcome)
    assert caplog.text.count("withdrew from secure aggregation: client refused: setup "
                             "refused: threshold t=3 is below the minimum t=4") == 6


def test_substituted_keys_are_detected_by_the_certificate_signature_check(
        blobs_fed: FederatedDataset, federation: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO)
    honest = SecAggPlusServer.roster_entry

    def substituted(self: SecAggPlusServer, u: int) -> RosterEntry:
        entry = honest(self, u)
        if u != 0:
            return entry
        return RosterEntry(0, entry.identity, b"\x07" * 32, entry.s_public, entry.contribution,
                           entry.signature, entry.credential)

    monkeypatch.setattr(SecAggPlusServer, "roster_entry", substituted)
    driver = SecAggRoundDriver(clip=1.0, max_weight=64.0, uniform=False)
    outcome = one_round(blobs_fed, federation, driver)
    assert isinstance(outcome, RoundFailedError)
    for cid in range(1, 6):  # the server logs every refusal with the client's reason
        assert (f"client c{cid} withdrew from secure aggregation: client refused: client {cid}: "
                "the keys relayed for client 0 ('c0') do not carry its valid signature (key "
                "substitution?)") in caplog.text
    assert ("client c0 withdrew from secure aggregation: client refused: client 0: the roster "
            "misrepresents this client's own keys") in caplog.text


def test_a_member_with_a_bad_signature_is_dropped_by_the_server_not_the_round(
        blobs_fed: FederatedDataset, federation: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One malicious client must not make every honest member refuse the roster: the server
    checks each advertisement against the CA and drops the bad one; the others go on."""
    caplog.set_level(logging.WARNING)
    honest = SecAggPlusClient.handle_setup

    def forged(self: SecAggPlusClient, message: Any) -> AdvertiseKeys:
        advert = honest(self, message)
        if self.client_id != 2:
            return advert
        return AdvertiseKeys(advert.round_id, 2, advert.c_public, advert.s_public,
                             advert.contribution, bytes(64), advert.credential)

    monkeypatch.setattr(SecAggPlusClient, "handle_setup", forged)
    driver = SecAggRoundDriver(clip=1.0, max_weight=64.0, uniform=False)
    outcome = one_round(blobs_fed, federation, driver)
    assert not isinstance(outcome, RoundFailedError), outcome
    assert [(r["updates"], r["rejected"]) for r in outcome.history] == [(5, 1)]
    assert "client 2 sent keys without a valid signature" in caplog.text


def test_certificates_are_checked_against_the_federation_ca(
        federation: Path, foreign: Path) -> None:
    paths, other = FederationPaths(federation), FederationPaths(foreign)
    verifier = CertificateVerifier.from_file(paths.ca_cert)
    me = SigningIdentity.from_files(paths.client_cert("c1"), paths.client_key("c1"))
    assert me.identity == "c1"
    key = verifier.public_key("c1", me.credential)
    assert verify_signature(key, me.sign(b"round keys"), b"round keys")
    assert not verify_signature(key, me.sign(b"round keys"), b"other keys")
    with pytest.raises(SecAggProtocolError, match="names 'c1'"):
        verifier.public_key("c2", me.credential)  # the server claims another identity
    stranger = SigningIdentity.from_files(other.client_cert("c0"), other.client_key("c0"))
    with pytest.raises(SecAggProtocolError, match="not issued by the federation CA"):
        verifier.public_key("c0", stranger.credential)
    operator = x509.load_pem_x509_certificate(paths.operator_cert.read_bytes())
    der = operator.public_bytes(serialization.Encoding.DER)
    name = SigningIdentity.from_files(paths.operator_cert, paths.operator_key).identity
    with pytest.raises(SecAggProtocolError, match="not a client's"):
        verifier.public_key(name, der)
    with pytest.raises(SecAggProtocolError, match="not issued"):
        verifier.public_key("c1", b"garbage")
