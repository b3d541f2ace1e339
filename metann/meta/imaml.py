"""Implicit MAML: a proximal inner loop and a meta-gradient by conjugate gradient on Hessian-vector products."""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from metann import _autograd
from metann.functional import math_attention
from metann.meta.compiled import compiled_parts
from metann.meta.evaluators import default_evaluator_classification
from metann.meta.maml import MAML, AdaptSpec, FastModel, check_steps

__all__ = ["CGResult", "conjugate_gradient", "iMAML"]


@dataclass(frozen=True)
class CGResult:
    """How a conjugate-gradient solve ended.

    Attributes:
        iterations: Matrix-vector products taken.
        residual: Final residual norm divided by the norm of the right-hand side
            (0.0 when the right-hand side is zero).
        positive_definite: ``False`` if CG met a direction of non-positive curvature
            and stopped there (the operator is not positive definite).
    """

    iterations: int
    residual: float
    positive_definite: bool = True


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def conjugate_gradient(
    matvec: Callable[[list[Tensor]], list[Tensor]], b: Sequence[Tensor], steps: int, tol: float = 0.0
) -> tuple[list[Tensor], CGResult]:
    r"""Solve :math:`A x = b` for a symmetric positive definite :math:`A` given only ``matvec``.

    ``x`` and ``b`` are lists of tensors (one block per parameter); CG starts from
    :math:`x_0 = 0`, so one step returns a multiple of ``b``. In exact arithmetic it
    solves the system in at most (number of elements) steps.

    Args:
        matvec: ``matvec(v) -> A v`` on lists shaped like ``b``.
        b: The right-hand side.
        steps: Largest number of iterations (``>= 1``).
        tol: Stop once ``||r|| <= tol * ||b||``.

    Returns:
        ``(x, result)`` with the solution blocks and a :class:`CGResult`.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> x, info = conjugate_gradient(lambda v: [A @ v[0]], [torch.tensor([1.0, 2.0])], steps=2)
        >>> torch.allclose(A @ x[0], torch.tensor([1.0, 2.0])), info.iterations
        (True, 2)
    """
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rs = float(_dot(r, r))
    b_norm = math.sqrt(rs)
    if b_norm == 0.0:
        return x, CGResult(0, 0.0)
    iterations = 0
    for _ in range(steps):
        ap = matvec(p)
        curvature = float(_dot(p, ap))
        iterations += 1
        if not curvature > 0.0:
            return x, CGResult(iterations, math.sqrt(rs) / b_norm, positive_definite=False)
        alpha = rs / curvature
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * ai for ri, ai in zip(r, ap)]
        rs_new = float(_dot(r, r))
        if math.sqrt(rs_new) <= tol * b_norm:
            rs = rs_new
            break
        p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
        rs = rs_new
    return x, CGResult(iterations, math.sqrt(rs) / b_norm)


