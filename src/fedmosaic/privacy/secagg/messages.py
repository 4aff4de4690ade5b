"""The messages of SecAgg+ and their byte encoding.

The client/server exchanges follow the malicious-server ("active") variant of Bonawitz et al.,
CCS 2017, "Practical Secure Aggregation for Privacy-Preserving Machine Learning" (§4, Fig. 4:
signed key advertisement and the ConsistencyCheck round), restricted to the neighbour graph of
Bell et al., CCS 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead":

============================  ============================  ===================================
server -> client              client -> server              content
============================  ============================  ===================================
:class:`SetupMessage`         :class:`AdvertiseKeys`        parameters / two X25519 keys, a
                                                            graph-seed contribution, signed
:class:`KeysBroadcast`        :class:`ShareKeys`            every member's signed keys (the
                                                            roster) / encrypted shares
:class:`SharesBroadcast`      :class:`MaskedInput`          shares addressed to u / masked y_u
:class:`ConsistencyRequest`   :class:`ConsistencySignature` survivor set U3 / signature on it
:class:`UnmaskRequest`        :class:`UnmaskResponse`       U3 and the signatures / the shares
============================  ============================  ===================================

Messages hold only ints, bytes, strings and (for the masked vector) a numpy array, so a
transport can carry them as they are or as :meth:`to_bytes`; :func:`decode_message` reverses
the encoding and rejects anything malformed with :class:`SecAggProtocolError`.

Wire format: a 12-byte header ``"SA" | version u8 | type u8 | round_id u64``, then the body;
all integers little-endian. Lists are a count, then every id (u32 each), then every
fixed-size blob; variable-size fields (signatures, certificates, identities) are a length and
the bytes, with limits from :mod:`fedmosaic.privacy.secagg.identity`.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from fedmosaic.privacy.secagg.crypto import (
    NONCE_BYTES,
    PUBLIC_KEY_BYTES,
    SEED_BYTES,
    SHARE_BYTES,
    TAG_BYTES,
    ring_dtype,
)
from fedmosaic.privacy.secagg.errors import SecAggProtocolError
from fedmosaic.privacy.secagg.graph import NeighbourGraph
from fedmosaic.privacy.secagg.identity import (
    MAX_CREDENTIAL_BYTES,
    MAX_IDENTITY_BYTES,
    MAX_SIGNATURE_BYTES,
)

MAGIC = b"SA"
VERSION = 2
_HEADER = struct.Struct("<2sBBQ")
#: Bytes of one encrypted share pair: nonce, (share of b_u || share of s_u), GCM tag.
SHARE_CIPHERTEXT_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + TAG_BYTES
_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF
_SESSION_LABEL = b"fedmosaic/secagg+/v1/session/"
_ADVERTISE_LABEL = b"fedmosaic/secagg+/v2/advertise-keys/"
_CONSISTENCY_LABEL = b"fedmosaic/secagg+/v2/consistency-check/"
_GRAPH_SEED_LABEL = b"fedmosaic/secagg+/v2/graph-seed/"
_COMMITMENT_LABEL = b"fedmosaic/secagg+/v2/self-mask-commitment/"
#: Bytes of a client's graph-seed contribution and of a self-mask seed commitment.
CONTRIBUTION_BYTES = 32
COMMITMENT_BYTES = 32


class MessageType(IntEnum):
    SETUP = 1
    ADVERTISE_KEYS = 2
    KEYS_BROADCAST = 3
    SHARE_KEYS = 4
    SHARES_BROADCAST = 5
    MASKED_INPUT = 6
    UNMASK_REQUEST = 7
    UNMASK_RESPONSE = 8
    CONSISTENCY_REQUEST = 9
    CONSISTENCY_SIGNATURE = 10


class _Reader:
    """Bounds-checked cursor over a received message: short input is a protocol error."""

    def __init__(self, data: bytes, offset: int) -> None:
        self.data, self.offset = data, offset

    def take(self, size: int) -> bytes:
        end = self.offset + size
        if size < 0 or end > len(self.data):
            raise SecAggProtocolError("message truncated")
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def unpack(self, fmt: str) -> tuple[int, ...]:
        spec = struct.Struct(fmt)
        return spec.unpack(self.take(spec.size))

    def ids(self, count: int) -> tuple[int, ...]:
        return tuple(np.frombuffer(self.take(4 * count), dtype="<u4").tolist())

    def blobs(self, count: int, size: int) -> tuple[bytes, ...]:
        raw = self.take(count * size)
        return tuple(raw[i * size : (i + 1) * size] for i in range(count))

    def blob(self, limit: int) -> bytes:
        (size,) = self.unpack("<I")
        if size > limit:
            raise SecAggProtocolError(f"a field of {size} bytes exceeds its limit of {limit}")
        return self.take(size)

    def text(self) -> str:
        try:
            return self.blob(MAX_IDENTITY_BYTES).decode()
        except UnicodeDecodeError as err:
            raise SecAggProtocolError("an identity is not UTF-8") from err

    def finish(self) -> None:
        if self.offset != len(self.data):
            raise SecAggProtocolError(f"{len(self.data) - self.offset} trailing bytes in message")


class _Wire:
    """``from_bytes`` for every message class: decode and check the message type."""

    @classmethod
    def from_bytes(cls, data: bytes) -> Any:
        message = decode_message(data)
        if not isinstance(message, cls):
            raise SecAggProtocolError(
                f"expected a {cls.__name__} message, got {type(message).__name__}"
            )
        return message


def _header(kind: MessageType, round_id: int) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, kind, round_id)


def _ids(values: tuple[int, ...] | list[int]) -> bytes:
    return np.asarray(values, dtype="<u4").tobytes()


def _blob(data: bytes, limit: int, what: str) -> bytes:
    if len(data) > limit:
        raise SecAggProtocolError(f"{what} of {len(data)} bytes exceeds its limit of {limit}")
    return struct.pack("<I", len(data)) + data


def _text(value: str) -> bytes:
    return _blob(value.encode(), MAX_IDENTITY_BYTES, "an identity")


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= _U32_MAX:
        raise SecAggProtocolError(f"{name} {value} does not fit in 32 bits")


@dataclass(frozen=True)
class SecAggConfig:
    """Everything the server announces in round 0; every participant derives the rest from it.

    ``graph_seed`` is the server's public share of the graph seed: the random relabelling of
    the Harary graph (see :mod:`fedmosaic.privacy.secagg.graph`) comes from
    :func:`roster_graph_seed`, a hash of it and of every member's signed contribution, so no
    single party chooses the graph. ``session_id`` hashes the whole configuration and is
    mixed into every key derivation, so keys never carry over between rounds and participants
    that disagree on any parameter fail authentication instead of producing a wrong sum.
    """

    round_id: int
    num_clients: int
    threshold: int
    degree: int
    dim: int
    bits: int
    graph_seed: bytes

    def validate(self) -> None:
        """Raise :class:`SecAggProtocolError` unless the parameters are consistent."""
        problems = []
        if not 0 <= self.round_id <= _U64_MAX:
            problems.append(f"round_id {self.round_id} is not a u64")
        if not 2 <= self.num_clients <= _U32_MAX:
            problems.append(f"num_clients {self.num_clients} is not in [2, 2^32)")
        if not 1 <= self.degree <= self.num_clients - 1:
            problems.append(f"degree {self.degree} is not in [1, num_clients - 1]")
        if not 1 <= self.threshold <= self.degree:
            problems.append(f"threshold {self.threshold} is not in [1, degree]")
        if not 1 <= self.dim <= _U32_MAX:
            problems.append(f"dim {self.dim} is not in [1, 2^32)")
        if not 1 <= self.bits <= 64:
            problems.append(f"bits {self.bits} is not in [1, 64]")
        if len(self.graph_seed) != SEED_BYTES:
            problems.append(f"graph_seed has {len(self.graph_seed)} bytes, not {SEED_BYTES}")
        if problems:
            raise SecAggProtocolError("invalid SecAgg+ configuration: " + "; ".join(problems))

    def body(self) -> bytes:
        return (
            struct.pack(
                "<IIIIB", self.num_clients, self.threshold, self.degree, self.dim, self.bits
            )
            + self.graph_seed
        )

    @property
    def session_id(self) -> bytes:
        encoded = _SESSION_LABEL + struct.pack("<Q", self.round_id) + self.body()
        return hashlib.sha256(encoded).digest()

    @property
    def value_dtype(self) -> np.dtype:
        return ring_dtype(self.bits)

    def graph(self, seed: bytes) -> NeighbourGraph:
        """The round's graph for the seed of :func:`roster_graph_seed`."""
        return NeighbourGraph(self.num_clients, self.degree, seed)


