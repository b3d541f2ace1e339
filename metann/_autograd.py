"""The inner loop's gradient call: ``torch.autograd.grad`` without its per-call Python overhead."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.overrides import has_torch_function

__all__ = ["grad"]

_TORCH_GRAD = torch.autograd.grad
# What `torch.autograd.grad` calls (torch >= 2.2); `torch.compiler` patches it for tracing.
_ENGINE_RUN_BACKWARD = getattr(torch.autograd, "_engine_run_backward", None)
_ENGINE = getattr(torch.autograd.Variable, "_execution_engine", None)
_LOG = getattr(torch.autograd.graph, "log", logging.getLogger("torch.autograd.graph"))
_IS_COMPILING = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
_PLAIN = (Tensor, nn.Parameter)


def grad(
    loss: Tensor, inputs: Sequence[Tensor], create_graph: bool, allow_unused: bool = True
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=allow_unused)``.

    ``torch.autograd.grad`` spends tens of microseconds per call in Python (argument
    normalisation, ``_make_grads``, the context it stashes for compiled backward graphs
    on device threads); an inner step of a small model costs not much more. For the
    inner loop's case this calls the autograd engine directly, exactly as
    ``torch.autograd.grad`` does after its checks: a plain real scalar loss, a list or
    tuple of plain tensors (``Tensor`` or ``Parameter``, no ``__torch_function__``
    mode), everything on the CPU (so no device thread runs a node, unless the forward
    itself moved data to another device), ``allow_unused`` a bool, not while
    ``torch.compile`` traces, autograd debug logging off, and neither
    ``torch.autograd.grad`` nor torch's engine entry point patched (as
    :func:`metann.testing.check_meta_gradient` patches the former). Otherwise it calls
    ``torch.autograd.grad`` with the arguments as given. Results and errors are the
    same either way.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> grad((w**2).sum(), (w,), create_graph=False)
        (tensor([2., 4.]),)
    """
    if (
        type(inputs) in (list, tuple)
        and inputs
        and type(allow_unused) is bool
        and _ENGINE is not None
        and torch.autograd.grad is _TORCH_GRAD
        and getattr(torch.autograd, "_engine_run_backward", None) is _ENGINE_RUN_BACKWARD
        and type(loss) is Tensor
        and loss.is_cpu
        and loss.numel() == 1
        and loss.dtype.is_floating_point
        and all(type(t) in _PLAIN and t.is_cpu for t in inputs)
        and not has_torch_function(inputs)
        and not _IS_COMPILING()
        and not _LOG.isEnabledFor(logging.DEBUG)
    ):
        return _ENGINE.run_backward(
            (loss,),
            (torch.ones_like(loss, memory_format=torch.preserve_format),),
            create_graph,
            create_graph,
            tuple(inputs),
            allow_unused,
            False,
        )
    return torch.autograd.grad(loss, inputs, create_graph=create_graph, allow_unused=allow_unused)
