"""Check an algorithm's meta-gradient against float64 finite differences and a longhand MAML."""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from metann.functional import math_attention
from metann.meta.imaml import iMAML
from metann.meta.maml import MAML
from metann.meta.metasgd import MetaSGD
from metann.meta.reptile import Reptile

__all__ = ["MetaGradientReport", "ParameterCheck", "check_meta_gradient"]


class _Task(NamedTuple):
    support: Any
    query: Any


@dataclass(frozen=True)
class ParameterCheck:
    """The checks of one meta-parameter.

    Attributes:
        name: The name in ``algorithm.named_parameters()``.
        shape: Its shape.
        grad_max: Largest absolute entry of the library's meta-gradient.
        fd_error: Largest ``|library - finite difference|`` over the probes.
        fd_scale: Largest ``|finite difference|`` over the probes.
        probes: Number of finite-difference probes (elements and directions).
        reference_error: Largest ``|library - reference|`` (``None``: no reference).
        reference_scale: Largest ``|reference|`` (``None``: no reference).
        fd_ok: Whether the finite-difference probes agree within tolerance.
        reference_ok: Whether the reference agrees (``True`` when there is none).
    """

    name: str
    shape: tuple[int, ...]
    grad_max: float
    fd_error: float
    fd_scale: float
    probes: int
    reference_error: float | None
    reference_scale: float | None
    fd_ok: bool
    reference_ok: bool

    @property
    def ok(self) -> bool:
        """Both checks pass."""
        return self.fd_ok and self.reference_ok


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


