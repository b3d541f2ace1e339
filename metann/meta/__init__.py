"""Meta-learning algorithms built on the dependent-module engine: MAML, first-order MAML, MetaSGD, ANIL."""
from metann.meta.anil import ANIL
from metann.meta.evaluators import default_evaluator_classification, default_evaluator_regression
from metann.meta.maml import MAML, FastModel
from metann.meta.metasgd import MetaSGD

__all__ = [
    "ANIL",
    "MAML",
    "FastModel",
    "MetaSGD",
    "default_evaluator_classification",
    "default_evaluator_regression",
]
