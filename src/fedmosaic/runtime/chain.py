"""Plain chains of flatten / ``nn.Linear`` / ReLU layers (the model zoo's MLP and logistic
regression), trained for a whole cohort at once with one batched matrix product per layer.

``linear_chain`` reads such a model from its ``torch.fx`` trace; ``run_chain`` is its forward
for a chunk of clients whose weights are the rows of a ``(K, D)`` matrix (what ``vmap`` of the
model's forward computes, without ``vmap``); ``chain_sgd_step`` is one plain-SGD step of every
client, its gradient written out by hand (backpropagation of a linear/ReLU chain and the
softmax cross-entropy or squared error, Rumelhart, Hinton and Williams 1986) instead of
recorded by autograd. BatchedTransport uses it for these models on every device: for the small
models of cross-device simulations a step is a few dozen tiny kernels, and autograd's graph,
the separate optimizer update and the softmax over a last dimension of ten classes were most of
its cost (docs/benchmarks.md, the digits peer task).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedmosaic.core.params import ParamSpec

# A layer of a model that is a plain chain of these: ("flatten",), ("relu",), ("identity",)
# or ("linear", weight entry, bias entry or None).
_ChainOp = tuple[Any, ...]
# How a traced forward spells x.flatten(1) and relu(x) outside modules: (node op, target).
_FLATTEN = (("call_method", "flatten"), ("call_function", torch.flatten))
_RELU = (("call_method", "relu"), ("call_function", torch.relu),
         ("call_function", nn.functional.relu))


def linear_chain(model: nn.Module, spec: ParamSpec) -> list[_ChainOp] | None:
    """``model``'s forward as a chain of flatten / Linear / ReLU layers (the MLP and logistic
    regression of the model zoo), read from its ``torch.fx`` trace; None for anything else.

    Such a model trains batched with one ``torch.bmm`` per linear layer on the ``(K, B, in)``
    activations of the chunk, instead of ``vmap`` over ``functional_call``: the same matrix
    products (``vmap`` batches ``F.linear`` into the same batched kernels), without the per-step
    cost of re-binding the module's parameters and of ``vmap``'s wrapping, which dominates
    for small models on a CPU. Anything the trace shows beyond that (another op, a branch, a
    second use of a value, a flatten of other dimensions) keeps the ``vmap`` path.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow and the like: vmap handles it or not
        return None
    by_name = {e.name: e for e in spec.entries}
    modules = dict(model.named_modules())
    chain: list[_ChainOp] = []
    prev: Any = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if prev is not None:
                return None  # a second input
            prev = node
            continue
        if len(node.args) < 1 or node.args[0] is not prev or len(prev.users) != 1:
            return None  # not a chain: a value used twice, or another input first
        rest, kwargs = tuple(node.args[1:]), dict(node.kwargs)
        if node.op == "output":
            return chain
        if node.op == "call_module":
            module = modules.get(str(node.target))
            if rest or kwargs or module is None or module._forward_hooks or \
                    module._forward_pre_hooks:
                return None
            if type(module) is nn.Linear:
                w = by_name.get(f"{node.target}.weight")
                b = by_name.get(f"{node.target}.bias") if module.bias is not None else None
                if w is None or (module.bias is not None and b is None):
                    return None  # frozen parameters: not in the flat vector
                chain.append(("linear", w, b))
            elif type(module) is nn.ReLU:
                chain.append(("relu",))
            elif type(module) is nn.Identity:
                chain.append(("identity",))
            elif type(module) is nn.Flatten and (module.start_dim, module.end_dim) == (1, -1):
                chain.append(("flatten",))
            else:
                return None
        elif (node.op, node.target) in _FLATTEN and \
                (rest, kwargs) in (((1,), {}), ((), {"start_dim": 1})):
            chain.append(("flatten",))
        elif (node.op, node.target) in _RELU and not rest and not kwargs:
            chain.append(("relu",))
        else:
            return None
        prev = node
    return None


def chain_params(chain: Sequence[_ChainOp]) -> list[Any]:
    """The flat-vector entries a ``linear_chain`` reads (each once, in order of use)."""
    seen: dict[int, Any] = {}
    for op in chain:
        if op[0] == "linear":
            for entry in op[1:]:
                if entry is not None:
                    seen.setdefault(entry.offset, entry)
    return list(seen.values())


def run_chain(chain: Sequence[_ChainOp], rows: Mapping[int, torch.Tensor],
              x: torch.Tensor) -> torch.Tensor:
    """A ``linear_chain`` on a chunk: ``rows[entry.offset]`` is that parameter of every client,
    ``(K, numel)``; ``x`` is ``(K, B, *features)``; returns ``(K, B, outputs)``, what ``vmap``
    of the model's forward returns."""
    h = x
    for op in chain:
        kind = op[0]
        if kind == "linear":
            we, be = op[1], op[2]
            weight = rows[we.offset]
            weight = weight.view(weight.shape[0], *we.shape).transpose(1, 2)
            h = (torch.bmm(h, weight) if be is None
                 else torch.baddbmm(rows[be.offset].unsqueeze(1), h, weight))
        elif kind == "relu":
            h = torch.relu(h)
        elif kind == "flatten":
            h = h.flatten(2)
    return h


