"""ANIL: almost no inner loop, only the head adapts."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from metann.meta.evaluators import default_evaluator_classification
from metann.meta.maml import MAML

__all__ = ["ANIL"]


class ANIL(MAML):
    """ANIL (Raghu et al., 2020): MAML whose inner loop adapts only the head.

    The body's parameters pass through the inner loop unchanged and are trained by
    the outer loop only; the head's parameters adapt as in :class:`MAML`.

    Args:
        model: The whole network (body and head).
        head: The head: a submodule of ``model`` or its name (``"classifier"``, ``"2"``).
        steps_train: Inner steps in train mode.
        steps_eval: Inner steps in eval mode (default: ``steps_train``).
        lr: Inner learning rate.
        evaluator: ``evaluator(fast_model, data) -> loss``.
        first_order: First-order variant.
        optimizer: Optional differentiable inner optimizer from :mod:`metann.optim`.

    Raises:
        ValueError: If ``head`` is not part of ``model``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> anil = ANIL(net, head=net[2], lr=0.1)
        >>> anil.adapt_names
        ('2.weight', '2.bias')
    """

    def __init__(
        self,
        model: nn.Module,
        head: nn.Module | str,
        steps_train: int = 1,
        steps_eval: int | None = None,
        lr: float | Tensor = 0.01,
        evaluator: Callable[[Any, Any], Tensor] = default_evaluator_classification,
        first_order: bool = False,
        optimizer: Any = None,
    ) -> None:
        if isinstance(head, str):
            modules = dict(model.named_modules()) if isinstance(model, nn.Module) else {}
            if head not in modules or not head:
                raise ValueError(f"`head` {head!r} is not the name of a submodule of the model.")
            head = modules[head]
        elif not isinstance(head, nn.Module):
            raise TypeError(f"`head` must be a submodule or its name, got `{type(head).__name__}`.")
        if isinstance(model, nn.Module) and not any(m is head for m in model.modules()):
            raise ValueError(f"`head` `{type(head).__name__}` is not part of the model.")
        super().__init__(model, steps_train, steps_eval, lr, evaluator, first_order, adapt=head, optimizer=optimizer)
