"""MetaSGD: MAML with learnable per-parameter inner learning rates."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from metann.meta.evaluators import default_evaluator_classification
from metann.meta.maml import MAML, AdaptSpec
from metann.meta.perstep import per_step_rates

__all__ = ["MetaSGD"]


class MetaSGD(MAML):
    r"""Meta-SGD (Li et al., 2017): the inner step is :math:`\theta - \alpha \odot \nabla L`, :math:`\alpha` learned.

    One learning-rate tensor per adapted parameter, shaped like it and initialised to
    ``lr``, is registered in ``lrs`` (an ``nn.ParameterList``), so ``parameters()``
    yields the model's parameters and then the rates, in ``named_parameters()`` order,
    and the meta-optimizer trains both.

    The inner-loop options of :class:`MAML` apply. With ``per_step_lr=True`` each rate
    tensor gets a leading step dimension (``lrs.i`` has shape ``(steps, *shape)``, with
    ``steps = max(steps_train, steps_eval)``): a separate Meta-SGD rate for every inner step.

    Args:
        model: The network to meta-learn.
        steps_train: Inner steps in train mode.
        steps_eval: Inner steps in eval mode (default: ``steps_train``).
        lr: Initial value of every learning rate.
        evaluator: ``evaluator(fast_model, data) -> loss`` used by the inner loop.
        first_order: Do not build the second-order graph (the rates still get gradients).
        adapt: Which parameters adapt (and get a rate); see :class:`MAML`.
        **options: The keyword-only inner-loop options of :class:`MAML`
            (``multi_step_loss``, ``per_step_lr``, ``per_step_bn``, ``first_order_iterations``,
            ``checkpoint_steps``, ``second_order_steps``).

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> metasgd = MetaSGD(net, lr=0.05)
        >>> [name for name, _ in metasgd.named_parameters()]
        ['model.weight', 'model.bias', 'lrs.0', 'lrs.1']
        >>> MetaSGD(net, steps_train=3, lr=0.05, per_step_lr=True).lrs[0].shape
        torch.Size([3, 1, 2])
    """

    _step_rates_attr = "lrs"

    def __init__(
        self,
        model: nn.Module,
        steps_train: int = 1,
        steps_eval: int | None = None,
        lr: float = 0.01,
        evaluator: Callable[[Any, Any], Tensor] = default_evaluator_classification,
        first_order: bool = False,
        adapt: AdaptSpec = None,
        **options: Any,
    ) -> None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)):
            raise TypeError(f"`MetaSGD` needs a number as the initial `lr`, got `{type(lr).__name__}`.")
        if "optimizer" in options:
            raise TypeError("`MetaSGD` learns its own inner update and takes no `optimizer`.")
        super().__init__(model, steps_train, steps_eval, float(lr), evaluator, first_order, adapt, **options)
        if not self.per_step_lr:  # with per_step_lr, MAML.__init__ registered `lrs` through `_make_step_rates`
            params = dict(model.named_parameters())
            self.lrs = nn.ParameterList(
                [nn.Parameter(torch.full_like(params[n].detach(), float(lr))) for n in self.adapt_names]
            )

    def _make_step_rates(self, count: int, lr: float) -> nn.ParameterList:
        """One rate tensor per adapted parameter and step: shape ``(count, *parameter.shape)``."""
        params = dict(self.model.named_parameters())
        like = [params[n] for n in self.adapt_names]
        return per_step_rates([tuple(p.shape) for p in like], count, lr, like)

    def inner_rates(self, names: list[str]) -> dict[str, Tensor]:
        """The learnable rates keyed by parameter name."""
        return dict(zip(self.adapt_names, self.lrs))

    def extra_repr(self) -> str:
        return super().extra_repr().replace("lr=", "initial lr=", 1)
