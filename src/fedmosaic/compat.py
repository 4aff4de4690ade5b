"""Compatibility of a client's data and model with the task, checked before any training.

A client declares a ``DataProfile`` when it joins (feature shape, dtype, label range, number
of samples, its model's number of outputs); the server holds the task's ``TaskProfile``
(the feature shape and classes its model expects). ``TaskProfile.check`` names the first
difference in words a data holder understands ("your data has 10 features; the task's model
expects 64"), so a mismatch ends the client at once instead of failing every round.

A profile is a declaration: a client may lie in it. The check catches honest mistakes; it is
not a defence (every update is still validated on arrival).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# Bounds on what a client may declare (the profile arrives from the network).
MAX_DIMS = 8
MAX_DIM_SIZE = 2**31 - 1
MAX_SAMPLES = 2**40
MAX_CLASSES = 2**24
# Largest sample (in values) ``model_outputs`` runs the model on: 16 MiB of float32.
MAX_PROBE_VALUES = 2**22
# Categories of incompatibility (bounded: they label metrics and log lines).
INCOMPATIBILITY_CODES = ("model_layout", "feature_shape", "dtype", "labels", "num_classes",
                         "no_data", "bad_profile")


class ProfileError(ValueError):
    """A declared profile that is not well formed (from the network: never trusted)."""


@dataclass(frozen=True)
class Incompatibility:
    """Why a client cannot take part: ``code`` (one of ``INCOMPATIBILITY_CODES``) and a
    one-line ``message`` addressed to the client's operator."""

    code: str
    message: str

    def __str__(self) -> str:
        return self.message


def describe_shape(shape: tuple[int, ...]) -> str:
    """'10 features' for flat data, 'samples of shape 1x28x28' otherwise."""
    if len(shape) == 1:
        return f"{shape[0]} feature{'s' if shape[0] != 1 else ''}"
    return "samples of shape " + "x".join(str(d) for d in shape)


@dataclass(frozen=True)
class DataProfile:
    """What a client declares about its local data and model (``pb.DataProfile``)."""

    feature_shape: tuple[int, ...]
    dtype: str
    num_samples: int
    label_min: int
    label_max: int
    num_outputs: int = 0  # 0: not known
    num_test_samples: int = 0

    @classmethod
    def of(cls, train: Any, test: Any = None, num_outputs: int = 0) -> DataProfile:
        """The profile of a client's ``train`` (and optional ``test``) data set."""
        x, y = np.asarray(train.x), np.asarray(train.y)
        if len(y) == 0:
            raise ProfileError("the training data is empty")
        return cls(feature_shape=tuple(int(d) for d in x.shape[1:]), dtype=str(x.dtype),
                   num_samples=len(y), label_min=int(y.min()), label_max=int(y.max()),
                   num_outputs=int(num_outputs),
                   num_test_samples=0 if test is None else len(test))

    def to_wire(self) -> Any:
        from fedmosaic.net.proto import fedmosaic_pb2 as pb

        return pb.DataProfile(feature_shape=list(self.feature_shape), dtype=self.dtype,
                              num_samples=self.num_samples, label_min=self.label_min,
                              label_max=self.label_max, num_outputs=self.num_outputs,
                              num_test_samples=self.num_test_samples)

    @classmethod
    def from_wire(cls, msg: Any) -> DataProfile:
        """Parse and bound a declared profile; ``ProfileError`` names what is wrong."""
        shape = tuple(int(d) for d in msg.feature_shape)
        if not 1 <= len(shape) <= MAX_DIMS or not all(1 <= d <= MAX_DIM_SIZE for d in shape):
            raise ProfileError(f"feature shape must have 1 to {MAX_DIMS} dimensions of size "
                               f">= 1 ({len(shape)} given)")
        dtype = str(msg.dtype)
        if len(dtype) > 32 or not dtype.isprintable():
            raise ProfileError("dtype must be a short printable name")
        # 0 samples is well formed (and refused by ``TaskProfile.check`` as ``no_data``).
        if msg.num_samples > MAX_SAMPLES or msg.num_test_samples > MAX_SAMPLES:
            raise ProfileError(f"num_samples and num_test_samples must be at most {MAX_SAMPLES}")
        if msg.label_min > msg.label_max or msg.num_outputs > MAX_CLASSES:
            raise ProfileError("label_min must be <= label_max and num_outputs bounded")
        return cls(shape, dtype, int(msg.num_samples), int(msg.label_min), int(msg.label_max),
                   int(msg.num_outputs), int(msg.num_test_samples))


