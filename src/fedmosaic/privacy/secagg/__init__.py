"""Secure aggregation: SecAgg (Bonawitz et al., CCS 2017) and SecAgg+ (Bell et al., CCS 2020).

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning";
Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead". The server
learns the sum of the clients' vectors and nothing else; clients may drop out at any stage.

* :mod:`~fedmosaic.privacy.secagg.protocol` -- :class:`SecAggPlusClient` and
  :class:`SecAggPlusServer`, message-driven state machines;
* :mod:`~fedmosaic.privacy.secagg.messages` -- the messages and their byte encoding;
* :mod:`~fedmosaic.privacy.secagg.graph` -- the neighbour graph,
  :func:`secagg_plus_parameters` (degree ``k`` and threshold ``t``) and the client-side
  :class:`SecAggBounds` that refuse weaker setups;
* :mod:`~fedmosaic.privacy.secagg.identity` -- long-term signing identities and their
  verification (certificates against the federation CA, or a simulated PKI);
* :mod:`~fedmosaic.privacy.secagg.quantize` -- floats to Z_(2^bits) and back;
* :mod:`~fedmosaic.privacy.secagg.crypto` -- X25519, HKDF, AES-GCM, AES-CTR PRG, Shamir;
* :mod:`~fedmosaic.privacy.secagg.simulate` -- :func:`secure_sum`, an in-process round.
"""

from fedmosaic.privacy.secagg.errors import (
    SecAggAbortError,
    SecAggError,
    SecAggInfeasibleError,
    SecAggProtocolError,
)
from fedmosaic.privacy.secagg.graph import (
    NeighbourGraph,
    SecAggBounds,
    SecAggParameters,
    minimum_threshold,
    secagg_plus_parameters,
)
from fedmosaic.privacy.secagg.identity import (
    CertificateVerifier,
    PeerVerifier,
    SigningIdentity,
    StaticPki,
)
from fedmosaic.privacy.secagg.messages import (
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
    decode_message,
)
from fedmosaic.privacy.secagg.protocol import (
    AggregateResult,
    ClientStage,
    SecAggPlusClient,
    SecAggPlusServer,
    ServerStage,
)
from fedmosaic.privacy.secagg.quantize import Quantizer
from fedmosaic.privacy.secagg.simulate import (
    DROPOUT_STAGES,
    SecureSumResult,
    make_config,
    run_round,
    secure_sum,
    secure_sum_int,
)

__all__ = [
    "DROPOUT_STAGES",
    "AdvertiseKeys",
    "AggregateResult",
    "CertificateVerifier",
    "ClientStage",
    "ConsistencyRequest",
    "ConsistencySignature",
    "KeysBroadcast",
    "MaskedInput",
    "Message",
    "NeighbourGraph",
    "PeerVerifier",
    "Quantizer",
    "RosterEntry",
    "SecAggAbortError",
    "SecAggBounds",
    "SecAggConfig",
    "SecAggError",
    "SecAggInfeasibleError",
    "SecAggParameters",
    "SecAggPlusClient",
    "SecAggPlusServer",
    "SecAggProtocolError",
    "SecureSumResult",
    "ServerStage",
    "SetupMessage",
    "ShareKeys",
    "SharesBroadcast",
    "SigningIdentity",
    "StaticPki",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode_message",
    "make_config",
    "minimum_threshold",
    "run_round",
    "secagg_plus_parameters",
    "secure_sum",
    "secure_sum_int",
]
