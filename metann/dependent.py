"""DependentModule: rewriting ``nn.Module`` classes so that their weights can be computed tensors."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

__all__ = ["DependentModule"]

# Bumped by every change of module structure (a dependent registered or removed, a
# submodule added or deleted). Substitution plans cached on a root module record the
# version they were built at and are rebuilt when it moved on.
_structure_version = 0

# One generated class per original class.
_CLASS_CACHE: dict[type, type] = {}


# Stands in for the shape of a value that is not a tensor: equal to no registered shape.
_NOT_A_TENSOR = object()


def _bump() -> None:
    global _structure_version
    _structure_version += 1


class _Dependent:
    """Registry entry of one dependent: its registered shape, and whether it trains.

    Tied dependents (one original ``Parameter`` used in several places) share one
    entry object, which is how substitution finds every slot of a tied weight.
    ``requires_grad`` is the original parameter's flag, given back by
    :meth:`DependentModule.to_original` (a frozen parameter stays frozen).
    """

    __slots__ = ("requires_grad", "shape")

    def __init__(self, shape: torch.Size | None, requires_grad: bool = True) -> None:
        self.shape = shape
        self.requires_grad = requires_grad

    def __getstate__(self) -> tuple[torch.Size | None, bool]:
        return self.shape, self.requires_grad

    def __setstate__(self, state: tuple[torch.Size | None, bool] | torch.Size | None) -> None:
        # `type(...) is tuple`: a `torch.Size` (the state of earlier versions) is a tuple too.
        self.shape, self.requires_grad = state if type(state) is tuple else (state, True)


class _DependentMeta(type):
    """Metaclass that makes ``DependentModule(net)`` convert ``net`` instead of building a module."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is DependentModule:
            if len(args) != 1 or kwargs:
                raise TypeError(
                    "`DependentModule(module)` takes exactly one `nn.Module` to convert; "
                    f"got {len(args)} positional and {len(kwargs)} keyword arguments."
                )
            return cls.to_dependentmodule(args[0])
        module = super().__call__(*args, **kwargs)
        return DependentModule.to_dependentmodule(module)


def _dependent_class(cls: type) -> type:
    """Return the cached ``Dependent<Name>`` subclass of ``cls``, creating it once."""
    if issubclass(cls, DependentModule):
        return cls
    dep = _CLASS_CACHE.get(cls)
    if dep is None:
        namespace = {
            "__module__": cls.__module__,
            "__qualname__": "Dependent" + cls.__qualname__,
            "_original_class": cls,
            # Classes such as torch's Parametrized<Name> define a __deepcopy__ that copies
            # __dict__ directly; route deepcopy through __reduce_ex__ / __getstate__ instead.
            "__deepcopy__": None,
        }
        dep = type("Dependent" + cls.__name__, (DependentModule, cls), namespace)
        _CLASS_CACHE[cls] = dep
    return dep


def _rebuild(original_class: type) -> DependentModule:
    """Unpickling helper: an empty instance of the dependent class of ``original_class``."""
    cls = _dependent_class(original_class)
    return cls.__new__(cls)


def _check_value(module: nn.Module, name: str, value: Any) -> None:
    if value is not None and not isinstance(value, Tensor):
        raise TypeError(
            f"dependent {name!r} of `{type(module).__name__}` must be a Tensor or None, got `{type(value).__name__}`."
        )


