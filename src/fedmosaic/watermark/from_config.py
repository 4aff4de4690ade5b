"""The ``[watermark]`` experiment section -> a WAFFLE stage and/or a client fingerprint.

Defaults live here (not in the config schema) so that an experiment without the section has
an empty one, and its resume identity is the same as before the section existed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedmosaic.core.errors import ConfigError
from fedmosaic.train.torch_trainer import TorchTrainer
from fedmosaic.watermark.fingerprint import ClientFingerprint
from fedmosaic.watermark.keys import WatermarkKey
from fedmosaic.watermark.triggers import TriggerSpec
from fedmosaic.watermark.verify import DEFAULT_THRESHOLD
from fedmosaic.watermark.waffle import WaffleStage

DEFAULTS: dict[str, Any] = {
    "waffle": True, "threshold": DEFAULT_THRESHOLD, "target_accuracy": 0.98, "max_epochs": 100,
    "lr": 0.05, "batch_size": 50, "patterns_per_class": 1, "samples_per_pattern": 10,
    "noise": 0.1, "density": 0.5, "fingerprint": False, "fingerprint_strength": 0.01,
}
_TRIGGER_KEYS = ("patterns_per_class", "samples_per_pattern", "noise", "density")


def settings(section: Mapping[str, Any]) -> dict[str, Any]:
    """The section with defaults filled in (the section must name a ``key_file``)."""
    if "key_file" not in section:
        raise ConfigError("watermark.key_file", "<missing>",
                          "required: a key file (create one with `fedmosaic watermark keygen`)")
    return {**DEFAULTS, **section}


def trigger_spec(section: Mapping[str, Any]) -> TriggerSpec:
    s = settings(section)
    return TriggerSpec(**{k: s[k] for k in _TRIGGER_KEYS})


def build_watermark(
    section: Mapping[str, Any], *, model_fn: Callable[[], torch.nn.Module],
    input_shape: tuple[int, ...], num_classes: int, device: str = "cpu",
) -> tuple[WaffleStage | None, ClientFingerprint | None]:
    """The server stage and the dispatch transform a ``[watermark]`` section asks for."""
    if not section:
        return None, None
    s = settings(section)
    key = WatermarkKey.from_file(s["key_file"])
    stage = None
    if s["waffle"]:
        # The server's own model instance, plain SGD: retraining must not share state with
        # the clients' trainer (a DP-SGD trainer's accountant, for one).
        trainer = TorchTrainer(model_fn, lr=s["lr"], batch_size=s["batch_size"], device=device)
        stage = WaffleStage(trainer, key, input_shape=input_shape, num_classes=num_classes,
                            spec=trigger_spec(s), target_accuracy=s["target_accuracy"],
                            max_epochs=s["max_epochs"], lr=s["lr"], batch_size=s["batch_size"])
    fingerprint = ClientFingerprint(key, s["fingerprint_strength"]) if s["fingerprint"] else None
    return stage, fingerprint
