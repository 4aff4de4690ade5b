"""Errors raised by the SecAgg+ implementation.

Two kinds of failure are kept apart because callers react to them differently:

* :class:`SecAggProtocolError` -- a message is malformed, out of order, fails authentication
  or asks for something the protocol forbids (for instance the double-unmask request of
  Bonawitz et al., CCS 2017, §4). The message is rejected; the receiver's state is left as it
  was before the message, so the caller may treat the sender as dropped and go on.
* :class:`SecAggAbortError` -- the round cannot finish correctly without weakening privacy,
  typically because fewer than ``t`` holders of some secret are left (Bell et al., CCS 2020,
  "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead"). The server then
  outputs nothing.
"""

from __future__ import annotations

from fedmosaic.core.errors import FedmosaicError


class SecAggError(FedmosaicError):
    """Base class of every secure-aggregation error."""


class SecAggProtocolError(SecAggError, ValueError):
    """A message was rejected: malformed, unauthenticated, out of order or forbidden."""


class SecAggAbortError(SecAggError, RuntimeError):
    """The round was aborted: the sum cannot be recovered without revealing more than it."""


class SecAggInfeasibleError(SecAggAbortError, ValueError):
    """No parameters meet the security and dropout requirements for this many clients.

    A ``ValueError`` (the request is unsatisfiable) and a :class:`SecAggAbortError` (the round
    cannot run securely): callers that skip an aborted round handle it the same way, so a
    federation that shrinks to three participants fails the round with this reason instead of
    crashing.
    """