class _Plan:
    """Slots of every dependent under a root module, found once and reused by `substitute`.

    ``entries[i]`` is ``(name, registry entry, slots)``, where a slot is
    ``(module.__dict__, attribute, module or None, flat index)``; the module and index
    are set for recurrent modules whose ``_flat_weights`` list must follow the value.
    ``registered[i]`` is the registry entry of ``entries[i]`` and ``shapes[i]`` its
    registered shape; ``plain`` and ``recurrent`` list every slot once, as
    ``(i, module.__dict__, attribute[, module, flat index])``, so that writing all
    dependents is one flat loop.
    """

    __slots__ = ("entries", "index", "names", "plain", "recurrent", "registered", "shapes", "version")

    def __init__(self, root: DependentModule) -> None:
        by_entry: dict[int, tuple[str, _Dependent, list[tuple]]] = {}
        for prefix, module in root.named_modules():
            registry = module.__dict__.get("_dependents")
            if not registry:
                continue
            flat_names = module.__dict__.get("_flat_weights_names")
            for attr, entry in registry.items():
                flat = flat_names.index(attr) if flat_names and attr in flat_names else -1
                slot = (module.__dict__, attr, module if flat >= 0 else None, flat)
                name = prefix + ("." if prefix else "") + attr
                by_entry.setdefault(id(entry), (name, entry, []))[2].append(slot)
        self.entries = list(by_entry.values())
        self.names = [name for name, _, _ in self.entries]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.registered = [entry for _, entry, _ in self.entries]
        self.shapes = [entry.shape for entry in self.registered]  # `update_shapes` rebuilds plans
        slots = [(i, *slot) for i, (_, _, entry_slots) in enumerate(self.entries) for slot in entry_slots]
        self.plain = [(i, slot_dict, attr) for i, slot_dict, attr, rnn, _ in slots if rnn is None]
        self.recurrent = [slot for slot in slots if slot[3] is not None]
        self.version = _structure_version

    def write_all(self, values: list[Tensor] | tuple[Tensor, ...] | None) -> None:
        """Store ``values[i]`` in every slot of dependent ``i`` (``None``: clear every slot)."""
        if values is None:
            for _, slot_dict, attr in self.plain:
                slot_dict[attr] = None
        else:
            for i, slot_dict, attr in self.plain:
                slot_dict[attr] = values[i]
        for i, slot_dict, attr, rnn, flat in self.recurrent:
            value = None if values is None else values[i]
            slot_dict[attr] = value
            _set_flat_weight(rnn, flat, value)


def _write(slots: list[tuple], value: Tensor | None) -> None:
    """Store ``value`` in every slot (plain dictionary writes)."""
    for slot_dict, attr, rnn, flat in slots:
        slot_dict[attr] = value
        if rnn is not None:
            _set_flat_weight(rnn, flat, value)


def _set_flat_weight(rnn: nn.Module, index: int, value: Tensor | None) -> None:
    # torch's RNNBase keeps `_flat_weights` (the tensors handed to the kernel) and weak
    # references used to notice swapped weights (torch 2.x `_update_flat_weights`). Keep
    # both in step, so a copy made while a weight was None never runs on a stale list.
    flat = rnn.__dict__.get("_flat_weights")
    if flat is not None and index < len(flat):
        flat[index] = value
    refs = rnn.__dict__.get("_flat_weight_refs")
    if refs is not None and index < len(refs):
        refs[index] = weakref.ref(value) if value is not None else None


