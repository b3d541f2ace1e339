"""MetaSGD: MAML with learnable per-parameter inner learning rates."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from metann.meta.evaluators import default_evaluator_classification
from metann.meta.maml import MAML, AdaptSpec

__all__ = ["MetaSGD"]


class MetaSGD(MAML):
    r"""Meta-SGD (Li et al., 2017): the inner step is :math:`\theta - \alpha \odot \nabla L`, with :math:`\alpha` learned.

    One learning-rate tensor per adapted parameter, shaped like it and initialised to
    ``lr``, is registered in ``lrs`` (an ``nn.ParameterList``), so ``parameters()``
    yields the model's parameters and then the rates, in ``named_parameters()`` order,
    and the meta-optimizer trains both.

    Args:
        model: The network to meta-learn.
        steps_train: Inner steps in train mode.
        steps_eval: Inner steps in eval mode (default: ``steps_train``).
        lr: Initial value of every learning rate.
        evaluator: ``evaluator(fast_model, data) -> loss`` used by the inner loop.
        first_order: Do not build the second-order graph (the rates still get gradients).
        adapt: Which parameters adapt (and get a rate); see :class:`MAML`.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> metasgd = MetaSGD(net, lr=0.05)
        >>> [name for name, _ in metasgd.named_parameters()]
        ['model.weight', 'model.bias', 'lrs.0', 'lrs.1']
    """

    def __init__(
        self,
        model: nn.Module,
        steps_train: int = 1,
        steps_eval: int | None = None,
        lr: float = 0.01,
        evaluator: Callable[[Any, Any], Tensor] = default_evaluator_classification,
        first_order: bool = False,
        adapt: AdaptSpec = None,
    ) -> None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)):
            raise TypeError(f"`MetaSGD` needs a number as the initial `lr`, got `{type(lr).__name__}`.")
        super().__init__(model, steps_train, steps_eval, float(lr), evaluator, first_order, adapt)
        params = dict(model.named_parameters())
        self.lrs = nn.ParameterList(
            [nn.Parameter(torch.full_like(params[n].detach(), float(lr))) for n in self.adapt_names]
        )

    def inner_rates(self, names: list[str]) -> dict[str, Tensor]:
        """The learnable rates keyed by parameter name."""
        return dict(zip(self.adapt_names, self.lrs))

    def extra_repr(self) -> str:
        return super().extra_repr().replace("lr=", "initial lr=")
