"""FastModel, the adapted model that MAML and its relatives return, and its variant for the inner-loop options."""
from __future__ import annotations

import contextlib
import numbers
from typing import TYPE_CHECKING, Any

from torch import Tensor
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from metann.meta.maml import MAML

__all__ = ["FastModel", "StepwiseFastModel"]

_NO_CONTEXT = contextlib.nullcontext()  # reusable; entered when no attention kernel needs choosing


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
        with wrapper._math_attention() if wrapper._needs_math_attention else _NO_CONTEXT:
            for _ in range(steps):
                self.adapt(evaluator(self, data))
        return self

    def __repr__(self) -> str:
        return f"FastModel({type(self._wrapper).__name__}, steps_taken={self.steps_taken}, params={list(self.params)})"


class StepwiseFastModel(FastModel):
    """The :class:`FastModel` of a wrapper with inner-loop options (MAML++ pieces, memory controls).

    It behaves like :class:`FastModel`, and also knows which inner step it is at
    (``steps_taken``), which selects the per-step learning rates and batch-norm
    tables, and how many steps the current adaptation plans (``planned_steps``), from
    which truncated back-propagation counts its last steps. The plain :class:`FastModel`
    keeps the hot path of the plain algorithms free of this bookkeeping.

    Example:
        >>> net = torch.nn.Linear(3, 1)
        >>> maml = MAML(net, steps_train=2, per_step_lr=True, evaluator=default_evaluator_regression)
        >>> support = (torch.randn(4, 3), torch.randn(4, 1))
        >>> fast = maml.clone()  # a StepwiseFastModel: an option changes the inner loop
        >>> query_losses = [fast.step_on(support).loss_on(support) for _ in range(2)]
        >>> fast.steps_taken, len(query_losses)
        (2, 2)
    """

    def __init__(self, wrapper: MAML, params: dict[str, Tensor], *, training: bool | None = None) -> None:
        super().__init__(wrapper, params)
        self.planned_steps = wrapper.steps
        self._training = training  # fixed mode of a recomputation view; None: the wrapper's mode

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        wrapper = self._wrapper
        training = wrapper.training if self._training is None else self._training
        return wrapper._options_forward(self.params, self.steps_taken, training, args, kwargs)

    def adapt(self, loss: Tensor) -> StepwiseFastModel:
        """Take one differentiable inner step on ``loss`` (computed with this model); returns ``self``.

        The step uses this step's learning rates, and builds a second-order graph when
        the wrapper's order schedule and truncation allow it. A loss given here was
        computed outside, so it is never recomputed: use :meth:`adapt_on` for
        checkpointed steps.
        """
        wrapper = self._wrapper
        step = self.steps_taken
        create_graph = wrapper._create_graph(step, self.planned_steps)
        self.params, self._state = wrapper._step_options(
            self.params, self._names, loss, self._state, step, create_graph
        )
        self.steps_taken += 1
        return self

    def adapt_on(self, data: Any, steps: int | None = None) -> StepwiseFastModel:
        """Take ``steps`` inner steps on ``data`` with the wrapper's evaluator; returns ``self``.

        Args:
            data: Support data for the evaluator, e.g. ``(x, y)``.
            steps: Number of steps; ``None`` uses the wrapper's count for its current
                mode. Truncated back-propagation counts its last steps from the end of
                this call.
        """
        wrapper = self._wrapper
        steps = wrapper.steps if steps is None else check_steps(steps, "steps")
        self.planned_steps = self.steps_taken + steps
        with wrapper._math_attention():
            for _ in range(steps):
                self.step_on(data)
        return self

    def step_on(self, data: Any) -> StepwiseFastModel:
        """One inner step on ``data``: recomputed in the backward pass when the wrapper checkpoints steps."""
        wrapper = self._wrapper
        step = self.steps_taken
        if not (wrapper.checkpoint_steps and wrapper._create_graph(step, self.planned_steps)):
            return self.adapt(wrapper.evaluator(self, data))
        base, names, training = self.params, self._names, wrapper.training

        def run(adapted: dict[str, Tensor], state: Any) -> tuple[dict[str, Tensor], Any]:
            params = {**base, **adapted}
            loss = wrapper.evaluator(self.view(params, step, training), data)
            new, state = wrapper._step_options(params, names, loss, state, step, True)
            return {n: new[n] for n in names}, state

        adapted, self._state = checkpoint(
            run, {n: base[n] for n in names}, self._state, use_reentrant=False, context_fn=wrapper._recompute_contexts
        )
        self.params = {**base, **adapted}
        self.steps_taken += 1
        return self

    def loss_on(self, data: Any) -> Tensor:
        """The evaluator's loss on ``data`` now (the query loss of a multi-step loss).

        With checkpointed steps the forward is recomputed in the backward pass instead
        of keeping its activations.
        """
        wrapper = self._wrapper
        if not (wrapper.checkpoint_steps and wrapper.second_order):
            return wrapper.evaluator(self, data)
        view = self.view(self.params, self.steps_taken, wrapper.training)
        return checkpoint(wrapper.evaluator, view, data, use_reentrant=False, context_fn=wrapper._recompute_contexts)

    def view(self, params: dict[str, Tensor], step: int, training: bool) -> StepwiseFastModel:
        """A model with ``params`` at inner step ``step``, in a fixed mode (for recomputation)."""
        view = StepwiseFastModel.__new__(StepwiseFastModel)
        view._wrapper = self._wrapper
        view.params = params
        view.steps_taken = step
        view.planned_steps = self.planned_steps
        view._names = self._names
        view._state = None
        view._training = training
        return view
