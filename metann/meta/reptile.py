"""Reptile: first-order meta-learning by moving the meta-parameters toward the adapted weights."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from metann.meta.evaluators import default_evaluator_classification
from metann.meta.maml import MAML, AdaptSpec

__all__ = ["Reptile"]

_INNER_DATA = ("all", "support")


def _learnable(lr: Any) -> bool:
    if isinstance(lr, Tensor):
        return lr.requires_grad
    if isinstance(lr, Mapping):
        return any(isinstance(r, Tensor) and r.requires_grad for r in lr.values())
    return False


def concat_data(support: Any, query: Any) -> tuple[Tensor, Tensor]:
    """Join two ``(x, y)`` pairs of tensors along the first dimension.

    Raises:
        TypeError: If either set is not a pair of tensors.
    """
    pairs = []
    for label, data in (("support", support), ("query", query)):
        if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)):
            raise TypeError(
                f"`inner_data='all'` joins the support and query sets, which must be pairs `(x, y)` of tensors; "
                f"the {label} set is `{type(data).__name__}`. Use `inner_data='support'` for other data."
            )
        pairs.append(data)
    (sx, sy), (qx, qy) = pairs
    return torch.cat([sx, qx]), torch.cat([sy, qy])


class Reptile(MAML):
    r"""Reptile (Nichol, Achiam and Schulman, 2018): move the meta-parameters toward the adapted weights.

    For each task, the inner loop takes ``steps_train`` plain gradient steps (or steps of
    a :mod:`metann.optim` optimizer) from :math:`\theta` to :math:`\phi`, never building
    a second-order graph, and the meta-update is

    .. math:: \theta \leftarrow \theta + \epsilon \, \frac{1}{n} \sum_{i=1}^{n} (\phi_i - \theta).

    **Convention with a meta-optimizer.** :meth:`meta_objective` returns the surrogate
    :math:`\tfrac12 \lVert \theta - \operatorname{stop\_grad}(\phi) \rVert^2`, whose
    gradient is :math:`\theta - \phi`. :class:`~metann.train.MetaTrainer` back-propagates
    the mean over the meta-batch, so ``.grad`` holds :math:`\frac1n \sum_i (\theta - \phi_i)`
    and ``torch.optim.SGD(reptile.parameters(), lr=eps)`` performs exactly the classic
    update above (the paper's "batched" Reptile; ``n = 1`` is serial Reptile). Any other
    ``torch.optim`` optimizer treats :math:`\theta - \phi` as a gradient: with
    ``torch.optim.Adam`` this is the common "Reptile with Adam" variant. The update is
    not the gradient of any objective, so a finite-difference check of it is meaningless.

    **Which data the inner loop sees** (``inner_data``). The paper's inner loop trains on
    the task's data only; few-shot implementations (and this default, ``"support"``)
    adapt on the support set and keep the query set for the reported loss, so that
    number is a held-out loss after adaptation, as for MAML. ``"all"`` adapts on the
    support and query sets concatenated (``(x, y)`` pairs of tensors), using every
    example of the task for the update; the reported query loss is then a training loss.
    Adaptation for evaluation (``reptile(support)`` in eval mode, as in
    :meth:`MetaTrainer.evaluate <metann.train.MetaTrainer.evaluate>`) always uses only the
    data it is given, with ``steps_eval`` steps, like :class:`MAML`.

    The inner loop takes full-batch steps on the chosen data; for the paper's
    mini-batches, write the loop with :meth:`clone` and :meth:`FastModel.adapt
    <metann.meta.FastModel.adapt>`. Only the parameters selected by ``adapt`` move;
    the others receive no gradient (``None``) from :meth:`meta_objective`.

    Args:
        model: The network to meta-learn.
        steps_train: Inner steps per task in train mode (the paper uses 5 to 10; 1 step
            is joint training on the expected loss, as the paper notes).
        steps_eval: Inner steps in eval mode (default: ``steps_train``).
        lr: Inner learning rate: a number, a tensor, or a mapping name -> tensor. It is
            not meta-learned (Reptile gives it no gradient).
        evaluator: ``evaluator(fast_model, data) -> loss`` for the inner loop and the
            reported query loss.
        adapt: Which parameters the inner loop updates (see :class:`MAML`).
        optimizer: A :mod:`metann.optim` optimizer for the inner loop (the paper uses
            Adam with :math:`\beta_1 = 0`); its state starts fresh for every task.
        inner_data: ``"support"`` (default) or ``"all"`` (support and query joined).

    Raises:
        ValueError: For a negative step count, an unknown ``inner_data``, or an ``lr``
            tensor that requires grad.
        TypeError: For a wrong kind of argument (see :class:`MAML`).

    Example:
        >>> from types import SimpleNamespace
        >>> from metann.meta import Reptile, default_evaluator_regression
        >>> net = torch.nn.Linear(1, 1)
        >>> reptile = Reptile(net, steps_train=5, lr=0.1, evaluator=default_evaluator_regression)
        >>> meta_opt = torch.optim.SGD(reptile.parameters(), lr=0.5)  # eps = 0.5
        >>> x = torch.linspace(-1, 1, 8).unsqueeze(1)
        >>> task = SimpleNamespace(support=(x, 2 * x), query=(x, 2 * x))
        >>> theta = net.weight.detach().clone()
        >>> phi = reptile(task.support).params["weight"].detach()
        >>> objective, query_loss = reptile.meta_objective(task)
        >>> objective.backward()  # net.weight.grad == theta - phi
        >>> meta_opt.step()
        >>> torch.allclose(net.weight, theta + 0.5 * (phi - theta))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        steps_train: int = 5,
        steps_eval: int | None = None,
        lr: float | Tensor | Mapping[str, Tensor] = 0.01,
        evaluator: Callable[[Any, Any], Tensor] = default_evaluator_classification,
        adapt: AdaptSpec = None,
        optimizer: Any = None,
        *,
        inner_data: str = "support",
    ) -> None:
        if not isinstance(inner_data, str):
            raise TypeError(f"`inner_data` must be a string, got `{type(inner_data).__name__}`.")
        if inner_data not in _INNER_DATA:
            raise ValueError(f"`inner_data` must be one of {list(_INNER_DATA)}, got {inner_data!r}.")
        if _learnable(lr):
            raise ValueError(
                "`Reptile` cannot meta-learn `lr`: its update gives the learning rate no gradient. "
                "Pass a number or a tensor with `requires_grad=False`."
            )
        super().__init__(
            model,
            steps_train=steps_train,
            steps_eval=steps_eval,
            lr=lr,
            evaluator=evaluator,
            first_order=True,
            adapt=adapt,
            optimizer=optimizer,
        )
        self.inner_data = inner_data

    def meta_objective(self, task: Any) -> tuple[Tensor, Tensor]:
        r"""This task's Reptile surrogate and its query loss after adaptation.

        Adapts with ``steps`` first-order steps on the ``inner_data`` of ``task`` and
        returns ``(objective, query_loss)`` where
        ``objective = 0.5 * sum((theta - phi.detach()) ** 2)`` over the adapted
        parameters, so ``objective.backward()`` adds :math:`\theta - \phi` to ``.grad``.
        ``query_loss`` is computed without a graph.

        Args:
            task: An object with ``support`` and ``query`` pairs (e.g. :class:`~metann.data.Task`).
        """
        data = task.support if self.inner_data == "support" else concat_data(task.support, task.query)
        fast = self(data)
        theta = self._model_params()
        names = [n for n in self.adapt_names if theta[n].requires_grad]
        moved = [n for n in names if fast.params[n] is not theta[n]]
        if moved:
            objective = sum(0.5 * (theta[n] - fast.params[n].detach()).square().sum() for n in moved)
        elif names:  # nothing moved (0 steps, or no gradient): a zero gradient for the adapted parameters
            objective = sum((theta[n] * 0).sum() for n in names)
        else:  # every adapted parameter is frozen: a constant that still accepts `backward()`
            objective = torch.zeros((), requires_grad=True)
        with torch.no_grad():
            reported = self.evaluator(fast, task.query)
        return objective, reported

    def batched(self, tasks: Any) -> Tensor:
        """Not available: :meth:`MAML.batched` returns MAML's query losses, not Reptile's update.

        Raises:
            NotImplementedError: Always. Use ``MetaTrainer(..., vectorize=False)``.
        """
        raise NotImplementedError(
            "`Reptile` has no vectorised meta-batch: `batched` would return MAML's query losses. "
            "Use `MetaTrainer(..., vectorize=False)` (the default), which calls `meta_objective` per task."
        )

    def extra_repr(self) -> str:
        return (
            f"steps_train={self.steps_train}, steps_eval={self.steps_eval}, lr={self.lr}, "
            f"inner_data={self.inner_data!r}"
        )