class DependentModule(nn.Module, metaclass=_DependentMeta):
    """A module whose parameters can be replaced by *dependents*: tensors that may carry a ``grad_fn``.

    ``DependentModule(module)`` converts ``module`` in place, recursively, and returns it:
    every submodule's class becomes a cached subclass ``Dependent<Name>`` of both
    ``DependentModule`` and its original class, so ``isinstance`` checks, ``repr``,
    ``state_dict`` and the forward pass behave as before. A converted module's
    parameters stay parameters until :meth:`clear_params` turns them into dependents,
    or until a stateless copy is made with :meth:`stateless`.

    Dependents live in the module's instance dictionary, so the unmodified ``forward``
    reads them as plain attributes, and :meth:`substitute` is a handful of dictionary
    writes per tensor: no copy, no detach, so gradients flow through substituted tensors.

    Copies: ``copy.deepcopy`` and ``pickle`` keep the ``Dependent*`` classes. A dependent
    that carries a ``grad_fn`` (a computed weight) is copied as a detached tensor: a copy
    cannot share the autograd graph of the original.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2))
        >>> stateless = DependentModule.stateless(net)
        >>> [name for name, _ in stateless.named_dependents()]
        ['0.weight', '0.bias']
        >>> w, b = net[0].weight * 2, net[0].bias  # a computed weight
        >>> out = stateless.substitute({"0.weight": w, "0.bias": b})(torch.ones(1, 3))
        >>> out.grad_fn is not None
        True
    """

    _original_class: type | None = None

    # ------------------------------------------------------------------ conversion
    @classmethod
    def to_dependentmodule(cls, module: nn.Module, recurse: bool = True) -> DependentModule:
        """Convert ``module`` (and, with ``recurse``, all its submodules) in place.

        Args:
            module: Any ``nn.Module``.
            recurse: Convert submodules too; ``False`` converts only ``module`` itself.

        Returns:
            ``module``, now an instance of ``Dependent<Name>``. Converting twice is a no-op.

        Raises:
            TypeError: If ``module`` is not an ``nn.Module``.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"`DependentModule` expects an `nn.Module`, got `{type(module).__name__}`. "
                "Wrap layers in `nn.Sequential(...)` first."
            )
        for m in module.modules() if recurse else (module,):
            if "_dependents" not in m.__dict__:
                m.__class__ = _dependent_class(type(m))
                m.__dict__["_dependents"] = {}
        return module  # type: ignore[return-value]

    @classmethod
    def stateless(
        cls, module: nn.Module, clear_filter: Callable[[nn.Module], bool] = lambda m: True
    ) -> DependentModule:
        """Return a converted deep copy of ``module`` whose parameters are dependents set to ``None``.

        The original module is untouched. Registered shapes come from the original
        parameters, so wrong shapes are refused even before any value is given.

        Args:
            module: The module to copy.
            clear_filter: Called on each submodule of the copy; returning ``False`` keeps
                that submodule's parameters as parameters.

        Example:
            >>> net = torch.nn.Linear(2, 1)
            >>> s = DependentModule.stateless(net)
            >>> s.weight is None, list(s.parameters())
            (True, [])
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"`stateless` expects an `nn.Module`, got `{type(module).__name__}`.")
        import copy

        copied = cls.to_dependentmodule(copy.deepcopy(module))
        return copied.clear_params(init=False, clear_filter=clear_filter)

    def to_original(self) -> nn.Module:
        """Undo the conversion of this module and its submodules, in place.

        Dependents become parameters again (``nn.Parameter`` of their detached values,
        with the ``requires_grad`` of the parameter they came from: a frozen parameter
        stays frozen); a dependent whose value is ``None`` is registered as a ``None``
        parameter.

        Returns:
            ``self``, whose class and submodules' classes are the original ones again.
        """
        tied: dict[int, nn.Parameter] = {}  # one Parameter per registry entry keeps tied weights tied
        for m in list(self.modules()):
            registry = m.__dict__.pop("_dependents", None)
            if registry is None:
                continue
            for name, entry in registry.items():
                value = m.__dict__.pop(name, None)
                if value is not None and id(entry) not in tied:
                    tied[id(entry)] = nn.Parameter(value.detach(), requires_grad=entry.requires_grad)
                m._parameters[name] = None if value is None else tied[id(entry)]
            m.__dict__.pop("_metann_plan", None)
            m.__class__ = type(m)._original_class or type(m)
        _bump()
        return self

    # ------------------------------------------------------------------ registration
    def register_dependent(self, name: str, tensor: Tensor | None) -> None:
        """Register ``tensor`` (or ``None``) as a dependent called ``name``.

        Args:
            name: Attribute name, without dots.
            tensor: The value; its shape becomes the registered shape.

        Raises:
            TypeError: If ``name`` is not a string or ``tensor`` is neither a tensor nor None.
            KeyError: If ``name`` is empty, contains ``"."`` or clashes with an attribute.
        """
        owner = type(self).__name__
        if not isinstance(name, str):
            raise TypeError(f"dependent name on `{owner}` must be a string, got `{type(name).__name__}`.")
        if not name:
            raise KeyError(f'dependent name on `{owner}` cannot be empty ("").')
        if "." in name:
            raise KeyError(f"dependent name {name!r} on `{owner}` cannot contain '.'.")
        registry = self._registry()
        if name not in registry and (hasattr(self, name) or name in self._parameters):
            raise KeyError(
                f"cannot register dependent {name!r} on `{owner}`: an attribute of that name already exists."
            )
        _check_value(self, name, tensor)
        previous = registry.get(name)  # re-registering keeps whether the original parameter trains
        registry[name] = _Dependent(
            None if tensor is None else tensor.shape, True if previous is None else previous.requires_grad
        )
        self.__dict__[name] = tensor
        self._refresh_flat_weight(name, tensor)
        _bump()

    def _registry(self) -> dict[str, _Dependent]:
        registry = self.__dict__.get("_dependents")
        if registry is None:
            registry = self.__dict__["_dependents"] = {}
        return registry

    def _refresh_flat_weight(self, name: str, value: Tensor | None) -> None:
        flat_names = self.__dict__.get("_flat_weights_names")
        if flat_names and name in flat_names:
            _set_flat_weight(self, flat_names.index(name), value)

    def clear_params(
        self, init: bool = False, clear_filter: Callable[[nn.Module], bool] = lambda m: True
    ) -> DependentModule:
        """Turn parameters of this module and its submodules into dependents.

        A parameter shared by several submodules (tied weights) becomes one dependent,
        listed under its first name. A parameter registered as ``None`` stays a ``None``
        parameter.

        Args:
            init: Keep the values (as detached copies); ``False`` sets them to ``None``.
            clear_filter: Called on each submodule; ``False`` keeps its parameters.

        Returns:
            ``self``.
        """
        shared: dict[int, tuple[_Dependent, Tensor | None]] = {}
        for module in self.modules():
            if not clear_filter(module) or not any(p is not None for p in module._parameters.values()):
                continue
            DependentModule.to_dependentmodule(module, recurse=False)
            registry = module._registry()
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                if id(param) not in shared:
                    value = param.detach().clone() if init else None
                    shared[id(param)] = (_Dependent(param.shape, param.requires_grad), value)
                entry, value = shared[id(param)]
                del module._parameters[name]
                registry[name] = entry
                module.__dict__[name] = value
                module._refresh_flat_weight(name, value)
        _bump()
        return self

    def update_shapes(self) -> None:
        """Re-read every registered shape from the dependents' current values (``None`` values keep theirs)."""
        for module in self.modules():
            for name, entry in module.__dict__.get("_dependents", {}).items():
                value = module.__dict__.get(name)
                if value is not None:
                    entry.shape = value.shape
        _bump()  # substitution plans copy the registered shapes

    # ------------------------------------------------------------------ iteration
    def named_dependents(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Tensor | None]]:
        """Yield ``(qualified name, value)`` of every dependent, like ``named_parameters()``.

        The order is the one ``named_parameters()`` had before the parameters were
        cleared; tied dependents appear once, under their first name.
        """
        seen: set[int] = set()
        modules = self.named_modules(prefix=prefix) if recurse else [(prefix, self)]
        for module_prefix, module in modules:
            for name, entry in module.__dict__.get("_dependents", {}).items():
                if id(entry) in seen:
                    continue
                seen.add(id(entry))
                yield module_prefix + ("." if module_prefix else "") + name, module.__dict__.get(name)

    def dependents(self, recurse: bool = True) -> Iterator[Tensor | None]:
        """Yield the values of the dependents, in :meth:`named_dependents` order."""
        for _, value in self.named_dependents(recurse=recurse):
            yield value

    # ------------------------------------------------------------------ substitution
    def _plan(self) -> _Plan:
        plan = self.__dict__.get("_metann_plan")
        if plan is None or plan.version != _structure_version:
            plan = self.__dict__["_metann_plan"] = _Plan(self)
        return plan

    def substitute(
        self, named_params: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], strict: bool = True
    ) -> DependentModule:
        """Put tensors into dependents by qualified name (``"0.weight"``).

        The tensors are used as they are (no copy, no detach), so gradients flow
        through them; a tied dependent receives the tensor in every place it is used.

        Args:
            named_params: A mapping or an iterable of ``(name, tensor)`` pairs.
            strict: Require every dependent to be given. With ``False``, missing names
                keep their current value. Unknown names raise either way.

        Returns:
            ``self``.

        Raises:
            KeyError: Listing the missing and the unexpected names.
            TypeError: If a value is not a tensor.
            ValueError: If a shape differs from the registered shape.
        """
        plan = self._plan()
        items = named_params.items() if isinstance(named_params, Mapping) else named_params
        index = plan.index
        chosen: list[tuple[int, Tensor]] = []
        unexpected = []
        for name, value in items:
            i = index.get(name)
            if i is None:
                unexpected.append(name)
            else:
                chosen.append((i, value))
        given = {i for i, _ in chosen} if strict and not isinstance(named_params, Mapping) else None
        if unexpected or (strict and len(given if given is not None else chosen) != len(plan.entries)):
            given = {i for i, _ in chosen}
            missing = [n for n in plan.names if index[n] not in given] if strict else []
            if unexpected or missing:
                raise KeyError(
                    f"`substitute` does not match `{type(self).__name__}`: missing {sorted(missing)}, "
                    f"unexpected {sorted(map(str, unexpected))}. Use the names from `named_dependents()`."
                )
        entries = plan.entries
        for i, value in chosen:
            self._check(entries[i], value)
        for i, value in chosen:
            _write(entries[i][2], value)
        return self

    def substitute_from_list(self, params: Iterable[Tensor]) -> DependentModule:
        """Put tensors into dependents in :meth:`named_dependents` order.

        Args:
            params: One tensor per dependent (a list, tuple or generator).

        Returns:
            ``self``.

        Raises:
            ValueError: If the number of tensors differs from the number of dependents,
                or a shape differs from the registered shape.
            TypeError: If a value is not a tensor.
        """
        plan = self._plan()
        values = params if isinstance(params, (list, tuple)) else list(params)
        if len(values) != len(plan.registered):
            raise ValueError(
                f"`substitute_from_list` on `{type(self).__name__}` got {len(values)} tensors, "
                f"expected {len(plan.registered)} (one per dependent, in `named_dependents()` order)."
            )
        # Validate everything first. This is the hot path of every inner step: one list
        # comparison when all is well, the detailed check (which raises) otherwise.
        if [v.shape if isinstance(v, Tensor) else _NOT_A_TENSOR for v in values] != plan.shapes:
            for entry, value in zip(plan.entries, values):
                self._check(entry, value)
        plan.write_all(values)
        return self

    def _check(self, entry: tuple[str, _Dependent, list], value: Any) -> None:
        name, registered, _ = entry
        if not isinstance(value, Tensor):
            raise TypeError(
                f"dependent {name!r} of `{type(self).__name__}` must be given a Tensor, got `{type(value).__name__}`."
            )
        shape = registered.shape
        if shape is not None and value.shape != shape:
            raise ValueError(
                f"dependent {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)} "
                "(the registered shape, from the original parameter)."
            )

    def _release(self) -> None:
        """Set every dependent to ``None`` so that no computed weight is kept alive."""
        self._plan().write_all(None)

    # ------------------------------------------------------------------ nn.Module hooks
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # The same checks as torch's `Module._call_impl` (torch 2.x), in one frame instead of
        # two: with any hook, tracing or a compiled call, torch's own path runs unchanged.
        d = self.__dict__
        if (
            d["_forward_hooks"]
            or d["_forward_pre_hooks"]
            or d["_backward_hooks"]
            or d["_backward_pre_hooks"]
            or _torch_module._global_forward_hooks
            or _torch_module._global_forward_pre_hooks
            or _torch_module._global_backward_hooks
            or _torch_module._global_backward_pre_hooks
            or d.get("_compiled_call_impl") is not None
            or torch._C._get_tracing_state()
        ):
            return nn.Module.__call__(self, *args, **kwargs)
        return self.forward(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        registry = self.__dict__.get("_dependents")
        if registry is not None and name in registry:
            # A dependent slot: write it directly. nn.Module.__setattr__ would turn an
            # assigned nn.Parameter back into a registered parameter.
            _check_value(self, name, value)
            self.__dict__[name] = value
            self._refresh_flat_weight(name, value)
            return
        if isinstance(value, nn.Module):
            DependentModule.to_dependentmodule(value)
            _bump()
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        registry = self.__dict__.get("_dependents")
        if registry is not None and name in registry:
            del registry[name]
            self.__dict__.pop(name, None)
            _bump()
            return
        if name in self._modules:
            _bump()
        super().__delattr__(name)

    def add_module(self, name: str, module: nn.Module | None) -> None:
        if module is not None:
            DependentModule.to_dependentmodule(module)
        super().add_module(name, module)
        _bump()

    register_module = add_module

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> DependentModule:
        # Move dependents first: torch's RNNBase._apply rebuilds `_flat_weights` from attributes.
        for name in self.__dict__.get("_dependents", {}):
            value = self.__dict__.get(name)
            if value is not None:
                self.__dict__[name] = fn(value)
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for name in self.__dict__.get("_dependents", {}):
            value = self.__dict__.get(name)
            if value is not None:
                destination[prefix + name] = value if keep_vars else value.detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for name, entry in self.__dict__.get("_dependents", {}).items():
            key = prefix + name
            if key in unexpected_keys:
                unexpected_keys.remove(key)
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            given = state_dict[key]
            if entry.shape is not None and given.shape != entry.shape:
                error_msgs.append(
                    f"size mismatch for {key}: copying a tensor with shape {tuple(given.shape)}, "
                    f"the dependent has shape {tuple(entry.shape)}."
                )
                continue
            current = self.__dict__.get(name)
            value = given.detach().clone()
            if current is not None:
                value = value.to(device=current.device, dtype=current.dtype)
            self.__dict__[name] = value
            self._refresh_flat_weight(name, value)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_metann_plan", None)
        state.pop("_flat_weight_refs", None)
        for key, value in state.items():
            if isinstance(value, Tensor) and value.grad_fn is not None:
                state[key] = value.detach()
            elif isinstance(value, list) and any(isinstance(v, Tensor) and v.grad_fn is not None for v in value):
                state[key] = [v.detach() if isinstance(v, Tensor) else v for v in value]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_flat_weights_names" in self.__dict__:
            names = self.__dict__["_flat_weights_names"]
            self.__dict__["_flat_weights"] = [getattr(self, n, None) for n in names]
            self.__dict__["_flat_weight_refs"] = [
                None if w is None else weakref.ref(w) for w in self.__dict__["_flat_weights"]
            ]

    def __reduce_ex__(self, protocol: Any) -> Any:
        original = type(self).__dict__.get("_original_class")
        if original is None:
            return super().__reduce_ex__(protocol)
        return _rebuild, (original,), self.__getstate__()
