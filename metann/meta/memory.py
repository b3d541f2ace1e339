"""Memory controls for long inner loops: what recomputing inner steps in the backward pass must keep intact.

The options themselves are arguments of :class:`~metann.meta.MAML` and
:class:`~metann.meta.MetaSGD`: ``checkpoint_steps=True`` recomputes every
second-order inner step during the backward pass (activation checkpointing with
``torch.utils.checkpoint``, non-reentrant) and ``second_order_steps=k`` builds the
second-order graph only for the last ``k`` inner steps.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

__all__ = ["frozen_running_stats"]

_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Give every normalisation layer of ``model`` copies of its running statistics while the context is open.

    A forward recomputed during the backward pass (activation checkpointing) must not
    update batch-norm running statistics a second time; inside this context the
    updates land on copies that are dropped at exit, and the layers get their own
    buffers back (also when the body raises).

    Args:
        model: Any module; its batch-norm and instance-norm layers are affected.

    Example:
        >>> from metann.meta.memory import frozen_running_stats
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> with frozen_running_stats(bn):
        ...     _ = bn(torch.randn(4, 2))
        >>> int(bn.num_batches_tracked)
        0
    """
    saved = []
    try:
        for module in model.modules():
            if not isinstance(module, nn.modules.batchnorm._NormBase):
                continue
            for name in _STATISTICS:
                value = getattr(module, name, None)
                if isinstance(value, Tensor):
                    saved.append((module, name, value))
                    setattr(module, name, value.clone())
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)
