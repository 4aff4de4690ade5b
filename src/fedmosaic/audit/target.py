"""The attacker's view of a client update, and its model of how that update was produced.

The attacker is the honest-but-curious server: it holds the global weights ``w`` it sent,
the learning rate and number of local steps it asked for, and one upload
``delta = local - w``. With ``T`` full-batch steps of plain SGD (what ``TorchTrainer`` does)
the client's update is ``delta = -lr * (g_0 + ... + g_(T-1))``, ``g_t`` the gradient at the
t-th iterate, so the attacker observes the *pseudo-gradient* ``-delta / lr``; for ``T = 1``
it is exactly the gradient of the client's loss at ``w``, the target of DLG and iDLG. For
``T > 1`` the attacker unrolls ``T`` differentiable SGD steps on its dummy data and matches
their sum (the multi-step setting of Geiping et al. 2020, "Inverting Gradients"); it knows
``lr`` and ``T`` because it set them.

The model is evaluated with ``torch.func.functional_call`` on the flat vectors of the
project's ``ParamSpec``, so any model a ``model_fn`` builds can be audited.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from fedmosaic.audit.errors import AuditError
from fedmosaic.data import ArrayDataset
from fedmosaic.train import FitConfig, TorchTrainer


def _has_running_stats(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._NormBase) for m in module.modules())


class UpdateModel:
    """Computes a client's real update (through ``TorchTrainer.fit``) and the attacker's
    differentiable simulation of it for dummy data.

    Only the spec's trainable parameters are matched: buffer entries (BatchNorm statistics)
    move with the data but are not gradients.
    """

    def __init__(self, trainer: TorchTrainer, weights: torch.Tensor, *, lr: float,
                 local_steps: int = 1) -> None:
        if trainer.loss_name != "cross_entropy":
            raise AuditError("the leakage audit attacks classifiers trained with cross-entropy "
                             f"(DLG's soft labels, iDLG's label rule); this trainer uses "
                             f"{trainer.loss_name or 'a custom loss callable'}")
        if not trainer.plain_sgd:
            raise AuditError("the leakage audit models the client's update as plain SGD steps "
                             "(-delta/lr is the gradient); this trainer uses another optimizer")
        if not lr > 0:
            raise AuditError(f"lr must be > 0, got {lr}")
        if not (isinstance(local_steps, int) and local_steps >= 1):
            raise AuditError(f"local_steps must be an integer >= 1, got {local_steps!r}")
        module = trainer.model
        if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
               for m in module.modules()):
            raise AuditError("the model has dropout: the attacker cannot reproduce the client's "
                             "random masks, so the audit would understate leakage; audit the "
                             "model with dropout p=0")
        spec = trainer.spec
        spec.check_vector(weights)
        self.trainer, self.spec, self.lr, self.local_steps = trainer, spec, lr, local_steps
        self.weights = weights.detach().clone()
        self.module = module
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        self.entries = [e for e in spec.entries if not e.is_buffer and e.name in trainable]
        if not self.entries:
            raise AuditError("the model has no trainable parameters in its ParamSpec: its "
                             "updates carry no gradient to attack")
        self.device = trainer.device
        views = spec.views(self.weights)
        # Constant leaves: the attack differentiates the simulated gradient w.r.t. the dummy
        # data, and autograd.grad needs the weights to require grad to form that gradient.
        self.leaves = [views[e.name].to(self.device, copy=True).requires_grad_(True)
                       for e in self.entries]
        self.buffers = {e.name: views[e.name].to(self.device, copy=True)
                        for e in spec.entries if e.is_buffer}
        self.index = torch.cat([torch.arange(e.offset, e.offset + e.numel)
                                for e in self.entries])
        self.per_client = local_steps > 1 or _has_running_stats(module)
        self.num_classes = 0  # set by probe()

    @property
    def numel(self) -> int:
        """Length of the pseudo-gradient the attacker matches."""
        return int(self.index.numel())

    def client_update(self, x: np.ndarray, y: np.ndarray, seed: int) -> torch.Tensor:
        """The update one client uploads after ``local_steps`` full-batch steps on (x, y)."""
        data = ArrayDataset.create(x, y)
        config = FitConfig(round=0, epochs=self.local_steps, batch_size=len(data), lr=self.lr,
                           seed=seed)
        result = self.trainer.fit(self.weights, data, config)
        return result.weights.cpu() - self.weights

    def observe(self, delta: torch.Tensor) -> torch.Tensor:
        """The pseudo-gradient ``-delta / lr`` over the matched coordinates (on the model's
        device)."""
        return (-delta[self.index] / self.lr).to(self.device)

    def _forward(self, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        state = {e.name: p for e, p in zip(self.entries, params)}
        state.update(self.buffers)
        return functional_call(self.module, state, (x,))

    def simulate(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The pseudo-gradient of ``K`` clients holding dummy data, summed (differentiable).

        ``x`` has shape ``(K, B, *features)`` and ``probs`` ``(K, B, C)`` (soft labels): each
        client's loss is the mean cross-entropy over its ``B`` samples, as in training.
        """
        k, b = x.shape[0], x.shape[1]
        self.module.train()  # the mode TorchTrainer.fit trains in
        if not self.per_client:
            # One step, no batch statistics: the clients' summed gradient is the gradient of
            # the sum of their mean losses, computable in one forward over all K*B samples.
            out = self._forward(self.leaves, x.reshape(k * b, *x.shape[2:]))
            losses = nn.functional.cross_entropy(out, probs.reshape(k * b, -1),
                                                 reduction="none")
            loss = losses.view(k, b).mean(1).sum()
            grads = torch.autograd.grad(loss, self.leaves, create_graph=True)
            return torch.cat([g.reshape(-1) for g in grads])
        total: list[torch.Tensor] | None = None
        for c in range(k):
            params = list(self.leaves)
            for _ in range(self.local_steps):
                out = self._forward(params, x[c])
                loss = nn.functional.cross_entropy(out, probs[c])
                grads = torch.autograd.grad(loss, params, create_graph=True)
                params = [p - self.lr * g for p, g in zip(params, grads)]
                total = list(grads) if total is None else [t + g for t, g in zip(total, grads)]
        assert total is not None
        return torch.cat([g.reshape(-1) for g in total])

    def probe(self, x: np.ndarray) -> int:
        """Check that the attack can run on this model and data; the number of classes.

        Runs the simulation on one real sample and differentiates it w.r.t. the input:
        a model that fails there (integer inputs, batch statistics on one sample, a
        non-differentiable operation) gets an error naming the problem now, not mid-attack.
        """
        xt = torch.as_tensor(x[:1], dtype=torch.float32).to(self.device)
        try:
            with torch.no_grad():
                self.module.train()
                out = self._forward(self.leaves, xt)
        except Exception as exc:
            raise AuditError(f"the model cannot be evaluated with torch.func.functional_call "
                             f"on one sample of shape {tuple(xt.shape[1:])}: {exc}") from exc
        if out.dim() != 2 or out.shape[0] != 1 or out.shape[1] < 2:
            raise AuditError(f"the model must output (batch, classes) logits with >= 2 classes, "
                             f"got shape {tuple(out.shape)}")
        self.num_classes = int(out.shape[1])
        dummy = xt.clone().unsqueeze(0).requires_grad_(True)
        probs = torch.full((1, 1, self.num_classes), 1.0 / self.num_classes,
                           device=self.device)
        try:
            g = self.simulate(dummy, probs)
            (grad_x,) = torch.autograd.grad(g.pow(2).sum(), dummy, allow_unused=True)
        except Exception as exc:
            raise AuditError(f"the model's gradient cannot be differentiated with respect to "
                             f"its input (DLG needs second derivatives): {exc}") from exc
        if grad_x is None or not bool(torch.isfinite(grad_x).all()) or not bool(grad_x.any()):
            raise AuditError("the model's gradient does not depend differentiably on its input "
                             "(zero, missing or non-finite second derivative): DLG cannot "
                             "optimise a dummy input against it")
        return self.num_classes

    def output_layer(self) -> tuple[slice, slice | None] | None:
        """Where the last linear layer's weight and bias sit in the pseudo-gradient.

        The last matched entries are taken as the output layer when they have the shapes of
        one: a bias ``(C,)`` preceded by a weight ``(C, h)``, or a weight ``(C, h)`` alone.
        """
        c = self.num_classes
        offsets, pos = [], 0
        for e in self.entries:
            offsets.append(slice(pos, pos + e.numel))
            pos += e.numel
        last = self.entries[-1]
        if last.shape == (c,) and len(self.entries) >= 2:
            w = self.entries[-2]
            if len(w.shape) == 2 and w.shape[0] == c:
                return offsets[-2], offsets[-1]
        if len(last.shape) == 2 and last.shape[0] == c:
            return offsets[-1], None
        return None

    def first_layer(self, features: int) -> tuple[slice, slice] | None:
        """Where a fully connected first layer's weight and bias sit in the pseudo-gradient.

        The first matched entries are taken as that layer when they have its shapes: a
        weight ``(h, features)`` followed by a bias ``(h,)``. The spec's order is the order
        the module registered its parameters in, not necessarily the order of the forward
        pass: :func:`fedmosaic.audit.attacks.check_analytic` confirms that the layer really
        sees the raw (flattened) input.
        """
        if len(self.entries) < 2:
            return None
        w, b = self.entries[0], self.entries[1]
        if len(w.shape) != 2 or w.shape[1] != features or tuple(b.shape) != (w.shape[0],):
            return None
        return slice(0, w.numel), slice(w.numel, w.numel + b.numel)

    def weight_rows(self, vector: torch.Tensor, where: slice) -> torch.Tensor:
        """The output layer's weight gradient as a ``(C, h)`` matrix."""
        return vector[where].view(self.num_classes, -1)