@dataclass(frozen=True)
class TaskProfile:
    """What the task's model expects of every client's data (``pb.TaskProfile``).

    ``feature_shape`` None: not known to the server (the client's own model check still runs);
    ``num_classes`` None: not a classification task, or not known.
    """

    feature_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    dtype: str = "float32"

    def check(self, client: DataProfile) -> Incompatibility | None:
        """The first way ``client`` does not fit this task, or None."""
        if client.num_samples == 0:
            return Incompatibility("no_data", "your client has no training samples; give it "
                                   "data (--data, or its partition of the experiment)")
        if self.feature_shape is not None and client.feature_shape != self.feature_shape:
            mine, theirs = client.feature_shape, self.feature_shape
            if len(mine) == len(theirs) == 1:
                msg = (f"your data has {describe_shape(mine)}; the task's model expects "
                       f"{theirs[0]}")
            else:
                msg = (f"your data has {describe_shape(mine)}; the task's model expects "
                       f"{describe_shape(theirs)}")
            return Incompatibility("feature_shape", msg)
        if not _float_like(client.dtype):
            return Incompatibility("dtype", f"your features have dtype {client.dtype}; the "
                                   f"task's model takes {self.dtype} (numbers)")
        if client.label_min < 0:
            return Incompatibility("labels", f"your data has a negative label "
                                   f"({client.label_min}); labels must be class indices "
                                   f"0, 1, ...")
        if self.num_classes is not None:
            if client.label_max >= self.num_classes:
                return Incompatibility("labels", f"your data has label {client.label_max}, "
                                       f"but the task has {self.num_classes} classes (labels "
                                       f"0 to {self.num_classes - 1})")
            if client.num_outputs and client.num_outputs != self.num_classes:
                return Incompatibility("num_classes", f"your model has {client.num_outputs} "
                                       f"outputs; the task has {self.num_classes} classes")
        return None

    def to_wire(self) -> Any:
        from fedmosaic.net.proto import fedmosaic_pb2 as pb

        return pb.TaskProfile(feature_shape=list(self.feature_shape or ()), dtype=self.dtype,
                              num_classes=self.num_classes or 0)

    @classmethod
    def from_wire(cls, msg: Any) -> TaskProfile:
        shape = tuple(int(d) for d in msg.feature_shape)
        return cls(feature_shape=shape or None, num_classes=int(msg.num_classes) or None,
                   dtype=str(msg.dtype) or "float32")


def _float_like(dtype: str) -> bool:
    try:
        return np.dtype(dtype).kind in "fiub"
    except TypeError:
        return False


def model_outputs(trainer: Any, feature_shape: tuple[int, ...]) -> int | None:
    """The number of outputs ``trainer``'s model gives for one sample of ``feature_shape``,
    when the trainer can say (a ``TorchTrainer``, directly or wrapped); None otherwise.

    Raises what the model raises when it cannot take such samples."""

    from fedmosaic.train.base import TrainerWrapper
    from fedmosaic.train.torch_trainer import TorchTrainer

    while isinstance(trainer, TrainerWrapper):
        trainer = trainer.inner
    if not isinstance(trainer, TorchTrainer) or not all(d > 0 for d in feature_shape):
        return None
    if math.prod(feature_shape) > MAX_PROBE_VALUES:
        return None  # too large to probe cheaply (the shape may come from the network)
    import torch

    from fedmosaic.data import ArrayDataset

    probe = ArrayDataset(np.zeros((2, *feature_shape), dtype=np.float32),
                         np.zeros(2, dtype=np.int64))
    # Zero weights: the output's shape does not depend on them, and building initial weights
    # would touch the global RNG (fork_rng) while another thread may be training.
    out = trainer.predict(torch.zeros(trainer.spec.numel), probe)
    return int(out.shape[-1]) if out.ndim >= 2 else 1


def layout_mismatch(client_numel: int, task_numel: int) -> Incompatibility:
    """The ``model_layout`` incompatibility: the client built another model than the task's
    (its parameter layout hash differs). ``client_numel`` 0: the client did not say."""
    if client_numel and client_numel != task_numel:
        sizes = f"{client_numel:,} parameters vs {task_numel:,}"
    elif client_numel:
        sizes = f"both {task_numel:,} parameters, but shaped or named differently"
    else:
        sizes = f"the task's model has {task_numel:,} parameters"
    return Incompatibility("model_layout", f"your model's layout differs from the task's "
                           f"model ({sizes}): use the task's model (the [model] of the "
                           f"experiment, or the same --trainer)")


def probe_incompatibility(trainer: Any, client: DataProfile,
                          task: TaskProfile) -> Incompatibility | None:
    """What running the task's model (``trainer``) on a sample of ``client``'s declared
    shape shows, when the task does not declare its feature shape: a model that raises
    cannot take such samples (``feature_shape``); its number of outputs bounds the labels
    (``labels``) and must equal the client model's (``num_classes``) when the task declares
    no number of classes. None: no problem found, or the trainer cannot be probed."""
    try:
        outputs = model_outputs(trainer, client.feature_shape)
    except Exception as exc:  # what the model raises on a wrong input is its own business
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        return Incompatibility("feature_shape", f"your data has "
                               f"{describe_shape(client.feature_shape)}, which the task's "
                               f"model cannot take ({detail})")
    if outputs is None or outputs < 2 or task.num_classes is not None:
        return None  # one output: regression or a binary logit, no class indices to check
    if client.label_max >= outputs:
        return Incompatibility("labels", f"your data has label {client.label_max}, but the "
                               f"task's model has {outputs} outputs (labels 0 to "
                               f"{outputs - 1})")
    if client.num_outputs and client.num_outputs != outputs:
        return Incompatibility("num_classes", f"your model has {client.num_outputs} outputs; "
                               f"the task's model has {outputs}")
    return None
