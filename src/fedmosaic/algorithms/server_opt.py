"""Server optimizers of the FedOpt family (Reddi et al., 2021, "Adaptive Federated
Optimization", ICLR, Algorithm 2).

Convention: ``delta`` is the aggregated client delta, the mean of
``local_weights - global_weights``; it is the *negative* pseudo-gradient, so every
optimizer moves along it: ``x_{t+1} = x_t + lr * (...)``. Weights, deltas and optimizer
state are flat float32 vectors; state is created lazily on the first step, on the
device of the weights, and follows the weights if they move.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from fedmosaic.core.errors import ConfigError

__all__ = [
    "FedAdagrad",
    "FedAdam",
    "FedAvgM",
    "FedYogi",
    "ServerOptimizer",
    "ServerSGD",
    "make_server_optimizer",
]


def _check_lr(lr: float) -> float:
    lr = float(lr)
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    return lr


def _check_beta(name: str, beta: float) -> float:
    beta = float(beta)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {beta!r}")
    return beta


def _check_tau(tau: float) -> float:
    tau = float(tau)
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    return tau


class ServerOptimizer(ABC):
    """Turns the aggregated client delta into the next global weights.

    Subclasses name their state tensors in ``_state_names``, create them in
    ``_init_state`` and implement the update in ``_update``; this base class does the
    checks, the lazy device-aware state and (de)serialisation.
    """

    name: str = ""
    _state_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._state: dict[str, torch.Tensor] = {}
        self._steps = 0

    @property
    def steps(self) -> int:
        """Number of steps taken so far."""
        return self._steps

    @abstractmethod
    def hyperparameters(self) -> dict[str, float]:
        """The hyperparameters, as plain floats."""

    def _init_state(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    @abstractmethod
    def _update(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Update ``self._state`` in place and return new weights (never mutate ``weights``)."""

    def step(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """New global weights from the current ones and the aggregated delta.

        ``weights`` is not modified; ``delta`` is moved to the weights' device if needed.
        """
        if not isinstance(weights, torch.Tensor) or weights.dim() != 1:
            raise ValueError("weights must be a 1-D tensor")
        if weights.dtype != torch.float32:
            raise ValueError(f"weights must be float32, got {weights.dtype}")
        if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != tuple(weights.shape):
            shape = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta)
            raise ValueError(f"delta has shape {shape}, weights have {tuple(weights.shape)}")
        if delta.dtype != torch.float32:
            raise ValueError(f"delta must be float32, got {delta.dtype}")
        delta = delta.to(weights.device)
        if self._state_names:
            if not self._state:
                self._state = self._init_state(weights)
            for key, tensor in self._state.items():
                if tensor.shape != weights.shape:
                    raise ValueError(
                        f"optimizer state '{key}' has shape {tuple(tensor.shape)}, weights have "
                        f"{tuple(weights.shape)}: the model changed under the optimizer"
                    )
                if tensor.device != weights.device:
                    self._state[key] = tensor.to(weights.device)
        new = self._update(weights, delta)
        self._steps += 1
        return new

    def describe(self) -> dict[str, Any]:
        """Name and hyperparameters, for reports."""
        return {"name": self.name, **self.hyperparameters()}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: name, hyperparameters, step count, tensors.

        Tensors are cloned, so the dict is a snapshot that ``torch.save`` can write.
        """
        return {
            "name": self.name,
            "hyperparameters": self.hyperparameters(),
            "steps": self._steps,
            "state": {k: v.detach().clone() for k, v in self._state.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a snapshot from :meth:`state_dict` of an identically configured optimizer."""
        if not isinstance(state, Mapping):
            raise ValueError(f"optimizer state must be a mapping, got {type(state).__name__}")
        missing = [k for k in ("name", "hyperparameters", "steps", "state") if k not in state]
        if missing:
            raise ValueError(f"optimizer state lacks keys {missing}")
        if state["name"] != self.name:
            raise ValueError(
                f"optimizer state belongs to '{state['name']}', cannot load into '{self.name}'"
            )
        mine, theirs = self.hyperparameters(), dict(state["hyperparameters"])
        if mine != theirs:
            diff = {
                k: (theirs.get(k), mine.get(k))
                for k in sorted(set(mine) | set(theirs))
                if theirs.get(k) != mine.get(k)
            }
            raise ValueError(
                f"{self.name} hyperparameters differ from the saved ones "
                f"(name: (saved, current)): {diff}"
            )
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"optimizer state has invalid step count {steps!r}")
        tensors = dict(state["state"])
        if tensors and set(tensors) != set(self._state_names):
            raise ValueError(
                f"{self.name} state tensors are {sorted(self._state_names)}, "
                f"saved state has {sorted(tensors)}"
            )
        shapes = {tuple(t.shape) for t in tensors.values()}
        if len(shapes) > 1 or any(len(s) != 1 for s in shapes):
            raise ValueError(f"{self.name} state tensors must be 1-D of one length, got {shapes}")
        if any(t.dtype != torch.float32 for t in tensors.values()):
            raise ValueError(f"{self.name} state tensors must be float32")
        self._state = {k: v.detach().clone() for k, v in tensors.items()}
        self._steps = steps


