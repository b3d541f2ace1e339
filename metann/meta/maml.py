"""MAML (second and first order), with the MAML++ and memory options of its inner loop."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Union, cast

import torch
from torch import Tensor, nn

from metann import _autograd
from metann.functional import _check_lr, _has_custom_or_attention, math_attention
from metann.learner import Learner
from metann.meta.batched import batched_query_losses
from metann.meta.compiled import check_not_compiled
from metann.meta.evaluators import (  # noqa: F401 (the regression evaluator is used by the docstring examples)
    default_evaluator_classification,
    default_evaluator_regression,
)
from metann.meta.fastmodel import FastModel, StepwiseFastModel, check_steps
from metann.meta.options import InnerLoopOptions, check_options
from metann.meta.perstep import multi_step_loss_weights, per_step_tables

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


def parameter_slots(model: nn.Module) -> list[tuple[str, dict[str, Any], str]]:
    """``(name, module._parameters, key)`` of every parameter, in ``named_parameters()`` order.

    Reading the slots gives the model's current parameters without walking the module
    tree: a parameter replaced later (``module.weight = nn.Parameter(...)``,
    ``load_state_dict(..., assign=True)``, ``.to()``) is found in its slot. The
    structure itself (which modules hold which parameters) is fixed when the wrapper is
    built, as the stateless copy that runs the model is.
    """
    slots, seen = [], set()
    for prefix, module in model.named_modules():
        for key, param in module._parameters.items():
            if param is not None and id(param) not in seen:  # shared parameters once, as named_parameters()
                seen.add(id(param))
                slots.append((prefix + ("." if prefix else "") + key, module._parameters, key))
    return slots


class MAML(InnerLoopOptions, nn.Module):
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

    **Inner-loop options** (keyword-only; the defaults give plain MAML, at plain MAML's
    speed). They combine freely, are fixed at construction, and :class:`MAMLpp` turns
    the MAML++ ones on with the paper's values:

    - ``multi_step_loss=T`` (MAML++ MSL): for the first ``T`` meta-iterations the
      objective of :meth:`meta_objective` is the weighted sum of the query losses after
      every inner step, with the weights of :func:`~metann.meta.perstep.multi_step_loss_weights`
      (uniform at first, annealed toward the last step); from iteration ``T`` on, the
      plain final query loss. Only :meth:`meta_objective` (which
      :class:`~metann.train.MetaTrainer` calls) sees the query set, so ``maml(support)``
      is unchanged.
    - ``per_step_lr=True`` (MAML++ LSLR): one learnable scalar learning rate per adapted
      parameter tensor and per inner step, initialised to ``lr``, registered as
      ``step_lrs`` (``step_lrs.i`` has shape ``(steps,)`` for the ``i``-th adapted
      parameter) after the model's parameters; ``steps`` is
      ``max(steps_train, steps_eval)``.
    - ``per_step_bn=True`` (MAML++ BNRS + BNWB): every batch-norm layer gets separate
      running statistics and affine parameters for each inner step, held in
      ``bn_tables`` (a :class:`~metann.meta.perstep.PerStepBatchNorm`; row ``k`` serves
      the weights after ``k`` inner steps, so the query forward after the last step has
      its own row). The tables' affine rows are meta-parameters; the inner loop does not
      adapt batch-norm weights and biases (they are left out of ``adapt_names``), and
      the layers' own weight, bias and running statistics are not used.
    - ``first_order_iterations=N`` (MAML++ derivative-order annealing): first order for
      the first ``N`` meta-iterations, second order from iteration ``N`` on.
    - ``checkpoint_steps=True`` (memory): every second-order inner step run by
      :meth:`FastModel.adapt_on` is recomputed during the backward pass instead of
      keeping its activations (``torch.utils.checkpoint``, non-reentrant), so the peak
      memory of the meta-gradient no longer grows with the steps' activations; the
      meta-gradient is the same. A recomputed forward does not update batch-norm running
      statistics a second time. Losses given to :meth:`FastModel.adapt` are not recomputed.
    - ``second_order_steps=k`` (memory, truncated back-propagation): only the last ``k``
      inner steps build a second-order graph; the earlier ones are first order (their
      gradients are constants, the path through the weights themselves is kept), so
      ``k = steps`` is MAML and ``first_order=True`` is the case ``k = 0``.

    The schedules (``multi_step_loss``, ``first_order_iterations``) count meta-iterations
    in :attr:`meta_iteration`, which is saved in ``state_dict()``; advance it once per
    meta-step with :meth:`step_schedule` (or set it with :meth:`set_iteration`).

    ``torch.compile``: a compiled model (``torch.compile(model)``, ``model.compile()`` or
    a compiled ``forward``) is refused unless ``first_order=True``, because second-order
    meta-gradients through compiled code are wrong in torch 2.13; first order is correct.

    Args:
        model: The network to meta-learn.
        steps_train: Inner steps in train mode (0: no adaptation).
        steps_eval: Inner steps in eval mode (default: ``steps_train``).
        lr: Inner learning rate: a number, or a tensor (an ``nn.Parameter`` is meta-learned).
            With ``per_step_lr``, a number: the initial value of the learned rates.
        evaluator: ``evaluator(fast_model, data) -> loss`` used by the inner loop.
        first_order: First-order MAML (no second-order graph in any mode).
        adapt: Which parameters the inner loop updates: names, a submodule, or a
            predicate on names (default: all). Others pass through unchanged.
        optimizer: A differentiable inner optimizer from :mod:`metann.optim`; its own
            ``lr`` is used and its state starts fresh for every adaptation.
        multi_step_loss: Meta-iterations of the annealed multi-step loss (``>= 1``), or
            ``None`` (off).
        per_step_lr: Learn one inner learning rate per parameter tensor and inner step.
        per_step_bn: Per-step batch-norm running statistics and affine parameters.
        first_order_iterations: Meta-iterations of first order before second order (``>= 0``).
        checkpoint_steps: Recompute the second-order inner steps in the backward pass.
        second_order_steps: Build the second-order graph only for this many last inner
            steps (``>= 1``), or ``None`` (all).

    Raises:
        TypeError: For a wrong kind of argument.
        ValueError: For negative step counts, option values out of range, options that
            contradict each other (each message says which), ``per_step_bn`` on a model
            without batch norm, and a compiled model with second order.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 5))
        >>> maml = MAML(net, steps_train=2, lr=0.1)
        >>> support = (torch.randn(5, 10), torch.arange(5))
        >>> query = (torch.randn(10, 10), torch.arange(5).repeat(2))
        >>> loss = default_evaluator_classification(maml(support), query)
        >>> loss.backward()
        >>> net[0].weight.grad.shape
        torch.Size([20, 10])

        Memory controls for a long inner loop (same meta-gradient, smaller peak):

        >>> long = MAML(net, steps_train=20, lr=0.1, checkpoint_steps=True)
        >>> default_evaluator_classification(long(support), query).backward()
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
        *,
        multi_step_loss: int | None = None,
        per_step_lr: bool = False,
        per_step_bn: bool = False,
        first_order_iterations: int = 0,
        checkpoint_steps: bool = False,
        second_order_steps: int | None = None,
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
        options = check_options(
            lr=lr, first_order=first_order, optimizer=optimizer, multi_step_loss=multi_step_loss,
            per_step_lr=per_step_lr, per_step_bn=per_step_bn, first_order_iterations=first_order_iterations,
            checkpoint_steps=checkpoint_steps, second_order_steps=second_order_steps,
        )
        adapt_names = resolve_adapt(model, adapt)
        tables = None
        if options["per_step_bn"]:
            tables, adapt_names = per_step_tables(model, max(steps_train, steps_eval) + 1, adapt_names)
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
        self.__dict__["_param_slots"] = parameter_slots(model)
        self._needs_math_attention = _has_custom_or_attention(model)
        self._math_active = False
        self._set_options(options, tables)

    @property
    def steps(self) -> int:
        """Inner steps for the current mode."""
        return self.steps_train if self.training else self.steps_eval

    @property
    def second_order(self) -> bool:
        """Whether inner steps now build a second-order graph.

        True in train mode, unless ``first_order`` or while the first
        ``first_order_iterations`` meta-iterations last.
        """
        if not self.training or self.first_order:
            return False
        return not self.first_order_iterations or self.meta_iteration >= self.first_order_iterations

    # ------------------------------------------------------------------ schedule
    @property
    def meta_iteration(self) -> int:
        """Meta-iterations completed, as counted by :meth:`step_schedule`.

        Saved in ``state_dict()`` (as ``_meta_iteration``) when a schedule uses it.

        Example:
            >>> MAML(torch.nn.Linear(2, 2)).meta_iteration
            0
        """
        return int(cast(Tensor, self._meta_iteration))

    def step_schedule(self) -> int:
        """Count one completed meta-iteration; call it once after each meta-step. Returns the new count.

        The multi-step loss weights and derivative-order annealing follow this counter.
        :class:`~metann.train.MetaTrainer` calls it; a hand-written meta-training loop
        calls it after ``meta_optimizer.step()``.

        Example:
            >>> maml = MAML(torch.nn.Linear(2, 2), first_order_iterations=1)
            >>> maml.second_order, maml.step_schedule(), maml.second_order
            (False, 1, True)
        """
        cast(Tensor, self._meta_iteration).add_(1)
        return self.meta_iteration

    def set_iteration(self, iteration: int) -> None:
        """Set the count of completed meta-iterations (e.g. when resuming a hand-written loop).

        Raises:
            TypeError: If ``iteration`` is not an int.
            ValueError: If it is negative.

        Example:
            >>> maml = MAML(torch.nn.Linear(2, 2), multi_step_loss=100)
            >>> maml.set_iteration(40)
            >>> maml.meta_iteration
            40
        """
        cast(Tensor, self._meta_iteration).fill_(check_steps(iteration, "iteration"))

    def loss_weights(self) -> list[float] | None:
        """The multi-step loss weights :meth:`meta_objective` uses now, or ``None`` for the plain final query loss.

        ``None`` without ``multi_step_loss``, in eval mode, with no inner steps, and from
        meta-iteration ``multi_step_loss`` on.

        Example:
            >>> maml = MAML(torch.nn.Linear(2, 2), steps_train=2, multi_step_loss=10)
            >>> maml.loss_weights()
            [0.5, 0.5]
        """
        anneal = self.multi_step_loss
        if anneal is None or not self.training or self.steps == 0:
            return None
        iteration = self.meta_iteration
        if iteration >= anneal:
            return None
        return multi_step_loss_weights(self.steps, iteration, anneal)

    # ------------------------------------------------------------------ adaptation
    def _model_params(self) -> dict[str, Tensor]:
        """The model's parameters by name, in ``named_parameters()`` order, read from their slots."""
        return {name: slot[key] for name, slot, key in self.__dict__["_param_slots"]}

    def clone(self) -> FastModel:
        """Return an unadapted :class:`FastModel` for a hand-written inner loop."""
        if self._stepwise:
            return StepwiseFastModel(self, self._model_params())
        return FastModel(self, self._model_params())

    def forward(self, data: Any) -> FastModel:
        """Adapt to ``data`` with the current mode's number of steps and return the :class:`FastModel`."""
        return self.clone().adapt_on(data)

    def meta_objective(self, task: Any) -> tuple[Tensor, Tensor]:
        """This task's contribution to a meta-step: ``(objective, query_loss)``.

        ``objective.backward()`` gives the task's meta-gradient and ``query_loss`` is the
        number to report. For MAML both are the query loss after adapting to the support
        set; with ``multi_step_loss`` (while it lasts) the objective is the weighted sum
        of the query losses after each inner step (weights from :meth:`loss_weights`) and
        the reported number is the last of them. Variants (Reptile) override this, and
        :class:`~metann.train.MetaTrainer` only calls this method.

        Args:
            task: An object with ``support`` and ``query`` pairs (e.g. :class:`~metann.data.Task`).

        Example:
            >>> from types import SimpleNamespace
            >>> net = torch.nn.Linear(3, 1)
            >>> maml = MAML(net, steps_train=3, evaluator=default_evaluator_regression, multi_step_loss=100)
            >>> task = SimpleNamespace(support=(torch.randn(4, 3), torch.randn(4, 1)),
            ...                        query=(torch.randn(4, 3), torch.randn(4, 1)))
            >>> objective, reported = maml.meta_objective(task)
            >>> objective.backward()
        """
        weights = self.loss_weights() if self.multi_step_loss is not None else None
        if weights is None:
            loss = self.evaluator(self(task.support), task.query)
            return loss, loss
        fast = StepwiseFastModel(self, self._model_params())  # the multi-step loss is stepwise
        fast.planned_steps = len(weights)
        losses = []
        with self._math_attention():
            for _ in weights:
                fast.step_on(task.support)
                losses.append(fast.loss_on(task.query))
        objective = torch.stack([w * loss for w, loss in zip(weights, losses)]).sum()
        return objective, losses[-1]

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
                train mode, for second order through a convolution followed by batch
                norm, which ``torch.func.vmap`` gets wrong in torch 2.13 (use the loop or
                ``first_order=True``), and for the per-step and memory options (only
                ``first_order_iterations`` works here; the others need the per-task loop).

        Example:
            >>> net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
            >>> maml = MAML(net, steps_train=2, lr=0.01, evaluator=default_evaluator_regression)
            >>> tasks = [((torch.randn(5, 1), torch.randn(5, 1)), (torch.randn(5, 1), torch.randn(5, 1)))] * 3
            >>> maml.batched(tasks).shape
            torch.Size([3])
        """
        if self._stepwise:
            raise ValueError(
                f"`batched` does not support the inner-loop options {self._stepwise_options()}; use the per-task "
                "loop (`maml.meta_objective(task)` per task, or `MetaTrainer(..., vectorize=False)`)."
            )
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
        grads = _autograd.grad(loss, [params[n] for n in names], self.second_order)
        return self._update(params, names, grads, state, self.inner_rates(names))

    def _update(
        self, params: dict[str, Tensor], names: list[str], grads: Sequence[Tensor | None], state: Any, lr: Any
    ) -> tuple[dict[str, Tensor], Any]:
        """The update rule: the inner optimizer when there is one, else ``p - lr * g`` (one fused op)."""
        new = dict(params)
        if self.optimizer is not None:
            given = {n: g for n, g in zip(names, grads) if g is not None}
            updated, state = self.optimizer.step({n: params[n] for n in given}, given, state)
            new.update(updated)
        elif type(lr) is float or not isinstance(lr, (Tensor, Mapping)):  # a number (the float test is the fast one)
            for n, g in zip(names, grads):
                if g is not None:
                    new[n] = torch.add(params[n], g, alpha=-lr)
        elif isinstance(lr, Tensor):
            for n, g in zip(names, grads):
                if g is not None:
                    new[n] = params[n] - lr * g
        else:
            for n, g in zip(names, grads):
                if g is not None:
                    new[n] = torch.addcmul(params[n], lr[n], g, value=-1)
        return new, state

    def extra_repr(self) -> str:
        order = "first" if self.first_order else "second"
        text = f"steps_train={self.steps_train}, steps_eval={self.steps_eval}, lr={self.lr}, order={order}"
        options = {
            "multi_step_loss": self.multi_step_loss,
            "first_order_iterations": self.first_order_iterations or None,
            "second_order_steps": self.second_order_steps,
            "per_step_lr": self.per_step_lr or None,
            "per_step_bn": self.per_step_bn or None,
            "checkpoint_steps": self.checkpoint_steps or None,
        }
        return text + "".join(f", {k}={v}" for k, v in options.items() if v is not None)
