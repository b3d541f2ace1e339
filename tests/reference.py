"""Hand-written references: models as functions of a list of tensors, MAML written out longhand."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sine_mlp(dtype=torch.float64) -> nn.Sequential:
    """The MLP of the sine-wave MAML experiment, 1-40-40-1."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)).to(dtype)


def sine_mlp_forward(params, x):
    w1, b1, w2, b2, w3, b3 = params
    h = F.relu(F.linear(x, w1, b1))
    h = F.relu(F.linear(h, w2, b2))
    return F.linear(h, w3, b3)


def conv_bn(dtype=torch.float64) -> nn.Sequential:
    """A small conv net with batch norm: conv-bn-relu-pool, linear head (3 classes)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    ).to(dtype)


def conv_bn_forward(params, x):
    """Train-mode forward of :func:`conv_bn` (batch statistics)."""
    cw, cb, gamma, beta, lw, lb = params
    h = F.conv2d(x, cw, cb)
    h = F.batch_norm(h, None, None, gamma, beta, training=True)
    h = F.max_pool2d(F.relu(h), 2)
    return F.linear(h.flatten(1), lw, lb)


def maml_meta_grads(
    forward, params, support, query, loss_fn, *, lr, steps, first_order=False, adapt=None, rates=None
):
    """Meta-gradient of the query loss after ``steps`` plain gradient steps on the support loss.

    Args:
        forward: ``forward(list_of_tensors, x)``.
        params: Leaf tensors (requires_grad) of the model.
        adapt: Indices of the parameters that adapt (default: all).
        rates: Optional per-parameter learning-rate tensors (MetaSGD), leaves with requires_grad.

    Returns:
        ``(grads of params, grads of rates or None, adapted params)``.
    """
    adapt = list(range(len(params))) if adapt is None else list(adapt)
    fast = list(params)
    for _ in range(steps):
        loss = loss_fn(forward(fast, support[0]), support[1])
        grads = torch.autograd.grad(loss, [fast[i] for i in adapt], create_graph=not first_order)
        for i, g in zip(adapt, grads):
            rate = rates[adapt.index(i)] if rates is not None else lr
            fast[i] = fast[i] - rate * g
    query_loss = loss_fn(forward(fast, query[0]), query[1])
    inputs = list(params) + (list(rates) if rates is not None else [])
    all_grads = torch.autograd.grad(query_loss, inputs, allow_unused=True)
    grads = list(all_grads[: len(params)])
    rate_grads = list(all_grads[len(params):]) if rates is not None else None
    return grads, rate_grads, fast


def leaves(module: nn.Module):
    """Detached leaf copies (requires_grad) of a module's parameters."""
    return [p.detach().clone().requires_grad_() for p in module.parameters()]


def meta_grads(objective, tensors):
    """Gradients of ``objective`` for ``tensors`` (``None`` where a tensor is unused)."""
    return torch.autograd.grad(objective, list(tensors), allow_unused=True)


def assert_all_close(got, expected, **kwargs):
    """``assert_close`` tensor by tensor, naming the index of the first that differs."""
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, msg=lambda m, i=i: f"tensor {i}: {m}", **kwargs)


def max_difference(a, b):
    """The largest absolute elementwise difference between two lists of tensors."""
    return max((x - y).abs().max().item() for x, y in zip(a, b))