def roster_graph_seed(config: SecAggConfig, contributions: dict[int, bytes]) -> bytes:
    """The graph seed: SHA-256 of the session and every advertised member's contribution.

    Fixed only once every key is in, by the server's setup nonce and the clients' random
    contributions together (each signed by its client), so neither the server nor any one
    client picks the graph: see ``docs/security.md`` for the grinding a colluding party can
    still do by choosing whom to leave out.
    """
    parts = [_GRAPH_SEED_LABEL, config.session_id, struct.pack("<I", len(contributions))]
    for u in sorted(contributions):
        parts.append(struct.pack("<I", u) + contributions[u])
    return hashlib.sha256(b"".join(parts)).digest()


def advertise_payload(session_id: bytes, sender: int, identity: str, c_public: bytes,
                      s_public: bytes, contribution: bytes) -> bytes:
    """What a client signs in :class:`AdvertiseKeys`: round, index, identity, keys, contribution."""
    return b"".join([_ADVERTISE_LABEL, session_id, struct.pack("<I", sender), _text(identity),
                     c_public, s_public, contribution])


def consistency_payload(roster: bytes, survivors: tuple[int, ...]) -> bytes:
    """What a client signs in the consistency check: the roster it accepted (its graph seed,
    :func:`roster_graph_seed`, which also binds the session) and the survivor set U3. Binding
    the roster means signatures only count among members that saw the same graph."""
    return b"".join([_CONSISTENCY_LABEL, roster, struct.pack("<I", len(survivors)),
                     _ids(survivors)])


