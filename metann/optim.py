r"""Differentiable, functional inner-loop optimizers (SGD, RMSprop, Adam) for meta-learning.

Each optimizer maps ``(params, grads, state)`` to ``(new_params, new_state)`` without
modifying any tensor or mapping in place, so the whole inner loop stays on the autograd
graph: of the parameters, of the gradients (when they were computed with
``create_graph=True``) and of the learning rate (when it is a tensor that requires grad).
With the same data, the updates equal :mod:`torch.optim`'s to float precision.

Example:
    Meta-learn Adam's step size through two inner steps (second order):

    >>> lr = torch.tensor(0.1, requires_grad=True)
    >>> opt = Adam(lr)
    >>> params = {"w": torch.tensor([1.0, -2.0], requires_grad=True)}
    >>> state = opt.init(params)
    >>> for _ in range(2):
    ...     loss = (params["w"] ** 2).sum()
    ...     grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=True)))
    ...     params, state = opt.step(params, grads, state)
    >>> params["w"].detach()
    tensor([ 0.8004, -1.8002])
    >>> (params["w"] ** 2).sum().backward()
    >>> lr.grad
    tensor(-10.3731)
"""
from __future__ import annotations

from collections.abc import Mapping
from numbers import Real
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["SGD", "Adam", "InnerOptimizer", "RMSprop"]

#: What ``lr`` may be: a number, a one-element tensor, or a mapping name -> tensor.
LearningRate = float | Tensor | Mapping[str, Tensor]

_NONNEGATIVE = "`{cls}` expects `{arg}` >= 0, got {value!r}."
_REAL = "`{cls}` expects `{arg}` to be a real number, got `{kind}` ({value!r})."
_BOOL = "`{cls}` expects `{arg}` to be a bool, got `{kind}` ({value!r})."


def _safe_sqrt(x: Tensor) -> Tensor:
    """Square root whose derivative is finite (zero) where ``x`` is exactly zero.

    The forward value is exactly ``x.sqrt()``. Plain ``sqrt`` has an infinite derivative
    at 0, so an exactly-zero second moment (a dead ReLU unit, an unused parameter) turns
    ``0 * inf`` into NaN in a second-order meta-gradient. Here the zero entries take the
    square root of a safe input (1) and are then overwritten with 0, so their derivative
    is 0 -- a valid subgradient, since a zero moment comes from zero gradients. The mask is
    applied even when ``x`` does not require grad: under ``torch.func`` transforms (the
    batched meta-batch path) ``requires_grad`` does not tell whether an outer graph exists.
    """
    zero = x == 0
    return x.masked_fill(zero, 1.0).sqrt().masked_fill(zero, 0.0)


def _descend(param: Tensor, direction: Tensor, lr: float | Tensor) -> Tensor:
    """Return ``param - lr * direction`` without touching ``param``."""
    if isinstance(lr, float):
        return torch.add(param, direction, alpha=-lr)
    return torch.addcmul(param, direction, lr, value=-1)


