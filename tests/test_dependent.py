"""Tests of metann.dependent: conversion, dependents, substitution, copies and errors."""

from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from metann import DependentModule
from tests.zoo import RNN_IDS, ZOO, Case, Tied, case_ids, double, zoo_params

ZOO_CASES = case_ids(ZOO)


def outputs(module: nn.Module, case: Case, args: tuple) -> tuple:
    """``module``'s eval output, then its train output (seeded, so dropout repeats)."""
    module.eval()
    out_eval = module(*args)
    module.train()
    torch.manual_seed(7)
    out_train = module(*args)
    return out_eval, out_train


def dependent_names(module: DependentModule) -> list[str]:
    return [name for name, _ in module.named_dependents()]


def param_names(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_parameters()]


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


def roundtrip(module: nn.Module, how: str) -> nn.Module:
    if how == "deepcopy":
        return copy.deepcopy(module)
    if how == "pickle":
        return pickle.loads(pickle.dumps(module))
    assert how == "none"
    return module


# ---------------------------------------------------------------------------- conversion
def test_repr_matches_spec():
    net = nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 2))
    assert DependentModule(net) is net
    assert repr(net) == (
        "DependentSequential(\n"
        "  (0): DependentLinear(in_features=10, out_features=5, bias=True)\n"
        "  (1): DependentLinear(in_features=5, out_features=2, bias=True)\n"
        ")"
    )


@pytest.mark.parametrize("case", ZOO_CASES)
def test_conversion_keeps_classes_names_and_outputs(case, seed):
    module = case.make()
    original = copy.deepcopy(module)
    args = case.args()
    params = dict(module.named_parameters())
    originals = {name: type(m) for name, m in module.named_modules()}

    assert DependentModule(module) is module

    for name, m in module.named_modules():
        assert type(m).__name__ == "Dependent" + originals[name].__name__
        assert isinstance(m, originals[name]) and isinstance(m, DependentModule)
        assert type(m)._original_class is originals[name]
    # Removing the "Dependent" prefixes gives back the original repr.
    assert re.sub(r"\bDependent(\w+)\(", r"\1(", repr(module)) == repr(original)
    # Conversion alone keeps the parameters as they were (same objects, same order).
    assert list(module.named_parameters()) == list(params.items())
    assert dependent_names(module) == []
    assert_close(outputs(module, case, args), outputs(original, case, args))


@pytest.mark.parametrize("case", ZOO_CASES)
def test_stateless_lists_every_parameter_as_a_none_dependent(case, seed):
    module = case.make()
    original_types = [type(m) for m in module.modules()]
    args = case.args()
    stateless = DependentModule.stateless(module)

    assert [type(m) for m in module.modules()] == original_types  # the original is untouched
    assert dependent_names(stateless) == param_names(module)
    assert all(value is None for value in stateless.dependents())
    assert list(stateless.parameters()) == []
    assert [n for n, _ in stateless.named_buffers()] == [n for n, _ in module.named_buffers()]

    stateless.substitute_from_list([p * 2 for p in module.parameters()])
    doubled = torch.func.functional_call(
        copy.deepcopy(module).eval(), {n: p * 2 for n, p in module.named_parameters()}, args
    )
    assert_close(stateless.eval()(*args), doubled)
    stateless.substitute(module.named_parameters())
    assert_close(outputs(stateless, case, args), outputs(copy.deepcopy(module), case, args))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("case", ZOO_CASES)
def test_copies_keep_classes_and_outputs(case, how, seed):
    module = case.make()
    args = case.args()
    expected = outputs(copy.deepcopy(module), case, args)
    converted = DependentModule(copy.deepcopy(module)).clear_params(init=True)
    stateless = DependentModule.stateless(module).substitute(module.named_parameters())
    if how == "pickle" and not case.picklable:
        # torch refuses to pickle parametrized modules; the converted module is refused too.
        with pytest.raises(RuntimeError, match="Serialization of parametrized modules"):
            pickle.dumps(module)
        with pytest.raises(pickle.PicklingError, match="Parametrized"):
            pickle.dumps(converted)
        return
    for source in (converted, stateless):
        copied = roundtrip(source, how)
        assert [type(m) for m in copied.modules()] == [type(m) for m in source.modules()]
        assert dependent_names(copied) == param_names(module)
        assert_close(outputs(copied, case, args), expected)