def self_mask_commitment(session_id: bytes, sender: int, self_seed: bytes) -> bytes:
    """Hash commitment to ``b_u``: lets the server tell a corrupt share from a good one."""
    return hashlib.sha256(_COMMITMENT_LABEL + session_id + struct.pack("<I", sender)
                          + self_seed).digest()


@dataclass(frozen=True)
class SetupMessage(_Wire):
    """Round 0, server -> every client: the round parameters."""

    config: SecAggConfig

    @property
    def round_id(self) -> int:
        return self.config.round_id

    def to_bytes(self) -> bytes:
        return _header(MessageType.SETUP, self.config.round_id) + self.config.body()

    @classmethod
    def _decode(cls, round_id: int, reader: _Reader) -> SetupMessage:
        n, t, k, dim, bits = reader.unpack("<IIIIB")
        return cls(SecAggConfig(round_id, n, t, k, dim, bits, reader.take(SEED_BYTES)))


@dataclass(frozen=True)
class AdvertiseKeys(_Wire):
    """Round 1, client -> server: public keys ``c_u`` (share encryption) and ``s_u`` (masks),
    a random graph-seed contribution, the client's signature over them
    (:func:`advertise_payload`) and its credential (certificate DER; empty in simulation)."""

    round_id: int
    sender: int
    c_public: bytes
    s_public: bytes
    contribution: bytes = field(default=bytes(CONTRIBUTION_BYTES))
    signature: bytes = b""
    credential: bytes = field(default=b"", repr=False)

    def to_bytes(self) -> bytes:
        _check_u32("sender", self.sender)
        _check_keys(self.c_public, self.s_public, self.contribution)
        return b"".join([
            _header(MessageType.ADVERTISE_KEYS, self.round_id),
            struct.pack("<I", self.sender), self.c_public, self.s_public, self.contribution,
            _blob(self.signature, MAX_SIGNATURE_BYTES, "a signature"),
            _blob(self.credential, MAX_CREDENTIAL_BYTES, "a credential"),
        ])

    @classmethod
    def _decode(cls, round_id: int, reader: _Reader) -> AdvertiseKeys:
        (sender,) = reader.unpack("<I")
        keys = (reader.take(PUBLIC_KEY_BYTES), reader.take(PUBLIC_KEY_BYTES),
                reader.take(CONTRIBUTION_BYTES))
        return cls(round_id, sender, *keys, reader.blob(MAX_SIGNATURE_BYTES),
                   reader.blob(MAX_CREDENTIAL_BYTES))


