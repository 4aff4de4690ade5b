"""Fault injection for fedmosaic deployments (issue #18, item 5).

``proxy``: a local TCP proxy that delays, throttles, drops, cuts and refuses connections
between clients and the server. ``federation``: real ``fedmosaic server`` / ``fedmosaic
client`` processes on 127.0.0.1 with mutual TLS, in a temporary directory. ``hooks``: the
test hooks a fault-injection process can switch on (slow checkpoint fsync, a hold after a
checkpoint, a slow local fit), read only by ``python -m fedmosaic.faults.launch``.
``hostile``: raw gRPC calls of a federation member turned hostile. ``scenarios``: the named
scenarios that inject one fault each and check the promises of docs/deployment.md
("Faults and limits"); ``benchmarks/chaos.py`` runs them all.
"""

from fedmosaic.faults.proxy import Fault, FaultProxy

__all__ = ["Fault", "FaultProxy"]