def _check_real(value: Any, name: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number, got `{type(value).__name__}`.")
    value = float(value)
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise ValueError(f"`{name}` must be {'> 0' if positive else '>= 0'} and finite, got {value}.")
    return value


def _learnable(lr: Any) -> bool:
    if isinstance(lr, Tensor):
        return lr.requires_grad
    if isinstance(lr, Mapping):
        return any(isinstance(r, Tensor) and r.requires_grad for r in lr.values())
    return False


class _Problem:
    """One task's inner problem, kept by the implicit node for its backward (no graph, only tensors)."""

    def __init__(self, wrapper: iMAML, phi: dict[str, Tensor], body: list[str], data: Any) -> None:
        self.wrapper = wrapper
        self.phi = phi
        self.body = body
        self.data = data
        self.training = wrapper.training

    def implicit_grads(self, grad_phi: list[Tensor]) -> list[Tensor | None]:
        r"""Gradients for the adapted parameters (:math:`x`) and the others (:math:`-M^\top x / \lambda`)."""
        wrapper = self.wrapper
        if wrapper.training != self.training:
            raise RuntimeError(
                "`iMAML`: the train/eval mode changed between the forward and the backward; the Hessian must "
                "be taken in the mode of the inner loop. Call `backward()` before switching modes."
            )
        lam, damping = wrapper.lam, wrapper.cg_damping
        theta = wrapper._model_params()
        saved = [(b, b.detach().clone()) for b in wrapper.model.buffers()]
        try:
            with torch.enable_grad(), math_attention(wrapper.model):
                leaves = {n: t.detach().requires_grad_() for n, t in self.phi.items()}
                body = {n: theta[n].detach().requires_grad_() for n in self.body}
                params = {n: leaves.get(n, body.get(n, t.detach())) for n, t in theta.items()}
                loss = wrapper.evaluator(FastModel(wrapper, params), self.data)
                grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
                live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                outputs = [grads[i] for i in live]
                inputs = list(leaves.values())

                def matvec(v: list[Tensor]) -> list[Tensor]:
                    hv = [None] * len(v)
                    if live:
                        hv = torch.autograd.grad(
                            outputs, inputs, [v[i] for i in live], retain_graph=True, allow_unused=True
                        )
                    return [(1 + damping) * vi + (h / lam if h is not None else 0) for vi, h in zip(v, hv)]

                x, result = conjugate_gradient(matvec, grad_phi, wrapper.cg_steps, wrapper.cg_tol)
                body_grads: list[Tensor | None] = [None] * len(body)
                if body and live:
                    mixed = torch.autograd.grad(
                        outputs, list(body.values()), [x[i] / lam for i in live], allow_unused=True
                    )
                    body_grads = [None if m is None else -m for m in mixed]
        finally:
            with torch.no_grad():  # the recomputed forward must not move batch-norm running statistics
                for buffer, value in saved:
                    buffer.copy_(value)
        wrapper.last_solve = result
        if not result.positive_definite:
            warnings.warn(
                f"`iMAML`: conjugate gradient met non-positive curvature after {result.iterations} step(s): "
                "I + H/lam is not positive definite here, so the meta-gradient is truncated. "
                "Increase `lam` or `cg_damping`.",
                UserWarning,
                stacklevel=2,
            )
        return [*x, *body_grads]


class _Implicit(torch.autograd.Function):
    """Identity on the inner solution in the forward; the implicit meta-gradient in the backward."""

    @staticmethod
    def forward(ctx: Any, problem: _Problem, *theta: Tensor) -> tuple[Tensor, ...]:
        ctx.problem = problem
        return tuple(p.clone() for p in problem.phi.values())

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grad_phi: Tensor) -> tuple[Any, ...]:
        return (None, *ctx.problem.implicit_grads(list(grad_phi)))


