"""Whole meta-batches in one vectorised call: every task's inner loop at once with ``torch.func.vmap``."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from metann.meta.maml import MAML

__all__ = ["batched_query_losses", "check_vectorizable", "stack_tasks"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_CONVS = (nn.modules.conv._ConvNd,)


def stack_tasks(tasks: Sequence[Any] | tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stack tasks into ``(support_x, support_y, query_x, query_y)``, each with a leading task dimension.

    Args:
        tasks: A list of tasks (objects with ``support`` and ``query`` pairs, or
            ``((sx, sy), (qx, qy))`` tuples) of equal shapes, or already stacked tensors.

    Raises:
        ValueError: If the list is empty or the tasks' shapes differ.
    """
    if isinstance(tasks, tuple) and len(tasks) == 4 and all(isinstance(t, Tensor) for t in tasks):
        return tasks
    if len(tasks) == 0:
        raise ValueError("`tasks` is empty; give at least one task.")
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for task in tasks:
        support, query = (task.support, task.query) if hasattr(task, "support") else task
        parts.append((*support, *query))
    shapes = {tuple(tuple(t.shape) for t in p) for p in parts}
    if len(shapes) != 1:
        raise ValueError(
            f"vectorised tasks must share their shapes; got {len(shapes)} different shape sets, e.g. "
            f"{sorted(shapes)[:2]}. Use the loop (`maml(task.support)` per task) for ragged tasks."
        )
    return tuple(torch.stack(column) for column in zip(*parts))  # type: ignore[return-value]


def check_vectorizable(model: nn.Module, *, training: bool, second_order: bool) -> None:
    """Refuse models that ``torch.func.vmap`` handles wrongly or not at all, naming the module.

    Raises:
        ValueError: For batch/instance norm tracking running statistics in train mode
            (vmap cannot update one buffer from many tasks), and for second order
            through a convolution followed by batch norm (torch 2.13's vmap gives a
            wrong meta-gradient there: relative error 5e-3 after one inner step).
    """
    if not training:
        return
    has_conv = False
    for name, module in model.named_modules():
        if isinstance(module, _CONVS):
            has_conv = True
        if not isinstance(module, _NORMS):
            continue
        label = f"module {name!r} (`{type(module).__name__}`)" if name else f"the model (`{type(module).__name__}`)"
        if module.track_running_stats:
            raise ValueError(
                f"cannot vectorise over tasks: {label} tracks running statistics, which one forward per task would "
                "update. Use `track_running_stats=False` (batch statistics) or the per-task loop."
            )
        if second_order and has_conv:
            raise ValueError(
                f"cannot vectorise second-order MAML through a convolution followed by {label}: torch.func.vmap "
                "gives a wrong meta-gradient there (torch 2.13). Use the per-task loop, or `first_order=True`."
            )


def batched_query_losses(wrapper: MAML, tasks: Any) -> Tensor:
    """Adapt to every task's support set at once and return the query losses, shape ``(num_tasks,)``.

    The inner loops run in one ``torch.func.vmap`` over tasks, with gradients from
    ``torch.func.grad``; the model runs through the same dependent-module engine as the
    loop. ``losses.mean().backward()`` gives the loop's meta-gradient.
    """
    support_x, support_y, query_x, query_y = stack_tasks(tasks)
    training = wrapper.training
    second_order = wrapper.second_order
    check_vectorizable(wrapper.model, training=training, second_order=second_order)
    learner = wrapper.__dict__["_learner"]
    meta_params = wrapper._model_params()
    names = list(meta_params)
    adapt = [n for n in wrapper.adapt_names if meta_params[n].requires_grad]
    steps = wrapper.steps
    evaluator = wrapper.evaluator
    optimizer = wrapper.optimizer
    rates = None if optimizer is not None else wrapper.inner_rates(adapt)

    def run(params: dict[str, Tensor], x: Any) -> Any:
        return learner.functional([params[n] for n in names], training, x)

    def support_loss(adapted: dict[str, Tensor], fixed: dict[str, Tensor], sx: Tensor, sy: Tensor) -> Tensor:
        params = {**fixed, **adapted}
        return evaluator(lambda x: run(params, x), (sx, sy))

    def task_loss(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        params = dict(meta_params)
        state = optimizer.init({n: params[n] for n in adapt}) if optimizer is not None else None
        for _ in range(steps):
            adapted = {n: params[n] for n in adapt}
            fixed = {n: p for n, p in params.items() if n not in adapted}
            grads = torch.func.grad(support_loss)(adapted, fixed, sx, sy)
            if not second_order:
                grads = {n: g.detach() for n, g in grads.items()}
            if optimizer is not None:
                new, state = optimizer.step(adapted, grads, state)
            elif isinstance(rates, dict):
                new = {n: adapted[n] - rates[n] * grads[n] for n in adapt}
            elif isinstance(rates, Tensor):
                new = {n: adapted[n] - rates * grads[n] for n in adapt}
            else:
                new = {n: torch.add(adapted[n], grads[n], alpha=-rates) for n in adapt}
            params.update(new)
        return evaluator(lambda x: run(params, x), (qx, qy))

    with wrapper._math_attention():
        return torch.func.vmap(task_loss, randomness="different")(support_x, support_y, query_x, query_y)
