"""SecAgg+ client and server as message-driven state machines, secure against a malicious server.

One :class:`SecAggPlusClient` per client per round and one :class:`SecAggPlusServer` per round
exchange the messages of :mod:`fedmosaic.privacy.secagg.messages`; neither touches a network,
so the same objects run in-process (:mod:`fedmosaic.privacy.secagg.simulate`) or behind any
transport. The protocol is the malicious-server ("active") variant of Bonawitz et al., CCS
2017, "Practical Secure Aggregation for Privacy-Preserving Machine Learning" (§4, Fig. 4),
with the neighbour graph of Bell et al., CCS 2020, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead" (SecAgg+):

0. *setup* -- the server announces round id, ``n``, ``t``, ``k``, its graph-seed nonce, the
   vector length and the modulus ``2**bits``; each client checks ``n``, ``k`` and ``t``
   against its *own* :class:`~fedmosaic.privacy.secagg.graph.SecAggBounds` and refuses a
   weaker setup (threshold lowering);
1. *advertise keys* -- each client ``u`` sends two fresh X25519 public keys ``c_u``, ``s_u``
   and a random contribution ``r_u`` to the graph seed, signed with its long-term key
   (its mTLS certificate key in a deployment); the server relays every member's signed
   advertisement (the roster) to every member, which hashes all contributions into the
   graph seed, rebuilds the graph itself and verifies its neighbours' signatures against
   their credentials (key substitution is detected); other members' entries are verified
   when their consistency signatures are counted. The graph seed ("the roster") is bound
   into every share ciphertext and consistency signature, so members shown different rosters
   accept no share and count no signature across views;
2. *share keys* -- ``u`` draws a self-mask seed ``b_u``, commits to it and Shamir-shares
   ``b_u`` and the raw private key ``s_u`` ``t``-out-of-``|N(u)|`` among its neighbours, each
   pair of shares encrypted to its recipient under an AES-GCM key from the ``c`` agreement;
3. *masked input* -- ``u`` sends ``y_u = x_u + PRG(b_u) + sum_{v > u} PRG(s_uv)
   - sum_{v < u} PRG(s_uv) mod 2^bits`` over the neighbours ``v`` whose shares it received;
4. *consistency check* -- the server sends the survivor set ``U3`` (masked inputs received);
   each survivor signs ``(roster, U3)``;
5. *unmasking* -- the server forwards ``U3`` and the signatures; a client answers only if
   ``U3`` is the set it signed, and reveals, for each neighbour ``v`` that has at least ``t``
   valid signatures on that ``U3`` from ``v``'s own neighbours, the share of ``b_v`` if
   ``v`` is in ``U3`` and of ``s_v`` otherwise. The server reconstructs (checking every
   secret against ``b_u``'s commitment or ``s_u``'s public key, and skipping corrupt shares
   when spare ones allow), removes the masks and outputs the sum of the survivors' inputs.

Why a malicious server cannot unmask a client ``v`` (exact conditions in ``docs/security.md``):
its ``k - c_v`` honest neighbours each reveal one share of ``v`` (of ``b_v`` if they saw
``v`` in ``U3``, of ``s_v`` otherwise) and only for a ``U3`` signed by ``t`` neighbours of
``v``; honest clients sign one ``U3`` each, so two different ``U3`` with ``t`` signatures
each need ``2t <= k + c_v``, which the client's minimum threshold rules out; and the ``c_v <
t`` corrupted neighbours alone hold too few shares. Dropping honest clients to isolate ``v``
fails the same way: its holders reveal nothing about ``v`` unless ``t`` of its neighbours
survived and signed, so its input only enters a sum with at least ``t - c_v`` honest
surviving neighbours. On the complete graph that is a proof by counting; on a sparse graph
removing those neighbours' masks too would need each of them "dropped" in a view signed by
``t`` of *its* neighbours, which the overlap of adjacent Harary neighbourhoods prevents in
practice but this module does not prove for every sparse graph (``docs/security.md``).

Dropouts are allowed at every stage: a client whose neighbourhood cannot hold ``t`` shares
is left out before anyone masks with it, and the round succeeds whenever every needed
secret keeps ``t`` responding holders; otherwise the server raises
:class:`SecAggAbortError` ("fewer than t survivors ...") without outputting anything.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedmosaic.privacy.secagg.crypto import (
    PUBLIC_KEY_BYTES,
    SHARE_BYTES,
    MaskAccumulator,
    RandomBytes,
    aead_decrypt,
    aead_encrypt,
    derive_aead_key,
    derive_mask_seed,
    generate_private_key,
    key_agreement,
    private_key_from_bytes,
    private_key_to_bytes,
    public_key_bytes,
    reconstruct_secret_bytes,
    share_associated_data,
    share_from_bytes,
    split_secret_bytes,
    system_random_bytes,
)
from fedmosaic.privacy.secagg.errors import SecAggAbortError, SecAggProtocolError
from fedmosaic.privacy.secagg.graph import SecAggBounds, prune_members
from fedmosaic.privacy.secagg.identity import (
    PeerVerifier,
    PublicKey,
    SigningIdentity,
    verify_signature,
)
from fedmosaic.privacy.secagg.messages import (
    CONTRIBUTION_BYTES,
    SHARE_CIPHERTEXT_BYTES,
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    KeysBroadcast,
    MaskedInput,
    Message,
    RosterEntry,
    SecAggConfig,
    SetupMessage,
    ShareKeys,
    SharesBroadcast,
    UnmaskRequest,
    UnmaskResponse,
    advertise_payload,
    consistency_payload,
    roster_graph_seed,
    self_mask_commitment,
)

log = logging.getLogger(__name__)


def _share_x(client_id: int) -> int:
    """Shamir evaluation point of a client: ids start at 0, and x = 0 is the secret itself."""
    return client_id + 1


def _check_unique(ids: Sequence[int], what: str) -> None:
    if len(set(ids)) != len(ids):
        raise SecAggProtocolError(f"{what} lists a client more than once")


def _validated_vector(vector: np.ndarray, config: SecAggConfig) -> np.ndarray:
    """The client's input as a ring-dtype vector, or a clear error (never a silent wrap)."""
    values = np.asarray(vector)
    if values.shape != (config.dim,):
        raise ValueError(f"the input vector must have shape ({config.dim},), got {values.shape}")
    if values.dtype.kind not in "ui":
        raise ValueError(
            f"the input vector must be integers in [0, 2^{config.bits}) (quantize floats "
            f"first), got dtype {values.dtype}"
        )
    if values.size and (int(values.min()) < 0 or int(values.max()) >> config.bits):
        raise ValueError(f"input values must lie in [0, 2^{config.bits})")
    return values.astype(config.value_dtype, copy=False)