class iMAML(MAML):  # the paper's spelling
    r"""Implicit MAML (Rajeswaran, Finn, Kakade and Levine, 2019).

    **Inner loop.** From :math:`\phi_0 = \theta`, ``steps`` gradient steps (or steps of a
    :mod:`metann.optim` optimizer) on the proximal objective

    .. math:: L_{\text{support}}(\phi) + \frac{\lambda}{2} \lVert \phi - \theta \rVert^2,

    taken on detached tensors: no graph is kept, so memory does not grow with the number
    of inner steps.

    **Meta-gradient.** At the inner solution :math:`\phi`, the gradient of the query loss
    with respect to :math:`\theta` is, by the implicit function theorem,

    .. math:: g = \Big(I + \frac{H}{\lambda}\Big)^{-1} \nabla_\phi L_{\text{query}}(\phi),
        \qquad H = \nabla^2_\phi L_{\text{support}}(\phi),

    solved by ``cg_steps`` steps of conjugate gradient on Hessian-vector products (double
    backward through one support forward, recomputed during the backward pass). It is
    exact when the inner loop has reached the proximal optimum. With ``cg_damping``
    :math:`\delta`, CG solves :math:`((1 + \delta) I + H / \lambda) g = \nabla_\phi L`.

    **Usage** is MAML's: ``imaml(support)`` returns a :class:`~metann.meta.FastModel`
    whose adapted weights equal :math:`\phi` and whose backward is the implicit
    meta-gradient, so ``evaluator(imaml(support), query).backward()``, :meth:`meta_objective`
    and :class:`~metann.train.MetaTrainer` work unchanged. In eval mode (or without grad)
    the adapted weights carry no graph.

    Parameters outside ``adapt`` are not adapted (:math:`\phi` keeps their :math:`\theta`);
    they receive the direct gradient of the query loss plus the implicit term
    :math:`-M^\top (H + \lambda I)^{-1} \nabla_\phi L_{\text{query}}`, with
    :math:`M = \partial^2 L_{\text{support}} / \partial \phi \, \partial \theta_{\text{fixed}}`.

    Batch norm: the inner steps and the query forward run in the model's mode and update
    running statistics as in :class:`MAML`; the support forward recomputed for the
    Hessian leaves them unchanged. Dropout draws a new mask in that recomputation.
    After each backward, :attr:`last_solve` holds the :class:`CGResult`.

    Args:
        model: The network to meta-learn.
        steps_train: Inner steps in train mode.
        steps_eval: Inner steps in eval mode (default: ``steps_train``).
        lr: Inner learning rate (a number, a tensor or a mapping name -> tensor; not
            meta-learned).
        evaluator: ``evaluator(fast_model, data) -> loss``.
        adapt: Which parameters the inner loop updates (see :class:`MAML`).
        optimizer: A :mod:`metann.optim` optimizer for the inner loop (applied to the
            proximal gradient).
        lam: Proximal strength :math:`\lambda > 0`.
        cg_steps: Largest number of CG iterations (``>= 1``).
        cg_damping: :math:`\delta \ge 0` added to the identity of the CG operator.
        cg_tol: Stop CG once the residual norm is at most ``cg_tol`` times the norm of
            the query gradient.

    Raises:
        TypeError: For a wrong kind of argument.
        ValueError: For ``lam <= 0``, ``cg_steps < 1``, a negative ``cg_damping``,
            ``cg_tol`` or step count, an ``lr`` tensor that requires grad, or a model
            (or part) compiled with ``torch.compile``, whose backward cannot be
            differentiated twice (torch 2.13).

    Example:
        >>> from metann.meta import iMAML, default_evaluator_regression
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> imaml = iMAML(net, steps_train=20, lr=0.05, lam=2.0, cg_steps=5,
        ...               evaluator=default_evaluator_regression)
        >>> x = torch.linspace(-3, 3, 20).unsqueeze(1)
        >>> loss = default_evaluator_regression(imaml((x[::2], x[::2].sin())), (x[1::2], x[1::2].sin()))
        >>> loss.backward()
        >>> net[0].weight.grad.shape, imaml.last_solve.iterations <= 5
        (torch.Size([16, 1]), True)
    """

    def __init__(
        self,
        model: nn.Module,
        steps_train: int = 10,
        steps_eval: int | None = None,
        lr: float | Tensor | Mapping[str, Tensor] = 0.01,
        evaluator: Callable[[Any, Any], Tensor] = default_evaluator_classification,
        adapt: AdaptSpec = None,
        optimizer: Any = None,
        *,
        lam: float = 1.0,
        cg_steps: int = 5,
        cg_damping: float = 0.0,
        cg_tol: float = 1e-10,
    ) -> None:
        lam = _check_real(lam, "lam", positive=True)
        if isinstance(cg_steps, bool) or not isinstance(cg_steps, numbers.Integral):
            raise TypeError(f"`cg_steps` must be an int, got `{type(cg_steps).__name__}`.")
        if cg_steps < 1:
            raise ValueError(f"`cg_steps` must be >= 1, got {cg_steps}.")
        cg_damping = _check_real(cg_damping, "cg_damping", positive=False)
        cg_tol = _check_real(cg_tol, "cg_tol", positive=False)
        parts = compiled_parts(model) if isinstance(model, nn.Module) else []
        if parts:
            raise ValueError(
                f"`iMAML` cannot run on code compiled with `torch.compile` (found in {parts}): its meta-gradient "
                f"needs Hessian-vector products, and the compiled backward is not differentiable twice in torch "
                f"{torch.__version__.split('+')[0]} (it raises, or returns a silently wrong result). Pass the eager "
                "module (e.g. `compiled._orig_mod`, or the module before `.compile()`)."
            )
        if _learnable(lr):
            raise ValueError(
                "`iMAML` cannot meta-learn `lr`: the implicit meta-gradient does not depend on the inner "
                "learning rate. Pass a number or a tensor with `requires_grad=False`."
            )
        super().__init__(
            model,
            steps_train=steps_train,
            steps_eval=steps_eval,
            lr=lr,
            evaluator=evaluator,
            first_order=True,  # the inner loop never builds a graph; the Hessian comes in the backward
            adapt=adapt,
            optimizer=optimizer,
        )
        self.lam = lam
        self.cg_steps = int(cg_steps)
        self.cg_damping = cg_damping
        self.cg_tol = cg_tol
        self.last_solve: CGResult | None = None

    def solve(self, data: Any, steps: int | None = None) -> dict[str, Tensor]:
        """Run the proximal inner loop on ``data`` and return the adapted weights (detached).

        Args:
            data: Support data for the evaluator.
            steps: Number of steps (default: the count for the current mode).

        Returns:
            The inner solution for every adapted parameter that requires grad, keyed by name.
        """
        steps = self.steps if steps is None else check_steps(steps, "steps")
        theta = self._model_params()
        names = [n for n in self.adapt_names if theta[n].requires_grad]
        center = {n: theta[n].detach() for n in names}
        fixed = {n: t.detach() for n, t in theta.items()}
        current = dict(center)
        state = self.optimizer.init(current) if self.optimizer is not None else None
        for _ in range(steps):
            with torch.enable_grad():
                leaves = {n: current[n].detach().requires_grad_() for n in names}
                loss = self.evaluator(FastModel(self, {**fixed, **leaves}), data)
                grads = _autograd.grad(loss, list(leaves.values()), False)
            with torch.no_grad():
                prox = {
                    n: self.lam * (leaves[n] - center[n]) + (g if g is not None else 0)
                    for n, g in zip(names, grads)
                }
                detached = {n: t.detach() for n, t in leaves.items()}
                if self.optimizer is not None:
                    current, state = self.optimizer.step(detached, prox, state)
                else:
                    lr = self.lr
                    current = {n: p - (lr[n] if isinstance(lr, Mapping) else lr) * prox[n] for n, p in detached.items()}
        return {n: t.detach() for n, t in current.items()}

    def forward(self, data: Any) -> FastModel:
        """Adapt to ``data`` (proximal inner loop) and return the :class:`~metann.meta.FastModel`.

        In train mode with grad enabled, the adapted weights back-propagate the implicit
        meta-gradient into the meta-parameters.
        """
        steps = self.steps
        phi = self.solve(data, steps)
        theta = self._model_params()
        adapted: Mapping[str, Tensor] = phi
        if self.training and torch.is_grad_enabled() and phi:
            body = [n for n, t in theta.items() if n not in phi and t.requires_grad]
            problem = _Problem(self, phi, body, data)
            outputs = _Implicit.apply(problem, *[theta[n] for n in phi], *[theta[n] for n in body])
            adapted = dict(zip(phi, outputs))
        fast = FastModel(self, {n: adapted.get(n, t) for n, t in theta.items()})
        fast.steps_taken = steps
        return fast

    def clone(self) -> FastModel:
        """Not available: a hand-written loop of :meth:`FastModel.adapt` steps would be MAML, not iMAML.

        Raises:
            NotImplementedError: Always. Call ``imaml(support)``, or :meth:`solve`.
        """
        raise NotImplementedError(
            "`iMAML` has no hand-written inner loop: `FastModel.adapt` takes MAML steps. "
            "Call `imaml(support)` (or `imaml.solve(support)` for the detached inner solution)."
        )

    def batched(self, tasks: Any) -> Tensor:
        """Not available: :meth:`MAML.batched` unrolls MAML's inner loop, not iMAML's.

        Raises:
            NotImplementedError: Always. Use ``MetaTrainer(..., vectorize=False)``.
        """
        raise NotImplementedError(
            "`iMAML` has no vectorised meta-batch: `batched` would unroll MAML's inner loop. "
            "Use `MetaTrainer(..., vectorize=False)` (the default)."
        )

    def extra_repr(self) -> str:
        return (
            f"steps_train={self.steps_train}, steps_eval={self.steps_eval}, lr={self.lr}, lam={self.lam}, "
            f"cg_steps={self.cg_steps}, cg_damping={self.cg_damping}, cg_tol={self.cg_tol}"
        )
