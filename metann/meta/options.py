"""The machinery of MAML's keyword-only options: validation, per-step updates and forwards, recomputation."""
from __future__ import annotations

import contextlib
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from metann import _autograd
from metann.functional import math_attention
from metann.meta.memory import frozen_running_stats
from metann.meta.perstep import PerStepBatchNorm, per_step_rates

if TYPE_CHECKING:
    from metann.meta.maml import MAML

__all__: list[str] = []


class InnerLoopOptions:
    """Mixin of :class:`~metann.meta.MAML`: what its inner-loop options need beyond the plain loop.

    Only :class:`~metann.meta.fastmodel.StepwiseFastModel` (used when an option that
    changes the inner loop is on) and the schedule call these methods, so the plain
    loop's hot path does not pass through them.
    """

    _step_rates_attr = "step_lrs"  # where `per_step_lr` registers its rates (MetaSGD: "lrs")

    if TYPE_CHECKING:  # provided by MAML
        model: nn.Module
        steps_train: int
        steps_eval: int
        lr: Any
        optimizer: Any
        adapt_names: tuple[str, ...]
        training: bool
        _needs_math_attention: bool
        _math_active: bool

        @property
        def second_order(self) -> bool: ...

        def inner_rates(self, names: list[str]) -> float | Tensor | Mapping[str, Tensor]: ...

        def _math_attention(self) -> contextlib.AbstractContextManager: ...

        def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None: ...

    def _set_options(self, options: dict[str, Any], tables: PerStepBatchNorm | None) -> None:
        """Store the inner-loop options and create what they learn (rates, batch-norm tables, the counter)."""
        self.multi_step_loss = options["multi_step_loss"]
        self.per_step_lr = options["per_step_lr"]
        self.per_step_bn = options["per_step_bn"]
        self.first_order_iterations = options["first_order_iterations"]
        self.checkpoint_steps = options["checkpoint_steps"]
        self.second_order_steps = options["second_order_steps"]
        self._recomputing = False
        self._rate_steps = max(self.steps_train, self.steps_eval)
        if self.per_step_lr:
            setattr(self, self._step_rates_attr, self._make_step_rates(self._rate_steps, float(self.lr)))
        if tables is not None:
            self.bn_tables = tables
        self.__dict__["_bn_tables"] = tables  # the same module, found without nn.Module's attribute lookup
        scheduled = self.multi_step_loss is not None or self.first_order_iterations > 0
        self.register_buffer("_meta_iteration", torch.zeros((), dtype=torch.int64), persistent=scheduled)
        self._stepwise = (
            self.multi_step_loss is not None or self.per_step_lr or tables is not None
            or self.checkpoint_steps or self.second_order_steps is not None
        )

    def _make_step_rates(self, count: int, lr: float) -> nn.ParameterList:
        """One scalar rate per adapted parameter and step: tensors of shape ``(count,)``."""
        params = dict(self.model.named_parameters())
        like = [params[n] for n in self.adapt_names]
        return per_step_rates([() for _ in like], count, lr, like)

    def _rates_at(self, names: list[str], step: int) -> float | Tensor | Mapping[str, Tensor]:
        """The learning rate(s) of inner step ``step`` (0-based)."""
        if not self.per_step_lr:
            return self.inner_rates(names)
        if step >= self._rate_steps:
            raise RuntimeError(
                f"`per_step_lr` has learning rates for {self._rate_steps} inner steps, and inner step {step + 1} "
                "was asked for. Build the algorithm with `steps_train`/`steps_eval` covering every step taken."
            )
        rates = getattr(self, self._step_rates_attr)
        return {n: r[step] for n, r in zip(self.adapt_names, rates)}

    def _create_graph(self, step: int, planned: int) -> bool:
        """Whether inner step ``step`` of ``planned`` builds a second-order graph (order schedule and truncation)."""
        if not self.second_order:
            return False
        last = self.second_order_steps
        return last is None or step >= planned - last

    def _step_options(
        self, params: dict[str, Tensor], names: list[str], loss: Tensor, state: Any, step: int, create_graph: bool
    ) -> tuple[dict[str, Tensor], Any]:
        """One inner step with this step's rates and an explicit choice of order."""
        grads = _autograd.grad(loss, [params[n] for n in names], create_graph)
        return self._update(params, names, grads, state, self._rates_at(names, step))

    def _options_forward(
        self, params: dict[str, Tensor], step: int, training: bool, args: tuple, kwargs: dict[str, Any]
    ) -> Any:
        """The model's forward with ``params`` at inner step ``step`` (per-step batch norm, attention kernel)."""
        learner = self.__dict__["_learner"]
        values = list(params.values())
        tables = self.__dict__["_bn_tables"]
        with contextlib.ExitStack() as stack:
            if self._needs_math_attention and self.second_order and not self._math_active:
                stack.enter_context(self._math_attention())
            if tables is not None:
                values = tables.substitute(values, step)
                stack.enter_context(tables.statistics(step, scratch=self._recomputing))
            return learner.functional(values, training, *args, **kwargs)

    def _recompute_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``context_fn`` of ``torch.utils.checkpoint``: nothing around the forward, `_Recomputation` on reruns."""
        return contextlib.nullcontext(), _Recomputation(cast("MAML", self))

    def _stepwise_options(self) -> list[str]:
        """Names of the options that are on and need the per-step inner loop."""
        on = {
            "checkpoint_steps": self.checkpoint_steps,
            "multi_step_loss": self.multi_step_loss is not None,
            "per_step_bn": self.per_step_bn,
            "per_step_lr": self.per_step_lr,
            "second_order_steps": self.second_order_steps is not None,
        }
        return sorted(name for name, value in on.items() if value)


class _Recomputation:
    """Around each rerun of a checkpointed step: running statistics stay put, attention stays differentiable.

    ``torch.utils.checkpoint`` reruns a step once per backward pass that needs its
    activations (also for the inner gradient taken in the forward pass), so this
    context can be entered several times.
    """

    def __init__(self, wrapper: MAML) -> None:
        self.wrapper = wrapper
        self.open: list[tuple[contextlib.ExitStack, bool]] = []

    def __enter__(self) -> None:
        wrapper = self.wrapper
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(frozen_running_stats(wrapper.model))
            if wrapper._needs_math_attention:
                stack.enter_context(math_attention())
        except BaseException:
            stack.close()
            raise
        self.open.append((stack, wrapper._recomputing))
        wrapper._recomputing = True

    def __exit__(self, *exc: Any) -> bool:
        stack, previous = self.open.pop()
        self.wrapper._recomputing = previous
        return bool(stack.__exit__(*exc))


def _check_flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool (True or False), got `{type(value).__name__}`.")
    return value


def _check_count(value: Any, name: str, minimum: int, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "an int or None" if allow_none else "an int"
        raise TypeError(f"`{name}` must be {kind}, got `{type(value).__name__}`.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return int(value)


def check_options(
    *, lr: Any, first_order: bool, optimizer: Any, multi_step_loss: Any, per_step_lr: Any, per_step_bn: Any,
    first_order_iterations: Any, checkpoint_steps: Any, second_order_steps: Any,
) -> dict[str, Any]:
    """Validate the inner-loop options (types, ranges, combinations) before anything is built."""
    options = {
        "multi_step_loss": _check_count(multi_step_loss, "multi_step_loss", 1, True),
        "per_step_lr": _check_flag(per_step_lr, "per_step_lr"),
        "per_step_bn": _check_flag(per_step_bn, "per_step_bn"),
        "first_order_iterations": _check_count(first_order_iterations, "first_order_iterations", 0, False),
        "checkpoint_steps": _check_flag(checkpoint_steps, "checkpoint_steps"),
        "second_order_steps": _check_count(second_order_steps, "second_order_steps", 1, True),
    }
    if options["per_step_lr"]:
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
            raise TypeError(
                f"`per_step_lr` learns its own rates and needs a number as the initial `lr`, got `{type(lr).__name__}`."
            )
        if optimizer is not None:
            raise ValueError(
                f"`per_step_lr` and `optimizer` both set the inner update; got `{type(optimizer).__name__}`. "
                "Use one of them."
            )
    if first_order:
        given = sorted(name for name in ("checkpoint_steps", "first_order_iterations", "second_order_steps")
                       if options[name] not in (None, 0, False))
        if given:
            raise ValueError(
                f"`first_order=True` builds no second-order graph, so {given} would have no effect. "
                "Drop them, or use `first_order=False`."
            )
    return options
