"""The messages of SecAgg+ and their byte encoding.

The four client/server exchanges follow Bonawitz et al., CCS 2017, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning" (§4, rounds 0-3 without the optional
consistency check), restricted to the neighbour graph of Bell et al., CCS 2020, "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead":

==========================  =========================  =====================================
server -> client            client -> server           content
==========================  =========================  =====================================
:class:`SetupMessage`       :class:`AdvertiseKeys`     round parameters / two X25519 keys
:class:`KeysBroadcast`      :class:`ShareKeys`         neighbours' keys / encrypted shares
:class:`SharesBroadcast`    :class:`MaskedInput`       shares addressed to u / masked vector
:class:`UnmaskRequest`      :class:`UnmaskResponse`    who survived or dropped / the shares
==========================  =========================  =====================================

Messages hold only ints, bytes and (for the masked vector) a numpy array, so a transport can
carry them as they are or as :meth:`to_bytes`; :func:`decode_message` reverses the encoding
and rejects anything malformed with :class:`SecAggProtocolError`.

Wire format: a 12-byte header ``"SA" | version u8 | type u8 | round_id u64``, then the body;
all integers little-endian. Lists are a count, then every id (u32 each), then every
fixed-size blob, so encoding and decoding are a few numpy/bytes operations per message.
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

MAGIC = b"SA"
VERSION = 1
_HEADER = struct.Struct("<2sBBQ")
#: Bytes of one encrypted share pair: nonce, (share of b_u || share of s_u), GCM tag.
SHARE_CIPHERTEXT_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + TAG_BYTES
_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF
_SESSION_LABEL = b"fedmosaic/secagg+/v1/session/"


class MessageType(IntEnum):
    SETUP = 1
    ADVERTISE_KEYS = 2
    KEYS_BROADCAST = 3
    SHARE_KEYS = 4
    SHARES_BROADCAST = 5
    MASKED_INPUT = 6
    UNMASK_REQUEST = 7
    UNMASK_RESPONSE = 8


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


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= _U32_MAX:
        raise SecAggProtocolError(f"{name} {value} does not fit in 32 bits")


@dataclass(frozen=True)
class SecAggConfig:
    """Everything the server announces in round 0; every participant derives the rest from it.

    ``graph_seed`` is public: it fixes the random relabelling of the Harary graph (see
    :mod:`fedmosaic.privacy.secagg.graph`). ``session_id`` hashes the whole configuration and is
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

    def graph(self) -> NeighbourGraph:
        return NeighbourGraph(self.num_clients, self.degree, self.graph_seed)


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
    """Round 1, client -> server: public keys ``c_u`` (share encryption) and ``s_u`` (masks)."""

    round_id: int
    sender: int
    c_public: bytes
    s_public: bytes

    def to_bytes(self) -> bytes:
        _check_u32("sender", self.sender)
        if len(self.c_public) != PUBLIC_KEY_BYTES or len(self.s_public) != PUBLIC_KEY_BYTES:
            raise SecAggProtocolError("public keys must be 32 bytes")
        return (
            _header(MessageType.ADVERTISE_KEYS, self.round_id)
            + struct.pack("<I", self.sender)
            + self.c_public
            + self.s_public
        )

    @classmethod
    def _decode(cls, round_id: int, reader: _Reader) -> AdvertiseKeys:
        (sender,) = reader.unpack("<I")
        return cls(round_id, sender, reader.take(PUBLIC_KEY_BYTES), reader.take(PUBLIC_KEY_BYTES))


@dataclass(frozen=True)
class NeighbourKeys:
    """The two public keys of one neighbour, as relayed by the server."""

    client_id: int
    c_public: bytes
    s_public: bytes


@dataclass(frozen=True)
class KeysBroadcast(_Wire):
    """Round 1, server -> client ``recipient``: the keys of its neighbours that advertised."""

    round_id: int
    recipient: int
    keys: tuple[NeighbourKeys, ...]

    def to_bytes(self) -> bytes:
        for entry in self.keys:
            if len(entry.c_public) != PUBLIC_KEY_BYTES or len(entry.s_public) != PUBLIC_KEY_BYTES:
                raise SecAggProtocolError("public keys must be 32 bytes")
        return b"".join(
            [
                _header(MessageType.KEYS_BROADCAST, self.round_id),
                struct.pack("<II", self.recipient, len(self.keys)),
                _ids([e.client_id for e in self.keys]),
                *(e.c_public + e.s_public for e in self.keys),
            ]
        )

    @classmethod
    def _decode(cls, round_id: int, reader: _Reader) -> KeysBroadcast:
        recipient, count = reader.unpack("<II")
        ids = reader.ids(count)
        blobs = reader.blobs(count, 2 * PUBLIC_KEY_BYTES)
        keys = tuple(
            NeighbourKeys(i, b[:PUBLIC_KEY_BYTES], b[PUBLIC_KEY_BYTES:]) for i, b in zip(ids, blobs)
        )
        return cls(round_id, recipient, keys)


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

    def to_bytes(self) -> bytes:
        return _encode_addressed(
            MessageType.SHARE_KEYS, self.round_id, self.sender, self.ciphertexts
        )

    @classmethod
    def _decode(cls, round_id: int, reader: _Reader) -> ShareKeys:
        return cls(round_id, *_decode_addressed(reader))


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
class UnmaskRequest(_Wire):
    """Round 3, server -> surviving client: its neighbours that survived / dropped after round 2.

    ``survived`` are the neighbours whose masked input arrived (reveal the share of their
    self-mask seed ``b_v``); ``dropped`` sent shares but no masked input (reveal the share of
    their masking key ``s_v``).
    """

    round_id: int
    recipient: int
    survived: tuple[int, ...]
    dropped: tuple[int, ...]

    def to_bytes(self) -> bytes:
        return b"".join(
            [
                _header(MessageType.UNMASK_REQUEST, self.round_id),
                struct.pack("<III", self.recipient, len(self.survived), len(self.dropped)),
                _ids(self.survived),
                _ids(self.dropped),
            ]
        )

    @classmethod
    def _decode(cls, round_id: int, reader: _Reader) -> UnmaskRequest:
        recipient, n_survived, n_dropped = reader.unpack("<III")
        return cls(round_id, recipient, reader.ids(n_survived), reader.ids(n_dropped))


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
