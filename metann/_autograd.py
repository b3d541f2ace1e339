"""The inner loop's gradient call: ``torch.autograd.grad`` without its per-call Python overhead."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.overrides import has_torch_function

__all__ = ["grad"]

_TORCH_GRAD = torch.autograd.grad
_ENGINE = getattr(torch.autograd.Variable, "_execution_engine", None)
_LOG = getattr(torch.autograd.graph, "log", logging.getLogger("torch.autograd.graph"))


def grad(
    loss: Tensor, inputs: Sequence[Tensor], create_graph: bool, allow_unused: bool = True
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=allow_unused)``.

    ``torch.autograd.grad`` spends tens of microseconds per call in Python (argument
    normalisation, ``_make_grads``, the context stashed for compiled backward graphs on
    device threads); an inner step of a small model costs not much more. For the inner
    loop's case (a plain real scalar loss, plain tensors, everything on the CPU, where
    the engine runs every node on this thread) this calls the autograd engine directly,
    exactly as ``torch.autograd.grad`` does after its checks; otherwise, or when
    ``torch.autograd.grad`` has been patched (e.g. by :func:`metann.testing.check_meta_gradient`),
    it calls ``torch.autograd.grad``. Results and errors are the same either way.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> grad((w**2).sum(), (w,), create_graph=False)
        (tensor([2., 4.]),)
    """
    inputs = tuple(inputs)
    if (
        inputs
        and _ENGINE is not None
        and torch.autograd.grad is _TORCH_GRAD
        and type(loss) is Tensor
        and loss.is_cpu
        and loss.numel() == 1
        and loss.dtype.is_floating_point
        and not has_torch_function(inputs)
        and all(t.is_cpu for t in inputs)
        and not _LOG.isEnabledFor(logging.DEBUG)
    ):
        return _ENGINE.run_backward(
            (loss,), (torch.ones_like(loss),), create_graph, create_graph, inputs, allow_unused, False
        )
    return torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=allow_unused)
