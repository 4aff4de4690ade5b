"""Server loop, transports, checkpoints and results."""

from fedmosaic.runtime.batched import BatchedTransport, BatchingFallbackWarning
from fedmosaic.runtime.checkpoint import load_checkpoint, save_checkpoint
from fedmosaic.runtime.parallel import ParallelTransport
from fedmosaic.runtime.ray_transport import RayTransport
from fedmosaic.runtime.result import RunResult, plot_histories
from fedmosaic.runtime.server import RunState, Server
from fedmosaic.runtime.simulate import simulate
from fedmosaic.runtime.tally import ClientFailure, PartialAggregate, RoundTally
from fedmosaic.runtime.transport import SequentialTransport, Transport, TransportResult

__all__ = [
    "BatchedTransport",
    "BatchingFallbackWarning",
    "ClientFailure",
    "ParallelTransport",
    "PartialAggregate",
    "RayTransport",
    "RoundTally",
    "RunResult",
    "RunState",
    "SequentialTransport",
    "Server",
    "Transport",
    "TransportResult",
    "load_checkpoint",
    "plot_histories",
    "save_checkpoint",
    "simulate",
]
