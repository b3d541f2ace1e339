"""Meta-learning algorithms on the dependent-module engine: MAML, MetaSGD, ANIL, MAML++, Reptile, iMAML."""
from metann.meta.anil import ANIL
from metann.meta.evaluators import default_evaluator_classification, default_evaluator_regression
from metann.meta.imaml import iMAML
from metann.meta.maml import MAML, FastModel
from metann.meta.mamlpp import MAMLpp
from metann.meta.metasgd import MetaSGD
from metann.meta.reptile import Reptile

__all__ = [
    "ANIL",
    "MAML",
    "FastModel",
    "MAMLpp",
    "MetaSGD",
    "Reptile",
    "default_evaluator_classification",
    "default_evaluator_regression",
    "iMAML",
]
