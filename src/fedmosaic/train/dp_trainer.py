"""DPSGDTrainer: sample-level differential privacy inside each client, with Opacus.

Every client runs DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy",
CCS) on its own data: each step draws a lot by Poisson sampling with rate ``q = L / N``
(``L`` the batch size, ``N`` the client's sample count), clips every example's gradient to
L2 norm ``C = max_grad_norm``, sums the clipped gradients, adds Gaussian noise
``N(0, (sigma * C)^2 I)`` with ``sigma = noise_multiplier`` and divides by ``L``. Per-sample
gradients, clipping and noise come from Opacus (Yousefpour et al. 2021, "Opacus:
User-Friendly Differential Privacy Library in PyTorch"): its ``GradSampleModule`` and
``DPOptimizer`` are the pieces ``PrivacyEngine.make_private`` assembles, used here directly so
that the model is wrapped once and each round only builds a fresh optimizer.

The guarantee is per client and per example: a client's released updates are
(epsilon, delta)-DP with respect to adding or removing one of *its* examples, with epsilon
accumulated over every round it took part in (the moments/RDP accountant of Abadi et al.,
as implemented by Opacus's accountants). It is not user-level or client-level DP.

Opacus is an optional dependency (``pip install opacus``); it is imported when a
``DPSGDTrainer`` is built, never when ``fedmosaic`` is imported.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedmosaic.core.params import ParamSpec
from fedmosaic.privacy.randomness import NoiseSource, SecureNoise
from fedmosaic.train.base import Dataset, FitConfig, FitResult
from fedmosaic.train.torch_trainer import MetricFn, TorchTrainer

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

__all__ = ["DPSGDTrainer"]

_ACCOUNTANTS = ("rdp", "prv", "gdp")
_NOISE = ("seeded", "secure")

# Independent random streams derived from one FitConfig.seed: lot sampling and DP noise must
# not share a generator, or the noise would be a function of which examples were sampled.
_SAMPLING_STREAM, _NOISE_STREAM = 0, 1


def _opacus() -> Any:
    """The Opacus pieces this trainer uses, imported on demand."""
    try:
        from opacus import GradSampleModule
        from opacus.accountants import create_accountant
        from opacus.optimizers import DPOptimizer
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
        from opacus.validators import ModuleValidator
    except ImportError as exc:
        raise ImportError(
            "DPSGDTrainer needs Opacus: pip install opacus (or pip install 'fedmosaic[dpsgd]')"
        ) from exc

    class SourceDPOptimizer(DPOptimizer):  # type: ignore[misc]
        """Opacus's ``DPOptimizer`` with its Gaussian noise drawn from a ``NoiseSource``
        (Opacus's own noise takes only a ``torch.Generator``); clipping, accumulation and
        scaling are Opacus's."""

        def __init__(self, optimizer: Any, *, noise_source: NoiseSource, **kw: Any) -> None:
            super().__init__(optimizer, **kw)
            self.noise_source = noise_source

        def add_noise(self) -> None:
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                ref = p.summed_grad
                noise = self.noise_source.gaussian(ref.shape, std, ref.dtype)
                p.grad = (ref + noise.to(ref.device)).view_as(p)
                _mark_as_processed(p.summed_grad)

    class _Opacus:
        grad_sample_module = GradSampleModule
        dp_optimizer = DPOptimizer
        source_optimizer = SourceDPOptimizer
        module_validator = ModuleValidator
        create = staticmethod(create_accountant)

    return _Opacus


def _stream_seed(seed: int, stream: int) -> int:
    """A 63-bit seed for one named random stream of a fit (stable across processes)."""
    # SeedSequence needs non-negative entropy; masking keeps negative user seeds distinct.
    entropy = [seed & (2**64 - 1), stream]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


class DPSGDTrainer:
    """Local DP-SGD (Abadi et al. 2016) with Opacus (Yousefpour et al. 2021).

    Implements the ``Trainer`` protocol, so any transport that takes a trainer can run it;
    it is deliberately not a ``TorchTrainer``, so ``BatchedTransport`` (which reproduces plain
    SGD only) falls back to sequential training for it.

    ``model_fn``, ``loss``, ``lr``, ``epochs``, ``batch_size``, ``metrics`` are as for
    ``TorchTrainer``; a callable ``loss`` must average over the lot (Opacus recovers each
    example's gradient by rescaling the mean), and the model may only contain layers Opacus
    can compute per-sample gradients for (no BatchNorm: it mixes examples).

    ``noise_multiplier`` is sigma, the ratio of the Gaussian noise's standard deviation to
    ``max_grad_norm`` (the per-example clipping bound C). ``delta`` is the delta at which each
    client's epsilon is reported. With ``poisson_sampling`` (the default, what the privacy
    analysis assumes) every step's lot contains each example independently with probability
    ``q = batch_size / n``; without it lots are fixed-size shuffled batches and the reported
    epsilon, computed for Poisson sampling at the same rate as Opacus does, is only the
    customary approximation, not a proven bound. ``accountant`` is Opacus's ``"rdp"``
    (Renyi DP, Mironov 2017; the default), ``"prv"`` (numerical composition of privacy loss
    distributions, tighter) or ``"gdp"`` (Gaussian DP, experimental: Opacus warns that it
    can under-estimate epsilon).

    ``noise`` says where lots and noise come from (``fedmosaic.privacy.randomness``):
    ``"secure"`` (the default) draws them from ``SecureNoise`` (ChaCha20 keyed from
    ``os.urandom``, one key per trainer), which no other party can reproduce; runs are then not
    reproducible. ``"seeded"`` draws them from PyTorch generators seeded from
    ``FitConfig.seed``, so the same seed gives the same weights -- but the server computes and
    sends that seed, so it can regenerate the noise and the lots and subtract the noise from
    the update: seeded noise is *simulation only*, an explicit choice for reproducible
    experiments, never the default (a deployed client that forgot to ask for secure noise would
    otherwise hand the server its un-noised update). A ``NoiseSource`` instance is used as
    given (tests). The float Gaussian is not protected against floating-point attacks
    (Mironov 2012; see ``docs/privacy.md``).

    FitResult metrics: ``train_loss`` and ``train_accuracy`` (classification) over the
    examples of the sampled lots, and ``epsilon``, the client's cumulative epsilon at
    ``delta`` after this fit. The loss and accuracy are computed from private data without
    noise: they are convenient in simulation but are not themselves differentially private.

    Privacy accounting is kept in this trainer object, one accountant per client (see
    ``fit`` for how clients are identified). Transports that build a trainer per worker
    process (``RayTransport``) therefore split a client's history between workers and
    under-report its epsilon: use ``SequentialTransport`` (or ``BatchedTransport``, which
    falls back to it) when the reported epsilons matter. Accountant histories are not part
    of run checkpoints; save and restore them with ``accounting_state`` and
    ``load_accounting_state`` around a resumed run.
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "cross_entropy",
        *,
        lr: float = 0.05,
        epochs: int = 1,
        batch_size: int = 32,
        noise_multiplier: float,
        max_grad_norm: float,
        delta: float = 1e-5,
        poisson_sampling: bool = True,
        device: str | torch.device = "cpu",
        metrics: Mapping[str, MetricFn] | None = None,
        accountant: str = "rdp",
        noise: str | NoiseSource = "secure",
        eval_batch_size: int = 512,
        trainable_only: bool = False,
    ) -> None:
        self.noise_multiplier = _positive("noise_multiplier", noise_multiplier)
        self.max_grad_norm = _positive("max_grad_norm", max_grad_norm)
        delta = float(delta)
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        self.delta = delta
        self.lr = _positive("lr", lr)
        if int(epochs) != epochs or epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if int(eval_batch_size) != eval_batch_size or eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be an integer >= 1, got {eval_batch_size!r}")
        if accountant not in _ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {', '.join(_ACCOUNTANTS)}, "
                             f"got {accountant!r}")
        self.epochs, self.batch_size = int(epochs), int(batch_size)
        self.poisson_sampling = bool(poisson_sampling)
        self.accountant = accountant
        self._source: NoiseSource | None
        if isinstance(noise, str):
            if noise not in _NOISE:
                raise ValueError(f"noise must be one of {', '.join(_NOISE)} or a NoiseSource, "
                                 f"got {noise!r}")
            self.noise = noise
            self._source = SecureNoise() if noise == "secure" else None
        elif isinstance(noise, NoiseSource):
            self.noise, self._source = repr(noise), noise
        else:
            raise ValueError(f"noise must be one of {', '.join(_NOISE)} or a NoiseSource, "
                             f"got {type(noise).__name__}")
        self._op = _opacus()
        # The non-private TorchTrainer supplies what DP does not change (model construction,
        # the flat-weight spec, losses, evaluation), so both trainers evaluate identically and
        # the model is still built exactly once.
        self._base = TorchTrainer(
            model_fn, loss, lr=self.lr, epochs=self.epochs, batch_size=self.batch_size,
            device=device, metrics=metrics, eval_batch_size=int(eval_batch_size),
            trainable_only=trainable_only,
        )
        self.device = self._base.device
        self.model = self._base.model
        self.classification = self._base.classification
        self.loss_fn = self._base.loss_fn
        errors = self._op.module_validator.validate(self.model, strict=False)
        if errors:
            listed = "; ".join(str(e) for e in errors[:5])
            raise ValueError(
                f"model_fn builds a model Opacus cannot train with per-sample clipping "
                f"({listed}); opacus.validators.ModuleValidator.fix replaces e.g. BatchNorm "
                f"with GroupNorm"
            )
        # Wrapped once: the hooks that record per-sample gradients stay on the model for the
        # trainer's lifetime and only act in training mode with autograd enabled, so
        # evaluation through the unwrapped model is unaffected. "mean" matches the mean
        # losses of TorchTrainer: Opacus rescales backprops by the lot size to recover each
        # example's own gradient.
        self._gsm = self._op.grad_sample_module(
            self.model, batch_first=True, loss_reduction="mean"
        )
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        entries = {e.name: e for e in self.spec.entries}
        self._anchored = [(p, entries[n]) for n, p in self.model.named_parameters()
                          if p.requires_grad and n in entries]
        self._accountants: dict[str, IAccountant] = {}

    # -- Trainer protocol -------------------------------------------------------------------
    @property
    def spec(self) -> ParamSpec:
        return self._base.spec

    def initial_weights(self, seed: int) -> torch.Tensor:
        """The flat weights of a freshly initialised model, seeded (global RNG untouched)."""
        return self._base.initial_weights(seed)

    def full_steps(self, num_samples: int, config: FitConfig) -> int:
        """Local DP-SGD steps of a complete fit: ``epochs`` times ``ceil(n / batch_size)``.

        With Poisson sampling an "epoch" is ``1/q`` steps, i.e. each example is expected to
        be visited once per epoch, as in Abadi et al.
        """
        return self._base.full_steps(num_samples, config)

    def fit(
        self, weights: torch.Tensor, data: Dataset, config: FitConfig, *,
        client_id: str | None = None,
    ) -> FitResult:
        """Run local DP-SGD from ``weights`` on ``data`` and charge the client's accountant.

        The accountant is keyed by ``client_id`` when given. Transports call
        ``fit(weights, data, config)`` without it, so the key then falls back to
        ``client_key(data)``, a digest of the data's bytes: it is the same in every round and
        every process for the same client, and does not depend on object identity (``id``)
        which changes when data is reloaded. Two clients holding byte-identical data share
        one accountant, which over-states (never under-states) their spend.

        FedProx (``config.proximal_mu > 0``): the proximal gradient ``mu (w - w_global)`` is
        added to the noisy, clipped, averaged data gradient, outside clipping and noise. It
        depends only on the current weights (already the output of DP steps) and the global
        model (public to the client), not on any example, so adding it is post-processing
        and costs no privacy; clipping it with the data gradients would instead spend the
        clipping budget C on a term with no privacy cost and bias the proximal pull.
        """
        n = len(data)
        if n == 0:
            raise ValueError("cannot train on an empty data set")
        key = client_id if client_id is not None else self.client_key(data)
        self.spec.load_into(self.model, weights.to(self.device))
        x = torch.as_tensor(data.x).to(self.device)
        y = torch.as_tensor(data.y).to(self.device)
        lr = config.lr if config.lr is not None else self.lr
        batch_size = config.batch_size or self.batch_size
        total = self.full_steps(n, config)
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        # q = L/N as in Abadi et al.; a batch size above N means every example, every step.
        sample_rate = min(1.0, batch_size / n)
        expected_lot = min(batch_size, n)
        mu = config.proximal_mu
        anchor_params = [p for p, _ in self._anchored]
        anchors = [weights[e.offset : e.offset + e.numel].view(e.shape).to(self.device)
                   for _, e in self._anchored] if mu > 0 else []

        sgd = torch.optim.SGD(self._params, lr=lr)
        common = dict(noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                      expected_batch_size=expected_lot, loss_reduction="mean")
        lots: Iterator[torch.Tensor]
        if self._source is None:
            # Simulation: both streams from FitConfig.seed (which the server knows).
            sample_gen = torch.Generator().manual_seed(_stream_seed(config.seed, _SAMPLING_STREAM))
            noise_gen = torch.Generator(device=self.device).manual_seed(
                _stream_seed(config.seed, _NOISE_STREAM))
            optimizer = self._op.dp_optimizer(sgd, generator=noise_gen, **common)
            lots = self._lots(n, batch_size, sample_rate, sample_gen)
        else:
            optimizer = self._op.source_optimizer(sgd, noise_source=self._source, **common)
            lots = self._source_lots(n, batch_size, sample_rate, self._source.numpy())
        accountant = self._accountants.get(key)
        if accountant is None:
            accountant = self._accountants[key] = self._op.create(self.accountant)
        # Opacus's own hook: charges the accountant inside every noisy step that is actually
        # taken, so a fit that fails half-way is still charged for what it released.
        optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))

        self._gsm.train()
        loss_sum, correct, seen, steps = 0.0, 0, 0, 0
        # Model randomness (dropout) is seeded from the client's seed, as in TorchTrainer, so
        # a fit is a pure function of (weights, data, config) with seeded noise.
        try:
            with torch.random.fork_rng(devices=self._rng_devices()), warnings.catch_warnings():
                # Opacus records backprops with full backward hooks; inputs never require grad,
                # which makes PyTorch warn on every step about behaviour Opacus relies on.
                warnings.filterwarnings("ignore", message="Full backward hook is firing",
                                        category=UserWarning)
                torch.manual_seed(config.seed)
                while steps < total:
                    idx = next(lots).to(self.device)
                    xb, yb = x[idx], y[idx]
                    optimizer.zero_grad(set_to_none=True)
                    out = self._gsm(xb)
                    # An empty Poisson lot still takes a (noise-only) step, as the analysis
                    # assumes; a mean loss over nothing is NaN, so differentiate a zero instead.
                    loss = self.loss_fn(out, yb) if len(idx) else out.sum()
                    loss.backward()
                    optimizer.pre_step()  # clip per example, sum, add noise, divide by L
                    if mu > 0:
                        with torch.no_grad():
                            diffs = torch._foreach_sub(anchor_params, anchors)
                            torch._foreach_add_([p.grad for p in anchor_params], diffs, alpha=mu)
                    sgd.step()
                    steps += 1
                    if len(idx):
                        loss_sum += float(loss.detach()) * len(idx)
                        seen += len(idx)
                        if self.classification:
                            correct += int((out.detach().argmax(1) == yb).sum())
        finally:
            # Drops per-sample gradients (one tensor per example and parameter) between
            # rounds, also when a step failed, so the next fit starts clean.
            optimizer.zero_grad(set_to_none=True)
            self._gsm.eval()

        metrics = {"train_loss": loss_sum / seen if seen else float("nan")}
        if self.classification:
            metrics["train_accuracy"] = correct / seen if seen else float("nan")
        metrics["epsilon"] = self._epsilon(accountant)
        new = self.spec.read_from(self.model)
        return FitResult(weights=new, num_samples=n, steps=steps, metrics=metrics)

    def evaluate(self, weights: torch.Tensor, data: Dataset) -> dict[str, float]:
        """Loss, accuracy (classification) and user metrics of ``weights`` on ``data``."""
        return self._base.evaluate(weights, data)

    def predict(self, weights: torch.Tensor, data: Dataset) -> torch.Tensor:
        """Model outputs for every sample of ``data`` (on CPU)."""
        return self._base.predict(weights, data)

    # -- privacy accounting -----------------------------------------------------------------
    @staticmethod
    def client_key(data: Dataset) -> str:
        """The accountant key ``fit`` uses for ``data`` when no ``client_id`` is passed.

        A BLAKE2b digest of the dtypes, shapes and bytes of ``data.x`` and ``data.y``: stable
        across rounds, processes and reloads of the same data. The whole arrays are hashed
        (not a prefix) so that clients whose first rows coincide are still told apart; it
        costs one pass over the data, small next to per-sample gradients.
        """
        h = hashlib.blake2b(digest_size=16)
        for arr in (data.x, data.y):
            a = np.ascontiguousarray(arr)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(memoryview(a).cast("B"))
        return "data:" + h.hexdigest()

    def client_epsilons(self) -> dict[str, float]:
        """Every client's cumulative epsilon at ``delta``, keyed as in ``fit``."""
        return {k: self._epsilon(acc) for k, acc in self._accountants.items()}

    def client_epsilon(self, key: str) -> float:
        """One client's cumulative epsilon at ``delta`` (0.0 if it never trained)."""
        acc = self._accountants.get(key)
        return 0.0 if acc is None else self._epsilon(acc)

    def accounting_state(self) -> dict[str, dict[str, Any]]:
        """The accountants' histories (picklable), to persist next to a checkpoint."""
        return {k: acc.state_dict() for k, acc in self._accountants.items()}

    def load_accounting_state(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Restore histories saved by ``accounting_state`` (replaces the current ones)."""
        accountants: dict[str, IAccountant] = {}
        for key, sd in state.items():
            mechanism = sd.get("mechanism", self.accountant)
            if mechanism != self.accountant:
                raise ValueError(f"accounting state of client {key!r} is for accountant "
                                 f"{mechanism!r}, this trainer uses {self.accountant!r}")
            acc = self._op.create(self.accountant)
            acc.load_state_dict(dict(sd))
            accountants[key] = acc
        self._accountants = accountants

    def _epsilon(self, accountant: IAccountant) -> float:
        if not accountant.history:
            return 0.0
        return float(accountant.get_epsilon(delta=self.delta))

    def _rng_devices(self) -> list[int]:
        """CUDA devices whose RNG state ``fork_rng`` must save and restore."""
        if self.device.type != "cuda":
            return []
        return [self.device.index if self.device.index is not None
                else torch.cuda.current_device()]

    # -- lots -------------------------------------------------------------------------------
    def _lots(
        self, n: int, batch_size: int, sample_rate: float, gen: torch.Generator
    ) -> Iterator[torch.Tensor]:
        """Endless sample-index lots (CPU int64)."""
        if self.poisson_sampling:
            # Each example joins each lot independently with probability q, so lot sizes
            # vary (and may be 0): the sampling the subsampled-Gaussian analysis is for.
            while True:
                yield torch.nonzero(torch.rand(n, generator=gen) < sample_rate).squeeze(1)
        else:
            while True:
                order = torch.randperm(n, generator=gen)
                for start in range(0, n, batch_size):
                    yield order[start : start + batch_size]

    def _source_lots(
        self, n: int, batch_size: int, sample_rate: float, rng: np.random.Generator
    ) -> Iterator[torch.Tensor]:
        """``_lots`` with the NoiseSource's generator: which examples a lot holds is part of
        the mechanism (amplification by sampling), so it must be as unpredictable as the
        noise."""
        if self.poisson_sampling:
            while True:
                yield torch.from_numpy(np.flatnonzero(rng.random(n) < sample_rate))
        else:
            while True:
                order = torch.from_numpy(rng.permutation(n))
                for start in range(0, n, batch_size):
                    yield order[start : start + batch_size]