def _check_real(cls: str, arg: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(_REAL.format(cls=cls, arg=arg, kind=type(value).__name__, value=value))
    return float(value)


def _check_nonnegative(cls: str, arg: str, value: Any) -> float:
    value = _check_real(cls, arg, value)
    if not value >= 0:  # also refuses NaN
        raise ValueError(_NONNEGATIVE.format(cls=cls, arg=arg, value=value))
    return value


def _check_bool(cls: str, arg: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(_BOOL.format(cls=cls, arg=arg, kind=type(value).__name__, value=value))
    return value


def _check_lr_tensor(cls: str, arg: str, value: Tensor) -> None:
    if not value.is_floating_point():
        raise TypeError(f"`{cls}` expects `{arg}` to be a floating-point tensor, got dtype {value.dtype}.")
    with torch.no_grad():
        if not bool((value >= 0).all()):
            raise ValueError(
                f"`{cls}` expects `{arg}` >= 0, got a tensor with negative or NaN entries ({value.detach()!r})."
            )


def _check_lr(cls: str, value: Any) -> float | Tensor | Mapping[str, Tensor]:
    """Validate a learning rate: a number, a one-element tensor or a mapping name -> tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"`{cls}` expects a tensor `lr` to have one element, got shape {tuple(value.shape)}. "
                "Pass a mapping name -> tensor for per-parameter learning rates."
            )
        _check_lr_tensor(cls, "lr", value)
        return value
    if isinstance(value, (Mapping, torch.nn.ParameterDict)):
        for name, rate in value.items():
            if not isinstance(name, str):
                raise TypeError(f"`{cls}` expects the keys of `lr` to be parameter names (str), got {name!r}.")
            if not isinstance(rate, Tensor):
                raise TypeError(
                    f"`{cls}` expects `lr[{name!r}]` to be a tensor, got `{type(rate).__name__}` ({rate!r}). "
                    f"Use `torch.full_like(param, {rate!r})` or a number for one shared rate."
                )
            _check_lr_tensor(cls, f"lr[{name!r}]", rate)
        return value
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"`{cls}` expects `lr` to be a number, a one-element tensor or a mapping name -> tensor, "
            f"got `{type(value).__name__}` ({value!r})."
        )
    return _check_nonnegative(cls, "lr", value)


class InnerOptimizer:
    r"""Base class of the differentiable inner-loop optimizers.

    An optimizer holds only hyper-parameters; everything that changes during one
    adaptation lives in the ``state`` returned by :meth:`init` and :meth:`step`. One
    optimizer object can therefore serve several models and several adaptations at once.

    ``state`` maps the name of each per-parameter buffer (as :mod:`torch.optim` spells it,
    e.g. ``"exp_avg"``) to a dictionary keyed by parameter name. Buffers are created on a
    parameter's first step (zeros, like :mod:`torch.optim`), and :class:`Adam` counts
    steps per parameter (``state["step"][name]``, an ``int``), so a parameter that
    receives no gradient in a step is left alone, exactly as :mod:`torch.optim` skips a
    parameter whose ``.grad`` is ``None``.

    Subclasses set ``_slots`` (the buffer names) and implement ``_update``.

    Args:
        lr: Learning rate, ``>= 0``. A number; a one-element floating-point tensor
            (give it ``requires_grad=True`` to meta-learn it); or a mapping name ->
            floating-point tensor of per-parameter rates (as in Meta-SGD), each of a shape
            that broadcasts to its parameter's shape (e.g. the parameter's own shape, or
            ``()``); names without a gradient need no rate, and extra names are
            ignored. Such tensors are cast to their parameter's dtype and device.
            Tensors are checked for negative entries when assigned; values learned later
            may take any sign.

    Raises:
        TypeError: If ``lr`` is of none of these kinds, or a tensor is not floating point.
        ValueError: If ``lr`` is negative or NaN, or a tensor ``lr`` has more than one element.

    Example:
        >>> opt = SGD(lr=0.5)
        >>> params = {"w": torch.ones(2, requires_grad=True), "frozen": torch.zeros(1)}
        >>> state = opt.init(params)
        >>> new, state = opt.step(params, {"w": torch.tensor([1.0, -1.0])}, state)
        >>> new["w"].detach(), new["frozen"] is params["frozen"]
        (tensor([0.5000, 1.5000]), True)
    """

    _slots: tuple[str, ...] = ()
    _hyper: ClassVar[tuple[str, ...]] = ()

    def __init__(self, lr: LearningRate) -> None:
        self.lr = lr

    @property
    def lr(self) -> LearningRate:
        """The learning rate (validated on assignment; see the class docstring)."""
        return self._lr

    @lr.setter
    def lr(self, value: LearningRate) -> None:
        self._lr = _check_lr(type(self).__name__, value)

    def __repr__(self) -> str:
        lr = self._lr
        if isinstance(lr, (Mapping, torch.nn.ParameterDict)):
            lr_text = f"<{len(lr)} per-parameter tensors>"
        else:
            lr_text = repr(lr)
        fields = [f"lr={lr_text}"] + [f"{key}={getattr(self, key)!r}" for key in self._hyper]
        return f"{type(self).__name__}({', '.join(fields)})"

    def init(self, params: Mapping[str, Tensor]) -> dict[str, Any]:
        """Return a fresh state for one adaptation of ``params``.

        The buffers are filled lazily by :meth:`step`, so this is cheap and the same
        state layout works for any parameter names.

        Args:
            params: The parameters to adapt, keyed by dotted name.

        Returns:
            A new state: one empty dictionary per buffer name.

        Raises:
            TypeError: If ``params`` is not a mapping.
        """
        self._check_mapping("params", params)
        return {slot: {} for slot in self._slots}

    def step(
        self,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor | None],
        state: dict[str, Any],
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Take one differentiable step.

        Args:
            params: Current parameters, keyed by dotted name.
            grads: Gradients keyed like ``params``. A name that is missing or maps to
                ``None`` passes through unchanged, and so does its state.
            state: The state from :meth:`init` or from the previous :meth:`step`.

        Returns:
            ``(new_params, new_state)``: new dictionaries; ``new_params`` has the keys
            of ``params`` in the same order. No input tensor, mapping or state is
            modified.

        Raises:
            TypeError: If ``params``, ``grads`` or ``state`` is not a mapping, or a
                gradient is not a tensor.
            KeyError: If ``grads`` names a parameter that ``params`` lacks, ``state``
                lacks a buffer (it was not made by this optimizer's :meth:`init`), or the
                ``lr`` mapping has no rate for a parameter that has a gradient.
            ValueError: If a gradient's shape differs from its parameter's, or a
                per-parameter ``lr`` does not broadcast to its parameter.
        """
        self._check_mapping("params", params)
        self._check_mapping("grads", grads)
        self._check_mapping("state", state)
        unexpected = grads.keys() - params.keys()
        if unexpected:
            raise KeyError(
                f"`{type(self).__name__}.step`: `grads` has names that `params` lacks: {sorted(unexpected)}."
            )
        missing = [slot for slot in self._slots if slot not in state]
        if missing:
            raise KeyError(
                f"`{type(self).__name__}.step`: `state` lacks the buffers {missing}. "
                "Create the state with this optimizer's `init(params)`."
            )
        new_state = dict(state)
        for slot in self._slots:
            new_state[slot] = dict(state[slot])
        lr = self._lr
        per_parameter = not isinstance(lr, (float, Tensor))
        if isinstance(lr, Tensor) and lr.dim():
            lr = lr.reshape(())
        new_params = {}
        for name, param in params.items():
            grad = grads.get(name)
            if grad is None:
                new_params[name] = param
                continue
            if not isinstance(grad, Tensor) or grad.shape != param.shape:
                self._bad_grad(name, param, grad)
            rate = self._rate(name, param) if per_parameter else lr
            new_params[name] = self._update(name, param, grad, rate, new_state)
        return new_params, new_state

    def _update(self, name: str, param: Tensor, grad: Tensor, lr: float | Tensor, state: dict[str, Any]) -> Tensor:
        """Return the new value of one parameter and write its new buffers into ``state``.

        ``state`` holds fresh copies of the per-buffer dictionaries, so assigning
        ``state[slot][name] = tensor`` is safe; the tensors in it must never be modified.
        """
        raise NotImplementedError(f"`{type(self).__name__}` must implement `_update`; use `SGD`, `RMSprop` or `Adam`.")

    def _rate(self, name: str, param: Tensor) -> Tensor:
        """Look up, check and cast the per-parameter learning rate of ``name``."""
        lrs = self._lr
        try:
            rate = lrs[name]
        except KeyError as err:
            raise KeyError(
                f"`{type(self).__name__}`: the `lr` mapping has no learning rate for parameter {name!r}. "
                "Give a rate for every parameter that receives a gradient."
            ) from err
        r_shape, p_shape = rate.shape, param.shape
        if len(r_shape) > len(p_shape) or any(
            r != 1 and r != p for r, p in zip(reversed(r_shape), reversed(p_shape))
        ):
            raise ValueError(
                f"`{type(self).__name__}`: `lr[{name!r}]` has shape {tuple(r_shape)}, which does not broadcast "
                f"to the shape {tuple(p_shape)} of parameter {name!r}. Use a tensor shaped like the parameter."
            )
        return rate.to(device=param.device, dtype=param.dtype)

    def _bad_grad(self, name: str, param: Tensor, grad: Any) -> None:
        cls = type(self).__name__
        if not isinstance(grad, Tensor):
            raise TypeError(
                f"`{cls}.step`: `grads[{name!r}]` must be a tensor or None, got `{type(grad).__name__}` ({grad!r})."
            )
        raise ValueError(
            f"`{cls}.step`: `grads[{name!r}]` has shape {tuple(grad.shape)}, "
            f"expected {tuple(param.shape)} (the shape of the parameter)."
        )

    def _check_mapping(self, arg: str, value: Any) -> None:
        if not isinstance(value, Mapping):
            expected = {
                "params": "a mapping name -> tensor",
                "grads": "a mapping name -> tensor (or None); pass `dict(zip(params, grads))`",
                "state": "the state returned by `init` or `step`",
            }[arg]
            raise TypeError(f"`{type(self).__name__}` expects `{arg}` to be {expected}, got `{type(value).__name__}`.")


class SGD(InnerOptimizer):
    r"""Differentiable stochastic gradient descent, with optional momentum.

    Follows :class:`torch.optim.SGD`: with :math:`g \leftarrow g + \lambda\theta`
    (weight decay), the momentum buffer is :math:`b_1 = g_1`,
    :math:`b_t = \mu b_{t-1} + (1 - \tau) g_t`; the step is :math:`\theta - \alpha b_t`,
    or :math:`\theta - \alpha (g_t + \mu b_t)` with Nesterov momentum. Unlike
    :mod:`torch.optim`, the buffer is not detached, so the meta-gradient flows through it.

    Args:
        lr: Learning rate :math:`\alpha` (see :class:`InnerOptimizer`).
        momentum: Momentum factor :math:`\mu \ge 0`.
        dampening: Dampening :math:`\tau` for momentum.
        nesterov: Use Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        weight_decay: L2 penalty :math:`\lambda \ge 0`.

    Raises:
        TypeError: If a hyper-parameter is of the wrong kind.
        ValueError: If ``lr``, ``momentum`` or ``weight_decay`` is negative, or
            ``nesterov`` is set without momentum or with dampening.

    Example:
        >>> opt = SGD(lr=0.1, momentum=0.9)
        >>> params = {"w": torch.tensor([1.0, 2.0], requires_grad=True)}
        >>> state = opt.init(params)
        >>> for _ in range(2):
        ...     params, state = opt.step(params, {"w": torch.tensor([1.0, -1.0])}, state)
        >>> params["w"].detach(), state["momentum_buffer"]["w"]
        (tensor([0.7100, 2.2900]), tensor([ 1.9000, -1.9000]))
    """

    _hyper: ClassVar[tuple[str, ...]] = ("momentum", "dampening", "nesterov", "weight_decay")

    def __init__(
        self,
        lr: LearningRate,
        momentum: float = 0.0,
        dampening: float = 0.0,
        *,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr)
        self.momentum = _check_nonnegative("SGD", "momentum", momentum)
        self.dampening = _check_real("SGD", "dampening", dampening)
        self.nesterov = _check_bool("SGD", "nesterov", nesterov)
        self.weight_decay = _check_nonnegative("SGD", "weight_decay", weight_decay)
        if nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                f"`SGD` with `nesterov=True` needs `momentum` > 0 and `dampening` == 0, got "
                f"momentum={self.momentum!r}, dampening={self.dampening!r}. Pass e.g. `momentum=0.9`."
            )
        self._slots = ("momentum_buffer",) if self.momentum != 0 else ()

    def _update(self, name: str, param: Tensor, grad: Tensor, lr: float | Tensor, state: dict[str, Any]) -> Tensor:
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)
        if self.momentum != 0:
            buffers = state["momentum_buffer"]
            buf = buffers.get(name)
            buf = grad if buf is None else buf.mul(self.momentum).add(grad, alpha=1 - self.dampening)
            buffers[name] = buf
            grad = grad.add(buf, alpha=self.momentum) if self.nesterov else buf
        return _descend(param, grad, lr)