def _check_keys(c_public: bytes, s_public: bytes, contribution: bytes) -> None:
    if len(c_public) != PUBLIC_KEY_BYTES or len(s_public) != PUBLIC_KEY_BYTES:
        raise SecAggProtocolError("public keys must be 32 bytes")
    if len(contribution) != CONTRIBUTION_BYTES:
        raise SecAggProtocolError(f"a graph-seed contribution has {CONTRIBUTION_BYTES} bytes")


@dataclass(frozen=True)
class RosterEntry:
    """One member's signed advertisement as relayed by the server, with the identity the
    server claims for that index (checked against the credential by the receiver)."""

    client_id: int
    identity: str
    c_public: bytes
    s_public: bytes
    contribution: bytes
    signature: bytes
    credential: bytes = field(default=b"", repr=False)

    def to_bytes(self) -> bytes:
        _check_keys(self.c_public, self.s_public, self.contribution)
        return b"".join([
            struct.pack("<I", self.client_id), _text(self.identity), self.c_public,
            self.s_public, self.contribution,
            _blob(self.signature, MAX_SIGNATURE_BYTES, "a signature"),
            _blob(self.credential, MAX_CREDENTIAL_BYTES, "a credential"),
        ])

    @classmethod
    def read(cls, reader: _Reader) -> RosterEntry:
        (client_id,) = reader.unpack("<I")
        identity = reader.text()
        keys = (reader.take(PUBLIC_KEY_BYTES), reader.take(PUBLIC_KEY_BYTES),
                reader.take(CONTRIBUTION_BYTES))
        return cls(client_id, identity, *keys, reader.blob(MAX_SIGNATURE_BYTES),
                   reader.blob(MAX_CREDENTIAL_BYTES))


@dataclass(frozen=True)
class KeysBroadcast(_Wire):
    """Round 1, server -> client ``recipient``: the roster, every member that advertised keys.

    All members, not only the recipient's neighbours: the graph seed hashes every member's
    contribution, so each client needs (and verifies) all of them -- O(n) bytes per client.
    """

    round_id: int
    recipient: int
    entries: tuple[RosterEntry, ...]

    def to_bytes(self) -> bytes:
        return b"".join([
            _header(MessageType.KEYS_BROADCAST, self.round_id),
            struct.pack("<II", self.recipient, len(self.entries)),
            *(e.to_bytes() for e in self.entries),
        ])

    @classmethod
    def _decode(cls, round_id: int, reader: _Reader) -> KeysBroadcast:
        recipient, count = reader.unpack("<II")
        if count > len(reader.data):  # every entry takes bytes: a huge count is a lie
            raise SecAggProtocolError("message truncated")
        return cls(round_id, recipient, tuple(RosterEntry.read(reader) for _ in range(count)))


def _encode_addressed(
    kind: MessageType, round_id: int, party: int, items: tuple[tuple[int, bytes], ...]
) -> bytes:
    for _, blob in items:
        if len(blob) != SHARE_CIPHERTEXT_BYTES:
            raise SecAggProtocolError(
                f"share ciphertexts have {SHARE_CIPHERTEXT_BYTES} bytes, got {len(blob)}"
            )
    return b"".join(
        [
            _header(kind, round_id),
            struct.pack("<II", party, len(items)),
            _ids([i for i, _ in items]),
            *(blob for _, blob in items),
        ]
    )


def _decode_addressed(reader: _Reader) -> tuple[int, tuple[tuple[int, bytes], ...]]:
    party, count = reader.unpack("<II")
    ids = reader.ids(count)
    return party, tuple(zip(ids, reader.blobs(count, SHARE_CIPHERTEXT_BYTES)))


@dataclass(frozen=True)
class ShareKeys(_Wire):
    """Round 2, client -> server: ``(recipient, ciphertext)`` of the shares for each neighbour."""

    round_id: int
    sender: int
    ciphertexts: tuple[tuple[int, bytes], ...]
    #: :func:`self_mask_commitment` of ``b_u``, so the server can check a reconstruction.
    seed_commitment: bytes = bytes(COMMITMENT_BYTES)

    def to_bytes(self) -> bytes:
        if len(self.seed_commitment) != COMMITMENT_BYTES:
            raise SecAggProtocolError(f"a commitment has {COMMITMENT_BYTES} bytes")
        return _encode_addressed(
            MessageType.SHARE_KEYS, self.round_id, self.sender, self.ciphertexts
        ) + self.seed_commitment

    @classmethod
    def _decode(cls, round_id: int, reader: _Reader) -> ShareKeys:
        return cls(round_id, *_decode_addressed(reader), reader.take(COMMITMENT_BYTES))


