"""metann: meta-learning for PyTorch, with modules whose weights can be computed tensors."""
from metann._version import __version__

__all__ = ["__version__"]
