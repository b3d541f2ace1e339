"""Pure functions over parameter mappings: stateless forward passes and differentiable inner steps."""
from __future__ import annotations

import contextlib
import numbers
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Union

import torch
from torch import Tensor, nn

from metann import _autograd
from metann.dependent import DependentModule
from metann.learner import share_buffers

__all__ = [
    "adapt",
    "functional_forward",
    "inner_step",
    "math_attention",
    "named_buffers",
    "named_params",
]

LearningRate = Union[float, Tensor, Mapping[str, Tensor]]

# Stateless copies made by `functional_forward`, one per model, dropped with the model.
# A copy shares the model's buffer dictionaries but holds no reference to the model.
_STATELESS: weakref.WeakKeyDictionary[nn.Module, DependentModule] = weakref.WeakKeyDictionary()


def named_params(model: nn.Module) -> dict[str, Tensor]:
    """Return ``model``'s parameters as a dict keyed by ``named_parameters()`` names.

    Example:
        >>> list(named_params(torch.nn.Linear(2, 1)))
        ['weight', 'bias']
    """
    return dict(model.named_parameters())


def named_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Return ``model``'s buffers as a dict keyed by ``named_buffers()`` names.

    Example:
        >>> list(named_buffers(torch.nn.BatchNorm1d(3)))
        ['running_mean', 'running_var', 'num_batches_tracked']
    """
    return dict(model.named_buffers())


def _stateless_of(model: nn.Module) -> DependentModule:
    stateless = _STATELESS.get(model)
    if stateless is None:
        stateless = DependentModule.stateless(model)
        share_buffers(model, stateless)
        _STATELESS[model] = stateless
    return stateless


@contextlib.contextmanager
def _swapped_buffers(model: nn.Module, buffers: Mapping[str, Tensor]) -> Iterator[None]:
    """Temporarily put ``buffers`` into ``model``'s buffer dictionaries (shared with its copies)."""
    owners = {}
    for name in buffers:
        prefix, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(prefix)
        except AttributeError as err:
            raise KeyError(f"`buffers` names {name!r}, which is not a buffer of `{type(model).__name__}`.") from err
        if attr not in module._buffers:
            raise KeyError(f"`buffers` names {name!r}, which is not a buffer of `{type(model).__name__}`.")
        owners[name] = (module._buffers, attr, module._buffers[attr])
    try:
        for name, (store, attr, _) in owners.items():
            store[attr] = buffers[name]
        yield
    finally:
        for store, attr, old in owners.values():
            store[attr] = old


def functional_forward(
    model: nn.Module,
    params: Mapping[str, Tensor],
    *args: Any,
    buffers: Mapping[str, Tensor] | None = None,
    **kwargs: Any,
) -> Any:
    """Run ``model``'s forward with ``params`` in place of its parameters.

    Parameters missing from ``params`` keep the model's own values (as with
    ``torch.func.functional_call``). The model's train/eval mode is used. The model
    itself is not modified; a stateless copy of it is made once and cached (change the
    model's structure and the cache follows only for a new model object).

    Args:
        model: The module to run.
        params: Tensors keyed by ``named_parameters()`` names.
        *args: Positional inputs of the forward.
        buffers: Optional tensors to use in place of buffers for this call.
        **kwargs: Keyword inputs of the forward.

    Returns:
        The forward's output, differentiable with respect to ``params``.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> params = {n: p * 0 for n, p in net.named_parameters()}
        >>> functional_forward(net, params, torch.ones(3, 2))
        tensor([[0.],
                [0.],
                [0.]], grad_fn=<AddmmBackward0>)
    """
    stateless = _stateless_of(model)
    plan = stateless._plan()
    if len(params) != len(plan.entries):
        params = {**named_params(model), **params}
    stateless.substitute(params)
    if stateless.training != model.training:
        stateless.train(model.training)
    try:
        if buffers:
            with _swapped_buffers(model, buffers):
                return stateless(*args, **kwargs)
        return stateless(*args, **kwargs)
    finally:
        stateless._release()


def _check_lr(lr: Any, names: Iterable[str], params: Mapping[str, Tensor]) -> None:
    if isinstance(lr, Mapping):
        missing = [n for n in names if n not in lr]
        if missing:
            raise KeyError(f"per-parameter `lr` has no rate for {sorted(missing)}.")
        for n in names:
            rate = lr[n]
            if not isinstance(rate, Tensor):
                raise TypeError(f"per-parameter `lr[{n!r}]` must be a Tensor, got `{type(rate).__name__}`.")
            try:
                fits = torch.broadcast_shapes(rate.shape, params[n].shape) == params[n].shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(
                    f"per-parameter `lr[{n!r}]` has shape {tuple(rate.shape)}, which does not broadcast to "
                    f"the parameter's shape {tuple(params[n].shape)}."
                )
    elif not isinstance(lr, (numbers.Real, Tensor)) or isinstance(lr, bool):
        raise TypeError(
            f"`lr` must be a number, a Tensor or a mapping name -> Tensor, got `{type(lr).__name__}`."
        )


