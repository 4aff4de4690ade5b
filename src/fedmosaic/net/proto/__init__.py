"""The deployment protocol: ``fedmosaic.proto``, its compiled descriptor ``fedmosaic.binpb``
and ``fedmosaic_pb2``, the message classes built from that descriptor.

Recompile the descriptor with ``make proto`` after editing the ``.proto``.
"""