@dataclass(frozen=True)
class SharesBroadcast(_Wire):
    """Round 2, server -> client ``recipient``: ``(sender, ciphertext)`` addressed to it."""

    round_id: int
    recipient: int
    ciphertexts: tuple[tuple[int, bytes], ...]

    def to_bytes(self) -> bytes:
        return _encode_addressed(
            MessageType.SHARES_BROADCAST, self.round_id, self.recipient, self.ciphertexts
        )

    @classmethod
    def _decode(cls, round_id: int, reader: _Reader) -> SharesBroadcast:
        return cls(round_id, *_decode_addressed(reader))


@dataclass(frozen=True, eq=False)
class MaskedInput(_Wire):
    """Round 3, client -> server: ``y_u`` in Z_(2^bits), as uint32 (bits <= 32) or uint64."""

    round_id: int
    sender: int
    values: np.ndarray = field(repr=False)

    def to_bytes(self) -> bytes:
        values = np.asarray(self.values)
        if values.ndim != 1 or values.dtype.kind != "u" or values.dtype.itemsize not in (4, 8):
            raise SecAggProtocolError("a masked input is a 1-d uint32 or uint64 vector")
        wire = values.astype(values.dtype.newbyteorder("<"), copy=False)
        return b"".join(
            [
                _header(MessageType.MASKED_INPUT, self.round_id),
                struct.pack("<IBI", self.sender, values.dtype.itemsize, values.shape[0]),
                wire.tobytes(),
            ]
        )

    @classmethod
    def _decode(cls, round_id: int, reader: _Reader) -> MaskedInput:
        sender, width, length = reader.unpack("<IBI")
        if width not in (4, 8):
            raise SecAggProtocolError(f"masked input values have 4 or 8 bytes, got {width}")
        raw = reader.take(width * length)
        return cls(round_id, sender, np.frombuffer(raw, dtype=f"<u{width}"))


@dataclass(frozen=True)
class ConsistencyRequest(_Wire):
    """Round 3 (ConsistencyCheck), server -> surviving client: the survivor set ``U3``, the
    clients whose masked input arrived. The client signs it (:func:`consistency_payload`)."""

    round_id: int
    recipient: int
    survivors: tuple[int, ...]

    def to_bytes(self) -> bytes:
        return b"".join([
            _header(MessageType.CONSISTENCY_REQUEST, self.round_id),
            struct.pack("<II", self.recipient, len(self.survivors)), _ids(self.survivors),
        ])

    @classmethod
    def _decode(cls, round_id: int, reader: _Reader) -> ConsistencyRequest:
        recipient, count = reader.unpack("<II")
        return cls(round_id, recipient, reader.ids(count))


@dataclass(frozen=True)
class ConsistencySignature(_Wire):
    """Round 3, client -> server: the client's signature on ``(round, U3)``."""

    round_id: int
    sender: int
    signature: bytes

    def to_bytes(self) -> bytes:
        return (_header(MessageType.CONSISTENCY_SIGNATURE, self.round_id)
                + struct.pack("<I", self.sender)
                + _blob(self.signature, MAX_SIGNATURE_BYTES, "a signature"))

    @classmethod
    def _decode(cls, round_id: int, reader: _Reader) -> ConsistencySignature:
        (sender,) = reader.unpack("<I")
        return cls(round_id, sender, reader.blob(MAX_SIGNATURE_BYTES))