@pytest.mark.parametrize("how", ["none", "deepcopy", "pickle"])
@pytest.mark.parametrize("case", ZOO_CASES)
def test_copy_then_to_double_then_substitute(case, how, seed):
    """RNN `_flat_weights` must follow substituted tensors after copies and `.to()` (PYTORCH_NOTES)."""
    if how == "pickle" and not case.picklable:
        pytest.skip("torch refuses to pickle parametrized modules")
    module = case.make()
    args = double(case.args())
    reference = copy.deepcopy(module).double()
    params = zoo_params(reference)
    names = param_names(reference)

    stateless = roundtrip(DependentModule.stateless(module), how).to(torch.float64)
    stateless.substitute(dict(zip(names, params)))
    expected = torch.func.functional_call(reference.eval(), dict(zip(names, params)), args)
    assert_close(stateless.eval()(*args), expected)

    # A converted module keeps its values through the copy and the dtype change.
    converted = roundtrip(DependentModule(copy.deepcopy(module)).clear_params(init=True), how)
    converted = converted.to(torch.float64).eval()
    assert all(value.dtype == torch.float64 for value in converted.dependents())
    assert_close(converted(*args), reference(*args))
    # ... and follows values assigned afterwards, one attribute at a time (a tied weight is
    # assigned in each place: assignment sets one slot, as it sets one parameter in torch).
    for name, value in dict(zip(names, params)).items():
        owner, _, attr = name.rpartition(".")
        setattr(converted.get_submodule(owner), attr, value)
    if case.id == "tied":
        converted.b.weight = converted.a.weight
    assert_close(converted(*args), expected)


@pytest.mark.parametrize("case", [c for c in ZOO_CASES if c.values[0].id in (*RNN_IDS, "mlp")])
def test_deepcopy_of_computed_dependents_holds_detached_values(case, seed):
    module = case.make()
    args = case.args()
    stateless = DependentModule.stateless(module)
    stateless.substitute({n: p * 1.0 for n, p in module.named_parameters()})
    assert all(value.grad_fn is not None for value in stateless.dependents())

    copies = [copy.deepcopy(stateless), pickle.loads(pickle.dumps(stateless))]
    for copied in copies:
        for (name, value), (_, source) in zip(copied.named_dependents(), stateless.named_dependents()):
            assert value.grad_fn is None and not value.requires_grad, name
            assert_close(value, source.detach())
        assert_close(copied.eval()(*args), module.eval()(*args))
    # The source keeps its computed values.
    assert all(value.grad_fn is not None for value in stateless.dependents())


@pytest.mark.parametrize("case", ZOO_CASES)
def test_state_dict_round_trips(case, seed):
    module = case.make()
    args = case.args()
    expected = module.state_dict()
    converted = DependentModule(copy.deepcopy(module))
    cleared = DependentModule(copy.deepcopy(module)).clear_params(init=True)
    for source in (converted, cleared):
        state = source.state_dict()
        assert list(state) == list(expected)
        assert_close(dict(state), dict(expected))
        # Into the original class (fresh random weights) ...
        fresh = case.make()
        fresh.load_state_dict(state)
        assert_close(outputs(fresh, case, args), outputs(copy.deepcopy(module), case, args))
    # ... and from the original class into converted ones.
    for target in (DependentModule(case.make()), DependentModule(case.make()).clear_params(init=True)):
        target.load_state_dict(expected)
        assert_close(outputs(target, case, args), outputs(copy.deepcopy(module), case, args))


@pytest.mark.parametrize("case", ZOO_CASES)
def test_to_original_undoes_conversion(case, seed):
    module = case.make()
    args = case.args()
    types = [type(m) for m in module.modules()]
    names = param_names(module)
    trains = [p.requires_grad for p in module.parameters()]
    expected = outputs(copy.deepcopy(module), case, args)
    DependentModule(module).clear_params(init=True)
    assert module.to_original() is module
    assert [type(m) for m in module.modules()] == types
    assert param_names(module) == names
    assert all(type(p) is nn.Parameter for p in module.parameters())
    assert [p.requires_grad for p in module.parameters()] == trains
    assert_close(outputs(module, case, args), expected)


@pytest.mark.parametrize("through", ["as is", "deepcopy", "pickle"])
def test_frozen_parameters_stay_frozen_through_conversion(through):
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    net[0].weight.requires_grad_(False)
    net[1].bias.requires_grad_(False)
    converted = DependentModule(net).clear_params(init=True)
    if through == "deepcopy":
        converted = copy.deepcopy(converted)
    elif through == "pickle":
        converted = pickle.loads(pickle.dumps(converted))
    restored = converted.to_original()
    assert {n: p.requires_grad for n, p in restored.named_parameters()} == {
        "0.weight": False,
        "0.bias": True,
        "1.weight": True,
        "1.bias": False,
    }