class RMSprop(InnerOptimizer):
    r"""Differentiable RMSprop.

    Follows :class:`torch.optim.RMSprop`: :math:`v_t = a v_{t-1} + (1 - a) g_t^2`
    (:math:`v_0 = 0`); centered, :math:`\bar g_t = a \bar g_{t-1} + (1 - a) g_t` and the
    denominator is :math:`\sqrt{v_t - \bar g_t^2} + \epsilon`, otherwise
    :math:`\sqrt{v_t} + \epsilon` (``eps`` added after the square root). The step is
    :math:`\theta - \alpha\, g_t / d_t`, or with momentum
    :math:`b_t = \mu b_{t-1} + g_t / d_t` and :math:`\theta - \alpha b_t`.

    Note:
        The square root is written so that its derivative at an exactly-zero moment
        is 0 instead of infinite (the forward value is unchanged), so dead units and
        parameters with an exactly-zero gradient do not put NaN into a second-order
        meta-gradient.

    Args:
        lr: Learning rate :math:`\alpha` (see :class:`InnerOptimizer`).
        alpha: Smoothing constant :math:`a \in [0, 1]`.
        eps: Term :math:`\epsilon \ge 0` added to the denominator.
        weight_decay: L2 penalty :math:`\lambda \ge 0` (:math:`g \leftarrow g + \lambda\theta`).
        momentum: Momentum factor :math:`\mu \ge 0`.
        centered: Normalise by the estimated variance of the gradient.

    Raises:
        TypeError: If a hyper-parameter is of the wrong kind.
        ValueError: If a hyper-parameter is out of range.

    Example:
        >>> opt = RMSprop(lr=0.01, alpha=0.9)
        >>> params = {"w": torch.tensor([1.0, 2.0], requires_grad=True)}
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"w": torch.tensor([2.0, 0.0])}, state)
        >>> params["w"].detach(), state["square_avg"]["w"]
        (tensor([0.9684, 2.0000]), tensor([0.4000, 0.0000]))
    """

    _hyper: ClassVar[tuple[str, ...]] = ("alpha", "eps", "weight_decay", "momentum", "centered")

    def __init__(
        self,
        lr: LearningRate,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        *,
        centered: bool = False,
    ) -> None:
        super().__init__(lr)
        self.alpha = _check_real("RMSprop", "alpha", alpha)
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"`RMSprop` expects `alpha` in [0, 1], got {self.alpha!r}.")
        self.eps = _check_nonnegative("RMSprop", "eps", eps)
        self.weight_decay = _check_nonnegative("RMSprop", "weight_decay", weight_decay)
        self.momentum = _check_nonnegative("RMSprop", "momentum", momentum)
        self.centered = _check_bool("RMSprop", "centered", centered)
        self._slots = (
            ("square_avg",) + (("grad_avg",) if centered else ()) + (("momentum_buffer",) if self.momentum > 0 else ())
        )

    def _update(self, name: str, param: Tensor, grad: Tensor, lr: float | Tensor, state: dict[str, Any]) -> Tensor:
        alpha = self.alpha
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)
        square_avg = _get_or_zeros(state["square_avg"], name, param)
        square_avg = square_avg.mul(alpha).addcmul(grad, grad, value=1 - alpha)
        state["square_avg"][name] = square_avg
        if self.centered:
            grad_avg = _get_or_zeros(state["grad_avg"], name, param).lerp(grad, 1 - alpha)
            state["grad_avg"][name] = grad_avg
            avg = _safe_sqrt(square_avg.addcmul(grad_avg, grad_avg, value=-1))
        else:
            avg = _safe_sqrt(square_avg)
        avg = avg.add(self.eps)
        if self.momentum > 0:
            buf = _get_or_zeros(state["momentum_buffer"], name, param).mul(self.momentum).addcdiv(grad, avg)
            state["momentum_buffer"][name] = buf
            return _descend(param, buf, lr)
        if isinstance(lr, float):
            return torch.addcdiv(param, grad, avg, value=-lr)
        return torch.addcmul(param, grad.div(avg), lr, value=-1)