class ClientStage(Enum):
    AWAITING_SETUP = "awaiting_setup"
    AWAITING_KEYS = "awaiting_keys"
    AWAITING_SHARES = "awaiting_shares"
    AWAITING_CONSISTENCY = "awaiting_consistency"
    AWAITING_UNMASK = "awaiting_unmask"
    DONE = "done"


class SecAggPlusClient:
    """One client's side of one SecAgg+ round.

    ``signer`` is the client's long-term :class:`~fedmosaic.privacy.secagg.identity.
    SigningIdentity` and ``verifier`` checks the other members' credentials
    (:class:`~fedmosaic.privacy.secagg.identity.CertificateVerifier` in a deployment,
    :class:`~fedmosaic.privacy.secagg.identity.StaticPki` in simulation). ``bounds`` is what
    this client accepts, configured locally (never taken from the server).

    Every ``handle_*`` method validates its message completely before changing any state: a
    rejected message raises :class:`SecAggProtocolError` and leaves the client where it was.
    ``random_bytes`` defaults to the OS CSPRNG; pass a
    :class:`~fedmosaic.privacy.secagg.crypto.DeterministicRandom` only for reproducible tests.
    """

    def __init__(
        self,
        client_id: int,
        *,
        signer: SigningIdentity,
        verifier: PeerVerifier,
        bounds: SecAggBounds | None = None,
        random_bytes: RandomBytes = system_random_bytes,
    ) -> None:
        if client_id < 0:
            raise ValueError(f"client ids are non-negative, got {client_id}")
        self.client_id = client_id
        self.signer, self.verifier = signer, verifier
        self.bounds = bounds or SecAggBounds()
        self._random = random_bytes
        self.stage = ClientStage.AWAITING_SETUP
        self._config: SecAggConfig | None = None
        self._session = b""
        self._advert: AdvertiseKeys | None = None
        self._neighbours: frozenset[int] = frozenset()
        self._neighbour_sets: list[frozenset[int]] = []
        # Verified signing keys, filled lazily (None: the relayed entry failed verification).
        self._signing_keys: dict[int, PublicKey | None] = {}
        self._entries: dict[int, RosterEntry] = {}
        self._c_key: X25519PrivateKey | None = None
        self._s_key: X25519PrivateKey | None = None
        self._self_seed: bytes = b""
        self._peer_s_public: dict[int, bytes] = {}
        self._aead_keys: dict[int, bytes] = {}
        self._held: dict[int, tuple[bytes, bytes]] = {}
        self._signed_survivors: tuple[int, ...] | None = None
        self._roster = b""  # the graph seed of the roster this client accepted

    # -- helpers ----------------------------------------------------------------------------

    def _check_stage(self, stage: ClientStage, message: Message) -> None:
        if self.stage is not stage:
            hint = " (it answers one unmask request only)" if self.stage is ClientStage.DONE else ""
            raise SecAggProtocolError(
                f"client {self.client_id} cannot accept {type(message).__name__} in stage "
                f"{self.stage.value}{hint}"
            )

    def _expect(self, stage: ClientStage, message: Message) -> SecAggConfig:
        """Check stage and round id of a post-setup message; return the round's configuration."""
        self._check_stage(stage, message)
        config = self._config
        if config is None:
            raise SecAggProtocolError(f"client {self.client_id} has not been set up")
        if message.round_id != config.round_id:
            raise SecAggProtocolError(
                f"message for round {message.round_id} reached client {self.client_id} in "
                f"round {config.round_id}"
            )
        return config

    def _expect_recipient(self, recipient: int) -> None:
        if recipient != self.client_id:
            raise SecAggProtocolError(
                f"message addressed to client {recipient} reached client {self.client_id}"
            )

    def _private_keys(self) -> tuple[X25519PrivateKey, X25519PrivateKey]:
        # Present from setup until the masked input is built; the stage checks guarantee it.
        if self._c_key is None or self._s_key is None:
            raise SecAggProtocolError(f"client {self.client_id} holds no round keys")
        return self._c_key, self._s_key

    @property
    def config(self) -> SecAggConfig | None:
        return self._config

    @property
    def neighbours(self) -> frozenset[int]:
        """This client's neighbours that take part (empty before the key broadcast)."""
        return self._neighbours

    # -- the malicious-server checks (each one a method, so a test can show what it stops) --

    def check_setup(self, config: SecAggConfig) -> None:
        """Refuse parameters weaker than this client's own bounds (threshold lowering)."""
        self.bounds.check(config.num_clients, config.degree, config.threshold)

    def verify_entry(self, config: SecAggConfig, entry: RosterEntry) -> PublicKey:
        """The member's verified signing key; refuses a bad credential or signature (key
        substitution)."""
        key = self.verifier.public_key(entry.identity, entry.credential)
        payload = advertise_payload(config.session_id, entry.client_id, entry.identity,
                                    entry.c_public, entry.s_public, entry.contribution)
        if not verify_signature(key, entry.signature, payload):
            raise SecAggProtocolError(
                f"client {self.client_id}: the keys relayed for client {entry.client_id} "
                f"({entry.identity!r}) do not carry its valid signature (key substitution?)"
            )
        return key

    def _signing_key(self, v: int) -> PublicKey | None:
        """Member ``v``'s verified signing key, verifying its roster entry on first use; None
        if the relayed entry does not verify (its signatures then never count)."""
        if v not in self._signing_keys:
            config = self._config
            assert config is not None
            try:
                self._signing_keys[v] = self.verify_entry(config, self._entries[v])
            except SecAggProtocolError as err:
                log.warning("%s", err)
                self._signing_keys[v] = None
        return self._signing_keys[v]

    def confirmed_owners(self, survivors: tuple[int, ...],
                         signatures: tuple[tuple[int, bytes], ...]) -> list[int]:
        """Owners of held shares with ``t`` valid signatures on ``U3`` from their neighbours.

        Signatures are verified lazily and each at most once: an owner is confirmed as soon
        as ``t`` of its neighbours' signatures verify, so a client checks about ``t`` plus a
        few signatures, not all of them.
        """
        config = self._config
        assert config is not None
        payload = consistency_payload(self._roster, survivors)
        members = set(survivors)
        offered = {v: sig for v, sig in signatures if v in members and v in self._entries}
        verdict: dict[int, bool] = {}

        def valid(v: int) -> bool:
            if v not in verdict:
                key = self._signing_key(v)
                verdict[v] = key is not None and verify_signature(key, offered[v], payload)
            return verdict[v]

        confirmed = []
        for owner in sorted(self._held):
            count = 0
            for v in sorted(self._neighbour_sets[owner] & offered.keys()):
                if valid(v):
                    count += 1
                    if count >= config.threshold:
                        confirmed.append(owner)
                        break
        return confirmed

    # -- stages -----------------------------------------------------------------------------

    def handle_setup(self, message: SetupMessage) -> AdvertiseKeys:
        """Round 0 -> 1: accept the parameters, advertise two signed public keys."""
        self._check_stage(ClientStage.AWAITING_SETUP, message)
        config = message.config
        config.validate()
        if self.client_id >= config.num_clients:
            raise SecAggProtocolError(
                f"client id {self.client_id} is outside the round's {config.num_clients} clients"
            )
        self.check_setup(config)
        c_key = generate_private_key(self._random)
        s_key = generate_private_key(self._random)
        contribution = self._random(CONTRIBUTION_BYTES)
        c_public, s_public = public_key_bytes(c_key), public_key_bytes(s_key)
        payload = advertise_payload(config.session_id, self.client_id, self.signer.identity,
                                    c_public, s_public, contribution)
        advert = AdvertiseKeys(config.round_id, self.client_id, c_public, s_public,
                               contribution, self.signer.sign(payload), self.signer.credential)
        self._config, self._session = config, config.session_id
        self._c_key, self._s_key, self._advert = c_key, s_key, advert
        self.stage = ClientStage.AWAITING_KEYS
        return advert

    def _check_roster(self, config: SecAggConfig, entries: tuple[RosterEntry, ...]) -> None:
        ids = [e.client_id for e in entries]
        _check_unique(ids, "the key broadcast")
        if any(not 0 <= u < config.num_clients for u in ids):
            raise SecAggProtocolError(f"client {self.client_id} got keys of non-members")
        identities = [e.identity for e in entries]
        if len(set(identities)) != len(identities):
            raise SecAggProtocolError(
                f"client {self.client_id}: the roster names one identity at several indices "
                "(a Sybil attack by the server)"
            )
        mine = next((e for e in entries if e.client_id == self.client_id), None)
        advert = self._advert
        if mine is None or advert is None or (
            mine.identity, mine.c_public, mine.s_public, mine.contribution
        ) != (self.signer.identity, advert.c_public, advert.s_public, advert.contribution):
            raise SecAggProtocolError(
                f"client {self.client_id}: the roster misrepresents this client's own keys"
            )

    def handle_keys(self, message: KeysBroadcast) -> ShareKeys:
        """Round 1 -> 2: verify the roster, rebuild the graph, share ``b_u`` and ``s_u``."""
        config = self._expect(ClientStage.AWAITING_KEYS, message)
        self._expect_recipient(message.recipient)
        self._check_roster(config, message.entries)
        if len(message.entries) < self.bounds.min_clients:
            raise SecAggProtocolError(
                f"client {self.client_id}: only {len(message.entries)} members advertised keys, "
                f"fewer than this client's minimum population {self.bounds.min_clients}"
            )
        by_id = {e.client_id: e for e in message.entries}
        seed = roster_graph_seed(config, {u: e.contribution for u, e in by_id.items()})
        # The roster this client saw, bound into every share it encrypts or accepts and into
        # its consistency signature: a server that shows members different rosters (hence
        # different graphs) gets no share accepted and no signature counted across them.
        self._roster = seed
        neighbour_sets = config.graph(seed).neighbour_sets()
        members = prune_members(neighbour_sets, by_id, config.threshold)
        if self.client_id not in members:
            raise SecAggProtocolError(
                f"client {self.client_id} has fewer than t={config.threshold} neighbours that "
                "advertised keys: its secrets could never be reconstructed"
            )
        peers = sorted(neighbour_sets[self.client_id] & members)
        # Our own entry was checked against what we sent (_check_roster). The neighbours'
        # entries are verified now (their keys are used at once: a substituted key is refused
        # here); any other member's only when its consistency signature is counted, so a
        # client verifies O(k) signatures, not all n (the roster's binding into every share
        # and signature keeps the members' views consistent; see docs/security.md).
        self._entries = by_id
        self._signing_keys = {self.client_id: self.signer.public_key}
        for v in peers:
            self._signing_keys[v] = self.verify_entry(config, by_id[v])
        c_key, s_key = self._private_keys()
        aead_keys = {
            v: derive_aead_key(
                key_agreement(c_key, by_id[v].c_public), self._session, self.client_id, v
            )
            for v in peers
        }
        s_public = {v: by_id[v].s_public for v in peers}
        self_seed = self._random(32)
        xs = [_share_x(v) for v in peers]
        seed_shares = split_secret_bytes(self_seed, config.threshold, xs, self._random)
        key_shares = split_secret_bytes(
            private_key_to_bytes(s_key), config.threshold, xs, self._random
        )
        ciphertexts = tuple(
            (
                v,
                aead_encrypt(
                    aead_keys[v],
                    b_share + s_share,
                    share_associated_data(self._roster, self.client_id, v),
                    self._random,
                ),
            )
            for v, b_share, s_share in zip(peers, seed_shares, key_shares)
        )
        self._aead_keys, self._peer_s_public, self._self_seed = aead_keys, s_public, self_seed
        self._neighbours, self._neighbour_sets = frozenset(peers), neighbour_sets
        self.stage = ClientStage.AWAITING_SHARES
        commitment = self_mask_commitment(self._session, self.client_id, self_seed)
        return ShareKeys(config.round_id, self.client_id, ciphertexts, commitment)

    def handle_shares(self, message: SharesBroadcast, vector: np.ndarray) -> MaskedInput:
        """Round 2 -> 3: keep the shares addressed to us and upload the masked input ``y_u``.

        ``vector`` is the client's input, already in Z_(2^bits) (see
        :class:`~fedmosaic.privacy.secagg.quantize.Quantizer`).
        """
        config = self._expect(ClientStage.AWAITING_SHARES, message)
        self._expect_recipient(message.recipient)
        senders = [v for v, _ in message.ciphertexts]
        _check_unique(senders, "the share broadcast")
        unknown = sorted(set(senders) - set(self._aead_keys))
        if unknown:
            raise SecAggProtocolError(
                f"client {self.client_id} got shares from {unknown[:5]}, which are not "
                "neighbours it exchanged keys with"
            )
        if len(senders) < config.threshold:
            raise SecAggProtocolError(
                f"client {self.client_id} got shares from {len(senders)} neighbours, fewer "
                f"than the threshold t={config.threshold}"
            )
        values = _validated_vector(vector, config)
        held: dict[int, tuple[bytes, bytes]] = {}
        for v, blob in message.ciphertexts:
            if len(blob) != SHARE_CIPHERTEXT_BYTES:
                raise SecAggProtocolError(f"share ciphertext from client {v} has a wrong length")
            try:
                associated = share_associated_data(self._roster, v, self.client_id)
                plain = aead_decrypt(self._aead_keys[v], blob, associated)
            except SecAggProtocolError as err:
                raise SecAggProtocolError(
                    f"client {self.client_id}: the share ciphertext from client {v} failed "
                    "authentication (tampered, misrouted or from another round)"
                ) from err
            if len(plain) != 2 * SHARE_BYTES:
                raise SecAggProtocolError(f"the shares from client {v} have a wrong length")
            seed_share, key_share = plain[:SHARE_BYTES], plain[SHARE_BYTES:]
            share_from_bytes(seed_share)  # range checks: reject garbage now, not at unmasking
            share_from_bytes(key_share)
            held[v] = (seed_share, key_share)

        _, s_key = self._private_keys()
        masked = MaskAccumulator(config.dim, config.bits)
        masked.add(values)
        masked.add_stream(self._self_seed)
        for v in senders:
            shared = key_agreement(s_key, self._peer_s_public[v])
            seed = derive_mask_seed(shared, self._session, self.client_id, v)
            # u adds the mask it shares with a larger id and subtracts the one it shares with
            # a smaller id, so the two copies of every pairwise mask cancel in the sum.
            if v > self.client_id:
                masked.add_stream(seed)
            else:
                masked.subtract_stream(seed)
        self._held = held
        # The secrets are now with the neighbours; forgetting them here means a later
        # compromise of this object cannot unmask y_u.
        self._self_seed = b""
        self._c_key = self._s_key = None
        self._aead_keys = {}
        self.stage = ClientStage.AWAITING_CONSISTENCY
        return MaskedInput(config.round_id, self.client_id, masked.value())

    def handle_consistency(self, message: ConsistencyRequest) -> ConsistencySignature:
        """Round 3 -> 4 (ConsistencyCheck): sign the survivor set ``U3``, once."""
        config = self._expect(ClientStage.AWAITING_CONSISTENCY, message)
        self._expect_recipient(message.recipient)
        survivors = tuple(message.survivors)
        _check_unique(survivors, "the survivor set")
        if list(survivors) != sorted(survivors) or self.client_id not in survivors:
            raise SecAggProtocolError(
                f"client {self.client_id}: the survivor set must be sorted and include it"
            )
        if any(v not in self._entries for v in survivors):
            raise SecAggProtocolError(f"client {self.client_id}: the survivor set names "
                                      "clients that did not advertise keys")
        if len(survivors) < config.threshold:
            raise SecAggProtocolError(
                f"client {self.client_id} refuses to sign a survivor set of {len(survivors)} "
                f"clients, fewer than t={config.threshold}"
            )
        signature = self.signer.sign(consistency_payload(self._roster, survivors))
        self._signed_survivors = survivors
        self.stage = ClientStage.AWAITING_UNMASK
        return ConsistencySignature(config.round_id, self.client_id, signature)

    def unmask_owners(self, message: UnmaskRequest) -> tuple[list[int], list[int]]:
        """The owners whose ``b`` shares (in ``U3``) and ``s`` shares (not in ``U3``) this
        client reveals: only those with ``t`` valid signatures on the signed ``U3`` from their
        own neighbours, so no two honest holders of a client's shares act on different views."""
        config = self._config
        assert config is not None
        if message.survivors != self._signed_survivors:
            raise SecAggProtocolError(
                f"client {self.client_id} refuses the unmask request: its survivor set is not "
                "the one this client signed (the server shows clients different views)"
            )
        _check_unique([v for v, _ in message.signatures], "the consistency signatures")
        confirmed = self.confirmed_owners(message.survivors, message.signatures)
        survivors = set(message.survivors)
        if not confirmed:
            raise SecAggProtocolError(
                f"client {self.client_id} refuses the unmask request: no neighbour has t="
                f"{config.threshold} valid consistency signatures from its own neighbours"
            )
        return ([v for v in confirmed if v in survivors],
                [v for v in confirmed if v not in survivors])

    def handle_unmask(self, message: UnmaskRequest) -> UnmaskResponse:
        """Round 4 -> done: reveal ``b_v`` shares of survivors or ``s_v`` shares of dropped ones.

        Never both for the same ``v``: which one follows from the signed ``U3``, the same for
        every honest holder (see :meth:`unmask_owners`); answers only once per round.
        """
        config = self._expect(ClientStage.AWAITING_UNMASK, message)
        self._expect_recipient(message.recipient)
        survived, dropped = self.unmask_owners(message)
        response = UnmaskResponse(
            config.round_id,
            self.client_id,
            seed_shares=tuple((v, self._held[v][0]) for v in survived),
            key_shares=tuple((v, self._held[v][1]) for v in dropped),
        )
        self._held = {}
        self.stage = ClientStage.DONE
        return response

    def handle(self, message: Message, vector: np.ndarray | None = None) -> Message:
        """Dispatch any server message to its stage handler (``vector`` for the share stage)."""
        if isinstance(message, SetupMessage):
            return self.handle_setup(message)
        if isinstance(message, KeysBroadcast):
            return self.handle_keys(message)
        if isinstance(message, SharesBroadcast):
            if vector is None:
                raise ValueError("the share broadcast needs the client's input vector")
            return self.handle_shares(message, vector)
        if isinstance(message, ConsistencyRequest):
            return self.handle_consistency(message)
        if isinstance(message, UnmaskRequest):
            return self.handle_unmask(message)
        raise SecAggProtocolError(f"clients do not accept {type(message).__name__} messages")


