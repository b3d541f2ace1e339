"""Tasks and task samplers: sinusoid regression, N-way K-shot classification, Glyphs and Omniglot."""

from __future__ import annotations

from .fewshot import FewShotSampler, split_classes
from .glyphs import Glyphs
from .omniglot import Omniglot
from .sinusoid import SinusoidTaskSampler
from .tasks import Task, TaskSampler

__all__ = [
    "FewShotSampler",
    "Glyphs",
    "Omniglot",
    "SinusoidTaskSampler",
    "Task",
    "TaskSampler",
    "split_classes",
]
