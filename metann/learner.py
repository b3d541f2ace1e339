"""Learner: run a module statelessly, with given tensors in place of its parameters."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

from metann import dependent
from metann.dependent import DependentModule

__all__ = ["Learner", "share_buffers"]


def share_buffers(source: nn.Module, target: nn.Module) -> None:
    """Make ``target`` (a structural copy of ``source``) use ``source``'s buffers.

    Each submodule of ``target`` gets the very buffer dictionary of its counterpart
    in ``source``, so the sharing survives ``source.to(...)``, ``load_state_dict``
    and in-place updates such as batch-norm running statistics.

    Raises:
        ValueError: If the two module trees do not have the same structure.
    """
    sources, targets = list(source.modules()), list(target.modules())
    if len(sources) != len(targets) or not all(isinstance(t, type(s)) for s, t in zip(sources, targets)):
        raise ValueError(
            f"`share_buffers` needs two modules with the same structure; got `{type(source).__name__}` "
            f"with {len(sources)} submodules and `{type(target).__name__}` with {len(targets)}."
        )
    for src, dst in zip(sources, targets):
        dst.__dict__["_buffers"] = src._buffers
        dst.__dict__["_non_persistent_buffers_set"] = src._non_persistent_buffers_set


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class _Chain:
    """The forward of a ``Sequential`` root as one flat loop over its layers' ``forward`` methods.

    ``layer(x)`` costs two Python frames per layer (``__call__``, then ``forward``) and
    ``Sequential.forward`` a loop of such calls; on a small MLP that overhead is as
    large as the arithmetic. When no module the loop skips has a hook, there are no
    global hooks and no tracing, calling the layers' ``forward`` methods in order
    (nested ``Sequential`` containers flattened) is the same computation as ``root(x)``.

    ``layers`` is ``None`` when the root is not a plain ``Sequential`` (its class does
    not keep ``nn.Sequential.forward``) or a module on the chain is compiled; the
    learner then always calls the root. Built for one root and one structure version of
    the engine; the learner rebuilds it when either changed (a copy of a learner gets its
    own).
    """

    __slots__ = ("hook_dicts", "layers", "root", "version")

    def __init__(self, root: nn.Module) -> None:
        self.version = dependent._structure_version
        self.root = root
        skipped: list[nn.Module] = []  # modules whose `__call__` the loop leaves out
        layers: list[nn.Module] = []

        def flatten(module: nn.Module) -> bool:
            skipped.append(module)
            if type(module).forward is not nn.Sequential.forward:
                layers.append(module)
                return True
            return all(child is not None and flatten(child) for child in module._modules.values())

        chainable = (
            type(root).forward is nn.Sequential.forward
            and flatten(root)
            and all(m.__dict__.get("_compiled_call_impl") is None for m in skipped)
        )
        self.layers = layers if chainable else None
        # Torch registers hooks into these dictionaries in place: one `any` sees them all.
        self.hook_dicts = [m.__dict__[name] for m in skipped for name in _HOOKS]

    def usable(self) -> bool:
        """Whether ``run`` may stand in for calling the root now."""
        return not (
            self.layers is None
            or any(self.hook_dicts)
            or _torch_module._global_forward_hooks
            or _torch_module._global_forward_pre_hooks
            or _torch_module._global_backward_hooks
            or _torch_module._global_backward_pre_hooks
            or self.root.__dict__.get("_compiled_call_impl") is not None
            or torch._C._get_tracing_state()
        )

    def run(self, x: Any) -> Any:
        for layer in self.layers:  # type: ignore[union-attr]
            x = layer.forward(x)  # looked up each time, as `__call__` does
        return x


class Learner(nn.Module):
    """Hold a module and run it statelessly with :meth:`functional`.

    The learner's parameters are the module's parameters. Beside the module it keeps a
    stateless dependent copy that shares the module's buffers (batch-norm running
    statistics update the module's own buffers, as a normal forward would).

    Args:
        module: Any ``nn.Module``; it is not modified.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
        >>> learner = Learner(net)
        >>> x = torch.randn(5, 4)
        >>> fast = [p - 0.1 for p in net.parameters()]  # computed weights
        >>> learner.functional(fast, True, x).shape
        torch.Size([5, 1])
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"`Learner` expects an `nn.Module`, got `{type(module).__name__}`.")
        super().__init__()
        self.module = module
        stateless = DependentModule.stateless(module)
        share_buffers(module, stateless)
        # Not a registered submodule: it has no parameters of its own, and `.to()`,
        # `state_dict()` and friends reach its buffers through `module`.
        self.__dict__["_stateless"] = stateless
        self.__dict__["_stateless_training"] = stateless.training
        self.__dict__["_chain"] = _Chain(stateless)

    @property
    def stateless(self) -> DependentModule:
        """The stateless dependent copy that :meth:`functional` runs."""
        return self.__dict__["_stateless"]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped module as usual, with its own parameters."""
        return self.module(*args, **kwargs)

    def functional(
        self, params: Mapping[str, Tensor] | Iterable[Tensor], training: bool, *args: Any, **kwargs: Any
    ) -> Any:
        """Run the module's forward with ``params`` in place of its parameters.

        Args:
            params: A mapping name -> tensor (matched by name, every parameter given),
                or an iterable of tensors in ``module.parameters()`` order.
            training: Train or eval behaviour (dropout, batch norm) for this call only.
            *args: Positional inputs of the module's forward.
            **kwargs: Keyword inputs of the module's forward.

        Returns:
            The forward's output, differentiable with respect to ``params``.

        Raises:
            KeyError: If a mapping misses names or has unknown ones.
            ValueError: If a sequence has the wrong length or a tensor the wrong shape.
            TypeError: If a value is not a tensor.
        """
        stateless = self.__dict__["_stateless"]
        # Lists and tuples first: isinstance against the Mapping ABC is comparatively slow.
        if not isinstance(params, (list, tuple)) and isinstance(params, Mapping):
            stateless.substitute(params)
        else:
            stateless.substitute_from_list(params)
        training = bool(training)
        if self.__dict__["_stateless_training"] != training:
            stateless.train(training)
            self.__dict__["_stateless_training"] = training
        chain = self.__dict__["_chain"]
        if chain.version != dependent._structure_version or chain.root is not stateless:
            chain = self.__dict__["_chain"] = _Chain(stateless)
        try:
            if len(args) == 1 and not kwargs and chain.usable():
                return chain.run(args[0])
            return stateless(*args, **kwargs)
        finally:
            stateless._release()
