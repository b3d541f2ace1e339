"""Finding code compiled with ``torch.compile`` in a model, whose backward cannot be differentiated twice."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["check_not_compiled", "compiled_parts"]

SECOND_ORDER_THROUGH_COMPILE = (
    "`{algorithm}` cannot take second-order meta-gradients through code compiled with `torch.compile` "
    "(found in {parts}): the compiled backward is not differentiable twice, so torch {version} either raises "
    "(\"compiled with non-empty donated buffers\") or, with donated buffers off, returns a silently wrong "
    "meta-gradient. Pass the eager module (e.g. `compiled._orig_mod`, or the module before `.compile()`), "
    "or use `first_order=True`, which is correct under `torch.compile`."
)


def _is_optimized_module(module: nn.Module) -> bool:
    # Checked by name so that importing metann does not import torch._dynamo (slow to import).
    return any(c.__name__ == "OptimizedModule" and c.__module__.startswith("torch._dynamo") for c in type(module).mro())


def compiled_parts(model: nn.Module) -> list[str]:
    """Names of the parts of ``model`` that run compiled code (``"<model>"`` for the model itself).

    Found: modules returned by ``torch.compile(module)`` (``OptimizedModule``), modules
    compiled in place with ``module.compile()``, and modules whose ``forward`` was
    compiled (``module.forward = torch.compile(module.forward)`` or a ``forward``
    decorated with ``@torch.compile``). Compiled functions called from an eager
    ``forward`` cannot be seen from the module tree.

    Example:
        >>> from metann.meta.compiled import compiled_parts
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> compiled_parts(net)
        []
        >>> net[0].forward = torch.compile(net[0].forward)
        >>> compiled_parts(net)
        ['0']
    """
    found = []
    for name, module in model.named_modules():
        compiled = (
            _is_optimized_module(module)
            or module.__dict__.get("_compiled_call_impl") is not None
            or getattr(module.forward, "_torchdynamo_orig_callable", None) is not None
        )
        if compiled:
            found.append(name or "<model>")
    return found


def check_not_compiled(model: nn.Module, algorithm: str) -> None:
    """Refuse a model with compiled parts for second-order meta-gradients.

    Args:
        model: The network to meta-learn.
        algorithm: The algorithm's name, for the message.

    Raises:
        ValueError: Naming the compiled parts and the two alternatives (the eager
            module, or first order).

    Example:
        >>> from metann.meta.compiled import check_not_compiled
        >>> check_not_compiled(torch.nn.Linear(2, 2), "MAML")  # eager: nothing to refuse
    """
    parts = compiled_parts(model)
    if parts:
        version = torch.__version__.split("+")[0]
        raise ValueError(SECOND_ORDER_THROUGH_COMPILE.format(algorithm=algorithm, parts=parts, version=version))
