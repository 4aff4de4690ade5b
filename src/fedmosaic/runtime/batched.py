"""BatchedTransport: train a whole cohort of clients at once with ``torch.func.vmap``.

Each selected client's weights are one row of a ``(K, D)`` matrix; one vmapped
forward pass and one backward pass compute every client's mini-batch gradient, and one SGD step
updates all rows. Clients with different data sizes or step counts are aligned by masking:
a client's padded batch positions carry zero weight in its loss, and a client that has
finished its steps is frozen by a per-step "active" flag. Clients are bucketed by step count
before chunking, so little work is wasted on padding. The result equals sequential training of
each client (``SequentialTransport``) up to float rounding.

A model whose forward is a plain chain of flatten / ``nn.Linear`` / ReLU (the zoo's MLP and
logistic regression; read from its ``torch.fx`` trace, ``linear_chain`` in runtime/chain.py)
is computed without ``vmap``: one ``torch.bmm`` per layer on the chunk's activations, the same
batched products without the per-step cost of ``functional_call`` and ``vmap``, and its
gradient step written out by hand (``chain_sgd_step``) instead of recorded by autograd. Each
step's batch is padded only to the largest real batch of the chunk, so clients with fewer
samples than a batch (cross-device populations) do not compute mostly padding.

This is the idea of pfl-research (no per-client serialization, RPC or model rebuild) taken one
step further: not one reused model trained client after client, but the cohort trained as one
batched computation, on CPU or CUDA.

What it reproduces exactly is ``TorchTrainer`` with plain SGD (the FedAvg client), with or
without the FedProx proximal term, per-client learning rates and step caps (stragglers).
Anything else (a custom local optimizer, a custom loss callable, BatchNorm or dropout, a model
that ``vmap`` cannot trace) falls back to ``SequentialTransport`` with a one-line warning that
says why; before the first ``vmap`` round a one-client probe is compared against sequential
training, so a model that traces but computes something different also falls back (a linear
chain is exact by construction and is not probed).

Where it pays: on a GPU, and on a CPU for small models whose per-step cost is mostly framework
overhead (the digits MLP of the peer task trains 5-40x faster than client after client). A
CNN on a CPU gains nothing: its convolutions already keep the cores busy, and the grouped
convolutions that per-client weights become are slower on CPU than plain ones
(docs/benchmarks.md has the figures).

**Batched only where it pays** (``batching="auto"``, the default; issue #23). Besides the
correctness checks above, the transport decides whether batching is *faster*, and trains
sequentially (``fallback_reason`` says why, one warning line is logged) where it is not:

* on a GPU (any non-CPU device): batched, always (the device is idle between the small
  kernels of one client; rule, deterministic);
* on a CPU, a flatten / Linear / ReLU chain (``linear_chain``): batched (rule, deterministic;
  the digits MLP of the peer task: 5-40x faster than sequential, docs/benchmarks.md);
* on a CPU, a model with a convolution (any ``nn.Conv*`` / ``nn.ConvTranspose*``):
  sequential (rule, deterministic; issue #23's Fashion-MNIST CNN, seconds per round batched
  against sequential: 1.96 / 1.95 at 100/10, 17.71 / 9.19 at 100/100, 2.54 / 2.19 at
  1000/100, 17.89 / 9.76 at 1000/1000: never faster, up to 1.9x slower);
* on a CPU, anything else: a **timed probe** on the first fit with at least two clients: a
  few of its clients (a quarter, at most 4) train sequentially and the first chunk of the
  rest batched, both timed per client step; if batched is slower per step the rest of the
  run is sequential. Nothing is trained twice (both parts are that round's real results), but
  the decision depends on the machine's load at that moment: it is **not deterministic**
  (the model is the same either way, up to float rounding).

``batching="always"`` skips this decision (the correctness checks still apply): use it to
force vmap, e.g. to measure it. ``decision`` always says what was decided and why.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from fedmosaic.algorithms.aggregate import weighted_sum
from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.core.update import ClientUpdate, finite_rows
from fedmosaic.runtime.chain import (
    chain_params,
    chain_sgd_step,
    linear_chain,
    manual_step_reason,
    run_chain,
)
from fedmosaic.runtime.tally import ClientFailure, PartialAggregate, Weighting
from fedmosaic.runtime.transport import EvalResult, SequentialTransport, TransportResult
from fedmosaic.train.base import FitConfig
from fedmosaic.train.torch_trainer import TorchTrainer

log = logging.getLogger(__name__)

# Modules whose training-mode behaviour is stateful or random: vmap cannot reproduce
# sequential training for them, so the transport falls back.
_UNBATCHABLE = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


# Layers whose vmapped form is slower on CPU than training client after client: per-client
# weights turn a convolution into a grouped one (measured on the SmallCNN, module docstring).
_CPU_SLOW = (nn.modules.conv._ConvNd,)
BATCHING = ("auto", "always")


def _concat(parts: list[Any]) -> Any:
    """Arrays or tensors of the clients, concatenated into one (numpy where all are)."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts) if parts else np.empty(0)
    return torch.cat([torch.as_tensor(p) for p in parts])


