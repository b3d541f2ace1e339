"""Few-shot tasks, the task-sampler protocol and the random-stream helpers the samplers share."""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Task", "TaskSampler"]


@dataclass(frozen=True, eq=False)
class Task:
    """One few-shot task: a support set to adapt on and a query set to evaluate on.

    A frozen dataclass of four tensors. Tasks compare by identity (``eq=False``):
    comparing tensors element-wise is the caller's business.

    Args:
        support_x: Support inputs, first dimension the number of support examples.
        support_y: Support targets, first dimension as ``support_x``.
        query_x: Query inputs, first dimension the number of query examples.
        query_y: Query targets, first dimension as ``query_x``.

    Raises:
        TypeError: If a field is not a tensor.
        ValueError: If ``x`` and ``y`` of the support (or query) set disagree on
            their first dimension.

    Example:
        >>> task = Task(torch.zeros(5, 3), torch.arange(5), torch.ones(2, 3), torch.arange(2))
        >>> x, y = task.support
        >>> x.shape, y.tolist()
        (torch.Size([5, 3]), [0, 1, 2, 3, 4])
        >>> task.query[0].shape
        torch.Size([2, 3])
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, Tensor):
                raise TypeError(f"`Task.{field.name}` must be a tensor, got `{type(value).__name__}`.")
        for part in ("support", "query"):
            x, y = getattr(self, part)
            if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"`Task.{part}_x` and `Task.{part}_y` must have the same first dimension "
                    f"(one target per example), got shapes {tuple(x.shape)} and {tuple(y.shape)}."
                )

    @property
    def support(self) -> tuple[Tensor, Tensor]:
        """The support set as an ``(x, y)`` pair.

        Example:
            >>> Task(torch.zeros(1, 2), torch.zeros(1), torch.ones(3, 2), torch.ones(3)).support[1]
            tensor([0.])
        """
        return self.support_x, self.support_y

    @property
    def query(self) -> tuple[Tensor, Tensor]:
        """The query set as an ``(x, y)`` pair.

        Example:
            >>> Task(torch.zeros(1, 2), torch.zeros(1), torch.ones(3, 2), torch.ones(3)).query[1]
            tensor([1., 1., 1.])
        """
        return self.query_x, self.query_y

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Task:
        """Return a new task with every tensor moved to ``device``.

        ``dtype`` converts only floating-point tensors, so integer class labels stay
        integers. The task itself is not changed.

        Args:
            device: Target device; ``None`` keeps each tensor's device.
            dtype: Target floating-point dtype; ``None`` keeps each tensor's dtype.

        Returns:
            A new :class:`Task`.

        Example:
            >>> task = Task(torch.zeros(2, 1), torch.arange(2), torch.zeros(1, 1), torch.arange(1))
            >>> new = task.to(dtype=torch.float64)
            >>> new.support_x.dtype, new.support_y.dtype
            (torch.float64, torch.int64)
        """

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

        return Task(*(move(getattr(self, f.name)) for f in dataclasses.fields(self)))


@runtime_checkable
class TaskSampler(Protocol):
    """Anything with ``sample(meta_batch_size) -> list[Task]``.

    The samplers of :mod:`metann.data` also offer ``get_state()`` and
    ``set_state(state)`` (the state of their private ``torch.Generator``), so a
    checkpoint can resume the exact task stream.

    Example:
        >>> class Constant:
        ...     def sample(self, meta_batch_size: int) -> list[Task]:
        ...         x = torch.zeros(1, 1)
        ...         return [Task(x, x, x, x) for _ in range(meta_batch_size)]
        >>> isinstance(Constant(), TaskSampler)
        True
        >>> len(Constant().sample(3))
        3
    """

    def sample(self, meta_batch_size: int) -> list[Task]:
        """Draw ``meta_batch_size`` tasks."""
        ...


# --- helpers shared by the samplers (private) -------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` as an int, or raise if it is not an integer >= ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be an integer, got `bool`.")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(f"`{name}` must be an integer, got `{type(value).__name__}`.") from err
    if number < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {number}.")
    return number


def _make_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    """The sampler's private CPU generator: ``generator`` itself, one seeded with ``seed``,
    or (neither given) one seeded from torch's global RNG so that ``torch.manual_seed``
    makes the stream reproducible."""
    if seed is not None and generator is not None:
        raise ValueError("Pass `seed` or `generator`, not both.")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a `torch.Generator`, got `{type(generator).__name__}`.")
        if generator.device.type != "cpu":
            raise ValueError(
                f"`generator` must be a CPU generator (tasks are drawn on the CPU, then moved), "
                f"got one on {generator.device}."
            )
        return generator
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int or None, got `{type(seed).__name__}`.")
    new = torch.Generator()
    new.manual_seed(seed)
    return new


class _GeneratorState:
    """Mixin: ``get_state``/``set_state`` over the attribute ``_generator``."""

    _generator: torch.Generator

    def get_state(self) -> Tensor:
        """Return the state of the sampler's random generator (a ``torch.uint8`` tensor).

        Save it in a checkpoint and pass it to :meth:`set_state` to resume the same
        stream of tasks.

        Returns:
            A copy of the generator state.

        Example:
            >>> from metann.data import SinusoidTaskSampler
            >>> sampler = SinusoidTaskSampler(seed=0)
            >>> state = sampler.get_state()
            >>> state.dtype
            torch.uint8
        """
        return self._generator.get_state()

    def set_state(self, state: Tensor) -> None:
        """Restore a state returned by :meth:`get_state`; later tasks repeat the stream from there.

        Args:
            state: A ``torch.uint8`` tensor from :meth:`get_state`.

        Raises:
            TypeError: If ``state`` is not a ``torch.uint8`` tensor.
            ValueError: If ``state`` is not a valid generator state.

        Example:
            >>> from metann.data import SinusoidTaskSampler
            >>> sampler = SinusoidTaskSampler(seed=0)
            >>> state = sampler.get_state()
            >>> first = sampler.sample(1)[0]
            >>> sampler.set_state(state)
            >>> torch.equal(sampler.sample(1)[0].support_x, first.support_x)
            True
        """
        if not isinstance(state, Tensor) or state.dtype != torch.uint8:
            kind = f"a {state.dtype} tensor" if isinstance(state, Tensor) else f"`{type(state).__name__}`"
            raise TypeError(f"`state` must be a torch.uint8 tensor from `get_state()`, got {kind}.")
        try:
            self._generator.set_state(state.cpu())
        except RuntimeError as err:
            raise ValueError(f"`state` is not a valid generator state from `get_state()`: {err}") from err
