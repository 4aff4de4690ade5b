"""SecAgg+ client and server as message-driven state machines.

One :class:`SecAggPlusClient` per client per round and one :class:`SecAggPlusServer` per round
exchange the messages of :mod:`fedmosaic.privacy.secagg.messages`; neither touches a network,
so the same objects run in-process (:mod:`fedmosaic.privacy.secagg.simulate`) or behind any
transport. The protocol is Bonawitz et al., CCS 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", with the neighbour graph of Bell et al., CCS 2020,
"Secure Single-Server Aggregation with (Poly)Logarithmic Overhead" (SecAgg+):

0. *setup* -- the server announces round id, ``n``, ``t``, ``k``, the public graph seed, the
   vector length and the modulus ``2**bits``;
1. *advertise keys* -- each client ``u`` sends two fresh X25519 public keys ``c_u``, ``s_u``;
   the server sends each client the keys of its neighbours;
2. *share keys* -- ``u`` draws a self-mask seed ``b_u`` and Shamir-shares ``b_u`` and the raw
   private key ``s_u`` ``t``-out-of-``|N(u)|`` among its neighbours, each pair of shares
   encrypted to its recipient under an AES-GCM key from the ``c`` key agreement; the server
   routes the ciphertexts;
3. *masked input* -- ``u`` sends ``y_u = x_u + PRG(b_u) + sum_{v > u} PRG(s_uv)
   - sum_{v < u} PRG(s_uv) mod 2^bits`` over the neighbours ``v`` whose shares it received,
   ``s_uv`` being HKDF of the X25519 agreement of ``s_u`` and ``s_v``;
4. *unmasking* -- the server tells each surviving client which of its neighbours survived
   and which dropped after round 2; the client returns the share of ``b_v`` for each survivor
   or of ``s_v`` for each dropped neighbour, never both for the same ``v``. The server
   reconstructs, removes the self masks and the dropped clients' pairwise masks (the
   survivors' pairwise masks cancel) and outputs the sum of the survivors' inputs.

Threat model. Clients check everything they can see locally: parameters, ids, lengths, that
shares only come from neighbours, authentication of every share, and -- the defence of
Bonawitz et al. against the double-unmask attack -- that one unmask request never asks for
both secrets of a client, never lists a client both as survivor and dropped, and never claims
fewer than ``t`` surviving neighbours; a client answers at most one unmask request. A
malicious server can still show *different* clients different survivor sets; against that,
SecAgg+ relies on the threshold rule ``2t > k + (corrupted neighbours)`` of
:func:`fedmosaic.privacy.secagg.graph.secagg_plus_parameters` (the honest neighbours of a
client never hand out ``t`` shares of both of its secrets). Public keys are relayed by the
server unauthenticated, as in the semi-honest variant of both papers; protecting them
against a malicious server needs a PKI and the signed consistency round of Bonawitz et al.

Dropouts are allowed at every stage: a client whose neighbourhood cannot hold ``t`` shares
is left out before anyone masks with it, and the round succeeds whenever every needed
secret keeps ``t`` responding holders; otherwise the server raises
:class:`SecAggAbortError` ("fewer than t survivors ...") without outputting anything.
"""

from __future__ import annotations

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
from fedmosaic.privacy.secagg.messages import (
    SHARE_CIPHERTEXT_BYTES,
    AdvertiseKeys,
    KeysBroadcast,
    MaskedInput,
    Message,
    NeighbourKeys,
    SecAggConfig,
    SetupMessage,
    ShareKeys,
    SharesBroadcast,
    UnmaskRequest,
    UnmaskResponse,
)


def _share_x(client_id: int) -> int:
    """Shamir evaluation point of a client: ids start at 0, and x = 0 is the secret itself."""
    return client_id + 1


def _check_unique(ids: tuple[int, ...] | list[int], what: str) -> None:
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
    AWAITING_UNMASK = "awaiting_unmask"
    DONE = "done"


