"""FedAsync's server update (Xie et al. 2019, "Asynchronous Federated Optimization",
arXiv:1903.03934, Algorithm 1) and the model history it needs.

Every arriving update is applied at once by mixing the client's new local model ``x_new``
into the global model ``x``::

    x <- (1 - a_t) * x + a_t * x_new,    a_t = alpha * s(staleness),  alpha in (0, 1]

with ``s`` a staleness function (``fedmosaic.algorithms.staleness``). A ``ClientUpdate``
carries ``delta = x_new - x_base`` relative to the model the client *trained from* (version
``base_round``), not to the current global model, so ``x_new = x_base + delta`` needs that
base model. The caller supplies it (``mix`` takes ``x_new``; ``mix_update`` takes the base
and the update); ``ModelHistory`` is a bounded store of recent global versions for callers
that do not keep the dispatched models themselves.

**Memory.** ``ModelHistory(max_staleness=S)`` keeps the last ``S + 1`` versions:
``(S + 1) * 4 * D`` bytes for a model of ``D`` floats (S = 16 and a 1M-parameter model:
68 MB). It stores references to the caller's tensors: the server's new weights are new
tensors at every step (``ServerOptimizer.step`` and ``mix`` never write in place), so this
copies nothing, but the caller must not modify a recorded tensor in place. An update staler
than ``S`` cannot be mixed (its base is gone) and is refused, which is also the bounded
staleness Xie et al.'s analysis assumes.

**Without the base.** ``apply_delta`` moves along the client's delta instead,
``x <- x + a_t * delta`` (FLSim's ``fed_buff_aggregation`` direction; FLSim reports it works
better in practice). It needs no history. The two agree exactly when the base is the current
model (staleness 0); in general::

    mix:         x + a_t * delta + a_t * (x_base - x)
    apply_delta: x + a_t * delta

and ``apply_delta`` is, bit for bit, a FedBuff step with ``K = 1``, uniform weighting, the
same staleness function and ``ServerSGD(lr=alpha)`` (FLSim's async/buffered equivalence).

Arithmetic: ``mix`` is ``torch.lerp(x, x_new, a_t)``, which is exact at both ends
(``a_t = 1`` returns ``x_new``, ``a_t = 0`` returns ``x``), so FedAsync with ``alpha = 1``,
one client and zero staleness makes the global model the client's model: sequential local
training. Everything stays on the global weights' device, in float32.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from fedmosaic.algorithms.staleness import (
    ConstantStaleness,
    StalenessFunction,
    check_staleness,
    make_staleness,
)
from fedmosaic.core.update import ClientUpdate, validate_update

__all__ = ["FedAsyncMixer", "ModelHistory"]


def _check_vector(name: str, tensor: object, like: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor)
        raise ValueError(f"{name} must be a 1-D tensor, got {shape}")
    if tensor.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {tensor.dtype}")
    if like is not None and tensor.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, the global weights have "
                         f"{tuple(like.shape)}")
    return tensor


class FedAsyncMixer:
    """FedAsync's mixing step (Xie et al. 2019, "Asynchronous Federated Optimization",
    arXiv:1903.03934): ``x <- (1 - a_t) x + a_t x_new`` with ``a_t = alpha * s(staleness)``.

    ``alpha`` in ``(0, 1]`` is the mixing hyperparameter; ``staleness`` defaults to the
    constant function (no damping). The only state is the number of steps taken.
    """

    name = "fedasync"

    def __init__(self, alpha: float, staleness: StalenessFunction | None = None) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
            raise ValueError(f"alpha must be a number in (0, 1], got {alpha!r}")
        a = float(alpha)
        if not (math.isfinite(a) and 0.0 < a <= 1.0):
            raise ValueError(f"alpha must be a number in (0, 1], got {alpha!r}")
        staleness = ConstantStaleness() if staleness is None else staleness
        if not isinstance(staleness, StalenessFunction):
            raise ValueError(
                f"staleness must be a StalenessFunction (see make_staleness), got {staleness!r}")
        self.alpha = a
        self.staleness = staleness
        self._steps = 0

    @property
    def steps(self) -> int:
        """Updates applied so far."""
        return self._steps

    def alpha_t(self, staleness: int) -> float:
        """The mixing weight ``alpha * s(staleness)`` of an update of this staleness."""
        return self.alpha * self.staleness(staleness)

    def _metrics(self, staleness: int, a_t: float) -> dict[str, Any]:
        return {"alpha_t": a_t, "staleness": staleness,
                "staleness_weight": self.staleness(staleness)}

    def mix(self, global_weights: torch.Tensor, client_model: torch.Tensor,
            staleness: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """New global weights ``(1 - a_t) * global + a_t * client_model`` (a new tensor on
        the global weights' device; neither input is modified) and the step's metrics
        (``alpha_t``, ``staleness``, ``staleness_weight``).

        ``client_model`` is the client's trained model, ``x_base + delta``. A non-finite
        client model is refused with ``ValueError`` before anything changes.
        """
        staleness = check_staleness(staleness)
        _check_vector("global_weights", global_weights)
        _check_vector("client_model", client_model, like=global_weights)
        client_model = client_model.to(global_weights.device)
        if not bool(torch.isfinite(client_model).all()):
            raise ValueError("client_model has non-finite values (NaN or inf)")
        a_t = self.alpha_t(staleness)
        new = torch.lerp(global_weights, client_model, a_t)
        self._steps += 1
        return new, self._metrics(staleness, a_t)

    def mix_update(self, global_weights: torch.Tensor, base_weights: torch.Tensor,
                   update: ClientUpdate, staleness: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """``mix`` with the client's model rebuilt as ``base_weights + update.delta``.

        ``update`` is validated first (``validate_update``: ``InvalidUpdateError`` naming the
        client); ``base_weights`` must be the global model of version ``update.base_round``
        (e.g. ``ModelHistory.base(update.base_round)``).
        """
        _check_vector("global_weights", global_weights)
        _check_vector("base_weights", base_weights, like=global_weights)
        update = validate_update(update, numel=global_weights.numel())
        device = global_weights.device
        client_model = base_weights.to(device) + update.delta.to(device)
        return self.mix(global_weights, client_model, staleness)

    def apply_delta(self, global_weights: torch.Tensor, delta: torch.Tensor,
                    staleness: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The base-free variant ``global + a_t * delta`` (see the module docstring): equal
        to ``mix`` at staleness 0 up to rounding, and bit for bit a FedBuff ``K = 1`` step
        with uniform weighting and ``ServerSGD(lr=alpha)``."""
        staleness = check_staleness(staleness)
        _check_vector("global_weights", global_weights)
        _check_vector("delta", delta, like=global_weights)
        delta = delta.to(global_weights.device)
        if not bool(torch.isfinite(delta).all()):
            raise ValueError("delta has non-finite values (NaN or inf)")
        scale = self.staleness(staleness)
        # The same two roundings as the buffer (0 + s * delta) then ServerSGD (x + lr * mean).
        scaled = torch.zeros_like(delta).add_(delta, alpha=scale)
        new = global_weights.add(scaled, alpha=self.alpha)
        self._steps += 1
        return new, self._metrics(staleness, self.alpha * scale)

    def describe(self) -> dict[str, Any]:
        """The configuration (JSON-able), for the run identity."""
        return {"name": self.name, "alpha": self.alpha, "staleness": self.staleness.describe()}

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.describe(), "steps": self._steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` of an identically configured mixer."""
        if not isinstance(state, Mapping) or "config" not in state or "steps" not in state:
            raise ValueError("mixer state must be a mapping with 'config' and 'steps'")
        if dict(state["config"]) != self.describe():
            raise ValueError(f"mixer configuration differs from the saved one: saved "
                             f"{dict(state['config'])}, current {self.describe()}")
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"mixer state has invalid step count {steps!r}")
        self._steps = steps

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FedAsyncMixer:
        """Build a mixer from ``describe()``'s dict."""
        staleness = dict(config.get("staleness", {"name": "constant"}))
        return cls(float(config["alpha"]), make_staleness(**staleness))


class ModelHistory:
    """The last ``max_staleness + 1`` global model versions, so that an update's base model
    (``x_base`` in FedAsync) can be found from its ``base_round``.

    ``record(version, weights)`` after every server step (versions strictly increasing);
    ``base(version)`` returns the recorded tensor or raises ``KeyError`` when it is older than
    the window (too stale to mix) or was never recorded. Tensors are kept by reference.
    """

    def __init__(self, max_staleness: int) -> None:
        if (isinstance(max_staleness, bool) or not isinstance(max_staleness, numbers.Integral)
                or max_staleness < 0):
            raise ValueError(f"max_staleness must be an integer >= 0, got {max_staleness!r}")
        self.max_staleness = int(max_staleness)
        self._versions: OrderedDict[int, torch.Tensor] = OrderedDict()

    @property
    def versions(self) -> list[int]:
        """The versions held, oldest first."""
        return list(self._versions)

    @property
    def latest(self) -> int | None:
        return next(reversed(self._versions)) if self._versions else None

    def record(self, version: int, weights: torch.Tensor) -> None:
        """Keep ``weights`` as ``version`` and forget versions older than the window."""
        version = check_staleness(version)  # an integer >= 0
        _check_vector("weights", weights)
        latest = self.latest
        if latest is not None and version <= latest:
            raise ValueError(f"version {version} is not after the latest recorded, {latest}")
        if self._versions:
            first = next(iter(self._versions.values()))
            if weights.shape != first.shape:
                raise ValueError(f"weights have shape {tuple(weights.shape)}, recorded "
                                 f"versions have {tuple(first.shape)}")
        self._versions[version] = weights
        while self._versions and next(iter(self._versions)) < version - self.max_staleness:
            self._versions.popitem(last=False)

    def base(self, version: int) -> torch.Tensor:
        """The recorded weights of ``version``."""
        try:
            return self._versions[version]
        except KeyError:
            held = (f"{next(iter(self._versions))}..{self.latest}" if self._versions
                    else "none")
            raise KeyError(f"model version {version} is not held (held: {held}; "
                           f"max_staleness={self.max_staleness})") from None

    def nbytes(self) -> int:
        """Bytes of the held tensors."""
        return sum(t.numel() * t.element_size() for t in self._versions.values())

    def state_dict(self) -> dict[str, Any]:
        """The held versions (cloned), for a checkpoint, so that updates in flight across a
        restart can still be mixed."""
        return {"max_staleness": self.max_staleness,
                "versions": {int(v): t.detach().clone() for v, t in self._versions.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["max_staleness"]) != self.max_staleness:
            raise ValueError(f"history max_staleness differs: saved {state['max_staleness']}, "
                             f"current {self.max_staleness}")
        self._versions = OrderedDict()
        for version in sorted(state["versions"]):
            self.record(int(version), state["versions"][version].detach().clone())