def chain_forward(chain: Sequence[_ChainOp]) -> Callable[[torch.Tensor, torch.Tensor],
                                                          torch.Tensor]:
    """``run_chain`` on the rows of a ``(K, D)`` matrix of the clients' flat weights."""
    entries = chain_params(chain)

    def forward(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        rows = {e.offset: w[:, e.offset : e.offset + e.numel] for e in entries}
        return run_chain(chain, rows, x)

    return forward


def manual_step_reason(chain: Sequence[_ChainOp], loss: str, feature_dims: int) -> str | None:
    """Why ``chain_sgd_step`` cannot train this chain (autograd then does), or None.

    It needs each sample's features flat before the first linear layer (the input already is,
    or the chain flattens it first), every layer's weights used once (a layer applied twice
    would need its gradient summed before its update), and a loss it writes out:
    cross-entropy, or squared error of a single output. ``feature_dims``: the number of
    dimensions of one sample's features."""
    first = next((op[0] for op in chain if op[0] != "identity"), None)
    if feature_dims > 1 and first != "flatten":
        return "the first linear layer sees unflattened features"
    linears = [op for op in chain if op[0] == "linear"]
    used = [e.offset for op in linears for e in op[1:] if e is not None]
    if len(used) != len(set(used)):
        return "a layer is applied more than once"
    if not linears:
        return "the chain has no linear layer"
    if loss == "cross_entropy":
        return None
    if loss == "mse" and int(linears[-1][1].shape[0]) == 1:
        return None
    return f"loss {loss!r} with this output is not written out"


def chain_sgd_step(
    chain: Sequence[_ChainOp],
    rows: Mapping[int, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    scale: torch.Tensor,
    *,
    loss: str,
    prox: tuple[torch.Tensor, Mapping[int, torch.Tensor]] | None = None,
    classification: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One plain-SGD step of every client of a chunk, in place on ``rows``.

    ``rows[entry.offset]``: that parameter of every client, ``(K, numel)`` (a view into the
    chunk's weight matrix); ``x``: ``(K, B, *features)``; ``y``: ``(K, B)``; ``mask``:
    ``(K, B)``, 1 for real samples and 0 for padding; ``scale``: ``(K,)``, each client's
    learning rate times whether it still takes steps. Each client minimises the mean of
    ``loss`` over its real samples (``"cross_entropy"``, or ``"mse"`` on one output); with
    ``prox = (mu, rows0)`` also FedProx's ``mu / 2 ||w - w0||^2`` (Li et al. 2020), ``rows0``
    holding the global weights of each parameter. ``manual_step_reason`` must be None.

    Returns each client's mean loss over its real samples and, for classification, its
    number of correct predictions (both ``(K,)``, computed before the step, as autograd's).
    The result equals autograd's gradient step up to float rounding (the same products,
    summed in another order).
    """
    k, b = mask.shape
    count = mask.sum(dim=1).clamp(min=1.0)
    # Features on dim 1, samples last: a layer is W (out, in) @ h (in, B), so the weight rows
    # need no transpose, and the softmax runs over dim 1 with the samples contiguous, several
    # times faster on a CPU than over a last dimension of ten classes.
    h = x.reshape(k, b, -1).transpose(1, 2)
    saved: list[tuple[Any, ...]] = []
    for op in chain:
        if op[0] == "linear":
            we, be = op[1], op[2]
            weight = rows[we.offset].view(k, *we.shape)
            z = (torch.bmm(weight, h) if be is None
                 else torch.baddbmm(rows[be.offset].unsqueeze(2), weight, h))
            saved.append((we, be, h))
            h = z
        elif op[0] == "relu":
            h = torch.relu(h)
            saved.append((h,))
    # d(step)/d(each sample's loss): the client's learning rate over its real sample count.
    coef = mask * (scale / count)[:, None]
    correct = None
    if loss == "cross_entropy":
        logp = torch.log_softmax(h, dim=1)
        target = y[:, None, :]
        per = logp.gather(1, target).squeeze(1).neg_()
        if classification:
            # max(dim).indices is argmax (the first maximal index) at a sixth of argmax's
            # cost over a middle dimension on CPU.
            correct = ((h.max(dim=1).indices == y).to(mask.dtype) * mask).sum(dim=1)
        g = logp.exp_()  # softmax; its gradient is softmax - onehot
        g.scatter_add_(1, target, torch.full(target.shape, -1.0, dtype=g.dtype,
                                             device=g.device))
        g.mul_(coef[:, None, :])
    else:  # squared error of one output
        diff = h[:, 0, :] - y.to(h.dtype)
        per = diff * diff
        g = (2.0 * diff * coef)[:, None, :]
    client_loss = (per * mask).sum(dim=1) / count
    # FedProx's pull towards the global weights, from the weights before this step.
    pulls = []
    if prox is not None:
        mu, rows0 = prox
        factor = (scale * mu)[:, None]
        for op in chain:
            if op[0] == "linear":
                for e in op[1:]:
                    if e is not None:
                        p = rows[e.offset]
                        pulls.append((p, factor * (p - rows0[e.offset])))
    first_linear = next(i for i, item in enumerate(saved) if len(item) == 3)
    for i in range(len(saved) - 1, -1, -1):
        item = saved[i]
        if len(item) == 1:  # ReLU: pass the gradient where the output is positive
            g = g * item[0].sign()  # the output is >= 0: its sign is the 0/1 mask, cheaply
            continue
        we, be, h_in = item
        weight = rows[we.offset].view(k, *we.shape)
        # The input's gradient needs this layer's weights before their update.
        g_in = torch.bmm(weight.transpose(1, 2), g) if i > first_linear else None
        weight.sub_(torch.bmm(g, h_in.transpose(1, 2)))
        if be is not None:
            rows[be.offset].sub_(g.sum(dim=2))
        if g_in is None:
            break
        g = g_in
    for p, pull in pulls:
        p.sub_(pull)
    return client_loss, correct