def test_re_registering_a_frozen_parameter_keeps_it_frozen():
    net = DependentModule(nn.Linear(3, 2))
    net.weight.requires_grad_(False)
    net.clear_params(init=True)
    net.register_dependent("weight", torch.zeros(2, 3))
    assert not net.to_original().weight.requires_grad


def test_registry_entries_pickled_by_earlier_versions_load():
    from metann.dependent import _Dependent

    entry = _Dependent.__new__(_Dependent)
    entry.__setstate__(torch.Size([4, 3]))  # earlier versions pickled the bare shape
    assert (entry.shape, entry.requires_grad) == (torch.Size([4, 3]), True)


# ---------------------------------------------------------------------------- class cache, assignment
def test_one_class_per_original_class_and_converting_twice_is_a_noop():
    a, b = DependentModule(nn.Linear(2, 2)), DependentModule(nn.Linear(3, 1))
    assert type(a) is type(b)
    net = DependentModule(mlp())
    types = [type(m) for m in net.modules()]
    assert DependentModule(net) is net
    assert DependentModule.to_dependentmodule(net) is net
    assert [type(m) for m in net.modules()] == types
    assert type(net[0]) is type(a)
    # Building the generated class directly builds a converted module.
    direct = type(a)(4, 3)
    assert type(direct) is type(a) and direct.weight.shape == (3, 4)


def test_recurse_false_converts_only_the_root():
    net = mlp()
    DependentModule.to_dependentmodule(net, recurse=False)
    assert type(net).__name__ == "DependentSequential"
    assert type(net[0]) is nn.Linear


def test_assigning_a_module_converts_it_and_reaches_the_plan(seed):
    net = DependentModule.stateless(mlp())
    net.extra = nn.Linear(2, 2)
    assert type(net.extra).__name__ == "DependentLinear"
    net.append(nn.Linear(2, 1))
    assert type(net[3]).__name__ == "DependentLinear"
    # New modules keep their parameters; the plan of the root is rebuilt.
    assert dependent_names(net) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    net.extra = DependentModule.stateless(nn.Linear(2, 2))
    assert dependent_names(net)[-2:] == ["extra.weight", "extra.bias"]
    w = torch.randn(2, 2)
    net.substitute({"extra.weight": w}, strict=False)
    assert net.extra.weight is w


def test_substituting_parameters_keeps_them_dependents(seed):
    net = mlp()
    stateless = DependentModule.stateless(net)
    stateless.substitute(net.named_parameters())
    assert stateless[0].weight is net[0].weight
    assert list(stateless.parameters()) == []
    assert dependent_names(stateless) == param_names(net)
    # Attribute assignment of a Parameter on a dependent keeps it a dependent too.
    p = nn.Parameter(torch.randn(8, 3))
    stateless[0].weight = p
    assert stateless[0].weight is p and list(stateless.parameters()) == []
    x = torch.randn(4, 3)
    assert_close(stateless[0](x), x @ p.T + net[0].bias)


def test_attribute_assignment_sets_the_dependent(seed):
    layer = DependentModule.stateless(nn.Linear(3, 2))
    w, b = torch.eye(2, 3), torch.zeros(2)
    layer.weight, layer.bias = w, b
    assert layer.weight is w and layer.bias is b
    x = torch.randn(4, 3)
    assert_close(layer(x), x[:, :2])  # weight eye, bias 0: output is the input's first columns
    with pytest.raises(TypeError, match=re.escape("dependent 'weight' of `DependentLinear` must be a Tensor")):
        layer.weight = [1.0, 2.0]
    assert layer.weight is w
    layer.weight = None
    assert layer.weight is None


def test_tied_weights_are_one_dependent_reaching_both_places(seed):
    tied = Tied()
    stateless = DependentModule.stateless(tied)
    assert dependent_names(stateless) == ["a.weight", "a.bias", "b.bias"] == param_names(tied)
    w = torch.randn(3, 3, requires_grad=True)
    params = {"a.weight": w, "a.bias": torch.randn(3), "b.bias": torch.randn(3)}
    stateless.substitute(params)
    assert stateless.a.weight is w and stateless.b.weight is w
    x = torch.randn(4, 3)
    assert_close(stateless(x), torch.func.functional_call(tied, params, (x,)))
    with pytest.raises(KeyError, match=re.escape("unexpected ['b.weight']")):
        stateless.substitute({**params, "b.weight": w})
    # clear_params(init=True) ties the kept values too; to_original ties the parameters again.
    converted = DependentModule(Tied()).clear_params(init=True)
    assert converted.a.weight is converted.b.weight
    converted.to_original()
    assert converted.a.weight is converted.b.weight
    assert param_names(converted) == ["a.weight", "a.bias", "b.bias"]


