"""Default losses of a (fast) model on a batch ``data = (x, y)``."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["default_evaluator_classification", "default_evaluator_regression"]


def _unpack(data: Any, who: str) -> tuple[Any, Tensor]:
    try:
        x, y = data
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{who}` expects `data` as a pair `(x, y)`, got `{type(data).__name__}`.") from err
    return x, y


def default_evaluator_classification(
    model: Callable[..., Tensor], data: Any, criterion: Callable[[Tensor, Tensor], Tensor] = nn.CrossEntropyLoss()
) -> Tensor:
    """Cross-entropy of ``model(x)`` against integer labels ``y``.

    Args:
        model: A module or a :class:`~metann.meta.FastModel`.
        data: A pair ``(x, y)``.
        criterion: The loss, ``criterion(logits, y)``.

    Returns:
        The scalar loss.

    Example:
        >>> net = torch.nn.Linear(4, 3)
        >>> loss = default_evaluator_classification(net, (torch.randn(6, 4), torch.arange(6) % 3))
        >>> loss.shape
        torch.Size([])
    """
    x, y = _unpack(data, "default_evaluator_classification")
    return criterion(model(x), y)


def default_evaluator_regression(model: Callable[..., Tensor], data: Any) -> Tensor:
    """Mean squared error of ``model(x)`` against ``y``.

    Example:
        >>> net = torch.nn.Linear(1, 1)
        >>> default_evaluator_regression(net, (torch.zeros(5, 1), net.bias.detach().expand(5, 1))).item()
        0.0
    """
    x, y = _unpack(data, "default_evaluator_regression")
    return F.mse_loss(model(x), y)
