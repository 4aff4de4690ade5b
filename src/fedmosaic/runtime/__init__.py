"""Server loop, transports, checkpoints and results."""

from fedmosaic.runtime.checkpoint import load_checkpoint, save_checkpoint
from fedmosaic.runtime.result import RunResult, plot_histories
from fedmosaic.runtime.server import RunState, Server
from fedmosaic.runtime.simulate import simulate
from fedmosaic.runtime.transport import ClientFailure, SequentialTransport, Transport

__all__ = [
    "ClientFailure",
    "RunResult",
    "RunState",
    "SequentialTransport",
    "Server",
    "Transport",
    "load_checkpoint",
    "plot_histories",
    "save_checkpoint",
    "simulate",
]