class Adam(InnerOptimizer):
    r"""Differentiable Adam.

    Follows :class:`torch.optim.Adam` (L2 weight decay, not AdamW):
    :math:`m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t`,
    :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2` (:math:`m_0 = v_0 = 0`), and
    :math:`\theta - \frac{\alpha}{1-\beta_1^t}\, m_t \big/ \big(\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon\big)`,
    with :math:`\hat v_t = \max(\hat v_{t-1}, v_t)` in place of :math:`v_t` for AMSGrad.
    The step count :math:`t` is kept per parameter in ``state["step"]``.

    Note:
        The square root is written so that its derivative at an exactly-zero moment
        is 0 instead of infinite (the forward value is unchanged), so dead units and
        parameters with an exactly-zero gradient do not put NaN into a second-order
        meta-gradient.

    Args:
        lr: Learning rate :math:`\alpha` (see :class:`InnerOptimizer`).
        betas: :math:`(\beta_1, \beta_2)`, each in :math:`[0, 1)`.
        eps: Term :math:`\epsilon \ge 0` added to the denominator.
        weight_decay: L2 penalty :math:`\lambda \ge 0` (:math:`g \leftarrow g + \lambda\theta`).
        amsgrad: Use the AMSGrad variant.

    Raises:
        TypeError: If a hyper-parameter is of the wrong kind.
        ValueError: If a hyper-parameter is out of range.

    Example:
        >>> opt = Adam(lr=0.1)
        >>> params = {"w": torch.tensor([1.0, 2.0], requires_grad=True)}
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"w": torch.tensor([3.0, -0.5])}, state)
        >>> params["w"].detach(), state["step"]
        (tensor([0.9000, 2.1000]), {'w': 1})
    """

    _hyper: ClassVar[tuple[str, ...]] = ("betas", "eps", "weight_decay", "amsgrad")

    def __init__(
        self,
        lr: LearningRate,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        amsgrad: bool = False,
    ) -> None:
        super().__init__(lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"`Adam` expects `betas` to be a pair (beta1, beta2), got {betas!r}.")
        beta1, beta2 = (_check_real("Adam", f"betas[{i}]", beta) for i, beta in enumerate(betas))
        for i, beta in enumerate((beta1, beta2)):
            if not 0 <= beta < 1:
                raise ValueError(f"`Adam` expects `betas[{i}]` in [0, 1), got {beta!r}.")
        self.betas = (beta1, beta2)
        self.eps = _check_nonnegative("Adam", "eps", eps)
        self.weight_decay = _check_nonnegative("Adam", "weight_decay", weight_decay)
        self.amsgrad = _check_bool("Adam", "amsgrad", amsgrad)
        self._slots = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())

    def _update(self, name: str, param: Tensor, grad: Tensor, lr: float | Tensor, state: dict[str, Any]) -> Tensor:
        beta1, beta2 = self.betas
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)
        step = state["step"].get(name, 0) + 1
        state["step"][name] = step
        exp_avg = _get_or_zeros(state["exp_avg"], name, param).lerp(grad, 1 - beta1)
        exp_avg_sq = _get_or_zeros(state["exp_avg_sq"], name, param).mul(beta2).addcmul(grad, grad, value=1 - beta2)
        state["exp_avg"][name] = exp_avg
        state["exp_avg_sq"][name] = exp_avg_sq
        if self.amsgrad:
            exp_avg_sq = torch.maximum(_get_or_zeros(state["max_exp_avg_sq"], name, param), exp_avg_sq)
            state["max_exp_avg_sq"][name] = exp_avg_sq
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = _safe_sqrt(exp_avg_sq).div(bias_correction2_sqrt).add(self.eps)
        if isinstance(lr, float):
            return torch.addcdiv(param, exp_avg, denom, value=-(lr / bias_correction1))
        return torch.addcmul(param, exp_avg.div(denom), lr, value=-1 / bias_correction1)


def _get_or_zeros(buffers: dict[str, Tensor], name: str, param: Tensor) -> Tensor:
    """The buffer of ``name``, or zeros like ``param`` on its first step (as in torch.optim)."""
    buf = buffers.get(name)
    return torch.zeros_like(param) if buf is None else buf
