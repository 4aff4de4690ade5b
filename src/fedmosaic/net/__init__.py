"""Deployment over the network (issue #5): gRPC transport, credentials and monitoring.

``server`` (``serve``), ``client`` (``run_client``), ``transport`` (``GrpcTransport``),
``service`` (the gRPC handlers), ``secagg`` (SecAgg+ over gRPC), ``auth`` (TLS identity and
revocation), ``wire`` (chunked tensors, fit settings, client stages), ``certs`` and
``monitoring``. Only ``tls`` (no dependencies) is imported here, so ``fedmosaic --help``
stays fast.
"""

# Before any gRPC import: gRPC reads its TLS cipher configuration once, at import (see ``tls``).
from fedmosaic.net import tls as _tls  # noqa: F401