@dataclass
class MetaGradientReport:
    """What :func:`check_meta_gradient` found; ``str(report)`` is a table.

    Attributes:
        algorithm: The algorithm's class name.
        objective: The meta-objective's value (float64).
        parameters: One :class:`ParameterCheck` per meta-parameter that requires grad.
        eps: Finite-difference step.
        rtol: Relative tolerance of the finite-difference check.
        atol: Absolute tolerance of the finite-difference check.
        reference: What the reference was: ``"longhand MAML"``, ``"off"`` or
            ``"not applicable: <reason>"``.
        reference_objective: The reference's meta-objective value (``None``: no reference).
        reference_rtol: Relative tolerance against the reference.
        reference_atol: Absolute tolerance against the reference.
        fd_target: What the finite differences differentiate: the meta-objective, or
            (first order) the meta-objective with the inner-loop gradients held fixed.
    """

    algorithm: str
    objective: float
    parameters: list[ParameterCheck]
    eps: float
    rtol: float
    atol: float
    reference: str
    reference_objective: float | None = None
    reference_rtol: float = 1e-7
    reference_atol: float = 1e-10
    fd_target: str = "the meta-objective"

    @property
    def objective_ok(self) -> bool:
        """Whether the reference computes the same meta-objective value (``True`` without a reference)."""
        if self.reference_objective is None:
            return True
        return abs(self.objective - self.reference_objective) <= self.reference_atol + self.reference_rtol * abs(
            self.reference_objective
        )

    @property
    def ok(self) -> bool:
        """Every parameter passes and the objective values agree."""
        return self.objective_ok and all(p.ok for p in self.parameters)

    @property
    def failures(self) -> list[str]:
        """Names of the parameters that fail a check."""
        return [p.name for p in self.parameters if not p.ok]

    def __str__(self) -> str:
        lines = [
            f"check_meta_gradient: {self.algorithm} in float64, meta-objective {self.objective:.10g}",
            f"finite differences of {self.fd_target}: eps={self.eps:g}, "
            f"pass if error <= {self.atol:g} + {self.rtol:g} * scale",
            f"reference: {self.reference}"
            + (
                f", pass if error <= {self.reference_atol:g} + {self.reference_rtol:g} * scale"
                if self.reference_objective is not None
                else ""
            ),
        ]
        if self.reference_objective is not None:
            mark = "ok" if self.objective_ok else "MISMATCH"
            lines.append(f"reference meta-objective {self.reference_objective:.10g} ({mark})")
        rows = [("parameter", "shape", "|grad| max", "probes", "FD error", "FD scale", "ref error", "ref scale")]
        rows[0] += ("status",)
        for p in self.parameters:
            checks = (("finite differences", p.fd_ok), ("reference", p.reference_ok))
            failed = [label for label, good in checks if not good]
            rows.append(
                (
                    p.name,
                    str(tuple(p.shape)),
                    _fmt(p.grad_max),
                    str(p.probes),
                    _fmt(p.fd_error),
                    _fmt(p.fd_scale),
                    _fmt(p.reference_error),
                    _fmt(p.reference_scale),
                    "ok" if not failed else "FAIL (" + ", ".join(failed) + ")",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines.extend("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
        bad = len(self.failures) + (not self.objective_ok)
        lines.append("result: OK" if self.ok else f"result: FAILED ({bad} problem(s))")
        return "\n".join(lines)

    def assert_ok(self) -> None:
        """Raise ``AssertionError`` with the table unless every check passed."""
        if not self.ok:
            raise AssertionError("meta-gradient check failed:\n" + str(self))


# ---------------------------------------------------------------------------- preparation
def _to_float64(data: Any) -> Any:
    if isinstance(data, Tensor):
        return data.double() if data.is_floating_point() else data
    if isinstance(data, (tuple, list)):
        return type(data)(_to_float64(d) for d in data)
    if isinstance(data, dict):
        return {k: _to_float64(v) for k, v in data.items()}
    return data


def _build(algorithm_or_factory: Any, model: nn.Module) -> nn.Module:
    """A float64 algorithm on a deep copy of ``model``; the caller's objects stay untouched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an `nn.Module`, got `{type(model).__name__}`.")
    if isinstance(algorithm_or_factory, nn.Module):
        if getattr(algorithm_or_factory, "model", None) is not model:
            raise ValueError(
                "`model` must be the algorithm's own model (`algorithm.model`); "
                "or pass a factory `lambda model: MAML(model, ...)`."
            )
        algorithm = copy.deepcopy(algorithm_or_factory).double()
    elif callable(algorithm_or_factory):
        algorithm = algorithm_or_factory(copy.deepcopy(model).double())
        if not isinstance(algorithm, nn.Module):
            raise TypeError(
                f"the factory must return a metann.meta algorithm (an `nn.Module`), got `{type(algorithm).__name__}`."
            )
        algorithm = algorithm.double()
    else:
        raise TypeError(
            "`algorithm_or_factory` must be a metann.meta algorithm or a factory `model -> algorithm`, "
            f"got `{type(algorithm_or_factory).__name__}`."
        )
    if isinstance(algorithm, Reptile):
        raise TypeError(
            "`check_meta_gradient` cannot check `Reptile`: its update (theta - phi) is not the gradient of a "
            "meta-objective, so finite differences do not apply."
        )
    if not (callable(getattr(algorithm, "meta_objective", None)) or callable(getattr(algorithm, "evaluator", None))):
        raise TypeError(
            f"`{type(algorithm).__name__}` has neither `meta_objective(task)` nor `evaluator`; "
            "it is not a metann.meta algorithm."
        )
    return algorithm


def _check_options(eps: Any, elements: Any, directions: Any, tolerances: dict[str, Any]) -> None:
    for name, value in {"eps": eps, **tolerances}.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"`{name}` must be a number, got `{type(value).__name__}`.")
        if not math.isfinite(value) or value < 0 or (name == "eps" and value == 0):
            raise ValueError(f"`{name}` must be {'> 0' if name == 'eps' else '>= 0'} and finite, got {value}.")
    for name, value in (("elements", elements), ("directions", directions)):
        if value is None and name == "elements":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"`{name}` must be an int, got `{type(value).__name__}`.")
        if value < 0:
            raise ValueError(f"`{name}` must be >= 0, got {value}.")
    if elements == 0 and directions == 0:
        raise ValueError("`elements` and `directions` are both 0: give at least one finite-difference probe.")


class _Objective:
    """The meta-objective of a float64 algorithm, evaluated from the same state every time."""

    def __init__(self, algorithm: nn.Module, task: _Task, seed: int) -> None:
        self.algorithm = algorithm
        self.task = task
        self.buffers = [(b, b.detach().clone()) for b in algorithm.buffers()]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.rng_state = torch.get_rng_state()

    def __call__(self) -> Tensor:
        with torch.no_grad():
            for buffer, value in self.buffers:
                buffer.copy_(value)
        self.algorithm.train()
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng_state)
            hook = getattr(self.algorithm, "meta_objective", None)
            if callable(hook):
                return hook(self.task)[0]
            return self.algorithm.evaluator(self.algorithm(self.task.support), self.task.query)

    def value(self) -> float:
        return float(self().detach())


@contextlib.contextmanager
def _inner_gradients(store: list[tuple[Tensor | None, ...]], *, replay: bool) -> Iterator[None]:
    """Record (or replay, in the same order) every ``torch.autograd.grad`` result taken without ``create_graph``.

    A first-order meta-gradient is the gradient of the meta-objective with the inner
    loop's gradients held fixed; replaying the gradients recorded at the unperturbed
    parameters gives finite differences of exactly that function. Calls that build a
    graph (``create_graph=True``) pass through. Patches ``torch.autograd.grad`` for the
    duration (single-threaded use only) and restores it in ``finally``.
    """
    original = torch.autograd.grad
    calls = iter(store)

    def grad(outputs: Any, inputs: Any, *args: Any, **kwargs: Any) -> tuple[Tensor | None, ...]:
        create_graph = kwargs.get("create_graph", args[2] if len(args) > 2 else False)
        if create_graph:
            return original(outputs, inputs, *args, **kwargs)
        if not replay:
            result = original(outputs, inputs, *args, **kwargs)
            store.append(tuple(None if g is None else g.detach().clone() for g in result))
            return result
        recorded = next(calls, None)
        inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
        if recorded is None or len(recorded) != len(inputs) or any(
            g is not None and g.shape != t.shape for g, t in zip(recorded, inputs)
        ):
            raise RuntimeError(
                "`check_meta_gradient`: the first-order inner loop took a different path when perturbed "
                "(another number or shape of gradients); finite differences with fixed inner gradients do not apply."
            )
        return recorded

    torch.autograd.grad = grad
    try:
        yield
    finally:
        torch.autograd.grad = original


# ---------------------------------------------------------------------------- finite differences
def _probes(param: Tensor, elements: int | None, directions: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Unit perturbation directions: single elements (a random subset), then random Gaussian directions."""
    n = param.numel()
    if elements is None or elements >= n:
        chosen = range(n)
    else:
        chosen = sorted(torch.randperm(n, generator=gen)[:elements].tolist())
    for index in chosen:
        e = torch.zeros(n, dtype=param.dtype, device=param.device)
        e[index] = 1.0
        yield e.view_as(param)
    for _ in range(directions):
        v = torch.randn(param.shape, generator=gen, dtype=param.dtype).to(param.device)
        yield v / v.norm()


def _finite_differences(
    objective: _Objective,
    param: Tensor,
    grad: Tensor,
    eps: float,
    elements: int | None,
    directions: int,
    gen: torch.Generator,
    frozen: list[tuple[Tensor | None, ...]] | None,
) -> tuple[float, float, int]:
    base = param.detach().clone()

    def value() -> float:
        if frozen is None:
            return objective.value()
        with _inner_gradients(frozen, replay=True):
            return objective.value()

    error, scale, count = 0.0, 0.0, 0
    try:
        for v in _probes(param, elements, directions, gen):
            with torch.no_grad():
                param.copy_(base + eps * v)
            plus = value()
            with torch.no_grad():
                param.copy_(base - eps * v)
            minus = value()
            numeric = (plus - minus) / (2 * eps)
            analytic = float((grad * v).sum())
            error, scale, count = max(error, abs(numeric - analytic)), max(scale, abs(numeric)), count + 1
    finally:
        with torch.no_grad():
            param.copy_(base)
    return error, scale, count


# ---------------------------------------------------------------------------- the longhand reference
def _second_order(algorithm: nn.Module) -> bool:
    """Whether the algorithm (in train mode) builds second-order graphs now (its order schedule included)."""
    order = getattr(algorithm, "second_order", None)
    if isinstance(order, bool):
        return order
    return not getattr(algorithm, "first_order", False)


def _reference_applicable(algorithm: nn.Module) -> str | None:
    """``None`` if the longhand MAML models ``algorithm``, else the reason it does not."""
    cls = type(algorithm)
    if not isinstance(algorithm, MAML):
        return f"`{cls.__name__}` is not a MAML-family algorithm"
    if isinstance(algorithm, iMAML):
        return "iMAML's meta-gradient is implicit (the finite differences still apply)"
    if getattr(algorithm, "optimizer", None) is not None:
        return "the inner loop uses a metann.optim optimizer"
    for method in ("forward", "meta_objective"):
        if getattr(cls, method) is not getattr(MAML, method):
            return f"`{cls.__name__}` overrides `{method}`"
    if cls.inner_rates not in (MAML.inner_rates, MetaSGD.inner_rates):
        return f"`{cls.__name__}` overrides `inner_rates`"
    # MAML++ options that change the meta-objective or the gradient (checkpointed steps and the
    # derivative-order schedule do not: the reference follows `second_order`).
    weights = algorithm.loss_weights() if callable(getattr(algorithm, "loss_weights", None)) else None
    options = {
        "multi_step_loss": weights is not None,
        "per_step_bn": bool(getattr(algorithm, "per_step_bn", False)),
        "per_step_lr": bool(getattr(algorithm, "per_step_lr", False)),
        "second_order_steps": getattr(algorithm, "second_order_steps", None) is not None,
    }
    on = sorted(name for name, value in options.items() if value)
    if on:
        return f"the longhand MAML does not model the options {on}"
    return None


def _longhand_maml(algorithm: MAML, objective: _Objective) -> tuple[float, dict[str, Tensor]]:
    """MAML/MetaSGD/ANIL written out with ``torch.func.functional_call`` and ``torch.autograd.grad``.

    Reads only the algorithm's settings (``steps_train``, ``inner_rates``, ``second_order``,
    ``adapt_names``, ``evaluator``) and runs on detached copies of its meta-parameters.
    """
    model = algorithm.model
    meta = {n: p for n, p in algorithm.named_parameters() if p.requires_grad}
    copies = {n: p.detach().clone().requires_grad_() for n, p in meta.items()}
    by_id = {id(meta[n]): copies[n] for n in meta}
    params = {n: by_id.get(id(p), p.detach()) for n, p in model.named_parameters()}
    names = [n for n in algorithm.adapt_names if params[n].requires_grad]
    rates = algorithm.inner_rates(names)

    def rate(name: str) -> Any:
        r = rates[name] if isinstance(rates, Mapping) else rates
        return by_id.get(id(r), r) if isinstance(r, Tensor) else r

    def call(p: dict[str, Tensor]) -> Callable[..., Any]:
        return lambda *args, **kwargs: torch.func.functional_call(model, p, args, kwargs)

    with torch.no_grad():
        for buffer, value in objective.buffers:
            buffer.copy_(value)
    algorithm.train()
    task = objective.task
    create_graph = _second_order(algorithm)
    with torch.random.fork_rng(devices=[]), math_attention():
        torch.set_rng_state(objective.rng_state)
        fast = dict(params)
        for _ in range(algorithm.steps_train):
            loss = algorithm.evaluator(call(fast), task.support)
            grads = torch.autograd.grad(
                loss, [fast[n] for n in names], create_graph=create_graph, allow_unused=True
            )
            fast = {**fast, **{n: fast[n] - rate(n) * g for n, g in zip(names, grads) if g is not None}}
        query_loss = algorithm.evaluator(call(fast), task.query)
        grads = torch.autograd.grad(query_loss, list(copies.values()), allow_unused=True)
    result = {n: (g if g is not None else torch.zeros_like(copies[n])) for n, g in zip(copies, grads)}
    return float(query_loss.detach()), result


# ---------------------------------------------------------------------------- the public check
def check_meta_gradient(
    algorithm_or_factory: nn.Module | Callable[[nn.Module], nn.Module],
    model: nn.Module,
    support: Any,
    query: Any,
    *,
    eps: float = 1e-6,
    reference: bool = True,
    elements: int | None = 16,
    directions: int = 2,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    reference_rtol: float = 1e-7,
    reference_atol: float = 1e-10,
    seed: int = 0,
) -> MetaGradientReport:
    r"""Compare an algorithm's meta-gradient with finite differences and, where it applies, a longhand MAML.

    Everything runs on a float64 deep copy: your model, algorithm, optimizer state and
    buffers are not touched. The meta-gradient is what ``backward()`` of the algorithm's
    ``meta_objective(task)`` (first element) puts into each meta-parameter's ``.grad``
    (``algorithm.parameters()``: the model's weights and e.g. MetaSGD's rates), in train
    mode, with ``task.support = support`` and ``task.query = query``.

    **Finite differences.** For each meta-parameter, central differences
    :math:`(f(\theta + \epsilon v) - f(\theta - \epsilon v)) / 2\epsilon` of the
    meta-objective are compared with :math:`\langle g, v \rangle` for ``elements``
    single entries (chosen at random when the parameter has more; ``None``: all, costly
    on big models) and ``directions`` random unit directions. A random direction touches
    every entry, so it catches an error anywhere in the tensor at the price of two
    evaluations; the single entries localise it. Each probe costs two evaluations of the
    meta-objective (a whole inner loop). Buffers are restored and the random generator
    reseeded (``seed``) before every evaluation, so batch norm and dropout see the same
    state each time. Finite differences check that the meta-gradient is the gradient of
    the meta-objective the algorithm computes, but cannot notice a wrong meta-objective.
    A first-order algorithm (``first_order=True``, or while an order schedule keeps it
    first order) computes by design the gradient with the inner loop's gradients held
    fixed, and truncated back-propagation (``second_order_steps``) does so for its early
    steps. For these, the inner gradients taken without a graph (``torch.autograd.grad``
    calls without ``create_graph``) are recorded at the unperturbed parameters and
    replayed in the perturbed evaluations, so the finite differences are of that function
    (``torch.autograd.grad`` is patched meanwhile: run no other thread's autograd during
    the check). A second-order algorithm gets no replay, so an inner step that forgets
    ``create_graph`` is caught.

    **Reference** (``reference=True``, for :class:`~metann.meta.MAML`,
    :class:`~metann.meta.MetaSGD`, :class:`~metann.meta.ANIL` and subclasses that keep
    their ``forward`` and ``meta_objective``, without an inner optimizer): MAML written
    longhand with ``torch.func.functional_call`` and
    ``torch.autograd.grad(create_graph=second_order)``, from the algorithm's
    ``steps_train``, ``inner_rates``, ``second_order``, ``adapt_names`` and ``evaluator``
    (with ``checkpoint_steps`` too; not with the other MAML++ options).
    Both the meta-objective's value and the meta-gradient must agree, which catches an
    inner loop that updates the wrong parameters or drops the second-order term. For
    other algorithms the report says why the reference was not applied.

    A parameter passes when ``error <= atol + rtol * scale`` for both checks, where the
    error is the largest absolute difference and the scale the largest absolute value
    of the finite differences (or of the reference). Not for :class:`~metann.meta.Reptile`,
    whose update is not a gradient. For :class:`~metann.meta.iMAML`, the implicit
    meta-gradient matches finite differences only once the inner loop has converged.

    Args:
        algorithm_or_factory: An algorithm whose ``model`` is ``model`` (deep-copied), or
            a factory ``model -> algorithm`` called with a float64 deep copy of ``model``.
        model: The network.
        support: Support data, e.g. ``(x, y)``; floating-point tensors are cast to float64.
        query: Query data.
        eps: Finite-difference step.
        reference: Compare with the longhand MAML where it applies.
        elements: Single entries probed per parameter (``None``: every entry).
        directions: Random directions probed per parameter.
        rtol: Relative tolerance against finite differences.
        atol: Absolute tolerance against finite differences.
        reference_rtol: Relative tolerance against the reference.
        reference_atol: Absolute tolerance against the reference.
        seed: Seed for the probes and for every evaluation's random numbers.

    Returns:
        A :class:`MetaGradientReport`; ``report.ok``, ``print(report)``, ``report.assert_ok()``.

    Raises:
        TypeError: For an algorithm that is not a metann.meta algorithm (or is Reptile),
            a model that is not an ``nn.Module``, or options of the wrong kind.
        ValueError: For ``eps <= 0``, negative tolerances or probe counts, or an
            algorithm whose ``model`` is not ``model``.

    Example:
        >>> from metann.meta import MAML, default_evaluator_regression
        >>> from metann.testing import check_meta_gradient
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> x, y = torch.randn(10, 2), torch.randn(10, 1)
        >>> report = check_meta_gradient(
        ...     lambda m: MAML(m, steps_train=2, lr=0.1, evaluator=default_evaluator_regression),
        ...     net, (x[:5], y[:5]), (x[5:], y[5:]), elements=4)
        >>> report.ok
        True
        >>> report.assert_ok()
    """
    _check_options(
        eps,
        elements,
        directions,
        {"rtol": rtol, "atol": atol, "reference_rtol": reference_rtol, "reference_atol": reference_atol},
    )
    algorithm = _build(algorithm_or_factory, model)
    objective = _Objective(algorithm, _Task(_to_float64(support), _to_float64(query)), seed)
    meta = [(n, p) for n, p in algorithm.named_parameters() if p.requires_grad]
    algorithm.zero_grad(set_to_none=True)
    # A first-order meta-gradient is not the gradient of the meta-objective; it is the gradient with the
    # inner-loop gradients held fixed, so those are recorded here and replayed under the perturbations.
    algorithm.train()
    truncated = getattr(algorithm, "second_order_steps", None) is not None
    first_order = not isinstance(algorithm, iMAML) and (not _second_order(algorithm) or truncated)
    frozen: list[tuple[Tensor | None, ...]] | None = [] if first_order else None
    with _inner_gradients(frozen, replay=False) if frozen is not None else contextlib.nullcontext():
        loss = objective()
    loss.backward()
    value = float(loss.detach())
    grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in meta}
    algorithm.zero_grad(set_to_none=True)

    reason = _reference_applicable(algorithm) if reference else "off"
    reference_value, reference_grads = None, None
    if reference and reason is None:
        reference_value, reference_grads = _longhand_maml(algorithm, objective)
        label = "longhand MAML (torch.func.functional_call, torch.autograd.grad)"
    else:
        label = reason if reason == "off" else f"not applicable: {reason}"

    gen = torch.Generator().manual_seed(seed)
    checks = []
    for name, param in meta:
        grad = grads[name]
        fd_error, fd_scale, probes = _finite_differences(
            objective, param, grad, eps, elements, directions, gen, frozen
        )
        ref_error = ref_scale = None
        ref_ok = True
        if reference_grads is not None:
            expected = reference_grads[name]
            ref_error = float((grad - expected).abs().max()) if grad.numel() else 0.0
            ref_scale = float(expected.abs().max()) if grad.numel() else 0.0
            ref_ok = ref_error <= reference_atol + reference_rtol * ref_scale
        checks.append(
            ParameterCheck(
                name=name,
                shape=tuple(param.shape),
                grad_max=float(grad.abs().max()) if grad.numel() else 0.0,
                fd_error=fd_error,
                fd_scale=fd_scale,
                probes=probes,
                reference_error=ref_error,
                reference_scale=ref_scale,
                fd_ok=fd_error <= atol + rtol * fd_scale,
                reference_ok=ref_ok,
            )
        )
    return MetaGradientReport(
        algorithm=type(algorithm).__name__,
        objective=value,
        parameters=checks,
        eps=float(eps),
        rtol=float(rtol),
        atol=float(atol),
        reference=label,
        reference_objective=reference_value,
        reference_rtol=float(reference_rtol),
        reference_atol=float(reference_atol),
        fd_target="the meta-objective with the first-order inner gradients held fixed"
        if first_order
        else "the meta-objective",
    )
