"""metann: meta-learning for PyTorch, with modules whose weights can be computed tensors."""
from metann._version import __version__
from metann.dependent import DependentModule
from metann.learner import Learner

__all__ = ["DependentModule", "Learner", "__version__"]