def test_clear_filter_keeps_filtered_modules_parameters(seed):
    net = mlp()

    def keep_last(m: nn.Module) -> bool:  # called on the copy's modules: recognise the layer by shape
        return not (isinstance(m, nn.Linear) and m.out_features == 2)

    stateless = DependentModule.stateless(net, clear_filter=keep_last)
    assert dependent_names(stateless) == ["0.weight", "0.bias"]
    assert param_names(stateless) == ["2.weight", "2.bias"]
    assert_close(stateless[2].weight, net[2].weight)
    assert stateless[2].weight is not net[2].weight  # a copy, the original is untouched
    stateless.substitute({"0.weight": net[0].weight, "0.bias": net[0].bias})
    x = torch.randn(4, 3)
    assert_close(stateless(x), net(x))

    converted = DependentModule(mlp())
    converted.clear_params(init=True, clear_filter=lambda m: m is not converted[0])
    assert dependent_names(converted) == ["2.weight", "2.bias"]
    assert param_names(converted) == ["0.weight", "0.bias"]


def test_clear_params_init_false_and_true():
    net = mlp()
    weight = net[0].weight
    converted = DependentModule(copy.deepcopy(net))
    assert converted.clear_params(init=True) is converted
    value = converted[0].weight
    assert value is not weight and value.grad_fn is None and not value.requires_grad
    assert_close(value, weight.detach())
    converted.clear_params()  # no parameters left: nothing changes
    assert converted[0].weight is value
    cleared = DependentModule(copy.deepcopy(net)).clear_params()
    assert all(v is None for v in cleared.dependents())


# ---------------------------------------------------------------------------- registration
def test_register_dependent_and_update_shapes(seed):
    layer = DependentModule(nn.Linear(3, 2))
    scale = torch.tensor([2.0, 3.0])
    layer.register_dependent("scale", scale)
    assert layer.scale is scale
    assert dependent_names(layer) == ["scale"]
    assert list(layer.state_dict()) == ["scale", "weight", "bias"]
    layer.register_dependent("empty", None)
    assert dependent_names(layer) == ["scale", "empty"]
    layer.substitute({"empty": torch.ones(5)}, strict=False)  # no registered shape: anything goes
    with pytest.raises(ValueError, match=re.escape("dependent 'scale' has shape (3,), expected (2,)")):
        layer.substitute({"scale": torch.ones(3)}, strict=False)
    layer.scale = torch.ones(3)  # assignment does not check shapes; update_shapes re-reads them
    layer.update_shapes()
    layer.substitute({"scale": torch.zeros(3), "empty": torch.ones(5)})
    layer.substitute_from_list([torch.zeros(3), torch.ones(5)])  # the list path sees new shapes too
    with pytest.raises(ValueError, match=re.escape("dependent 'scale' has shape (2,), expected (3,)")):
        layer.substitute_from_list([torch.ones(2), torch.ones(5)])
    with pytest.raises(ValueError, match=re.escape("dependent 'empty' has shape (1,), expected (5,)")):
        layer.substitute({"empty": torch.ones(1)}, strict=False)
    assert_close(layer.scale, torch.zeros(3))


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        (3, TypeError, "dependent name on `DependentLinear` must be a string, got `int`"),
        ("", KeyError, "dependent name on `DependentLinear` cannot be empty"),
        ("a.b", KeyError, "dependent name 'a.b' on `DependentLinear` cannot contain '.'"),
        ("weight", KeyError, "cannot register dependent 'weight' on `DependentLinear`: an attribute"),
        ("forward", KeyError, "cannot register dependent 'forward' on `DependentLinear`: an attribute"),
        ("running", KeyError, "cannot register dependent 'running' on `DependentLinear`: an attribute"),
    ],
)
def test_register_dependent_rejects_bad_names(name, error, message):
    layer = DependentModule(nn.Linear(3, 2))
    layer.register_buffer("running", torch.zeros(1))
    before = dict(layer.__dict__)
    with pytest.raises(error, match=re.escape(message)):
        layer.register_dependent(name, torch.zeros(1))
    assert dependent_names(layer) == [] and layer.__dict__ == before


