"""Tests of metann.learner: Learner.functional over the zoo, buffer sharing, modes and errors."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.testing import assert_close

from metann import Learner
from metann.learner import share_buffers
from tests.zoo import (
    ZOO,
    SelfAttention,
    assert_unchanged,
    case_ids,
    double,
    loss_of,
    zoo_params,
)

ZOO_CASES = case_ids(ZOO)
ZOO_BY_ID = {case.id: case for case in ZOO}


def names_of(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_parameters()]


def conv_bn() -> nn.Module:
    return ZOO_BY_ID["conv_bn"].make()


def released(learner: Learner) -> bool:
    return all(value is None for value in learner.stateless.dependents())


# ---------------------------------------------------------------------------- the zoo
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", ZOO_CASES)
def test_functional_equals_the_module(case, training, seed):
    module = case.make().train(not training)  # the module's own mode must not matter
    reference = copy.deepcopy(module).train(training)
    args = case.args()
    learner = Learner(module)

    with assert_unchanged(module, buffers=False):
        torch.manual_seed(5)
        out = learner.functional(list(module.parameters()), training, *args)
    torch.manual_seed(5)
    assert_close(out, reference(*args))
    assert module.training is not training and learner.stateless.training is training
    # Buffers (batch-norm statistics in train mode) were updated in the module, as by its forward.
    assert_close(dict(module.named_buffers()), dict(reference.named_buffers()))
    assert released(learner)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", ZOO_CASES)
def test_gradients_equal_functional_call(case, training, seed):
    module = case.make().double()
    reference = copy.deepcopy(module).train(training)
    args = double(case.args())
    params = zoo_params(module)  # differ from the module's own parameters
    learner = Learner(module)

    torch.manual_seed(5)
    out = learner.functional(params, training, *args)
    torch.manual_seed(5)
    expected = torch.func.functional_call(reference, dict(zip(names_of(module), params)), args)
    assert_close(out, expected)
    ours = torch.autograd.grad(loss_of(out), params, allow_unused=True)
    theirs = torch.autograd.grad(loss_of(expected), params, allow_unused=True)
    for name, a, b in zip(names_of(module), ours, theirs):
        assert (a is None) == (b is None), name
        if b is not None:
            assert_close(a, b, msg=name)
    assert any(g is not None and g.abs().sum() > 0 for g in ours)
    assert all(p.grad is None for p in module.parameters())


def test_unused_parameter_gets_no_gradient(seed):
    module = ZOO_BY_ID["unused"].make()
    params = zoo_params(module)
    out = Learner(module).functional(params, True, torch.randn(4, 3))
    grads = torch.autograd.grad(out.sum(), params, allow_unused=True)
    assert [g is None for g in grads] == [name == "unused" for name in names_of(module)]


# ---------------------------------------------------------------------------- params
def test_params_as_mapping_list_tuple_or_generator(seed):
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    learner = Learner(net)
    x = torch.randn(5, 3)
    expected = net(x)
    named = dict(net.named_parameters())
    reordered = dict(reversed(list(named.items())))  # a mapping is matched by name, not order
    for params in (named, reordered, list(net.parameters()), tuple(net.parameters()), net.parameters()):
        assert_close(learner.functional(params, False, x), expected)
    # Other values really are used: weight 1 and bias 0 give back the input.
    ident = nn.Linear(3, 3)
    out = Learner(ident).functional([torch.eye(3), torch.zeros(3)], False, x)
    assert_close(out, x)


def test_forward_runs_the_module_with_its_own_parameters(seed):
    net = nn.Linear(3, 2)
    learner = Learner(net)
    x = torch.randn(4, 3)
    assert_close(learner(x), net(x))
    assert list(learner.parameters()) == list(net.parameters())
    assert list(learner.state_dict()) == ["module.weight", "module.bias"]


def test_keyword_arguments_reach_the_forward(seed):
    attn = nn.MultiheadAttention(4, 2, batch_first=True)
    learner = Learner(attn)
    q, kv = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    out, weights = learner.functional(list(attn.parameters()), False, q, kv, kv, need_weights=True)
    expected, expected_weights = attn.eval()(q, kv, kv, need_weights=True)
    assert_close(out, expected)
    assert_close(weights, expected_weights)


# ---------------------------------------------------------------------------- modes and state
def test_training_flag_applies_to_that_call_only(seed):
    net = ZOO_BY_ID["dropout"].make().eval()
    learner = Learner(net)
    x = torch.randn(4, 3)
    params = list(net.parameters())
    a = learner.functional(params, True, x)
    b = learner.functional(params, True, x)
    assert not torch.allclose(a, b)  # dropout is active in train mode
    assert not net.training
    assert_close(learner.functional(params, False, x), net(x))
    assert_close(learner.functional(params, 0, x), net(x))  # any truthy/falsy value
    learner.train()
    assert net.training  # the learner's own mode is the module's
    assert_close(learner.functional(params, False, x), net.eval()(x))


def test_batch_norm_statistics_update_the_modules_buffers(seed):
    net = conv_bn()
    learner = Learner(net)
    x = torch.randn(4, 1, 6, 6)
    before = copy.deepcopy(net.state_dict())
    mean, count = net[1].running_mean.clone(), int(net[1].num_batches_tracked)
    eval_out = learner.functional(net.parameters(), False, x)
    assert_close(net[1].running_mean, mean, rtol=0, atol=0)  # eval: no update
    learner.functional(net.parameters(), True, x)
    assert not torch.allclose(net[1].running_mean, mean)
    assert int(net[1].num_batches_tracked) == count + 1
    reference = conv_bn()
    reference.load_state_dict(before)
    reference.train()(x)
    assert_close(net[1].running_mean, reference[1].running_mean)
    assert_close(net[1].running_var, reference[1].running_var)
    # Eval outputs read the updated statistics.
    assert not torch.allclose(learner.functional(net.parameters(), False, x), eval_out)
    assert_close(learner.functional(net.parameters(), False, x), net.eval()(x))


def test_buffer_sharing_survives_to_load_state_dict_and_in_place_updates(seed):
    net = conv_bn()
    learner = Learner(net)
    x = torch.randn(4, 1, 6, 6)

    learner.to(torch.float64)
    assert net[1].running_mean.dtype == torch.float64
    params = [p.detach() for p in net.parameters()]
    learner.functional(params, True, x.double())
    reference = copy.deepcopy(net)
    assert learner.stateless[1].running_mean is net[1].running_mean
    assert_close(learner.functional(params, False, x.double()), net.eval()(x.double()))

    other = conv_bn().double()
    net.load_state_dict(other.state_dict())
    assert_close(net[1].running_var, other[1].running_var)
    assert_close(learner.functional(list(other.parameters()), False, x.double()), other.eval()(x.double()))
    assert not torch.allclose(learner.functional(params, False, x.double()), reference.eval()(x.double()))

    with torch.no_grad():
        net[1].running_mean.fill_(3.0)
    other[1].running_mean.fill_(3.0)
    assert_close(learner.functional(list(other.parameters()), False, x.double()), other(x.double()))
    net[1].reset_running_stats()
    other[1].reset_running_stats()
    assert_close(learner.functional(list(other.parameters()), False, x.double()), other(x.double()))
    # Assigning a new buffer tensor reaches the copy as well.
    net[1].running_var = torch.full((3,), 4.0, dtype=torch.float64)
    other[1].running_var = torch.full((3,), 4.0, dtype=torch.float64)
    assert_close(learner.functional(list(other.parameters()), False, x.double()), other(x.double()))


def test_share_buffers_refuses_different_structures():
    with pytest.raises(ValueError, match=re.escape("`share_buffers` needs two modules with the same structure")):
        share_buffers(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2))


def test_original_module_is_never_modified(seed):
    net = conv_bn()
    learner = Learner(net)
    x = torch.randn(4, 1, 6, 6)
    params = [p.detach().clone().requires_grad_() for p in net.parameters()]
    with assert_unchanged(net, buffers=False):
        for training in (True, False):
            out = learner.functional(params, training, x)
            out.sum().backward()
    assert all(p.grad is None for p in net.parameters())
    assert all(p.grad is not None for p in params)
    assert net.training


def test_dependents_are_released_even_when_the_forward_fails(seed):
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    learner = Learner(net)
    with assert_unchanged(net), pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        learner.functional(net.parameters(), True, torch.randn(2, 5))
    assert released(learner)
    assert_close(learner.functional(net.parameters(), True, torch.ones(2, 3)), net(torch.ones(2, 3)))


def test_deepcopy_of_a_learner_keeps_buffers_shared(seed):
    net = conv_bn()
    learner = copy.deepcopy(Learner(net))
    x = torch.randn(4, 1, 6, 6)
    learner.functional(learner.module.parameters(), True, x)
    assert learner.stateless[1].running_mean is learner.module[1].running_mean
    assert not torch.allclose(learner.module[1].running_mean, net[1].running_mean)


# ---------------------------------------------------------------------------- attention
def _meta_gradient(call, params, x):
    """One differentiable inner SGD step on ``call``, then the outer gradient."""
    inner = call(params, x[:1]).pow(2).mean()
    grads = torch.autograd.grad(inner, params, create_graph=True)
    fast = [p - 0.5 * g for p, g in zip(params, grads)]
    return torch.autograd.grad(call(fast, x[1:]).sin().sum(), params)


@pytest.mark.parametrize("case_id", ["mha", "transformer"])
def test_attention_second_order_under_the_math_kernel(case_id, seed):
    module = ZOO_BY_ID[case_id].make().double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    learner = Learner(module)
    params = zoo_params(module)
    names = names_of(module)
    with sdpa_kernel(SDPBackend.MATH):
        ours = _meta_gradient(lambda ps, inp: learner.functional(ps, True, inp), params, x)
        theirs = _meta_gradient(
            lambda ps, inp: torch.func.functional_call(module, dict(zip(names, ps)), (inp,)), params, x
        )
    assert_close(ours, theirs)
    # Second-order terms matter here: the first-order gradient is different.
    first = torch.autograd.grad(learner.functional([p - 0.0 for p in params], True, x[1:]).sin().sum(), params)
    assert not all(torch.allclose(a, b) for a, b in zip(ours, first))


@pytest.mark.parametrize(
    ("case_id", "kernel"),
    [("mha", "_native_multi_head_attention"), ("transformer", "_transformer_encoder_layer_fwd")],
)
def test_eval_fast_path_uses_the_substituted_weights(case_id, kernel, monkeypatch, seed):
    module = ZOO_BY_ID[case_id].make()
    if case_id == "mha":
        assert isinstance(module, SelfAttention)
    x = torch.randn(2, 5, 8)
    learner = Learner(module)
    params = [p.detach() for p in zoo_params(module)]
    calls = []
    original = getattr(torch, kernel)

    def counting(*args, **kwargs):
        calls.append(kernel)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, kernel, counting)
    with torch.no_grad():
        out = learner.functional(params, False, x)
        assert calls == [kernel]  # the fast path ran ...
        monkeypatch.setattr(torch, kernel, original)
        expected = torch.func.functional_call(module.train(), dict(zip(names_of(module), params)), (x,))
    assert_close(out, expected)  # ... on the substituted weights (the slow train path agrees)
    assert not torch.allclose(out, module.eval()(x))


# ---------------------------------------------------------------------------- Sequential chains
def nested_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.Sequential(nn.ReLU(), nn.Linear(5, 4)), nn.Tanh(), nn.Linear(4, 2))


def test_sequential_chain_equals_the_module_and_its_gradients(seed):
    net = nested_mlp().double()
    learner = Learner(net)
    x = torch.randn(6, 3, dtype=torch.float64)
    params = [p.detach().clone().requires_grad_() for p in net.parameters()]
    out = learner.functional(params, True, x)
    expected = torch.func.functional_call(net, dict(zip(names_of(net), params)), (x,))
    assert_close(out, expected)
    assert_close(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(expected.square().sum(), params))
    assert torch.autograd.gradgradcheck(lambda *p: learner.functional(p, True, x), params)
    assert released(learner)


@pytest.mark.parametrize("where", ["root", "nested child", "leaf", "global"])
def test_hooks_on_a_sequential_chain_still_run(where, seed):
    net = nested_mlp()
    learner = Learner(net)
    x = torch.randn(2, 3)
    plain = learner.functional(net.parameters(), True, x)
    calls = []

    def hook(module, inputs, output):
        calls.append(type(module).__name__)
        return output * 2

    stateless = learner.stateless
    target = {"root": stateless, "nested child": stateless[1], "leaf": stateless[1][1]}.get(where)
    handle = (
        torch.nn.modules.module.register_module_forward_hook(hook)
        if target is None
        else target.register_forward_hook(hook)
    )
    try:
        hooked = learner.functional(net.parameters(), True, x)
    finally:
        handle.remove()
    assert calls and not torch.allclose(hooked, plain)
    if where == "root":
        assert_close(hooked, plain * 2)
    calls.clear()
    assert_close(learner.functional(net.parameters(), True, x), plain)  # removed: the chain runs again
    assert calls == []


def test_sequential_chain_follows_structure_changes_and_copies(seed):
    net = nested_mlp()
    learner = Learner(net)
    x = torch.randn(2, 3)
    before = learner.functional(net.parameters(), True, x)
    learner.stateless[2] = nn.Sigmoid()  # a new layer in the stateless copy
    after = learner.functional(net.parameters(), True, x)
    net[2] = nn.Sigmoid()
    assert_close(after, net(x))
    assert not torch.allclose(after, before)

    twin = copy.deepcopy(learner)
    calls = []
    twin.stateless[0].register_forward_hook(lambda m, i, o: calls.append("twin"))
    assert_close(twin.functional(net.parameters(), True, x), after)
    assert calls == ["twin"]  # the copy runs its own modules
    learner.functional(net.parameters(), True, x)
    assert calls == ["twin"]


def test_custom_forward_of_a_sequential_subclass_is_respected(seed):
    class Doubling(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    net = Doubling(nn.Linear(3, 2), nn.ReLU())
    learner = Learner(net)
    x = torch.randn(4, 3)
    assert_close(learner.functional(net.parameters(), True, x), net(x))


# ---------------------------------------------------------------------------- bad input
def test_learner_needs_a_module():
    with pytest.raises(TypeError, match=re.escape("`Learner` expects an `nn.Module`, got `list`")):
        Learner([nn.Linear(2, 2)])


@pytest.fixture
def learner():
    return Learner(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))


def test_functional_reports_names_counts_shapes_and_kinds(learner):
    net, x = learner.module, torch.randn(2, 3)
    named = dict(net.named_parameters())
    with assert_unchanged(net):
        with pytest.raises(KeyError, match=re.escape("missing ['2.bias'], unexpected ['2.b']")):
            learner.functional({**{k: v for k, v in named.items() if k != "2.bias"}, "2.b": named["2.bias"]}, True, x)
        with pytest.raises(ValueError, match=re.escape("got 3 tensors, expected 4")):
            learner.functional(list(net.parameters())[:3], True, x)
        with pytest.raises(ValueError, match=re.escape("dependent '0.bias' has shape (3,), expected (4,)")):
            learner.functional({**named, "0.bias": torch.zeros(3)}, True, x)
        with pytest.raises(TypeError, match=re.escape("dependent '2.weight' of `DependentSequential` must be given a Tensor, got `ndarray`")):
            learner.functional([*list(net.parameters())[:2], named["2.weight"].detach().numpy(), named["2.bias"]], True, x)
    assert released(learner)
    assert_close(learner.functional(named, True, x), net(x))
