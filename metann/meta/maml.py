"""MAML, second and first order (its FastModel lives in metann.meta.fastmodel)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Union

import torch
from torch import Tensor, nn

from metann.functional import _check_lr, _has_custom_or_attention, math_attention
from metann.learner import Learner
from metann.meta.batched import batched_query_losses
from metann.meta.compiled import check_not_compiled
from metann.meta.evaluators import (  # noqa: F401 (the regression evaluator is used by the docstring examples)
    default_evaluator_classification,
    default_evaluator_regression,
)
from metann.meta.fastmodel import FastModel, check_steps

__all__ = ["MAML", "FastModel"]  # FastModel lives in metann.meta.fastmodel

AdaptSpec = Union[None, str, nn.Module, Callable[[str], bool], Iterable[str]]


def resolve_adapt(model: nn.Module, adapt: AdaptSpec) -> tuple[str, ...]:
    """Turn an ``adapt`` selection into parameter names, in ``named_parameters()`` order.

    Args:
        model: The model whose parameters are selected.
        adapt: ``None`` (all), a submodule of ``model``, the name of a submodule or of a
            parameter, a predicate on names, or an iterable of parameter names.

    Raises:
        KeyError: Listing names that are not parameters of ``model``.
        ValueError: If the selection matches no parameter or the submodule is not part of ``model``.
        TypeError: If ``adapt`` is of another kind.
    """
    names = [n for n, _ in model.named_parameters()]
    if adapt is None:
        chosen = names
    elif isinstance(adapt, nn.Module):
        prefix = next((p for p, m in model.named_modules() if m is adapt), None)
        if prefix is None:
            raise ValueError(f"`adapt` module `{type(adapt).__name__}` is not a submodule of the model.")
        chosen = [n for n in names if not prefix or n.startswith(prefix + ".")]
    elif isinstance(adapt, str):
        modules = dict(model.named_modules())
        if adapt in names:
            chosen = [adapt]
        elif adapt in modules:
            return resolve_adapt(model, modules[adapt])
        else:
            raise KeyError(f"`adapt` names {adapt!r}, which is neither a parameter nor a submodule of the model.")
    elif callable(adapt):
        chosen = [n for n in names if adapt(n)]
    elif isinstance(adapt, Iterable):
        given = list(adapt)
        unknown = [n for n in given if n not in names]
        if unknown:
            raise KeyError(f"`adapt` names {sorted(map(str, unknown))}, which are not parameters of the model.")
        chosen = [n for n in names if n in set(given)]
    else:
        raise TypeError(
            "`adapt` must be None, a submodule, a name, a predicate on names or an iterable of names; "
            f"got `{type(adapt).__name__}`."
        )
    if not chosen:
        raise ValueError(f"`adapt` selection {adapt!r} matches no parameter of the model.")
    return tuple(chosen)


class MAML(nn.Module):
    """Model-Agnostic Meta-Learning (Finn et al., 2017), second or first order.

    ``maml(data)`` adapts a copy of the model's weights to ``data`` and returns a
    :class:`FastModel`. The meta-parameters are ``maml.parameters()`` (the model's
    parameters first). In train mode, ``steps_train`` inner steps build a second-order
    graph (unless ``first_order``); in eval mode, ``steps_eval`` steps never do.

    Batch norm: every forward (inner steps and query) runs the model's own mode, so in
    train mode batch statistics are used and the running statistics in the model's
    buffers are updated as a normal forward would; in eval mode the running statistics
    are used and not changed. Attention: while a second-order graph is built, models with
    attention (or custom layers) run under the math attention kernel, whose backward is
    differentiable.

    ``torch.compile``: a compiled model (``torch.compile(model)``, ``model.compile()`` or
    a compiled ``forward``) is refused unless ``first_order=True``, because second-order
    meta-gradients through compiled code are wrong in torch 2.13; first order is correct.

    Args:
        model: The network to meta-learn.
        steps_train: Inner steps in train mode (0: no adaptation).
        steps_eval: Inner steps in eval mode (default: ``steps_train``).
        lr: Inner learning rate: a number, or a tensor (an ``nn.Parameter`` is meta-learned).
        evaluator: ``evaluator(fast_model, data) -> loss`` used by the inner loop.
        first_order: First-order MAML (no second-order graph in any mode).
        adapt: Which parameters the inner loop updates: names, a submodule, or a
            predicate on names (default: all). Others pass through unchanged.
        optimizer: A differentiable inner optimizer from :mod:`metann.optim`; its own
            ``lr`` is used and its state starts fresh for every adaptation.

    Raises:
        TypeError: For a wrong kind of argument.
        ValueError: For negative step counts, and a compiled model with second order.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 5))
        >>> maml = MAML(net, steps_train=2, lr=0.1)
        >>> support = (torch.randn(5, 10), torch.arange(5))
        >>> query = (torch.randn(10, 10), torch.arange(5).repeat(2))
        >>> loss = default_evaluator_classification(maml(support), query)
        >>> loss.backward()
        >>> net[0].weight.grad.shape
        torch.Size([20, 10])
    """

    def __init__(
        self,
        model: nn.Module,
        steps_train: int = 1,
        steps_eval: int | None = None,
        lr: float | Tensor | Mapping[str, Tensor] = 0.01,
        evaluator: Callable[[Any, Any], Tensor] = default_evaluator_classification,
        first_order: bool = False,
        adapt: AdaptSpec = None,
        optimizer: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`{type(self).__name__}` expects an `nn.Module` as `model`, got `{type(model).__name__}`.")
        steps_train = check_steps(steps_train, "steps_train")
        steps_eval = steps_train if steps_eval is None else check_steps(steps_eval, "steps_eval")
        if not callable(evaluator):
            raise TypeError(f"`evaluator` must be callable, got `{type(evaluator).__name__}`.")
        if optimizer is not None and not (hasattr(optimizer, "init") and hasattr(optimizer, "step")):
            raise TypeError(
                f"`optimizer` must be an inner optimizer from `metann.optim`, got `{type(optimizer).__name__}`."
            )
        adapt_names = resolve_adapt(model, adapt)
        _check_lr(lr, adapt_names, dict(model.named_parameters()))
        if not first_order:
            check_not_compiled(model, type(self).__name__)
        super().__init__()
        self.model = model
        self.steps_train = steps_train
        self.steps_eval = steps_eval
        self.lr = lr
        self.evaluator = evaluator
        self.first_order = bool(first_order)
        self.optimizer = optimizer
        self.adapt_names = adapt_names
        self.__dict__["_learner"] = Learner(model)
        self._needs_math_attention = _has_custom_or_attention(model)
        self._math_active = False

    @property
    def steps(self) -> int:
        """Inner steps for the current mode."""
        return self.steps_train if self.training else self.steps_eval

    @property
    def second_order(self) -> bool:
        """Whether inner steps now build a second-order graph (train mode and not first order)."""
        return self.training and not self.first_order

    def clone(self) -> FastModel:
        """Return an unadapted :class:`FastModel` for a hand-written inner loop."""
        return FastModel(self, dict(self.model.named_parameters()))

    def forward(self, data: Any) -> FastModel:
        """Adapt to ``data`` with the current mode's number of steps and return the :class:`FastModel`."""
        return self.clone().adapt_on(data)

    def meta_objective(self, task: Any) -> tuple[Tensor, Tensor]:
        """This task's contribution to a meta-step: ``(objective, query_loss)``.

        ``objective.backward()`` gives the task's meta-gradient and ``query_loss`` is the
        number to report. For MAML both are the query loss after adapting to the support
        set; variants (multi-step losses, Reptile) override this, and
        :class:`~metann.train.MetaTrainer` only calls this method.

        Args:
            task: An object with ``support`` and ``query`` pairs (e.g. :class:`~metann.data.Task`).
        """
        loss = self.evaluator(self(task.support), task.query)
        return loss, loss

    def batched(self, tasks: Any) -> Tensor:
        """Adapt to a whole meta-batch in one vectorised call and return the per-task query losses.

        All tasks' inner loops run at once under ``torch.func.vmap`` (gradients from
        ``torch.func.grad``), through the same engine as the loop; the returned losses
        (shape ``(num_tasks,)``) give the loop's meta-gradient, e.g.
        ``maml.batched(tasks).mean().backward()``. It supports every order, MetaSGD,
        ANIL and the :mod:`metann.optim` inner optimizers.

        When to use it: many tasks on a small model (sine-wave MLPs: several times
        faster than the loop). On large models the loop is as fast and needs less
        memory. Tasks must share their shapes.

        Args:
            tasks: A list of tasks (with ``support``/``query`` pairs) or the stacked
                tensors ``(support_x, support_y, query_x, query_y)``.

        Returns:
            The query losses after adaptation, one per task.

        Raises:
            ValueError: For ragged tasks, for batch norm tracking running statistics in
                train mode, and for second order through a convolution followed by batch
                norm, which ``torch.func.vmap`` gets wrong in torch 2.13 (use the loop or
                ``first_order=True``).

        Example:
            >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
            >>> maml = MAML(net, steps_train=2, lr=0.01, evaluator=default_evaluator_regression)
            >>> tasks = [((torch.randn(5, 1), torch.randn(5, 1)), (torch.randn(5, 1), torch.randn(5, 1)))] * 3
            >>> maml.batched(tasks).shape
            torch.Size([3])
        """
        return batched_query_losses(self, tasks)

    @contextlib.contextmanager
    def _math_attention(self) -> Iterator[None]:
        """Run under the math attention kernel while a second-order graph of an attention model is built."""
        if not (self._needs_math_attention and self.second_order) or self._math_active:
            yield
            return
        self._math_active = True
        try:
            with math_attention():
                yield
        finally:
            self._math_active = False

    def inner_rates(self, names: list[str]) -> float | Tensor | Mapping[str, Tensor]:
        """The inner learning rate(s) used for ``names`` (overridden by learnable-rate variants)."""
        return self.lr

    def _step(
        self, params: dict[str, Tensor], names: list[str], loss: Tensor, state: Any, step: int
    ) -> tuple[dict[str, Tensor], Any]:
        """One inner step: gradients of ``loss`` for ``names``, then the update rule."""
        grads = torch.autograd.grad(
            loss, [params[n] for n in names], create_graph=self.second_order, allow_unused=True
        )
        new = dict(params)
        if self.optimizer is not None:
            given = {n: g for n, g in zip(names, grads) if g is not None}
            updated, state = self.optimizer.step({n: params[n] for n in given}, given, state)
            new.update(updated)
            return new, state
        lr = self.inner_rates(names)
        if isinstance(lr, Mapping):
            for n, g in zip(names, grads):
                if g is not None:
                    new[n] = torch.addcmul(params[n], lr[n], g, value=-1)
        elif isinstance(lr, Tensor):
            for n, g in zip(names, grads):
                if g is not None:
                    new[n] = params[n] - lr * g
        else:
            for n, g in zip(names, grads):
                if g is not None:
                    new[n] = torch.add(params[n], g, alpha=-lr)
        return new, state

    def extra_repr(self) -> str:
        order = "first" if self.first_order else "second"
        return f"steps_train={self.steps_train}, steps_eval={self.steps_eval}, lr={self.lr}, order={order}"