def test_a_dependent_without_shape_takes_any_tensor_but_no_other_value():
    layer = DependentModule.stateless(nn.Linear(3, 2))
    layer.register_dependent("free", None)
    w, b = torch.zeros(2, 3), torch.zeros(2)
    for value in (torch.ones(4), torch.ones(1, 1)):
        layer.substitute_from_list([w, b, value])
        assert layer.free is value
    with pytest.raises(
        TypeError, match=re.escape("dependent 'free' of `DependentLinear` must be given a Tensor, got `int`")
    ):
        layer.substitute_from_list([w, b, 5])
    assert layer.free is value


def test_register_dependent_rejects_a_non_tensor():
    layer = DependentModule(nn.Linear(3, 2))
    with pytest.raises(
        TypeError, match=re.escape("dependent 'scale' of `DependentLinear` must be a Tensor or None, got `float`")
    ):
        layer.register_dependent("scale", 1.0)
    assert dependent_names(layer) == [] and not hasattr(layer, "scale")


def test_register_dependent_rejects_a_clashing_submodule_name():
    net = DependentModule(mlp())
    with pytest.raises(KeyError, match=re.escape("cannot register dependent '0' on `DependentSequential`")):
        net.register_dependent("0", torch.zeros(1))


# ---------------------------------------------------------------------------- bad input
def test_not_a_module_is_refused():
    with pytest.raises(TypeError, match=re.escape("`DependentModule` expects an `nn.Module`, got `list`")):
        DependentModule([nn.Linear(2, 2)])
    with pytest.raises(TypeError, match=re.escape("takes exactly one `nn.Module`")):
        DependentModule()
    with pytest.raises(TypeError, match=re.escape("`stateless` expects an `nn.Module`, got `dict`")):
        DependentModule.stateless({})


@pytest.fixture
def filled():
    """A stateless MLP holding values, and those values by name."""
    stateless = DependentModule.stateless(mlp())
    values = {name: torch.randn(p.shape) for name, p in mlp().named_parameters()}
    stateless.substitute(values)
    return stateless, values


def assert_holds(module: DependentModule, values: dict) -> None:
    current = dict(module.named_dependents())
    assert list(current) == list(values)
    assert all(current[name] is values[name] for name in values)


def test_strict_substitute_lists_missing_and_unexpected_names(filled):
    stateless, values = filled
    given = {"2.bias": torch.zeros(2), "0.weight": torch.zeros(8, 3), "1.weight": torch.zeros(1), "zz": 1}
    message = "`substitute` does not match `DependentSequential`: missing ['0.bias', '2.weight'], unexpected ['1.weight', 'zz']"
    with pytest.raises(KeyError, match=re.escape(message)):
        stateless.substitute(given)
    with pytest.raises(KeyError, match=re.escape(message)):
        stateless.substitute(list(given.items()))  # pairs are checked the same way
    assert_holds(stateless, values)
    with pytest.raises(KeyError, match=re.escape("missing ['0.bias', '0.weight', '2.bias', '2.weight']")):
        stateless.substitute({})
    assert_holds(stateless, values)


def test_non_strict_substitute_keeps_missing_and_refuses_unknown(filled):
    stateless, values = filled
    new = torch.ones(2)
    stateless.substitute({"2.bias": new}, strict=False)
    assert_holds(stateless, {**values, "2.bias": new})
    with pytest.raises(KeyError, match=re.escape("missing [], unexpected ['2.bais']")):
        stateless.substitute({"2.bias": torch.zeros(2), "2.bais": torch.zeros(2)}, strict=False)
    assert_holds(stateless, {**values, "2.bias": new})


def test_wrong_shape_names_the_dependent_and_both_shapes(filled):
    stateless, values = filled
    bad = {**values, "0.bias": torch.zeros(8), "2.weight": torch.zeros(3, 8)}
    with pytest.raises(ValueError, match=re.escape("dependent '2.weight' has shape (3, 8), expected (2, 8)")):
        stateless.substitute(bad)
    assert_holds(stateless, values)  # nothing was written, not even the good '0.bias'
    with pytest.raises(ValueError, match=re.escape("dependent '0.weight' has shape (3, 8), expected (8, 3)")):
        stateless.substitute_from_list([torch.zeros(3, 8), *list(values.values())[1:]])
    assert_holds(stateless, values)
    # Shapes are known before any value was given.
    empty = DependentModule.stateless(mlp())
    with pytest.raises(ValueError, match=re.escape("dependent '0.bias' has shape (3,), expected (8,)")):
        empty.substitute({"0.bias": torch.zeros(3)}, strict=False)
    assert all(v is None for v in empty.dependents())