@dataclass(frozen=True)
class UnmaskRequest(_Wire):
    """Round 4, server -> client that signed: ``U3`` again and the signatures collected on it.

    The client answers only if ``U3`` is the set it signed and, for each neighbour ``v``
    whose share it reveals, at least ``t`` neighbours of ``v`` signed that same ``U3``; it
    then reveals the share of ``b_v`` if ``v`` is in ``U3`` and of ``s_v`` otherwise -- the
    request names no owners, so the server cannot ask for anything else.
    """

    round_id: int
    recipient: int
    survivors: tuple[int, ...]
    signatures: tuple[tuple[int, bytes], ...]

    def to_bytes(self) -> bytes:
        return b"".join([
            _header(MessageType.UNMASK_REQUEST, self.round_id),
            struct.pack("<III", self.recipient, len(self.survivors), len(self.signatures)),
            _ids(self.survivors),
            _ids([v for v, _ in self.signatures]),
            *(_blob(sig, MAX_SIGNATURE_BYTES, "a signature") for _, sig in self.signatures),
        ])

    @classmethod
    def _decode(cls, round_id: int, reader: _Reader) -> UnmaskRequest:
        recipient, n_survivors, n_signatures = reader.unpack("<III")
        survivors = reader.ids(n_survivors)
        signers = reader.ids(n_signatures)
        signatures = tuple((v, reader.blob(MAX_SIGNATURE_BYTES)) for v in signers)
        return cls(round_id, recipient, survivors, signatures)


@dataclass(frozen=True)
class UnmaskResponse(_Wire):
    """Round 3, client -> server: ``(owner, share)`` of ``b_owner`` or of ``s_owner``."""

    round_id: int
    sender: int
    seed_shares: tuple[tuple[int, bytes], ...]
    key_shares: tuple[tuple[int, bytes], ...]

    def to_bytes(self) -> bytes:
        for _, share in self.seed_shares + self.key_shares:
            if len(share) != SHARE_BYTES:
                raise SecAggProtocolError(f"shares have {SHARE_BYTES} bytes, got {len(share)}")
        return b"".join(
            [
                _header(MessageType.UNMASK_RESPONSE, self.round_id),
                struct.pack("<III", self.sender, len(self.seed_shares), len(self.key_shares)),
                _ids([v for v, _ in self.seed_shares]),
                _ids([v for v, _ in self.key_shares]),
                *(share for _, share in self.seed_shares),
                *(share for _, share in self.key_shares),
            ]
        )

    @classmethod
    def _decode(cls, round_id: int, reader: _Reader) -> UnmaskResponse:
        sender, n_seed, n_key = reader.unpack("<III")
        seed_ids, key_ids = reader.ids(n_seed), reader.ids(n_key)
        seed_shares = tuple(zip(seed_ids, reader.blobs(n_seed, SHARE_BYTES)))
        key_shares = tuple(zip(key_ids, reader.blobs(n_key, SHARE_BYTES)))
        return cls(round_id, sender, seed_shares, key_shares)


Message = (
    SetupMessage
    | AdvertiseKeys
    | KeysBroadcast
    | ShareKeys
    | SharesBroadcast
    | MaskedInput
    | ConsistencyRequest
    | ConsistencySignature
    | UnmaskRequest
    | UnmaskResponse
)

_DECODERS = {
    MessageType.SETUP: SetupMessage,
    MessageType.ADVERTISE_KEYS: AdvertiseKeys,
    MessageType.KEYS_BROADCAST: KeysBroadcast,
    MessageType.SHARE_KEYS: ShareKeys,
    MessageType.SHARES_BROADCAST: SharesBroadcast,
    MessageType.MASKED_INPUT: MaskedInput,
    MessageType.UNMASK_REQUEST: UnmaskRequest,
    MessageType.UNMASK_RESPONSE: UnmaskResponse,
    MessageType.CONSISTENCY_REQUEST: ConsistencyRequest,
    MessageType.CONSISTENCY_SIGNATURE: ConsistencySignature,
}


def decode_message(data: bytes) -> Message:
    """Parse any SecAgg+ message; malformed input raises :class:`SecAggProtocolError`."""
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise SecAggProtocolError(f"message of {len(data)} bytes is shorter than its header")
    magic, version, kind, round_id = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SecAggProtocolError("not a SecAgg+ message (bad magic)")
    if version != VERSION:
        raise SecAggProtocolError(f"unsupported SecAgg+ message version {version}")
    try:
        decoder = _DECODERS[MessageType(kind)]
    except ValueError as err:
        raise SecAggProtocolError(f"unknown SecAgg+ message type {kind}") from err
    reader = _Reader(data, _HEADER.size)
    message = decoder._decode(round_id, reader)
    reader.finish()
    return message