class ServerSGD(ServerOptimizer):
    """Plain server SGD on the pseudo-gradient: ``x + lr * delta``.

    With ``lr=1`` this is FedAvg's server step (McMahan et al., 2017); see Reddi et al.,
    2021, "Adaptive Federated Optimization", for the server-learning-rate view.
    """

    name = "sgd"

    def __init__(self, lr: float = 1.0) -> None:
        super().__init__()
        self.lr = _check_lr(lr)

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr}

    def _update(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return weights.add(delta, alpha=self.lr)


class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al., 2019, "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification").

    ``m = momentum * m + delta``; ``x + lr * m``, with ``m`` starting at zero.
    """

    name = "fedavgm"
    _state_names = ("m",)

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        self.lr = _check_lr(lr)
        self.momentum = _check_beta("momentum", momentum)

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "momentum": self.momentum}

    def _init_state(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"m": torch.zeros_like(weights)}

    def _update(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        m = self._state["m"]
        m.mul_(self.momentum).add_(delta)
        return weights.add(m, alpha=self.lr)


class _AdaptiveServerOptimizer(ServerOptimizer):
    """Shared part of FedAdagrad / FedAdam / FedYogi (Reddi et al., 2021, Algorithm 2).

    ``m = beta1 * m + (1 - beta1) * delta``; the subclass updates ``v``;
    ``x + lr * m / (sqrt(v) + tau)``. There is no bias correction, as in the paper.
    ``m`` starts at zero and ``v`` at ``tau**2`` (the paper asks for ``v_{-1} >= tau**2``).
    """

    _state_names = ("m", "v")

    def __init__(self, lr: float, beta1: float, tau: float) -> None:
        super().__init__()
        self.lr = _check_lr(lr)
        self.beta1 = _check_beta("beta1", beta1)
        self.tau = _check_tau(tau)

    def _init_state(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "m": torch.zeros_like(weights),
            "v": torch.full_like(weights, self.tau**2),
        }

    @abstractmethod
    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        """Update the second-moment estimate ``v`` in place."""

    def _update(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        m, v = self._state["m"], self._state["v"]
        m.mul_(self.beta1).add_(delta, alpha=1.0 - self.beta1)
        self._update_v(v, delta * delta)
        denom = v.sqrt().add_(self.tau)
        return weights.addcdiv(m, denom, value=self.lr)


class FedAdagrad(_AdaptiveServerOptimizer):
    """FedAdagrad (Reddi et al., 2021, "Adaptive Federated Optimization", Algorithm 2).

    ``v = v + delta**2``, with ``v`` initialised to ``tau**2``; no bias correction.
    """

    name = "fedadagrad"

    def __init__(self, lr: float = 1e-2, beta1: float = 0.9, tau: float = 1e-3) -> None:
        super().__init__(lr, beta1, tau)

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "beta1": self.beta1, "tau": self.tau}

    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.add_(delta_sq)


class _DecayingSecondMoment(_AdaptiveServerOptimizer):
    """Shared by FedAdam and FedYogi: an exponential second-moment decay ``beta2``."""

    def __init__(
        self, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(lr, beta1, tau)
        self.beta2 = _check_beta("beta2", beta2)

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}


class FedAdam(_DecayingSecondMoment):
    """FedAdam (Reddi et al., 2021, "Adaptive Federated Optimization", Algorithm 2).

    ``v = beta2 * v + (1 - beta2) * delta**2``, with ``v`` initialised to ``tau**2``;
    no bias correction.
    """

    name = "fedadam"

    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.mul_(self.beta2).add_(delta_sq, alpha=1.0 - self.beta2)


class FedYogi(_DecayingSecondMoment):
    """FedYogi (Reddi et al., 2021, "Adaptive Federated Optimization", Algorithm 2).

    ``v = v - (1 - beta2) * delta**2 * sign(v - delta**2)``, with ``v`` initialised to
    ``tau**2``; no bias correction.
    """

    name = "fedyogi"

    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        sign = torch.sign(v - delta_sq)
        v.addcmul_(delta_sq, sign, value=-(1.0 - self.beta2))


_REGISTRY: dict[str, type[ServerOptimizer]] = {
    "sgd": ServerSGD,
    "fedavg": ServerSGD,
    "fedavgm": FedAvgM,
    "fedadagrad": FedAdagrad,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
}


def make_server_optimizer(name: str, **kwargs: Any) -> ServerOptimizer:
    """Build a server optimizer by name ("sgd" or its alias "fedavg", "fedavgm",
    "fedadagrad", "fedadam", "fedyogi"); ``kwargs`` are its hyperparameters.

    An unknown name raises ``ConfigError`` (a ``ValueError``); an unknown keyword raises
    ``ValueError``; both list what is allowed.
    """
    cls = _REGISTRY.get(str(name).lower())
    if cls is None:
        raise ConfigError("server_optimizer", name, sorted(_REGISTRY))
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {unknown} for server optimizer '{name}'; allowed: {allowed}"
        )
    return cls(**kwargs)