def test_wrong_count_in_substitute_from_list(filled):
    stateless, values = filled
    message = "`substitute_from_list` on `DependentSequential` got 3 tensors, expected 4"
    with pytest.raises(ValueError, match=re.escape(message)):
        stateless.substitute_from_list(list(values.values())[:3])
    with pytest.raises(ValueError, match=re.escape("got 5 tensors, expected 4")):
        stateless.substitute_from_list(iter([*values.values(), torch.zeros(1)]))
    assert_holds(stateless, values)


def test_non_tensor_values_are_refused(filled):
    stateless, values = filled
    message = "dependent '2.bias' of `DependentSequential` must be given a Tensor, got `list`"
    with pytest.raises(TypeError, match=re.escape(message)):
        stateless.substitute({**values, "0.bias": torch.zeros(8), "2.bias": [0.0, 0.0]})
    with pytest.raises(
        TypeError,
        match=re.escape("dependent '0.weight' of `DependentSequential` must be given a Tensor, got `NoneType`"),
    ):
        stateless.substitute_from_list([None, *list(values.values())[1:]])
    assert_holds(stateless, values)


def test_substitute_accepts_pairs_generators_and_returns_self(filled):
    stateless, values = filled
    new = {name: torch.randn(v.shape) for name, v in values.items()}
    assert stateless.substitute(iter(new.items())) is stateless
    assert_holds(stateless, new)
    assert stateless.substitute_from_list(v for v in values.values()) is stateless
    assert_holds(stateless, values)


# ---------------------------------------------------------------------------- gradients
def test_gradcheck_through_substitute(seed):
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    stateless = DependentModule.stateless(net)
    x = torch.randn(5, 3, dtype=torch.float64)
    params = tuple(p.detach().clone().requires_grad_() for p in net.parameters())

    def f(*tensors):
        return stateless.substitute_from_list(tensors)(x)

    assert torch.autograd.gradcheck(f, params)
    assert torch.autograd.gradgradcheck(f, params)

    def g(w, b):
        return stateless.substitute({"0.weight": w, "0.bias": b}, strict=False)(x)

    stateless.substitute_from_list(params)
    assert torch.autograd.gradcheck(g, params[:2])


def test_gradients_flow_into_the_given_tensors_unchanged(seed):
    net = mlp()
    stateless = DependentModule.stateless(net)
    params = [p.detach().clone().requires_grad_() for p in net.parameters()]
    computed = [p * 3 for p in params]
    stateless.substitute_from_list(computed)
    assert all(a is b for a, b in zip(stateless.dependents(), computed))  # no copy, no detach
    x = torch.randn(4, 3)
    expected = torch.autograd.grad(
        torch.func.functional_call(net, dict(zip(param_names(net), computed)), (x,)).pow(2).sum(),
        params,
        retain_graph=True,
    )
    stateless(x).pow(2).sum().backward()
    for p, e in zip(params, expected):
        assert_close(p.grad, e)
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("case", [c for c in ZOO_CASES if c.values[0].id in RNN_IDS])
def test_rnn_second_order_through_substitute(case, seed):
    module = case.make().double()
    args = double(case.args())
    stateless = DependentModule.stateless(module)
    params = zoo_params(module)
    names = param_names(module)

    def meta_grad(call):
        loss = call(params).pow(2).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        fast = [p - 0.5 * g for p, g in zip(params, grads)]
        return torch.autograd.grad(call(fast).sin().sum(), params)

    ours = meta_grad(lambda ps: stateless.substitute_from_list(ps)(*args)[0])
    theirs = meta_grad(lambda ps: torch.func.functional_call(module, dict(zip(names, ps)), args)[0])
    assert_close(ours, theirs)


def test_hooks_still_run_through_the_lean_call():
    net = DependentModule(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    calls = []
    handle = net[0].register_forward_hook(lambda m, i, o: calls.append("local"))
    pre = net[0].register_forward_pre_hook(lambda m, i: (i[0] * 0,))
    glob = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    try:
        out = net(torch.ones(3, 2))
    finally:
        handle.remove()
        pre.remove()
        glob.remove()
    assert calls == ["DependentLinear", "local", "DependentReLU", "DependentSequential"]  # torch: global first
    torch.testing.assert_close(out, torch.relu(net[0].bias).expand(3, 2))
    calls.clear()
    net(torch.ones(3, 2))
    assert calls == []