def inner_step(
    params: Mapping[str, Tensor],
    loss: Tensor,
    lr: LearningRate,
    *,
    first_order: bool = False,
    adapt_names: Iterable[str] | None = None,
    allow_unused: bool = True,
) -> dict[str, Tensor]:
    r"""Take one differentiable gradient step :math:`\theta' = \theta - \alpha \nabla_\theta L`.

    Args:
        params: Current tensors, keyed by name.
        loss: Scalar loss computed from ``params``.
        lr: A number, a tensor (learnable, stays on the graph) or a mapping
            name -> tensor of per-parameter rates broadcastable to each parameter.
        first_order: Do not build the graph of the gradient (first-order MAML).
        adapt_names: Names to update (default: all); the others pass through.
        allow_unused: Pass through parameters the loss does not depend on; with
            ``False`` such a parameter raises.

    Returns:
        New tensors with exactly the keys (and order) of ``params``.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> new = inner_step({"w": w}, (w ** 2).sum(), lr=0.25)
        >>> new["w"]
        tensor([0.5000, 1.0000], grad_fn=<SubBackward0>)
    """
    names = [n for n in (params if adapt_names is None else adapt_names) if params[n].requires_grad]
    _check_lr(lr, names, params)
    grads = _autograd.grad(loss, [params[n] for n in names], not first_order, allow_unused)
    new = dict(params)
    for n, g in zip(names, grads):
        if g is None:
            continue
        rate = lr[n] if isinstance(lr, Mapping) else lr
        new[n] = params[n] - rate * g
    return new


def adapt(
    model: nn.Module,
    params: Mapping[str, Tensor],
    build_loss: Callable[[Mapping[str, Tensor]], Tensor],
    *,
    lr: LearningRate = 0.01,
    inner_steps: int = 1,
    first_order: bool = False,
    adapt_names: Iterable[str] | None = None,
    allow_unused: bool = True,
) -> dict[str, Tensor]:
    """Run the whole inner loop: ``inner_steps`` calls of :func:`inner_step`.

    When a second-order graph is built, the loop runs under the math attention kernel
    (see :func:`math_attention`), so attention models get a differentiable backward.

    Args:
        model: The model (used to decide the attention kernel).
        params: Starting tensors keyed by name (e.g. ``named_params(model)``).
        build_loss: ``build_loss(params) -> scalar`` loss, typically through
            :func:`functional_forward`.
        lr: As in :func:`inner_step`.
        inner_steps: Number of steps; 0 returns ``params`` unchanged.
        first_order: As in :func:`inner_step`.
        adapt_names: As in :func:`inner_step`.
        allow_unused: As in :func:`inner_step`.

    Returns:
        The adapted tensors.

    Raises:
        ValueError: If ``inner_steps`` is negative.

    Example:
        >>> net = torch.nn.Linear(1, 1)
        >>> x, y = torch.randn(8, 1), torch.randn(8, 1)
        >>> loss = lambda p: ((functional_forward(net, p, x) - y) ** 2).mean()
        >>> fast = adapt(net, named_params(net), loss, lr=0.1, inner_steps=3)
        >>> bool(loss(fast) < loss(named_params(net)))
        True
    """
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int):
        raise TypeError(f"`inner_steps` must be an int, got `{type(inner_steps).__name__}`.")
    if inner_steps < 0:
        raise ValueError(f"`inner_steps` must be >= 0, got {inner_steps}.")
    params = dict(params)
    context = math_attention(model) if not first_order else contextlib.nullcontext()
    with context:
        for _ in range(inner_steps):
            params = inner_step(
                params,
                build_loss(params),
                lr,
                first_order=first_order,
                adapt_names=adapt_names,
                allow_unused=allow_unused,
            )
    return params


def _original_type(module: nn.Module) -> type:
    cls = type(module)
    return cls.__dict__.get("_original_class") or cls


def _has_custom_or_attention(model: nn.Module) -> bool:
    for m in model.modules():
        cls = _original_type(m)
        if issubclass(cls, nn.MultiheadAttention) or not cls.__module__.startswith("torch."):
            return True
    return False


def math_attention(model: nn.Module | None = None) -> contextlib.AbstractContextManager:
    """A context that selects the math kernel of scaled-dot-product attention.

    PyTorch's fused CPU attention kernel has no double backward ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented",
    torch 2.13), so second-order meta-gradients through ``nn.MultiheadAttention`` or
    ``nn.TransformerEncoderLayer`` need the math kernel while the inner loop runs.
    Given a ``model`` made only of torch layers without attention, this returns a
    no-op context (entering the kernel context costs about 18 µs).

    Args:
        model: The model to inspect, or ``None`` to always select the math kernel.

    Example:
        >>> with math_attention():
        ...     pass
    """
    if model is not None and not _has_custom_or_attention(model):
        return contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False)
    return sdpa_kernel(SDPBackend.MATH)