# ================================================================================== server


class ServerStage(Enum):
    COLLECT_KEYS = "collect_keys"
    COLLECT_SHARES = "collect_shares"
    COLLECT_MASKED = "collect_masked"
    COLLECT_CONSISTENCY = "collect_consistency"
    COLLECT_UNMASK = "collect_unmask"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True, eq=False)
class AggregateResult:
    """The server's output: the sum mod 2^bits of the inputs of ``survivors``.

    ``corrupt_share_senders`` are clients whose unmask shares failed the checks; their shares
    were skipped (the spare shares sufficed). Their own inputs are in the sum when they are
    survivors: their masked input was taken before they misbehaved.
    """

    total: np.ndarray = field(repr=False)
    survivors: tuple[int, ...]
    corrupt_share_senders: tuple[int, ...] = ()


#: Random t-subsets tried to find ``t`` consistent shares once the first subset failed.
RECONSTRUCTION_ATTEMPTS = 200


class SecAggPlusServer:
    """The server's side of one SecAgg+ round.

    ``identities[u]`` is the identity the server claims for index ``u`` (a deployment: the
    client id of the verified mTLS peer), relayed with each member's keys; each client checks
    it against the member's credential. ``verifier`` (optional) lets an honest server drop a
    member with a bad signature at once, instead of every client refusing the roster.

    Call order: :meth:`setup_message`; :meth:`receive` each :class:`AdvertiseKeys`;
    :meth:`broadcast_keys`; :meth:`receive` each :class:`ShareKeys`; :meth:`route_shares`;
    :meth:`receive` each :class:`MaskedInput`; :meth:`request_consistency`; :meth:`receive`
    each :class:`ConsistencySignature`; :meth:`request_unmask`; :meth:`receive` each
    :class:`UnmaskResponse`; :meth:`finalize`. The stage-closing calls decide who is still
    in (messages not received by then count as dropouts). A rejected client message raises
    :class:`SecAggProtocolError` and changes nothing; the caller can treat its sender as
    dropped. Masked inputs are summed on arrival, so the server holds one vector, not ``n``.
    """

    def __init__(self, config: SecAggConfig, identities: Sequence[str],
                 verifier: PeerVerifier | None = None) -> None:
        config.validate()
        if len(identities) != config.num_clients:
            raise ValueError(f"{len(identities)} identities for {config.num_clients} clients")
        self.config = config
        self.identities = list(identities)
        self.verifier = verifier
        self._session = config.session_id
        self._roster = b""  # the graph seed of the roster sent out (bound into signatures)
        self._neighbours: list[frozenset[int]] = []
        self.stage = ServerStage.COLLECT_KEYS
        self._adverts: dict[int, AdvertiseKeys] = {}
        self._keyed: dict[int, frozenset[int]] = {}  # u -> neighbours whose keys u got
        self._ciphertexts: dict[int, dict[int, bytes]] = {}
        self._commitments: dict[int, bytes] = {}
        self._holders: dict[int, frozenset[int]] = {}  # u -> neighbours holding u's shares
        self._sum = MaskAccumulator(config.dim, config.bits)
        self._masked: set[int] = set()
        self._survivors: tuple[int, ...] = ()
        self._signatures: dict[int, bytes] = {}
        self._requested: set[int] = set()
        self._seed_shares: dict[int, dict[int, bytes]] = {}
        self._key_shares: dict[int, dict[int, bytes]] = {}
        self._responded: set[int] = set()
        self._needed_keys: list[int] = []
        self._corrupt: set[int] = set()  # Shamir x of senders caught with a corrupt share

    # -- helpers ----------------------------------------------------------------------------

    def _expect(self, stage: ServerStage, message: Message | None = None) -> None:
        """Check the stage (and the round id of an incoming message)."""
        if self.stage is not stage:
            what = type(message).__name__ if message is not None else "this call"
            raise SecAggProtocolError(
                f"server in stage {self.stage.value} cannot accept {what} "
                f"(expected stage {stage.value})"
            )
        if message is not None and message.round_id != self.config.round_id:
            raise SecAggProtocolError(
                f"message for round {message.round_id} reached the server of round "
                f"{self.config.round_id}"
            )

    def _abort(self, reason: str) -> SecAggAbortError:
        self.stage = ServerStage.ABORTED
        # Drop everything secret-related the server holds so an aborted round reveals nothing.
        self._seed_shares, self._key_shares, self._ciphertexts = {}, {}, {}
        return SecAggAbortError(reason)

    def roster_entry(self, u: int) -> RosterEntry:
        a = self._adverts[u]
        return RosterEntry(u, self.identities[u], a.c_public, a.s_public, a.contribution,
                           a.signature, a.credential)

    @property
    def survivors(self) -> tuple[int, ...]:
        """Clients whose masked input has arrived so far."""
        return tuple(sorted(self._masked))

    @property
    def neighbour_sets(self) -> list[frozenset[int]]:
        """Every node's neighbours in the round's graph (known once the keys are in)."""
        return self._neighbours

    # -- stages -----------------------------------------------------------------------------

    def setup_message(self) -> SetupMessage:
        """Round 0: the same message for every client."""
        return SetupMessage(self.config)

    def receive_advertise(self, message: AdvertiseKeys) -> None:
        self._expect(ServerStage.COLLECT_KEYS, message)
        u = message.sender
        if not 0 <= u < self.config.num_clients:
            raise SecAggProtocolError(f"sender {u} is not a client of this round")
        if u in self._adverts:
            raise SecAggProtocolError(f"client {u} advertised keys twice")
        if len(message.c_public) != PUBLIC_KEY_BYTES or len(message.s_public) != PUBLIC_KEY_BYTES:
            raise SecAggProtocolError(f"client {u} sent malformed public keys")
        if len(message.contribution) != CONTRIBUTION_BYTES:
            raise SecAggProtocolError(f"client {u} sent a malformed graph-seed contribution")
        if self.verifier is not None:
            key = self.verifier.public_key(self.identities[u], message.credential)
            payload = advertise_payload(self._session, u, self.identities[u], message.c_public,
                                        message.s_public, message.contribution)
            if not verify_signature(key, message.signature, payload):
                raise SecAggProtocolError(f"client {u} sent keys without a valid signature")
        self._adverts[u] = message

    def broadcast_keys(self) -> dict[int, KeysBroadcast]:
        """Close round 1: fix the graph from every contribution; send each member the roster."""
        self._expect(ServerStage.COLLECT_KEYS)
        seed = roster_graph_seed(
            self.config, {u: a.contribution for u, a in self._adverts.items()})
        self._roster = seed
        self._neighbours = self.config.graph(seed).neighbour_sets()
        members = prune_members(self._neighbours, self._adverts, self.config.threshold)
        if not members:
            raise self._abort(
                f"fewer than t={self.config.threshold} survivors: after key advertisement no "
                f"client has t neighbours that advertised keys ({len(self._adverts)} advertised)"
            )
        roster = tuple(self.roster_entry(u) for u in sorted(self._adverts))
        out = {}
        for u in sorted(members):
            self._keyed[u] = frozenset(self._neighbours[u] & members)
            out[u] = KeysBroadcast(self.config.round_id, u, roster)
        self.stage = ServerStage.COLLECT_SHARES
        return out

    def receive_share_keys(self, message: ShareKeys) -> None:
        self._expect(ServerStage.COLLECT_SHARES, message)
        u = message.sender
        if u not in self._keyed:
            raise SecAggProtocolError(f"client {u} was not sent keys in this round")
        if u in self._ciphertexts:
            raise SecAggProtocolError(f"client {u} sent its shares twice")
        recipients = [v for v, _ in message.ciphertexts]
        _check_unique(recipients, f"the shares of client {u}")
        # Exactly one ciphertext per keyed neighbour: a skipped neighbour would mask with u
        # while u does not mask with it, and the pairwise masks would not cancel.
        if set(recipients) != self._keyed[u]:
            raise SecAggProtocolError(
                f"client {u} must send shares to exactly the {len(self._keyed[u])} neighbours "
                f"it got keys of"
            )
        if any(len(blob) != SHARE_CIPHERTEXT_BYTES for _, blob in message.ciphertexts):
            raise SecAggProtocolError(f"client {u} sent a share ciphertext of wrong length")
        self._ciphertexts[u] = dict(message.ciphertexts)
        self._commitments[u] = message.seed_commitment

    def route_shares(self) -> dict[int, SharesBroadcast]:
        """Close round 2: forward each ciphertext to its recipient, among clients still in."""
        self._expect(ServerStage.COLLECT_SHARES)
        members = prune_members(self._neighbours, self._ciphertexts, self.config.threshold)
        if not members:
            raise self._abort(
                f"fewer than t={self.config.threshold} survivors: after share distribution no "
                f"client has t neighbours that distributed shares ({len(self._ciphertexts)} did)"
            )
        out = {}
        for v in sorted(members):
            senders = sorted(self._neighbours[v] & members)
            self._holders[v] = frozenset(senders)
            routed = tuple((u, self._ciphertexts[u][v]) for u in senders)
            out[v] = SharesBroadcast(self.config.round_id, v, routed)
        self._ciphertexts = {}
        self.stage = ServerStage.COLLECT_MASKED
        return out

    def receive_masked_input(self, message: MaskedInput) -> None:
        self._expect(ServerStage.COLLECT_MASKED, message)
        u = message.sender
        if u not in self._holders:
            raise SecAggProtocolError(f"client {u} is not in the masking stage of this round")
        if u in self._masked:
            raise SecAggProtocolError(f"client {u} sent its masked input twice")
        values = np.asarray(message.values)
        dtype = self.config.value_dtype
        if values.shape != (self.config.dim,) or values.dtype.itemsize != dtype.itemsize:
            raise SecAggProtocolError(
                f"masked input of client {u} must be {self.config.dim} values of "
                f"{dtype.itemsize} bytes"
            )
        if values.dtype.kind != "u":
            raise SecAggProtocolError(f"masked input of client {u} is not unsigned")
        if self.config.bits not in (32, 64) and int(values.max()) >> self.config.bits:
            raise SecAggProtocolError(f"masked input of client {u} exceeds 2^{self.config.bits}")
        self._sum.add(values.astype(dtype, copy=False))
        self._masked.add(u)

    def _check_recoverable(self, answering: set[int], when: str) -> list[int]:
        """Abort unless every survivor's ``b_v`` and every needed ``s_d`` keeps ``t`` holders
        among ``answering``; return the dropped clients whose keys are needed."""
        t = self.config.threshold
        survivors = self._masked
        if len(survivors) < t:
            raise self._abort(
                f"fewer than t={t} survivors: only {len(survivors)} masked inputs arrived"
            )
        for v in sorted(survivors):
            alive = len(self._holders[v] & answering)
            if alive < t:
                raise self._abort(
                    f"fewer than t={t} survivors among the neighbours of client {v} "
                    f"({alive} {when}): its self mask could not be removed"
                )
        needed = []
        for d in sorted(set(self._holders) - survivors):
            if not self._holders[d] & survivors:
                continue  # nobody who survived masked with d: its key is not needed
            alive = len(self._holders[d] & answering)
            if alive < t:
                raise self._abort(
                    f"fewer than t={t} survivors among the neighbours of dropped client {d} "
                    f"({alive} {when}): its pairwise masks could not be removed"
                )
            needed.append(d)
        return needed

    def request_consistency(self) -> dict[int, ConsistencyRequest]:
        """Close round 3: check that unmasking can succeed, then send ``U3`` to be signed.

        Aborts before anything is revealed when fewer than ``t`` masked inputs arrived, or
        when some survivor's ``b_v`` or some dropped client's ``s_v`` (needed because a
        survivor masked with it) has fewer than ``t`` surviving holders.
        """
        self._expect(ServerStage.COLLECT_MASKED)
        self._check_recoverable(self._masked, "survived")
        self._survivors = tuple(sorted(self._masked))
        self._requested = set(self._survivors)
        self.stage = ServerStage.COLLECT_CONSISTENCY
        return {w: ConsistencyRequest(self.config.round_id, w, self._survivors)
                for w in self._survivors}

    def receive_consistency(self, message: ConsistencySignature) -> None:
        self._expect(ServerStage.COLLECT_CONSISTENCY, message)
        w = message.sender
        if w not in self._requested:
            raise SecAggProtocolError(f"client {w} was not asked to sign the survivor set")
        if w in self._signatures:
            raise SecAggProtocolError(f"client {w} signed the survivor set twice")
        if self.verifier is not None:
            key = self.verifier.public_key(self.identities[w], self._adverts[w].credential)
            payload = consistency_payload(self._roster, self._survivors)
            if not verify_signature(key, message.signature, payload):
                raise SecAggProtocolError(f"client {w} sent an invalid consistency signature")
        self._signatures[w] = message.signature

    def request_unmask(self) -> dict[int, UnmaskRequest]:
        """Close round 4: forward ``U3`` and every signature to the clients that signed."""
        self._expect(ServerStage.COLLECT_CONSISTENCY)
        signers = set(self._signatures)
        self._needed_keys = self._check_recoverable(signers, "signed the survivor set")
        signatures = tuple(sorted(self._signatures.items()))
        out = {w: UnmaskRequest(self.config.round_id, w, self._survivors, signatures)
               for w in sorted(signers)}
        self._requested = signers
        self._seed_shares = {v: {} for v in self._survivors}
        self._key_shares = {d: {} for d in self._needed_keys}
        self.stage = ServerStage.COLLECT_UNMASK
        return out

    def receive_unmask(self, message: UnmaskResponse) -> None:
        self._expect(ServerStage.COLLECT_UNMASK, message)
        w = message.sender
        if w not in self._requested:
            raise SecAggProtocolError(f"client {w} was not asked to unmask")
        if w in self._responded:
            raise SecAggProtocolError(f"client {w} answered the unmask request twice")
        seed_owners = [v for v, _ in message.seed_shares]
        key_owners = [v for v, _ in message.key_shares]
        _check_unique(seed_owners, f"the seed shares of client {w}")
        _check_unique(key_owners, f"the key shares of client {w}")
        owners = {v for v, holders in self._holders.items() if w in holders}
        survivors = set(self._survivors)
        if not set(seed_owners) <= owners & survivors or not set(key_owners) <= owners - survivors:
            raise SecAggProtocolError(f"client {w} sent shares that were not requested")
        for _, share in message.seed_shares + message.key_shares:
            share_from_bytes(share)
        x = _share_x(w)
        for v, share in message.seed_shares:
            self._seed_shares[v][x] = share
        for d, share in message.key_shares:
            if d in self._key_shares:
                self._key_shares[d][x] = share
        self._responded.add(w)

    def _reconstruct(self, shares: dict[int, bytes], check: Callable[[bytes], bool],
                     owner: int, what: str) -> bytes:
        """The secret from ``t`` shares that pass ``check``; corrupt shares are found and skipped.

        The first ``t`` shares are tried first (the honest case: one interpolation). If the
        result fails the check (commitment or public key), random ``t``-subsets are tried;
        once one passes, every other share is tested against the polynomial it fixes (swap
        it into the subset: the secret stays the same exactly when the share lies on it), and
        the senders of shares off the polynomial are recorded and ignored from then on.
        """
        t = self.config.threshold
        points = sorted(x for x in shares if x not in self._corrupt)
        if len(points) < t:
            raise self._abort(
                f"fewer than t={t} trustworthy shares of the {what} of client {owner}"
            )

        def attempt(subset: list[int]) -> bytes | None:
            try:
                secret = reconstruct_secret_bytes(subset, [shares[x] for x in subset])
            except SecAggProtocolError:
                return None
            return secret if check(secret) else None

        first = points[:t]
        secret = attempt(first)
        if secret is not None:
            return secret
        chooser = random.Random(owner)  # public choice: no secrecy needed, reproducible
        for _ in range(RECONSTRUCTION_ATTEMPTS):
            subset = sorted(chooser.sample(points, t))
            secret = attempt(subset)
            if secret is None:
                continue
            base = subset[1:]
            outside = [x for x in points if x not in subset]
            confirmed, off = [], []
            for x in outside:
                trial = sorted([*base, x])
                try:
                    same = reconstruct_secret_bytes(trial, [shares[y] for y in trial]) == secret
                except SecAggProtocolError:
                    same = False
                (confirmed if same else off).append(x)
            # Blame senders only when the polynomial is confirmed beyond the subset and by a
            # majority: colluding liars whose errors cancel in one subset reveal the right
            # secret there, but must not get honest members blamed.
            if confirmed and 2 * (len(subset) + len(confirmed)) > len(points):
                self._corrupt.update(off)
            return secret
        raise self._abort(
            f"inconsistent shares of the {what} of client {owner}: no {t} of the "
            f"{len(points)} shares reconstruct a value matching its commitment"
        )

    def finalize(self) -> AggregateResult:
        """Close round 5: reconstruct the needed secrets and output the survivors' sum."""
        self._expect(ServerStage.COLLECT_UNMASK)
        t = self.config.threshold
        for owners, kind in ((self._seed_shares, "self-mask seed"), (self._key_shares, "key")):
            for v, shares in owners.items():
                if len(shares) < t:
                    raise self._abort(
                        f"fewer than t={t} survivors answered the unmask request for the {kind} "
                        f"of client {v} ({len(shares)} shares)"
                    )
        try:
            for v in sorted(self._seed_shares):
                commitment = self._commitments[v]
                seed = self._reconstruct(
                    self._seed_shares[v],
                    lambda b, v=v, c=commitment: self_mask_commitment(self._session, v, b) == c,
                    v, "self-mask seed")
                self._sum.subtract_stream(seed)
            for d in self._needed_keys:
                public = self._adverts[d].s_public
                raw = self._reconstruct(
                    self._key_shares[d],
                    lambda r, p=public: public_key_bytes(private_key_from_bytes(r)) == p,
                    d, "masking key")
                s_key = private_key_from_bytes(raw)
                for v in sorted(self._holders[d] & self._masked):
                    seed = derive_mask_seed(
                        key_agreement(s_key, self._adverts[v].s_public), self._session, d, v
                    )
                    # v added PRG(s_dv) if d > v and subtracted it if d < v: undo that.
                    if d > v:
                        self._sum.subtract_stream(seed)
                    else:
                        self._sum.add_stream(seed)
        except SecAggProtocolError as err:
            raise self._abort(f"unmasking failed: {err}") from err
        result = AggregateResult(self._sum.value(), self.survivors,
                                 tuple(sorted(x - 1 for x in self._corrupt)))
        self._seed_shares, self._key_shares = {}, {}
        self.stage = ServerStage.DONE
        return result

    def receive(self, message: Message) -> None:
        """Dispatch any client message to its stage handler."""
        if isinstance(message, AdvertiseKeys):
            self.receive_advertise(message)
        elif isinstance(message, ShareKeys):
            self.receive_share_keys(message)
        elif isinstance(message, MaskedInput):
            self.receive_masked_input(message)
        elif isinstance(message, ConsistencySignature):
            self.receive_consistency(message)
        elif isinstance(message, UnmaskResponse):
            self.receive_unmask(message)
        else:
            raise SecAggProtocolError(f"the server does not accept {type(message).__name__}")
