"""The deployment protocol's message classes, built at import from ``fedmosaic.binpb``.

``fedmosaic.binpb`` is the ``FileDescriptorSet`` that ``protoc`` compiles from
``fedmosaic.proto`` (``make proto``). Building the classes from it with protobuf's public
runtime API, instead of committing ``protoc --python_out`` code, keeps the module free of the
generated code's exact runtime-version check: it loads on any protobuf from 4.21 on, the
version users commonly have pinned by other packages. The module-level names are those the
generated module had (one class per message, ``DESCRIPTOR`` for the file).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

DESCRIPTOR_SET = "fedmosaic.binpb"
PROTO_FILE = "fedmosaic.proto"


def _load_file() -> Any:
    """The protocol's FileDescriptor, added to the default pool once."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(PROTO_FILE)
    except KeyError:
        pass
    blob = resources.files(__package__).joinpath(DESCRIPTOR_SET).read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(blob).file
    if len(files) != 1 or files[0].name != PROTO_FILE:
        raise ImportError(f"{DESCRIPTOR_SET} must describe {PROTO_FILE} alone: run `make proto`")
    pool.AddSerializedFile(files[0].SerializeToString())
    return pool.FindFileByName(PROTO_FILE)


DESCRIPTOR = _load_file()


def _message(name: str) -> Any:
    desc = DESCRIPTOR.message_types_by_name[name]
    get = getattr(message_factory, "GetMessageClass", None)
    if get is not None:  # protobuf >= 4.22
        return get(desc)
    return message_factory.MessageFactory(desc.file.pool).GetPrototype(desc)  # 4.21


DataProfile = _message("DataProfile")
JoinRequest = _message("JoinRequest")
TaskProfile = _message("TaskProfile")
JoinReply = _message("JoinReply")
HeartbeatRequest = _message("HeartbeatRequest")
HeartbeatReply = _message("HeartbeatReply")
TaskRequest = _message("TaskRequest")
FitSettings = _message("FitSettings")
StageSpec = _message("StageSpec")
SkellamSettings = _message("SkellamSettings")
SecAggSettings = _message("SecAggSettings")
Task = _message("Task")
ModelRequest = _message("ModelRequest")
TensorChunk = _message("TensorChunk")
UploadHeader = _message("UploadHeader")
UploadMessage = _message("UploadMessage")
UploadReply = _message("UploadReply")
SecAggEnvelope = _message("SecAggEnvelope")
StatusRequest = _message("StatusRequest")
StatusReply = _message("StatusReply")
TaskRefusal = _message("TaskRefusal")
RefusalReply = _message("RefusalReply")
ClientIssue = _message("ClientIssue")
EvaluationReport = _message("EvaluationReport")
EvaluationReply = _message("EvaluationReply")

__all__ = ["DESCRIPTOR", "ClientIssue", "DataProfile", "EvaluationReply", "EvaluationReport",
           "FitSettings", "HeartbeatReply", "HeartbeatRequest", "JoinReply", "JoinRequest",
           "ModelRequest", "RefusalReply", "SecAggEnvelope", "SecAggSettings",
           "SkellamSettings", "StageSpec", "StatusReply", "StatusRequest", "Task",
           "TaskProfile", "TaskRefusal", "TaskRequest", "TensorChunk", "UploadHeader",
           "UploadMessage", "UploadReply"]
