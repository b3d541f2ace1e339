"""FastModel, the adapted model that MAML and its relatives return."""
from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from metann.meta.maml import MAML

__all__ = ["FastModel"]


def check_steps(value: Any, name: str) -> int:
    """Validate an inner-loop step count: an int >= 0.

    Example:
        >>> from metann.meta.fastmodel import check_steps
        >>> check_steps(3, "steps_train")
        3
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got `{type(value).__name__}`.")
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}.")
    return int(value)


class FastModel:
    """A model with fast (adapted) weights, returned by :class:`MAML` and its relatives.

    Call it like the model (``fast(x)``); ``fast.params`` maps every parameter name (in
    ``named_parameters()`` order) to its current tensor, which stays on the autograd
    graph of the meta-parameters, so a loss computed with ``fast`` back-propagates into
    them. The wrapper's train/eval mode at call time decides the mode of the forward
    and whether inner steps build a second-order graph.

    Example:
        >>> net = torch.nn.Linear(3, 2)
        >>> maml = MAML(net, lr=0.1)
        >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
        >>> fast = maml.clone()
        >>> fast = fast.adapt(torch.nn.functional.cross_entropy(fast(x), y))
        >>> sorted(fast.params)
        ['bias', 'weight']
    """

    def __init__(self, wrapper: MAML, params: dict[str, Tensor]) -> None:
        self._wrapper = wrapper
        self.params = params
        self.steps_taken = 0
        self._names = [n for n in wrapper.adapt_names if params[n].requires_grad]
        self._state = wrapper.optimizer.init({n: params[n] for n in self._names}) if wrapper.optimizer else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        wrapper = self._wrapper
        learner = wrapper.__dict__["_learner"]
        if wrapper._needs_math_attention and wrapper.second_order and not wrapper._math_active:
            with wrapper._math_attention():
                return learner.functional(list(self.params.values()), wrapper.training, *args, **kwargs)
        return learner.functional(list(self.params.values()), wrapper.training, *args, **kwargs)

    def adapt(self, loss: Tensor) -> FastModel:
        """Take one differentiable inner step on ``loss`` (computed with this model); returns ``self``."""
        self.params, self._state = self._wrapper._step(self.params, self._names, loss, self._state, self.steps_taken)
        self.steps_taken += 1
        return self

    def adapt_on(self, data: Any, steps: int | None = None) -> FastModel:
        """Take ``steps`` inner steps on ``data`` with the wrapper's evaluator; returns ``self``.

        Args:
            data: Support data for the evaluator, e.g. ``(x, y)``.
            steps: Number of steps; ``None`` uses the wrapper's count for its current
                mode (``steps_train`` in train mode, ``steps_eval`` in eval mode).
        """
        wrapper = self._wrapper
        steps = wrapper.steps if steps is None else check_steps(steps, "steps")
        evaluator = wrapper.evaluator
        with wrapper._math_attention():
            for _ in range(steps):
                self.adapt(evaluator(self, data))
        return self

    def __repr__(self) -> str:
        return f"FastModel({type(self._wrapper).__name__}, steps_taken={self.steps_taken}, params={list(self.params)})"