class SecAggPlusClient:
    """One client's side of one SecAgg+ round.

    Every ``handle_*`` method validates its message completely before changing any state: a
    rejected message raises :class:`SecAggProtocolError` and leaves the client where it was.
    ``random_bytes`` defaults to the OS CSPRNG; pass a
    :class:`~fedmosaic.privacy.secagg.crypto.DeterministicRandom` only for reproducible tests.
    ``max_clients`` caps the round size a client accepts: it rebuilds the graph from the seed
    in O(n) memory, so a forged setup message must not be able to make it allocate gigabytes.
    """

    def __init__(
        self,
        client_id: int,
        *,
        random_bytes: RandomBytes = system_random_bytes,
        max_clients: int = 1_000_000,
    ) -> None:
        if client_id < 0:
            raise ValueError(f"client ids are non-negative, got {client_id}")
        self.client_id = client_id
        self.max_clients = max_clients
        self._random = random_bytes
        self.stage = ClientStage.AWAITING_SETUP
        self._config: SecAggConfig | None = None
        self._session = b""
        self._neighbours: frozenset[int] = frozenset()
        self._c_key: X25519PrivateKey | None = None
        self._s_key: X25519PrivateKey | None = None
        self._self_seed: bytes = b""
        self._peer_s_public: dict[int, bytes] = {}
        self._aead_keys: dict[int, bytes] = {}
        self._held: dict[int, tuple[bytes, bytes]] = {}

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
        """This client's neighbours in the round's graph (empty before setup)."""
        return self._neighbours

    # -- stages -----------------------------------------------------------------------------

    def handle_setup(self, message: SetupMessage) -> AdvertiseKeys:
        """Round 0 -> 1: accept the parameters, build the graph, advertise two public keys."""
        self._check_stage(ClientStage.AWAITING_SETUP, message)
        config = message.config
        config.validate()
        if config.num_clients > self.max_clients:
            raise SecAggProtocolError(
                f"round of {config.num_clients} clients exceeds this client's limit of "
                f"{self.max_clients}"
            )
        if self.client_id >= config.num_clients:
            raise SecAggProtocolError(
                f"client id {self.client_id} is outside the round's {config.num_clients} clients"
            )
        neighbours = frozenset(config.graph().neighbours(self.client_id))
        c_key = generate_private_key(self._random)
        s_key = generate_private_key(self._random)
        self._config, self._session, self._neighbours = config, config.session_id, neighbours
        self._c_key, self._s_key = c_key, s_key
        self.stage = ClientStage.AWAITING_KEYS
        return AdvertiseKeys(
            config.round_id, self.client_id, public_key_bytes(c_key), public_key_bytes(s_key)
        )

    def handle_keys(self, message: KeysBroadcast) -> ShareKeys:
        """Round 1 -> 2: share ``b_u`` and ``s_u`` among the neighbours whose keys arrived."""
        config = self._expect(ClientStage.AWAITING_KEYS, message)
        self._expect_recipient(message.recipient)
        peers = [entry.client_id for entry in message.keys]
        _check_unique(peers, "the key broadcast")
        strangers = sorted(set(peers) - self._neighbours)
        if strangers:
            raise SecAggProtocolError(
                f"client {self.client_id} got keys of non-neighbours {strangers[:5]}"
            )
        if len(peers) < config.threshold:
            raise SecAggProtocolError(
                f"client {self.client_id} got keys of {len(peers)} neighbours, fewer than the "
                f"threshold t={config.threshold}: its secrets could never be reconstructed"
            )
        if any(
            len(e.c_public) != PUBLIC_KEY_BYTES or len(e.s_public) != PUBLIC_KEY_BYTES
            for e in message.keys
        ):
            raise SecAggProtocolError(f"client {self.client_id} got malformed public keys")
        c_key, s_key = self._private_keys()
        aead_keys = {
            e.client_id: derive_aead_key(
                key_agreement(c_key, e.c_public), self._session, self.client_id, e.client_id
            )
            for e in message.keys
        }
        s_public = {e.client_id: e.s_public for e in message.keys}
        self_seed = self._random(32)
        xs = [_share_x(v) for v in peers]
        seed_shares = split_secret_bytes(self_seed, config.threshold, xs, self._random)
        key_shares = split_secret_bytes(
            private_key_to_bytes(s_key),
            config.threshold,
            xs,
            self._random,
        )
        ciphertexts = tuple(
            (
                v,
                aead_encrypt(
                    aead_keys[v],
                    b_share + s_share,
                    share_associated_data(self._session, self.client_id, v),
                    self._random,
                ),
            )
            for v, b_share, s_share in zip(peers, seed_shares, key_shares)
        )
        self._aead_keys, self._peer_s_public, self._self_seed = aead_keys, s_public, self_seed
        self.stage = ClientStage.AWAITING_SHARES
        return ShareKeys(config.round_id, self.client_id, ciphertexts)

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
                associated = share_associated_data(self._session, v, self.client_id)
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
        self.stage = ClientStage.AWAITING_UNMASK
        return MaskedInput(config.round_id, self.client_id, masked.value())

    def handle_unmask(self, message: UnmaskRequest) -> UnmaskResponse:
        """Round 3 -> 4: reveal ``b_v`` shares of survivors or ``s_v`` shares of dropped clients.

        Refuses (``SecAggProtocolError``) any request that would reveal both secrets of a
        client, lists a client as both survived and dropped, names a client whose shares this
        client does not hold, or claims fewer than ``t`` surviving neighbours; and answers only
        once per round.
        """
        config = self._expect(ClientStage.AWAITING_UNMASK, message)
        self._expect_recipient(message.recipient)
        _check_unique(message.survived, "the unmask request's survivors")
        _check_unique(message.dropped, "the unmask request's dropped clients")
        both = sorted(set(message.survived) & set(message.dropped))
        if both:
            raise SecAggProtocolError(
                f"client {self.client_id} refuses the unmask request: clients {both[:5]} are "
                "claimed both survived and dropped, which would reveal both the self-mask seed "
                "and the masking key of each (double-unmask attack)"
            )
        unknown = sorted((set(message.survived) | set(message.dropped)) - set(self._held))
        if unknown:
            raise SecAggProtocolError(
                f"client {self.client_id} holds no shares of clients {unknown[:5]} named in the "
                "unmask request"
            )
        if len(message.survived) < config.threshold:
            raise SecAggProtocolError(
                f"client {self.client_id} refuses the unmask request: fewer than t="
                f"{config.threshold} survivors claimed among its neighbours "
                f"({len(message.survived)}), so no input could be unmasked correctly"
            )
        response = UnmaskResponse(
            config.round_id,
            self.client_id,
            seed_shares=tuple((v, self._held[v][0]) for v in message.survived),
            key_shares=tuple((v, self._held[v][1]) for v in message.dropped),
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
        if isinstance(message, UnmaskRequest):
            return self.handle_unmask(message)
        raise SecAggProtocolError(f"clients do not accept {type(message).__name__} messages")


# ================================================================================== server


class ServerStage(Enum):
    COLLECT_KEYS = "collect_keys"
    COLLECT_SHARES = "collect_shares"
    COLLECT_MASKED = "collect_masked"
    COLLECT_UNMASK = "collect_unmask"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True, eq=False)
