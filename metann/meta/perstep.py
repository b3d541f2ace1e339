"""Per-inner-step pieces of MAML++: the annealed multi-step loss weights and per-step batch-norm tables."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import cast

import torch
from torch import Tensor, nn

__all__ = ["PerStepBatchNorm", "multi_step_loss_weights"]

_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def multi_step_loss_weights(
    num_steps: int, iteration: int, anneal_iterations: int, *, floor: float = 0.03
) -> list[float]:
    r"""Weights of the query losses after each inner step, at meta-iteration ``iteration`` (MAML++).

    With :math:`N` = ``num_steps``, :math:`T` = ``anneal_iterations``, :math:`t` =
    ``iteration`` and :math:`m` = ``floor`` :math:`/ N`, the weights start uniform
    (:math:`1/N`) and move linearly toward the last step (Antoniou et al., 2019, as in
    their published code, with meta-iterations in place of epochs):

    .. math::

        w_i = \max\left(\frac{1}{N} - \frac{t}{N T},\ m\right) \quad (i < N), \qquad
        w_N = \min\left(\frac{1}{N} + \frac{(N - 1)\, t}{N T},\ 1 - (N - 1)\, m\right).

    They sum to 1. From :math:`t \ge T` on, only the last step counts (:math:`w_N = 1`,
    the plain MAML objective).

    Args:
        num_steps: Inner steps :math:`N` (``>= 0``; 0 gives an empty list).
        iteration: Meta-iterations completed so far (``>= 0``).
        anneal_iterations: Meta-iterations :math:`T` of the multi-step loss (``>= 1``).
        floor: The smallest total weight of a non-final step, times :math:`N`
            (the paper's 0.03).

    Returns:
        ``num_steps`` weights, the last for the query loss after the last step.

    Raises:
        ValueError: For a negative count or iteration, ``anneal_iterations < 1``, or a
            ``floor`` outside ``[0, 1]``.

    Example:
        >>> from metann.meta.perstep import multi_step_loss_weights
        >>> multi_step_loss_weights(4, 0, 100)
        [0.25, 0.25, 0.25, 0.25]
        >>> [round(w, 4) for w in multi_step_loss_weights(4, 50, 100)]
        [0.125, 0.125, 0.125, 0.625]
        >>> multi_step_loss_weights(4, 100, 100)
        [0.0, 0.0, 0.0, 1.0]
    """
    for name, value, minimum in (("num_steps", num_steps, 0), ("iteration", iteration, 0),
                                 ("anneal_iterations", anneal_iterations, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}` must be an int, got `{type(value).__name__}`.")
        if value < minimum:
            raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"`floor` must be in [0, 1], got {floor}.")
    if num_steps == 0:
        return []
    if iteration >= anneal_iterations:
        return [0.0] * (num_steps - 1) + [1.0]
    decay = iteration / (num_steps * anneal_iterations)
    low = floor / num_steps
    early = max(1.0 / num_steps - decay, low)
    last = min(1.0 / num_steps + (num_steps - 1) * decay, 1.0 - (num_steps - 1) * low)
    return [early] * (num_steps - 1) + [last]


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` has a batch-norm layer that :class:`PerStepBatchNorm` would give tables."""
    return any(isinstance(m, _BATCH_NORMS) for m in model.modules())


class _Tables(nn.Module):
    """One batch-norm layer's per-step affine parameters (``weight``, ``bias``) and running statistics."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, count: int) -> None:
        super().__init__()
        if bn.affine:
            self.weight = nn.Parameter(bn.weight.detach().unsqueeze(0).repeat(count, 1))
            self.bias = nn.Parameter(bn.bias.detach().unsqueeze(0).repeat(count, 1))
        for name in _STATISTICS:
            value = getattr(bn, name, None)
            if value is not None:
                self.register_buffer(name, value.detach().unsqueeze(0).repeat(count, *([1] * value.dim())))


class PerStepBatchNorm(nn.Module):
    """Separate batch-norm statistics and affine parameters for every inner step (MAML++ BNRS + BNWB).

    For each batch-norm layer of ``model`` (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``)
    it holds ``count`` rows: ``layers[j].weight`` and ``layers[j].bias`` of shape
    ``(count, C)`` (meta-parameters, when the layer is affine) and the buffers
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` with a leading
    ``count`` dimension (when the layer tracks running statistics), all initialised
    from the layer's own values. Row ``k`` belongs to the model's weights after ``k``
    inner steps: the support forward of step ``k + 1`` and, after the last step, the
    query forward.

    How it runs over the engine: the forward substitutes the model's weights through
    the dependent-module engine anyway, so :meth:`substitute` only replaces the batch
    norm's weight and bias in that list by row ``k`` (differentiable, so each row gets
    its own meta-gradient), and :meth:`statistics` points the layer's running-statistic
    buffers at row ``k`` for the duration of the forward, so batch norm reads (eval) or
    updates in place (train) that step's statistics. The layers' own weight, bias and
    buffers are not used while the tables are.

    Args:
        model: The network whose batch-norm layers get tables.
        count: Rows per table (inner steps + 1).

    Raises:
        ValueError: If ``model`` has no batch-norm layer.

    Example:
        >>> from metann.meta.perstep import PerStepBatchNorm
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> tables = PerStepBatchNorm(net, count=3)
        >>> tables.layers[0].weight.shape, tables.layers[0].running_mean.shape
        (torch.Size([3, 4]), torch.Size([3, 4]))
    """

    def __init__(self, model: nn.Module, count: int) -> None:
        super().__init__()
        found = [(name, m) for name, m in model.named_modules() if isinstance(m, _BATCH_NORMS)]
        if not found:
            raise ValueError(
                f"`per_step_bn` needs batch-norm layers, and `{type(model).__name__}` has none. "
                "Leave `per_step_bn=False` for this model."
            )
        self.count = count
        self.layer_names = [name for name, _ in found]
        self.layers = nn.ModuleList([_Tables(m, count) for _, m in found])
        self.__dict__["_modules_of_model"] = [m for _, m in found]  # not registered: they belong to the model
        names = [n for n, _ in model.named_parameters()]
        position = {n: i for i, n in enumerate(names)}
        self._affine = [
            (position[f"{prefix}.weight" if prefix else "weight"], position[f"{prefix}.bias" if prefix else "bias"], j)
            for j, (prefix, m) in enumerate(found)
            if m.affine
        ]
        self.affine_names = [names[i] for iw, ib, _ in self._affine for i in (iw, ib)]

    def _check(self, step: int) -> None:
        if step >= self.count:
            raise RuntimeError(
                f"per-step batch norm has tables for {self.count - 1} inner steps, and inner step {step + 1} "
                "was asked for. Build the algorithm with `steps_train`/`steps_eval` covering every step taken."
            )

    def substitute(self, values: list[Tensor], step: int) -> list[Tensor]:
        """``values`` (one tensor per model parameter) with each batch norm's weight and bias set to row ``step``."""
        self._check(step)
        values = list(values)
        layers = self.layers
        for iw, ib, j in self._affine:
            tables = cast(_Tables, layers[j])
            values[iw] = tables.weight[step]
            values[ib] = tables.bias[step]
        return values

    @contextlib.contextmanager
    def statistics(self, step: int, *, scratch: bool = False) -> Iterator[None]:
        """Point every batch norm's running-statistic buffers at row ``step`` while the context is open.

        Args:
            step: The row (inner steps taken so far).
            scratch: Use copies of the rows, so that in-place updates are dropped (for
                a forward recomputed in the backward pass, which must not update twice).
        """
        self._check(step)
        saved = []
        try:
            for module, tables in zip(self.__dict__["_modules_of_model"], self.layers):
                for name in _STATISTICS:
                    table = getattr(tables, name, None)
                    if table is None:
                        continue
                    saved.append((module, name, getattr(module, name)))
                    row = table[step]
                    setattr(module, name, row.clone() if scratch else row)
            yield
        finally:
            for module, name, value in reversed(saved):
                setattr(module, name, value)


def per_step_tables(
    model: nn.Module, count: int, adapt_names: tuple[str, ...]
) -> tuple[PerStepBatchNorm, tuple[str, ...]]:
    """Build the tables of ``per_step_bn`` and drop the batch-norm affine parameters from the adapted names.

    Raises:
        ValueError: If the model has no batch norm, or only batch-norm parameters were selected to adapt.
    """
    tables = PerStepBatchNorm(model, count)
    kept = tuple(n for n in adapt_names if n not in tables.affine_names)
    if not kept:
        raise ValueError(
            f"`adapt` selects only batch-norm weights and biases {sorted(tables.affine_names)}, which "
            "`per_step_bn` learns per step in the outer loop instead; select other parameters to adapt."
        )
    return tables, kept


def per_step_rates(
    shapes: Sequence[tuple[int, ...]], count: int, lr: float, like: Sequence[Tensor]
) -> nn.ParameterList:
    """One learnable learning-rate tensor per parameter, of shape ``(count, *shape)``, filled with ``lr``."""
    rates = [torch.full((count, *shape), lr, dtype=t.dtype, device=t.device) for shape, t in zip(shapes, like)]
    return nn.ParameterList([nn.Parameter(r) for r in rates])