def unbatchable_reason(tr: Any) -> str | None:
    """Why ``BatchedTransport`` cannot reproduce this trainer's fits (it then trains
    sequentially), or None: what it checks before any data is touched."""
    if not isinstance(tr, TorchTrainer):
        return f"trainer is a {type(tr).__name__}, not a TorchTrainer"
    if not tr.plain_sgd:
        return "the local optimizer is not plain SGD"
    if tr.loss_name not in ("cross_entropy", "mse"):
        return "the loss is a custom callable (only 'cross_entropy' and 'mse' are batched)"
    for name, module in tr.model.named_modules():
        if isinstance(module, _UNBATCHABLE):
            return (f"module '{name}' ({type(module).__name__}) behaves differently per "
                    "batch in training mode")
    if any(e.is_buffer for e in tr.spec.entries):
        return "the model has floating-point buffers that training updates"
    return None


def cpu_slow_module(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first layer whose vmapped form is slower on CPU than sequential training (a
    convolution), as (name, module); None if there is none."""
    for name, module in model.named_modules():
        if isinstance(module, _CPU_SLOW):
            return name, module
    return None


class BatchingFallbackWarning(UserWarning):
    """The batched transport could not batch this model and trains clients sequentially."""


@dataclass
class _Plan:
    """Step-by-step sample indices of a chunk of clients, padded to a common shape."""

    tasks: list[ClientTask]
    index: torch.Tensor  # (K, S, B) int64, global sample indices (padding repeats a valid one)
    mask: torch.Tensor  # (K, S, B) float32, 1 for real samples
    active: torch.Tensor  # (K, S) float32, 1 while the client still has steps to do
    lr: torch.Tensor  # (K,) float32
    mu: torch.Tensor  # (K,) float32
    num_samples: torch.Tensor  # (K,) int64
    steps: torch.Tensor  # (K,) int64


class BatchedTransport:
    """In-process simulation that trains the selected clients together with ``vmap``.

    ``max_clients_per_chunk`` bounds how many clients are trained in one vmapped pass;
    by default it is derived from ``memory_budget_mb`` (weights, gradients and activations of
    a chunk must fit). ``device`` defaults to the trainer's device. ``batching``: "auto"
    (batch only where it is faster than sequential training, see the module docstring) or
    "always" (batch whenever it is correct).

    ``fallback_reason`` is None while rounds are trained batched, else why they are not;
    ``decision`` says what was decided and why (or that the timed probe is still to come).
    """

    def __init__(
        self,
        trainer: TorchTrainer,
        federated_data: object,
        *,
        device: str | torch.device | None = None,
        max_clients_per_chunk: int | None = None,
        memory_budget_mb: float = 256.0,
        batching: str = "auto",
    ) -> None:
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        if max_clients_per_chunk is not None and max_clients_per_chunk < 1:
            raise ValueError(f"max_clients_per_chunk must be >= 1, got {max_clients_per_chunk}")
        if not memory_budget_mb > 0:
            raise ValueError(f"memory_budget_mb must be > 0, got {memory_budget_mb}")
        self.trainer = trainer
        self.data = federated_data
        self.device = torch.device(device) if device is not None else trainer.device
        self.max_clients_per_chunk = max_clients_per_chunk
        self.memory_budget = memory_budget_mb * 2**20
        self.sequential = SequentialTransport(trainer, federated_data)
        self.fallback_reason: str | None = self._static_check()
        self._probed = False
        ids = list(federated_data.client_ids)  # type: ignore[attr-defined]
        data = federated_data
        self._sizes = {c: len(data.client(c).train) for c in ids}  # type: ignore[attr-defined]
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._offsets: dict[str, int] = {}
        self._chunk: int | None = None
        self.batching = batching
        # Injectable for tests of the timed probe (a timing decision is not deterministic).
        self._clock: Callable[[], float] = time.perf_counter
        if self.fallback_reason is not None:
            self._warn_fallback()
        # A flatten / Linear / ReLU chain trains with bmm instead of vmap (see linear_chain).
        self._chain = (linear_chain(trainer.model, trainer.spec)
                       if self.fallback_reason is None else None)
        self._timing_pending = False
        self._manual_step = False  # set with the data (_ensure_data)
        self.decision = (f"sequential: {self.fallback_reason}" if self.fallback_reason
                         else self._speed_rule())
        if self.fallback_reason is None and not self._timing_pending and \
                self.device.type == "cpu" and self._sizes:
            # Decided by rule to batch on the CPU: gather the clients' data now, with the rest
            # of the set-up, not inside the first round (a device is touched at the first fit).
            self._ensure_data()

    def use_data(self, federated_data: object) -> None:
        """Train from now on over ``federated_data``'s clients, keeping what was decided.

        A Ray worker fed by a client source holds only the clients of its current share
        (``RayTransport``); it points its batched transport at them each round. The batching
        decision, the chain trace and the chunk size stay (they depend on the model, not on
        which clients train); the gathered data is rebuilt, from the new clients only."""
        self.data = federated_data
        self.sequential = SequentialTransport(self.trainer, federated_data)
        ids = list(federated_data.client_ids)  # type: ignore[attr-defined]
        data = federated_data
        self._sizes = {c: len(data.client(c).train) for c in ids}  # type: ignore[attr-defined]
        self._x = self._y = None
        self._offsets = {}
        if self.fallback_reason is None and not self._timing_pending and ids:
            self._ensure_data()

    # -- Transport protocol -----------------------------------------------------------------
    def available_clients(self) -> list[str]:
        return self.sequential.available_clients()

    def full_steps(self, client_id: str, config: FitConfig) -> int:
        return self.sequential.full_steps(client_id, config)

    @property
    def batched(self) -> bool:
        """Whether rounds are trained batched (False after a fallback)."""
        return self.fallback_reason is None

    def fit(
        self, weights: torch.Tensor, tasks: Sequence[ClientTask],
        weighting: Weighting | None = None,
    ) -> Iterator[TransportResult]:
        if self.fallback_reason is None and not self._probed:
            self._probe(weights, tasks)
        if self.fallback_reason is not None:
            yield from self.sequential.fit(weights, tasks, weighting)
            return
        known, unknown = [], []
        for t in tasks:
            (known if t.client_id in self._sizes else unknown).append(t)
        for t in unknown:
            yield ClientFailure(t.client_id, f"KeyError: unknown client '{t.client_id}'")
        if self._timing_pending and len(known) >= 2:
            yield from self._timed_fit(weights, known, weighting)
            return
        for chunk in self._chunks(known):
            yield from self._train_chunk(weights, chunk, weighting)

    def evaluate(
        self, weights: torch.Tensor, client_ids: Sequence[str], round_num: int,
    ) -> Iterator[EvalResult]:
        """Federated evaluation, client after client through ``SequentialTransport``.

        Every client evaluates the same weight vector, so there is nothing to ``vmap``: each
        client's test split is one forward pass of the trainer's model, and the reports are
        exactly those of ``SequentialTransport`` (no fallback or probe is involved).
        """
        yield from self.sequential.evaluate(weights, client_ids, round_num)

    # -- batchability -----------------------------------------------------------------------
    def _static_check(self) -> str | None:
        return unbatchable_reason(self.trainer)

    def _speed_rule(self) -> str:
        """Whether batching pays, where a rule measured on this project's benchmarks says so
        (module docstring); sets ``fallback_reason`` for a model it does not pay for, or
        leaves the question to the timed probe of the first fit (``_timed_fit``)."""
        if self.batching == "always":
            return "batched: forced (batching = 'always')"
        if self.device.type != "cpu":
            return f"batched: on {self.device}, a whole cohort per kernel pays"
        if self._chain is not None:
            return ("batched: a flatten/Linear/ReLU chain on CPU (one bmm per layer; 5-40x "
                    "faster than sequential on the digits MLP)")
        slow = cpu_slow_module(self.trainer.model)
        if slow is not None:
            name, module = slow
            self.fallback_reason = (
                f"module '{name}' ({type(module).__name__}) is a convolution: vmapped "
                "convolutions on CPU are slower than sequential training (issue #23's CNN: up to "
                "1.9x); batching = 'always' forces vmap")
            self._warn_fallback()
            return f"sequential: {self.fallback_reason}"
        self._timing_pending = True
        return "pending: batched and sequential will be timed on the first fit of 2+ clients"

    def _timed_fit(self, weights: torch.Tensor, tasks: list[ClientTask],
                   weighting: Weighting | None) -> Iterator[TransportResult]:
        """The first fit of a model no rule covers: a few clients sequentially, the first
        chunk of the rest batched, both timed per client step; the faster one trains the rest
        of this fit and of the run. Every result is a real one (nothing is trained twice)."""
        self._timing_pending = False
        m = max(1, min(4, len(tasks) // 4))
        head, rest = tasks[:m], tasks[m:]
        t0 = self._clock()
        done = list(self.sequential.fit(weights, head, weighting))
        t_seq = self._clock() - t0
        yield from done
        chunks = list(self._chunks(rest))
        t0 = self._clock()
        done = list(self._train_chunk(weights, chunks[0], weighting))
        t_bat = self._clock() - t0
        yield from done
        per_seq = t_seq / max(1, sum(self._steps(t) for t in head))
        per_bat = t_bat / max(1, sum(self._steps(t) for t in chunks[0]))
        timing = (f"timed on the first round: {per_bat * 1e3:.3g} ms per client step batched "
                  f"({len(chunks[0])} clients at once), {per_seq * 1e3:.3g} ms sequential")
        if per_bat > per_seq:
            self.fallback_reason = f"batching is slower here ({timing})"
            self.decision = f"sequential: {self.fallback_reason}"
            self._warn_fallback()
            later = [t for c in chunks[1:] for t in c]
            yield from self.sequential.fit(weights, later, weighting)
            return
        self.decision = f"batched: {timing}"
        log.info("BatchedTransport: %s", self.decision)
        for chunk in chunks[1:]:
            yield from self._train_chunk(weights, chunk, weighting)

    def _warn_fallback(self) -> None:
        msg = f"BatchedTransport: training sequentially because {self.fallback_reason}"
        log.warning(msg)
        warnings.warn(msg, BatchingFallbackWarning, stacklevel=3)

    def _probe(self, weights: torch.Tensor, tasks: Sequence[ClientTask]) -> None:
        """Check one client, one step, batched against sequential; fall back on any mismatch.

        Only the ``vmap`` path is probed: it runs whatever the model's forward does. A
        ``linear_chain`` is exact by construction (the trace admits nothing but plain Linear,
        ReLU and flatten modules, each computed by one known kernel; tests/runtime/
        test_batched.py checks it against sequential training), so a probe would only add its
        cost to the first round."""
        self._probed = True
        self._ensure_data()
        if self._chain is not None:
            return
        task = next((t for t in tasks if t.client_id in self._sizes), None)
        if task is None:
            return
        cfg = task.config
        probe = ClientTask(task.client_id, FitConfig(
            round=cfg.round, epochs=cfg.epochs, batch_size=cfg.batch_size, max_steps=1,
            lr=cfg.lr, proximal_mu=cfg.proximal_mu, seed=cfg.seed))
        try:
            (got,) = [r for r in self._train_chunk(weights, [probe], None)]
        except Exception as exc:  # vmap could not trace the model
            self.fallback_reason = f"vmap failed on this model ({type(exc).__name__}: {exc})"[:300]
            self.decision = f"sequential: {self.fallback_reason}"
            self._warn_fallback()
            return
        train = self.data.client(task.client_id).train  # type: ignore[attr-defined]
        want = self.trainer.fit(weights, train, probe.config).weights - weights
        assert isinstance(got, ClientUpdate)
        scale = float(want.abs().max()) + 1e-12
        if not torch.allclose(got.delta, want, rtol=1e-3, atol=1e-4 * scale):
            err = float((got.delta - want).abs().max())
            self.fallback_reason = (f"a batched probe step differs from sequential training "
                                    f"(max abs error {err:.3g})")
            self.decision = f"sequential: {self.fallback_reason}"
            self._warn_fallback()

    # -- planning ---------------------------------------------------------------------------
    def _ensure_data(self) -> None:
        """Concatenate every client's training data once, on the device."""
        if self._x is not None:
            return
        xs, ys, offset = [], [], 0
        for cid in self._sizes:
            train = self.data.client(cid).train  # type: ignore[attr-defined]
            xs.append(train.x)
            ys.append(train.y)
            self._offsets[cid] = offset
            offset += len(train)
        # One numpy concatenation, then one tensor (thousands of small tensors cost more).
        self._x = torch.as_tensor(_concat(xs)).to(self.device)
        # Whether a chain takes the hand-written step: decided once, from the data's shape.
        self._manual_step = self._chain is not None and manual_step_reason(
            self._chain, self.trainer.loss_name, self._x.dim() - 1) is None
        self._y = torch.as_tensor(_concat(ys)).to(self.device)

    def _batch_size(self, cfg: FitConfig) -> int:
        return cfg.batch_size or self.trainer.batch_size

    def _chunk_size(self, batch_size: int) -> int:
        if self.max_clients_per_chunk is not None:
            return self.max_clients_per_chunk
        if self._chunk is None:
            self._chunk = max(1, int(self.memory_budget // self._bytes_per_client(batch_size)))
        return self._chunk

    def _bytes_per_client(self, batch_size: int) -> float:
        """Rough memory of one client in a vmapped step: weights, gradient and temporaries
        (about 6 vectors of D floats) plus activations of one mini-batch kept for backward."""
        model, x0 = self.trainer.model, self._x
        assert x0 is not None
        sizes: list[int] = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel()))
                 for m in model.modules() if not list(m.children())]
        try:
            with torch.no_grad():
                model(x0[:batch_size])
        finally:
            for h in hooks:
                h.remove()
        activations = 3 * 4 * (sum(sizes) + x0[:batch_size].numel())
        return 6 * 4 * self.trainer.spec.numel + activations

    def _chunks(self, tasks: Sequence[ClientTask]) -> Iterator[list[ClientTask]]:
        """Bucket by (batch size, step count) so clients in a chunk need similar work."""
        self._ensure_data()
        by_bs: dict[int, list[ClientTask]] = {}
        for t in tasks:
            by_bs.setdefault(self._batch_size(t.config), []).append(t)
        for bs, group in by_bs.items():
            group.sort(key=lambda t: self._steps(t))
            size = self._chunk_size(bs)
            for start in range(0, len(group), size):
                yield group[start : start + size]

    def _steps(self, task: ClientTask) -> int:
        n = self._sizes[task.client_id]
        total = self.trainer.full_steps(n, task.config)
        cap = task.config.max_steps
        return total if cap is None else min(total, cap)

    def _plan(self, tasks: list[ClientTask]) -> _Plan:
        """The exact batches ``TorchTrainer.fit`` would draw for each client, padded."""
        bs = self._batch_size(tasks[0].config)
        steps = [self._steps(t) for t in tasks]
        s_max = max(steps)
        k = len(tasks)
        bases = [self._offsets[t.client_id] for t in tasks]
        index = np.empty((k, s_max, bs), dtype=np.int64)
        index[...] = np.asarray(bases, dtype=np.int64)[:, None, None]  # padding: a real sample
        mask = np.zeros((k, s_max, bs), dtype=np.float32)
        gen = torch.Generator()  # re-seeded per client: manual_seed resets its whole state
        for i, (task, total, base) in enumerate(zip(tasks, steps, bases)):
            n = self._sizes[task.client_id]
            gen.manual_seed(task.config.seed)
            s = 0
            while s < total:
                order = torch.randperm(n, generator=gen).numpy()
                for start in range(0, n, bs):
                    if s >= total:
                        break
                    idx = order[start : start + bs]
                    index[i, s, : len(idx)] = base + idx
                    mask[i, s, : len(idx)] = 1.0
                    s += 1
        # Pad each step only to the largest real batch of the chunk, not to the batch size:
        # clients with fewer samples than a batch (cross-device) would otherwise compute
        # mostly padding (digits at 1,000 clients: 1-2 samples padded to 32).
        width = max(1, int(mask.sum(axis=2).max())) if mask.size else 1
        index, mask = index[:, :, :width], mask[:, :, :width]
        steps_t = torch.tensor(steps, dtype=torch.int64)
        active = (torch.arange(s_max)[None, :] < steps_t[:, None]).to(torch.float32)
        lr = torch.tensor([t.config.lr if t.config.lr is not None else self.trainer.lr
                           for t in tasks], dtype=torch.float32)
        mu = torch.tensor([t.config.proximal_mu for t in tasks], dtype=torch.float32)
        num = torch.tensor([self._sizes[t.client_id] for t in tasks], dtype=torch.int64)
        return _Plan(tasks, torch.from_numpy(index), torch.from_numpy(mask), active, lr, mu,
                     num, steps_t)

    # -- training ---------------------------------------------------------------------------
    def _forward_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """One client's forward pass from its flat weight row (vmapped over clients)."""
        model, entries = self.trainer.model, self.trainer.spec.entries

        def forward(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            params = {e.name: w[e.offset : e.offset + e.numel].view(e.shape) for e in entries}
            return functional_call(model, params, (x,))

        return forward

    def _per_sample_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.trainer.loss_name == "cross_entropy":
            flat = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1),
                                               reduction="none")
            return flat.view(y.shape)
        return (out.squeeze(-1) - y.to(out.dtype)) ** 2

    def _train_chunk(
        self, weights: torch.Tensor, tasks: list[ClientTask], weighting: Weighting | None
    ) -> Iterator[TransportResult]:
        assert self._x is not None and self._y is not None
        plan = self._plan(tasks)
        dev = self.device
        k = len(tasks)
        w0 = weights.to(dev)
        # One row per client, a fresh tensor (faster than repeat; expand().contiguous()
        # would alias w0 for a single client).
        w = torch.empty((k, w0.numel()), dtype=w0.dtype, device=dev).copy_(w0)
        on = self._on_device
        lr, mu = on(plan.lr), on(plan.mu)
        prox = bool((plan.mu > 0).any())
        loss_sum = torch.zeros(k, device=dev)
        correct = torch.zeros(k, device=dev)
        index, mask, active = on(plan.index), on(plan.mask), on(plan.active)
        if self._manual_step:
            # The gradient written out by hand (runtime/chain.py): no autograd graph.
            chain = self._chain
            rows = {e.offset: w[:, e.offset : e.offset + e.numel] for e in chain_params(chain)}
            pull = ((mu, {o: w0[o : o + r.shape[1]] for o, r in rows.items()}) if prox
                    else None)
            for s in range(index.shape[1]):
                idx, m = index[:, s], mask[:, s]
                flat = idx.reshape(-1)  # index_select: a third of advanced indexing's cost
                x = self._x.index_select(0, flat).view(*idx.shape, *self._x.shape[1:])
                y = self._y.index_select(0, flat).view(idx.shape)
                client_loss, right = chain_sgd_step(
                    chain, rows, x, y, m, lr * active[:, s],
                    loss=self.trainer.loss_name, prox=pull,
                    classification=self.trainer.classification)
                loss_sum += client_loss * m.sum(dim=1)
                if right is not None:
                    correct += right
        else:
            self._autograd_steps(w, w0, index, mask, active, lr, mu, prox, loss_sum, correct)
        deltas = w.detach().sub_(w0)
        for i, task in enumerate(tasks):
            if task.stages:  # client-side stages (e.g. local DP) act on each client's row
                deltas[i] = task.finish(deltas[i].cpu()).to(dev)
        seen = mask.sum(dim=(1, 2)).clamp(min=1.0)
        metrics = {"train_loss": (loss_sum / seen).cpu(), "steps": plan.steps.to(torch.float32)}
        if self.trainer.classification:
            metrics["train_accuracy"] = (correct / seen).cpu()
        if weighting is None or not hasattr(weighting, "weights_for_samples"):
            yield from self._individual(tasks, deltas.cpu(), plan, metrics)
            return
        finite = finite_rows(deltas).cpu()
        yield self._reduce(tasks, deltas, plan, metrics, finite, weighting)

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the transport's device (no call at all on the CPU, where it already is:
        a round makes a dozen of these)."""
        return t if self.device.type == "cpu" else t.to(self.device)

    def _autograd_steps(
        self, w: torch.Tensor, w0: torch.Tensor, index: torch.Tensor, mask: torch.Tensor,
        active: torch.Tensor, lr: torch.Tensor, mu: torch.Tensor, prox: bool,
        loss_sum: torch.Tensor, correct: torch.Tensor,
    ) -> None:
        """Every step of a chunk through autograd, in place on ``w`` (a ``(K, D)`` row per
        client), adding each client's summed loss and correct count to the accumulators."""
        # vmap only the forward pass: clients are independent, so the gradient of the summed
        # per-client losses w.r.t. row k of w is exactly client k's gradient. Plain autograd
        # then does every backward at once (and, unlike torch.func.grad, without importing
        # torch._dynamo, which costs seconds of start-up).
        # ``leaves``: what autograd differentiates, each with its part of w0. A linear chain's
        # parameters are leaves of their own (column views of w, updated in place), so the
        # backward never scatters each parameter's gradient into a zero (K, D) matrix.
        assert self._x is not None and self._y is not None
        leaves: list[tuple[torch.Tensor, torch.Tensor]]
        if self._chain is not None:
            chain = self._chain
            leaves = [(w[:, e.offset : e.offset + e.numel].requires_grad_(True),
                       w0[e.offset : e.offset + e.numel]) for e in chain_params(chain)]
            rows = {e.offset: p for e, (p, _) in zip(chain_params(chain), leaves, strict=True)}

            def forward(_: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
                return run_chain(chain, rows, x)
        else:
            w.requires_grad_(True)
            leaves = [(w, w0)]
            forward = vmap(self._forward_fn())
            self.trainer.model.train()  # functional_call runs the module (the chain never does)
        for s in range(index.shape[1]):
            idx, m = index[:, s], mask[:, s]
            x, y = self._x[idx], self._y[idx]
            out = forward(w, x)
            per = self._per_sample_loss(out, y)
            count = m.sum(dim=1)
            client_loss = (per * m).sum(dim=1) / count.clamp(min=1.0)
            client_loss.sum().backward()
            with torch.no_grad():
                scale = (lr * active[:, s])[:, None]
                for p, p0 in leaves:
                    g = p.grad
                    assert g is not None
                    if prox:
                        g.add_(mu[:, None] * (p - p0))
                    p.sub_(scale * g)
                    p.grad = None
                loss_sum += client_loss * count
                if self.trainer.classification:
                    correct += ((out.argmax(-1) == y).to(m.dtype) * m).sum(dim=1)

    def _individual(
        self, tasks: list[ClientTask], deltas: torch.Tensor, plan: _Plan,
        metrics: dict[str, torch.Tensor],
    ) -> Iterator[TransportResult]:
        # Python numbers for the whole chunk at once (one conversion per tensor, not one
        # indexing op and one item() per client and metric).
        num = plan.num_samples.tolist()
        values = {k: v.tolist() for k, v in metrics.items()}
        for i, task in enumerate(tasks):
            # A non-finite delta is passed on as is: the server's validation rejects it.
            yield ClientUpdate(
                client_id=task.client_id, delta=deltas[i].clone(),
                num_samples=num[i], base_round=task.config.round,
                metrics={k: v[i] for k, v in values.items()},
            )

    def _reduce(
        self, tasks: list[ClientTask], deltas: torch.Tensor, plan: _Plan,
        metrics: dict[str, torch.Tensor], finite: torch.Tensor, weighting: Weighting,
    ) -> PartialAggregate:
        """Validate and sum the chunk on the device: one matrix-vector product."""
        rejected = [f"update from client '{t.client_id}' rejected: delta has non-finite values"
                    for t, ok in zip(tasks, finite.tolist()) if not ok]
        keep = finite.nonzero().squeeze(1)
        if len(keep) == 0:
            return PartialAggregate(weighted_sum=None, rejected=rejected)
        num = plan.num_samples[keep]
        wts = weighting.weights_for_samples(num)  # type: ignore[attr-defined]
        total = float(wts.to(torch.float64).sum())
        dev_keep = keep.to(deltas.device)
        summed = weighted_sum(deltas.index_select(0, dev_keep), wts).cpu()
        n = num.to(torch.float64)
        metric_sums = {k: float((v[keep].to(torch.float64) * n).sum()) for k, v in metrics.items()}
        return PartialAggregate(
            weighted_sum=summed.contiguous(), total_weight=total, count=len(keep),
            num_samples=int(num.sum()), metric_sums=metric_sums,
            bytes_up=len(keep) * deltas.shape[1] * 4,
            client_ids=[tasks[i].client_id for i in keep.tolist()], rejected=rejected,
        )