class AggregateResult:
    """The server's output: the sum mod 2^bits of the inputs of ``survivors``."""

    total: np.ndarray = field(repr=False)
    survivors: tuple[int, ...]


class SecAggPlusServer:
    """The server's side of one SecAgg+ round.

    Call order: :meth:`setup_message`; :meth:`receive` each :class:`AdvertiseKeys`;
    :meth:`broadcast_keys`; :meth:`receive` each :class:`ShareKeys`; :meth:`route_shares`;
    :meth:`receive` each :class:`MaskedInput`; :meth:`request_unmask`; :meth:`receive` each
    :class:`UnmaskResponse`; :meth:`finalize`. The stage-closing calls decide who is still
    in (messages not received by then count as dropouts). A rejected client message raises
    :class:`SecAggProtocolError` and changes nothing; the caller can treat its sender as
    dropped. Masked inputs are summed on arrival, so the server holds one vector, not ``n``.
    """

    def __init__(self, config: SecAggConfig) -> None:
        config.validate()
        self.config = config
        self._session = config.session_id
        self.graph = config.graph()
        self._neighbours = self.graph.neighbour_sets()
        self.stage = ServerStage.COLLECT_KEYS
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._keyed: dict[int, frozenset[int]] = {}  # u -> neighbours whose keys u got
        self._ciphertexts: dict[int, dict[int, bytes]] = {}
        self._holders: dict[int, frozenset[int]] = {}  # u -> neighbours holding u's shares
        self._sum = MaskAccumulator(config.dim, config.bits)
        self._masked: set[int] = set()
        self._requests: dict[int, UnmaskRequest] = {}
        self._seed_shares: dict[int, dict[int, bytes]] = {}
        self._key_shares: dict[int, dict[int, bytes]] = {}
        self._responded: set[int] = set()
        self._needed_keys: list[int] = []

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

    def _prune(self, members: set[int]) -> set[int]:
        """Largest subset in which every client has >= t neighbours (else its shares are useless).

        A client whose neighbourhood cannot hold t shares could never be unmasked, and anyone
        who masked with it could not be unmasked either, so it is removed before anyone does.
        """
        t = self.config.threshold
        alive = set(members)
        changed = True
        while changed:
            changed = False
            for u in list(alive):
                if len(self._neighbours[u] & alive) < t:
                    alive.discard(u)
                    changed = True
        return alive

    @property
    def survivors(self) -> tuple[int, ...]:
        """Clients whose masked input has arrived so far."""
        return tuple(sorted(self._masked))

    # -- stages -----------------------------------------------------------------------------

    def setup_message(self) -> SetupMessage:
        """Round 0: the same message for every client."""
        return SetupMessage(self.config)

    def receive_advertise(self, message: AdvertiseKeys) -> None:
        self._expect(ServerStage.COLLECT_KEYS, message)
        u = message.sender
        if not 0 <= u < self.config.num_clients:
            raise SecAggProtocolError(f"sender {u} is not a client of this round")
        if u in self._keys:
            raise SecAggProtocolError(f"client {u} advertised keys twice")
        if len(message.c_public) != PUBLIC_KEY_BYTES or len(message.s_public) != PUBLIC_KEY_BYTES:
            raise SecAggProtocolError(f"client {u} sent malformed public keys")
        self._keys[u] = (message.c_public, message.s_public)

    def broadcast_keys(self) -> dict[int, KeysBroadcast]:
        """Close round 1: each remaining client gets the keys of its advertising neighbours."""
        self._expect(ServerStage.COLLECT_KEYS)
        members = self._prune(set(self._keys))
        if not members:
            raise self._abort(
                f"fewer than t={self.config.threshold} survivors: after key advertisement no "
                f"client has t neighbours that advertised keys ({len(self._keys)} advertised)"
            )
        out = {}
        for u in sorted(members):
            peers = sorted(self._neighbours[u] & members)
            self._keyed[u] = frozenset(peers)
            keys = tuple(NeighbourKeys(v, *self._keys[v]) for v in peers)
            out[u] = KeysBroadcast(self.config.round_id, u, keys)
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

    def route_shares(self) -> dict[int, SharesBroadcast]:
        """Close round 2: forward each ciphertext to its recipient, among clients still in."""
        self._expect(ServerStage.COLLECT_SHARES)
        members = self._prune(set(self._ciphertexts))
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

    def request_unmask(self) -> dict[int, UnmaskRequest]:
        """Close round 3: check that unmasking can succeed, then ask each survivor for shares.

        Aborts before any share is requested -- so nothing is revealed -- when fewer than
        ``t`` masked inputs arrived, or when some survivor's ``b_v`` or some dropped client's
        ``s_v`` (needed because a survivor masked with it) has fewer than ``t`` surviving
        holders.
        """
        self._expect(ServerStage.COLLECT_MASKED)
        t = self.config.threshold
        survivors = self._masked
        if len(survivors) < t:
            raise self._abort(
                f"fewer than t={t} survivors: only {len(survivors)} masked inputs arrived"
            )
        dropped = set(self._holders) - survivors
        for v in sorted(survivors):
            alive = len(self._holders[v] & survivors)
            if alive < t:
                raise self._abort(
                    f"fewer than t={t} survivors among the neighbours of client {v} "
                    f"({alive}): its self mask could not be removed"
                )
        needed = []
        for d in sorted(dropped):
            alive = len(self._holders[d] & survivors)
            if alive == 0:
                continue  # nobody who survived masked with d: its key is not needed
            if alive < t:
                raise self._abort(
                    f"fewer than t={t} survivors among the neighbours of dropped client {d} "
                    f"({alive}): its pairwise masks could not be removed"
                )
            needed.append(d)
        self._needed_keys = needed
        out = {}
        for w in sorted(survivors):
            holders = self._holders[w]
            out[w] = UnmaskRequest(
                self.config.round_id,
                w,
                survived=tuple(sorted(holders & survivors)),
                dropped=tuple(sorted(holders - survivors)),
            )
        self._requests = out
        self._seed_shares = {v: {} for v in survivors}
        self._key_shares = {d: {} for d in needed}
        self.stage = ServerStage.COLLECT_UNMASK
        return out

    def receive_unmask(self, message: UnmaskResponse) -> None:
        self._expect(ServerStage.COLLECT_UNMASK, message)
        w = message.sender
        request = self._requests.get(w)
        if request is None:
            raise SecAggProtocolError(f"client {w} was not asked to unmask")
        if w in self._responded:
            raise SecAggProtocolError(f"client {w} answered the unmask request twice")
        seed_owners = [v for v, _ in message.seed_shares]
        key_owners = [v for v, _ in message.key_shares]
        _check_unique(seed_owners, f"the seed shares of client {w}")
        _check_unique(key_owners, f"the key shares of client {w}")
        if not set(seed_owners) <= set(request.survived) or not set(key_owners) <= set(
            request.dropped
        ):
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

    def _reconstruct(self, shares: dict[int, bytes], owner: int, what: str) -> bytes:
        t = self.config.threshold
        points = sorted(shares)
        secret = reconstruct_secret_bytes(points[:t], [shares[x] for x in points[:t]])
        if len(points) > t:
            # Spare shares let us catch a corrupted one: two different t-subsets must agree.
            check = reconstruct_secret_bytes(points[-t:], [shares[x] for x in points[-t:]])
            if check != secret:
                raise self._abort(f"inconsistent shares of the {what} of client {owner}")
        return secret

    def finalize(self) -> AggregateResult:
        """Close round 4: reconstruct the needed secrets and output the survivors' sum."""
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
                self._sum.subtract_stream(
                    self._reconstruct(self._seed_shares[v], v, "self-mask seed")
                )
            for d in self._needed_keys:
                raw = self._reconstruct(self._key_shares[d], d, "masking key")
                s_key = private_key_from_bytes(raw)
                if public_key_bytes(s_key) != self._keys[d][1]:
                    raise self._abort(
                        f"the reconstructed masking key of client {d} does not match its "
                        "advertised public key: a share is corrupt"
                    )
                for v in sorted(self._holders[d] & self._masked):
                    seed = derive_mask_seed(
                        key_agreement(s_key, self._keys[v][1]), self._session, d, v
                    )
                    # v added PRG(s_dv) if d > v and subtracted it if d < v: undo that.
                    if d > v:
                        self._sum.subtract_stream(seed)
                    else:
                        self._sum.add_stream(seed)
        except SecAggProtocolError as err:
            raise self._abort(f"unmasking failed: {err}") from err
        result = AggregateResult(self._sum.value(), self.survivors)
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
        elif isinstance(message, UnmaskResponse):
            self.receive_unmask(message)
        else:
            raise SecAggProtocolError(f"the server does not accept {type(message).__name__}")
