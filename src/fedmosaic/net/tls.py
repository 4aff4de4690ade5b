"""TLS 1.3 only for the gRPC connections of this process, where gRPC's Python API allows it.

gRPC Python (checked up to 1.85) has no minimum-TLS-version setting: ``ssl_server_credentials``
and ``ssl_channel_credentials`` take none, gRPC Core's ``grpc_tls_credentials_options_set_min_
tls_version`` is not reachable from Python (grpc/grpc#37305, PRs #43045 and #43080 are unmerged),
and BoringSSL's TLS 1.3 suites cannot be configured at all, so ``GRPC_SSL_CIPHER_SUITES`` with
only TLS 1.3 names is refused ("Invalid cipher list", grpc/grpc#28382). What does work is the
documented ``GRPC_SSL_CIPHER_SUITES`` variable, which sets the TLS 1.2 (and older) suites: we set
it to PSK suites only. A PSK suite needs a pre-shared-key callback, which gRPC never installs, so
BoringSSL (and OpenSSL) skip it on both sides; no TLS 1.2 suite is then usable and a TLS 1.2
handshake fails with ``NO_SHARED_CIPHER``, while TLS 1.3, whose suites are fixed, is unaffected.

gRPC reads the variable once, when ``grpc`` is first imported. ``fedmosaic.net``'s package
``__init__`` imports this module before any of its modules imports ``grpc``, so every
``fedmosaic`` command and every program that imports ``fedmosaic.net`` before ``grpc`` gets the
policy, and child processes inherit it. A program that imported ``grpc`` first cannot: ``policy``
then says ``"late"`` and the server and client log a warning. Setting ``GRPC_SSL_CIPHER_SUITES``
yourself (``"custom"``) or ``FEDMOSAIC_ALLOW_TLS12=1`` (``"allowed"``) keeps TLS 1.2.
"""

from __future__ import annotations

import os
import sys
from typing import Literal

CIPHER_ENV = "GRPC_SSL_CIPHER_SUITES"
ALLOW_TLS12_ENV = "FEDMOSAIC_ALLOW_TLS12"
# TLS <= 1.2 suites that no gRPC connection can negotiate (see the module docstring).
TLS13_ONLY_CIPHERS = "PSK-AES128-CBC-SHA:PSK-AES256-CBC-SHA"

Policy = Literal["enforced", "late", "custom", "allowed"]


def _apply() -> Policy:
    current = os.environ.get(CIPHER_ENV)
    if current == TLS13_ONLY_CIPHERS:
        return "enforced"  # set by us earlier, or inherited from a parent process
    if os.environ.get(ALLOW_TLS12_ENV) == "1":
        return "allowed"
    if current:
        return "custom"
    if "grpc" in sys.modules:
        return "late"  # gRPC has already read its configuration
    os.environ[CIPHER_ENV] = TLS13_ONLY_CIPHERS
    return "enforced"


_POLICY: Policy = _apply()


def policy() -> Policy:
    """Whether this process's gRPC refuses TLS 1.2: ``"enforced"``, or why not."""
    return _POLICY


def describe() -> str:
    """One sentence for logs and status output."""
    return {
        "enforced": "TLS 1.3 only (TLS 1.2 suites disabled through GRPC_SSL_CIPHER_SUITES)",
        "late": "TLS 1.2 still accepted: grpc was imported before fedmosaic.net; import "
                "fedmosaic.net first or set GRPC_SSL_CIPHER_SUITES="
                f"{TLS13_ONLY_CIPHERS} in the environment",
        "custom": f"TLS 1.2 may be accepted: {CIPHER_ENV} is set by the environment",
        "allowed": f"TLS 1.2 accepted: {ALLOW_TLS12_ENV}=1",
    }[_POLICY]
