"""Flat float32 parameter vectors and the ParamSpec that maps them to and from a model.

Every algorithm in fedmosaic works on one contiguous float32 vector per model; the
``ParamSpec`` records which tensors of a ``state_dict`` that vector holds, in which order,
with which shapes and dtypes.

Buffers: floating-point buffers (e.g. BatchNorm ``running_mean`` / ``running_var``) are part
of the vector and are averaged like parameters, as FedAvg implementations commonly do.
Integer and boolean buffers (e.g. BatchNorm ``num_batches_tracked``) are *not* federated:
they cannot be averaged meaningfully, so each model keeps its own value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from math import prod

import torch
from torch import nn

from fedmosaic.core.errors import SpecMismatchError


@dataclass(frozen=True)
class ParamEntry:
    """One tensor of the flat vector: its name, shape, dtype, offset and whether it is a buffer."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    is_buffer: bool

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class ParamSpec:
    """The layout of a flat float32 vector over the federated tensors of a model."""

    entries: tuple[ParamEntry, ...]

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    @property
    def nbytes(self) -> int:
        """Bytes of the flat float32 vector (what one model costs on the wire, raw)."""
        return 4 * self.numel

    @classmethod
    def from_module(cls, module: nn.Module, *, trainable_only: bool = False) -> ParamSpec:
        """Spec over a module's floating-point parameters and buffers.

        With ``trainable_only`` only parameters with ``requires_grad`` are federated (the
        rest stays at each holder's value), as federated transfer learning needs.
        """
        params = dict(module.named_parameters())
        keep: list[tuple[str, torch.Tensor, bool]] = []
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            is_buffer = name not in params
            if trainable_only and (is_buffer or not params[name].requires_grad):
                continue
            keep.append((name, tensor, is_buffer))
        return cls._build(keep)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> ParamSpec:
        """Spec over every floating-point tensor of a state dict (all treated as parameters)."""
        return cls._build([(n, t, False) for n, t in state.items() if t.is_floating_point()])

    @classmethod
    def _build(cls, tensors: list[tuple[str, torch.Tensor, bool]]) -> ParamSpec:
        entries, offset = [], 0
        for name, tensor, is_buffer in tensors:
            entry = ParamEntry(name, tuple(tensor.shape), tensor.dtype, offset, is_buffer)
            entries.append(entry)
            offset += entry.numel
        if not entries:
            raise SpecMismatchError("the model has no floating-point tensors to federate")
        return cls(tuple(entries))

    def flatten(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One contiguous float32 CPU vector from a state dict (or ``named_parameters``)."""
        missing = [e.name for e in self.entries if e.name not in state]
        if missing:
            raise SpecMismatchError(f"state dict lacks tensors {missing[:5]}")
        out = torch.empty(self.numel, dtype=torch.float32)
        for e in self.entries:
            t = state[e.name]
            if tuple(t.shape) != e.shape:
                raise SpecMismatchError(
                    f"tensor '{e.name}' has shape {tuple(t.shape)}, spec expects {e.shape}"
                )
            out[e.offset : e.offset + e.numel].copy_(t.detach().reshape(-1))
        return out

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """A state dict (tensors in their original dtypes) from a flat vector."""
        self.check_vector(vector)
        return {
            e.name: vector[e.offset : e.offset + e.numel].reshape(e.shape).to(e.dtype).clone()
            for e in self.entries
        }

    def views(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Shaped views into ``vector`` (no copy); writes to them write the vector."""
        self.check_vector(vector)
        return {e.name: vector[e.offset : e.offset + e.numel].view(e.shape) for e in self.entries}

    def load_into(self, module: nn.Module, vector: torch.Tensor) -> None:
        """Copy a flat vector into a module's tensors in place (no rebuild, no new tensors)."""
        self.check_vector(vector)
        state = module.state_dict(keep_vars=True)
        with torch.no_grad():
            for e in self.entries:
                target = state[e.name]
                src = vector[e.offset : e.offset + e.numel].view(e.shape)
                target.copy_(src)

    def read_from(self, module: nn.Module, out: torch.Tensor | None = None) -> torch.Tensor:
        """Flat float32 vector of a module's current federated tensors."""
        state = module.state_dict(keep_vars=True)
        if out is None:
            out = torch.empty(self.numel, dtype=torch.float32)
        with torch.no_grad():
            for e in self.entries:
                out[e.offset : e.offset + e.numel].copy_(state[e.name].detach().reshape(-1))
        return out

    def check_vector(self, vector: torch.Tensor) -> None:
        if vector.dim() != 1 or vector.numel() != self.numel:
            raise SpecMismatchError(
                f"vector has shape {tuple(vector.shape)}, spec expects ({self.numel},)"
            )
        if vector.dtype != torch.float32:
            raise SpecMismatchError(f"vector has dtype {vector.dtype}, spec expects torch.float32")

    def to_json(self) -> list[dict[str, object]]:
        return [
            {"name": e.name, "shape": list(e.shape), "dtype": str(e.dtype).replace("torch.", ""),
             "buffer": e.is_buffer}
            for e in self.entries
        ]

    @classmethod
    def from_json(cls, data: list[dict[str, object]]) -> ParamSpec:
        entries, offset = [], 0
        for d in data:
            shape = tuple(int(s) for s in d["shape"])  # type: ignore[union-attr]
            dtype = getattr(torch, str(d["dtype"]))
            entry = ParamEntry(str(d["name"]), shape, dtype, offset, bool(d["buffer"]))
            entries.append(entry)
            offset += entry.numel
        return cls(tuple(entries))
