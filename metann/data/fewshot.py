"""N-way K-shot classification tasks drawn from labelled tensors or a map-style dataset."""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from .tasks import Task, _check_int, _GeneratorState, _make_generator

__all__ = ["FewShotSampler", "split_classes"]

_MAX_LISTED = 10  # how many offending classes an error message lists


def _listed(items: Sequence[object]) -> str:
    shown = ", ".join(str(i) for i in items[:_MAX_LISTED])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_LISTED else "")


def _check_labels(labels: object, name: str = "labels") -> Tensor:
    """Return ``labels`` as a 1-D int64 CPU tensor, or raise."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"`{name}` must be an integer tensor, got `{type(labels).__name__}`.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"`{name}` must be an integer tensor, got dtype {labels.dtype}.")
    if labels.dim() != 1:
        raise ValueError(f"`{name}` must be one-dimensional (one label per example), got shape {tuple(labels.shape)}.")
    return labels.detach().to(device="cpu", dtype=torch.long)


def _as_label(label: object, index: int) -> int:
    """One dataset label as an int (a Python integer or a one-element integer tensor)."""
    if isinstance(label, Tensor):
        if label.numel() != 1 or label.is_floating_point() or label.is_complex():
            raise TypeError(
                f"item {index} of the dataset has label {label!r}; expected an int or a one-element integer tensor."
            )
        return int(label.item())
    try:
        return operator.index(label)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(
            f"item {index} of the dataset has a label of type `{type(label).__name__}`; expected an int."
        ) from err


def _split_item(item: Any, index: int) -> tuple[Any, Any]:
    """``(x, label)`` from one dataset item, or a TypeError naming the item."""
    try:
        x, label = item
        return x, label
    except (TypeError, ValueError) as err:
        kind = type(item).__name__
        raise TypeError(f"item {index} of the dataset is not an `(x, label)` pair: got `{kind}`.") from err


def _dataset_labels(dataset: Any) -> tuple[Tensor, Tensor]:
    """Labels of a map-style dataset (its ``labels`` tensor attribute, or every item's label,
    read once) and an empty tensor shaped like a stack of its inputs."""
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise TypeError(
            f"`inputs` must be a tensor (with `labels`) or a map-style dataset of `(x, label)` items "
            f"(with `labels=None`), got `{type(dataset).__name__}`."
        )
    size = len(dataset)
    if size == 0:
        return torch.empty(0, dtype=torch.long), torch.empty(0)
    stored = getattr(dataset, "labels", None)
    if isinstance(stored, Tensor) and stored.dim() == 1 and len(stored) == size:
        labels = _check_labels(stored, name=f"{type(dataset).__name__}.labels")
        first = _split_item(dataset[0], 0)[0]
    else:
        first, label = _split_item(dataset[0], 0)
        rest = (_as_label(_split_item(dataset[i], i)[1], i) for i in range(1, size))
        labels = torch.tensor([_as_label(label, 0), *rest], dtype=torch.long)
    if not isinstance(first, Tensor):
        raise TypeError(f"the dataset's inputs must be tensors, item 0 holds `{type(first).__name__}`.")
    return labels, first.new_empty((0, *first.shape))


def _unique_ints(values: object, name: str) -> list[int]:
    if isinstance(values, Tensor):
        return sorted(set(_check_labels(values.flatten(), name).tolist()))
    if not isinstance(values, Iterable):
        raise TypeError(f"`{name}` must be an iterable of integer class labels, got `{type(values).__name__}`.")
    try:
        return sorted({operator.index(v) for v in values})
    except TypeError as err:
        raise TypeError(f"`{name}` must hold integer class labels: {err}") from err


class FewShotSampler(_GeneratorState):
    """Sample N-way K-shot classification tasks from labelled examples.

    The examples are either a tensor ``inputs`` (first dimension N) with an integer
    tensor ``labels`` of shape ``(N,)``, or any map-style dataset whose items are
    ``(x, label)`` pairs, with ``labels=None``. The dataset's labels are read once at
    construction by indexing every item, unless the dataset has a ``labels``
    attribute holding a 1-D integer tensor of length ``len(dataset)`` (as
    :class:`~metann.data.Glyphs` and :class:`~metann.data.Omniglot` do), which is
    used instead. A task indexes only its own examples and stacks their ``x``.

    For every task, ``ways`` distinct classes are chosen at random from the class
    pool, and for each of them ``shots + queries`` distinct examples, without
    replacement: the first ``shots`` go to the support set and the rest to the
    query set, so the two sets share no example. The ``j``-th chosen class gets the
    label ``j`` (an int64 tensor). Both sets are ordered class by class (all
    examples of label 0, then label 1, ...), not shuffled.

    Args:
        inputs: A tensor of examples, or a map-style dataset of ``(x, label)`` items.
        labels: Integer labels of shape ``(N,)`` for a tensor ``inputs``; ``None``
            for a dataset.
        ways: Classes per task (at least 1).
        shots: Support examples per class (at least 1).
        queries: Query examples per class (at least 0).
        seed: Seed of the sampler's private generator (see
            :class:`~metann.data.SinusoidTaskSampler` for what ``None`` means).
        generator: A CPU ``torch.Generator`` to draw from instead of ``seed``.
        classes: Restrict the class pool to these labels (for instance one part of
            :func:`split_classes`). Default: every label present.
        device: Device of the task tensors. Default: the device of ``inputs`` (or of
            the dataset's ``x``).

    Attributes:
        classes: The sorted class pool (original labels).
        device: Device of the task tensors.

    Raises:
        TypeError: If ``inputs`` is not a tensor while ``labels`` is given, is neither
            a tensor nor a dataset, or labels are not integers.
        ValueError: If ``ways``/``shots`` < 1 or ``queries`` < 0, lengths of
            ``inputs`` and ``labels`` differ, ``classes`` names an absent label,
            there are fewer classes than ``ways``, or a class has fewer than
            ``shots + queries`` examples.

    Example:
        >>> inputs = torch.randn(60, 4)
        >>> labels = torch.arange(6).repeat_interleave(10)
        >>> sampler = FewShotSampler(inputs, labels, ways=3, shots=2, queries=4, seed=0)
        >>> task = sampler.sample(1)[0]
        >>> task.support_x.shape, task.support_y.tolist()
        (torch.Size([6, 4]), [0, 0, 1, 1, 2, 2])
        >>> task.query_y.shape
        torch.Size([12])
    """

    def __init__(
        self,
        inputs: Tensor | Any,
        labels: Tensor | None,
        ways: int,
        shots: int,
        queries: int,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        classes: Iterable[int] | Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.ways = _check_int("ways", ways, 1)
        self.shots = _check_int("shots", shots, 1)
        self.queries = _check_int("queries", queries, 0)
        self._dataset: Any | None = None
        if isinstance(inputs, Tensor):
            if labels is None:
                raise TypeError("`labels` must be an integer tensor when `inputs` is a tensor, got None.")
            if inputs.dim() == 0:
                raise ValueError("`inputs` must have a first dimension (one row per example), got a 0-d tensor.")
            all_labels = _check_labels(labels)
            self._template = inputs[:0]
        elif labels is not None:
            raise TypeError(
                f"`inputs` must be a tensor when `labels` is given, got `{type(inputs).__name__}`. "
                "Pass a map-style dataset of `(x, label)` items with `labels=None` instead."
            )
        else:
            all_labels, self._template = _dataset_labels(inputs)
            self._dataset = inputs
        if labels is not None and len(all_labels) != len(inputs):
            raise ValueError(
                f"`inputs` and `labels` must have the same length, "
                f"got {len(inputs)} inputs and {len(all_labels)} labels."
            )
        self._inputs = inputs
        self.classes, self._members = self._class_pool(all_labels, classes)
        self.device = torch.device(device) if device is not None else self._template.device
        self._generator = _make_generator(seed, generator)

    def _class_pool(
        self, labels: Tensor, classes: Iterable[int] | Tensor | None
    ) -> tuple[tuple[int, ...], list[Tensor]]:
        """Sorted class pool and, per pool class, the sorted indices of its examples; validated."""
        present, counts = torch.unique(labels, return_counts=True)
        groups = torch.argsort(labels, stable=True).split(counts.tolist())
        by_class = dict(zip(present.tolist(), groups, strict=True))
        if classes is None:
            pool = sorted(by_class)
        else:
            pool = _unique_ints(classes, "classes")
            absent = [c for c in pool if c not in by_class]
            if absent:
                raise ValueError(f"`classes` names labels that no example has: [{_listed(absent)}].")
        where = " in `classes`" if classes is not None else ""
        if len(pool) < self.ways:
            raise ValueError(
                f"`ways` = {self.ways} but only {len(pool)} classes are available{where}. "
                f"Lower `ways` or provide more classes."
            )
        need = self.shots + self.queries
        short = [f"class {c} has {len(by_class[c])}" for c in pool if len(by_class[c]) < need]
        if short:
            raise ValueError(
                f"every class needs `shots` + `queries` = {self.shots} + {self.queries} = {need} examples, "
                f"but {_listed(short)}. Lower `shots`/`queries` or leave these classes out with `classes`."
            )
        return tuple(pool), [by_class[c] for c in pool]

    def _gather(self, index: Tensor) -> Tensor:
        if self._dataset is None:
            x = self._inputs[index.to(self._inputs.device)]
        elif len(index) == 0:
            x = self._template
        else:
            x = torch.stack([self._dataset[i][0] for i in index.tolist()])
        return x.to(self.device)

    def _sample_task(self) -> Task:
        chosen = torch.randperm(len(self.classes), generator=self._generator)[: self.ways]
        support, query = [], []
        for j in chosen.tolist():
            members = self._members[j]
            picked = members[torch.randperm(len(members), generator=self._generator)[: self.shots + self.queries]]
            support.append(picked[: self.shots])
            query.append(picked[self.shots :])
        support_x, query_x = self._gather(torch.cat(support)), self._gather(torch.cat(query))
        ways = torch.arange(self.ways, device=support_x.device)
        return Task(support_x, ways.repeat_interleave(self.shots), query_x, ways.repeat_interleave(self.queries))

    def sample(self, meta_batch_size: int) -> list[Task]:
        """Draw ``meta_batch_size`` independent tasks.

        Args:
            meta_batch_size: Number of tasks (at least 1).

        Returns:
            A list of :class:`~metann.data.Task`; labels are int64 in ``0..ways-1``.

        Raises:
            ValueError: If ``meta_batch_size < 1``.

        Example:
            >>> sampler = FewShotSampler(torch.eye(8), torch.arange(4).repeat(2), 2, 1, 1, seed=0)
            >>> [task.query_y.tolist() for task in sampler.sample(2)]
            [[0, 1], [0, 1]]
        """
        count = _check_int("meta_batch_size", meta_batch_size, 1)
        return [self._sample_task() for _ in range(count)]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ways={self.ways}, shots={self.shots}, queries={self.queries}, "
            f"classes={len(self.classes)}, device={self.device})"
        )


def split_classes(
    labels_or_classes: Tensor | Iterable[int] | int,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> tuple[list[int], ...]:
    """Split the classes at random into disjoint groups (say train, validation, test).

    The distinct classes are shuffled by a generator seeded with ``seed`` and cut
    into consecutive groups of about ``fraction * num_classes`` classes each (the
    boundaries are the rounded cumulative fractions, so every class lands in
    exactly one group). Pass a group as ``classes=`` to :class:`FewShotSampler`.

    Args:
        labels_or_classes: Labels of the examples (an integer tensor, repeats
            allowed), an iterable of class labels, or an int ``n`` for ``range(n)``.
        fractions: Non-negative fractions that sum to 1, one per group.
        seed: Seed of the shuffle; the same seed gives the same split.

    Returns:
        One sorted list of class labels per fraction.

    Raises:
        TypeError: If the labels are not integers.
        ValueError: If ``fractions`` is empty, has a negative entry or does not sum to 1.

    Example:
        >>> train, val, test = split_classes(torch.arange(10).repeat(3), (0.6, 0.2, 0.2), seed=0)
        >>> len(train), len(val), len(test)
        (6, 2, 2)
        >>> sorted(train + val + test) == list(range(10))
        True
    """
    if isinstance(labels_or_classes, int) and not isinstance(labels_or_classes, bool):
        classes = list(range(_check_int("labels_or_classes", labels_or_classes, 0)))
    else:
        classes = _unique_ints(labels_or_classes, "labels_or_classes")
    parts = [float(f) for f in fractions]
    if (
        not parts
        or any(not math.isfinite(f) or f < 0 for f in parts)
        or not math.isclose(sum(parts), 1.0, abs_tol=1e-6)
    ):
        raise ValueError(f"`fractions` must be non-negative numbers that sum to 1, got {tuple(fractions)}.")
    seed = _check_int("seed", seed, -(2**63))
    generator = torch.Generator()
    generator.manual_seed(seed)
    shuffled = [classes[i] for i in torch.randperm(len(classes), generator=generator).tolist()]
    total, bounds = 0.0, [0]
    for fraction in parts[:-1]:
        total += fraction
        bounds.append(round(total * len(classes)))
    bounds.append(len(classes))
    return tuple(sorted(shuffled[a:b]) for a, b in itertools.pairwise(bounds))
