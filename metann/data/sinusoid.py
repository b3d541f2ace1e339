"""Sinusoid regression tasks, the classic toy problem of MAML (Finn et al., 2017)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .tasks import Task, _check_int, _GeneratorState, _make_generator

__all__ = ["SinusoidTaskSampler"]


def _check_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    """Return ``value`` as a ``(low, high)`` pair of finite floats with ``low <= high``."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be a pair of numbers (low, high), got {value!r}.") from err
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"`{name}` must be finite with low <= high, got ({low}, {high}).")
    return low, high


class SinusoidTaskSampler(_GeneratorState):
    r"""Sample sinusoid regression tasks :math:`y = A \sin(x + \varphi)`.

    For each task the amplitude :math:`A` and phase :math:`\varphi` are drawn
    uniformly from ``amp_range`` and ``phase_range``, and every input ``x`` uniformly
    from ``x_range``. Support and query inputs are drawn independently from the
    same task. Inputs and targets are shaped ``(k, 1)``.

    Numbers are drawn on the CPU in float64 by the sampler's own
    ``torch.Generator`` and then moved to ``device`` and ``dtype``, so the stream
    does not depend on the device, and a float32 task is the float64 task rounded.
    Tasks are drawn one after another: ``sample(2)`` followed by ``sample(3)``
    gives the same tasks as one ``sample(5)``.

    Args:
        amp_range: ``(low, high)`` of the amplitude.
        phase_range: ``(low, high)`` of the phase, in radians.
        x_range: ``(low, high)`` of the inputs.
        k_support: Support examples per task (at least 1).
        k_query: Query examples per task (at least 0).
        generator: A CPU ``torch.Generator`` to draw from (it is used, not copied).
        seed: Seed of a new private generator. With neither ``seed`` nor
            ``generator``, the seed is drawn from torch's global generator, so
            ``torch.manual_seed`` makes the stream reproducible.
        device: Device of the returned tensors (default: CPU).
        dtype: Floating-point dtype of the returned tensors.

    Raises:
        TypeError: If an argument has the wrong kind.
        ValueError: If a range has ``low > high``, a count is too small, ``dtype``
            is not floating point, or both ``seed`` and ``generator`` are given.

    Example:
        >>> sampler = SinusoidTaskSampler(k_support=5, k_query=3, seed=0)
        >>> task = sampler.sample(4)[0]
        >>> task.support_x.shape, task.query_y.shape, task.support_x.dtype
        (torch.Size([5, 1]), torch.Size([3, 1]), torch.float32)
        >>> bool(SinusoidTaskSampler(seed=0).sample(1)[0].support_x.abs().max() <= 5.0)
        True
    """

    def __init__(
        self,
        amp_range: Sequence[float] = (0.1, 5.0),
        phase_range: Sequence[float] = (0.0, math.pi),
        x_range: Sequence[float] = (-5.0, 5.0),
        k_support: int = 10,
        k_query: int = 10,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.amp_range = _check_range("amp_range", amp_range)
        self.phase_range = _check_range("phase_range", phase_range)
        self.x_range = _check_range("x_range", x_range)
        self.k_support = _check_int("k_support", k_support, 1)
        self.k_query = _check_int("k_query", k_query, 0)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"`dtype` must be a `torch.dtype`, got `{type(dtype).__name__}`.")
        if not dtype.is_floating_point:
            raise ValueError(f"`dtype` must be a floating-point dtype, got {dtype}.")
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self._generator = _make_generator(seed, generator)

    def _uniform(self, shape: tuple[int, ...], bounds: tuple[float, float]) -> Tensor:
        low, high = bounds
        unit = torch.rand(shape, generator=self._generator, dtype=torch.float64)
        return low + (high - low) * unit

    def sample_with_params(self, meta_batch_size: int) -> tuple[list[Task], Tensor, Tensor]:
        """Draw tasks and also return their true amplitudes and phases.

        Use the parameters to draw the true curve, for instance
        ``amplitudes[i] * torch.sin(x + phases[i])``.

        Args:
            meta_batch_size: Number of tasks (at least 1).

        Returns:
            ``(tasks, amplitudes, phases)``: the list of tasks and two tensors of shape
            ``(meta_batch_size,)`` in the sampler's ``dtype`` and ``device``.

        Raises:
            ValueError: If ``meta_batch_size < 1``.

        Example:
            >>> sampler = SinusoidTaskSampler(seed=1, k_query=0)
            >>> tasks, amps, phases = sampler.sample_with_params(2)
            >>> x, y = tasks[1].support
            >>> torch.testing.assert_close(y, amps[1] * torch.sin(x + phases[1]))
        """
        count = _check_int("meta_batch_size", meta_batch_size, 1)
        k = self.k_support + self.k_query
        tasks, amplitudes, phases = [], [], []
        for _ in range(count):
            amplitude = self._uniform((), self.amp_range)
            phase = self._uniform((), self.phase_range)
            x = self._uniform((k, 1), self.x_range)
            y = amplitude * torch.sin(x + phase)
            x, y = x.to(self.device, self.dtype), y.to(self.device, self.dtype)
            s = self.k_support
            tasks.append(Task(x[:s], y[:s], x[s:], y[s:]))
            amplitudes.append(amplitude)
            phases.append(phase)
        return (
            tasks,
            torch.stack(amplitudes).to(self.device, self.dtype),
            torch.stack(phases).to(self.device, self.dtype),
        )

    def sample(self, meta_batch_size: int) -> list[Task]:
        """Draw ``meta_batch_size`` tasks.

        Args:
            meta_batch_size: Number of tasks (at least 1).

        Returns:
            A list of :class:`~metann.data.Task`.

        Raises:
            ValueError: If ``meta_batch_size < 1``.

        Example:
            >>> tasks = SinusoidTaskSampler(seed=0).sample(3)
            >>> len(tasks), tasks[0].query_x.shape
            (3, torch.Size([10, 1]))
        """
        return self.sample_with_params(meta_batch_size)[0]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(amp_range={self.amp_range}, phase_range={self.phase_range}, "
            f"x_range={self.x_range}, k_support={self.k_support}, k_query={self.k_query}, "
            f"device={self.device}, dtype={self.dtype})"
        )
