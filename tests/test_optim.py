"""Tests for metann.optim: torch.optim trajectories, second-order gradients, state safety, errors."""
from __future__ import annotations

import copy
import doctest
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch.testing import assert_close

from metann import optim
from metann.optim import SGD, Adam, InnerOptimizer, RMSprop

SHAPES = {"layer.weight": (3, 4), "layer.bias": (3,), "conv": (2, 2, 2), "scale": (1,)}


@dataclass(frozen=True)
class Case:
    id: str
    ours: Callable[[], InnerOptimizer]
    reference: Callable[[list], torch.optim.Optimizer]


# foreach=False: the single-tensor reference path (the default on CPU anyway).
CASES = [
    Case("sgd", lambda: SGD(0.1), lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=False)),
    Case("sgd_momentum", lambda: SGD(0.1, momentum=0.9),
         lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False)),
    Case("sgd_dampening_wd", lambda: SGD(0.05, momentum=0.8, dampening=0.3, weight_decay=0.1),
         lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.1, foreach=False)),
    Case("sgd_nesterov", lambda: SGD(0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
         lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, foreach=False)),
    Case("rmsprop", lambda: RMSprop(0.01), lambda ps: torch.optim.RMSprop(ps, lr=0.01, foreach=False)),
    # eps=0.1 makes "eps after sqrt" differ visibly from "eps inside sqrt".
    Case("rmsprop_centered_momentum_wd",
         lambda: RMSprop(0.02, alpha=0.9, eps=0.1, weight_decay=0.1, momentum=0.5, centered=True),
         lambda ps: torch.optim.RMSprop(ps, lr=0.02, alpha=0.9, eps=0.1, weight_decay=0.1, momentum=0.5,
                                        centered=True, foreach=False)),
    Case("rmsprop_centered", lambda: RMSprop(0.01, eps=1e-3, centered=True),
         lambda ps: torch.optim.RMSprop(ps, lr=0.01, eps=1e-3, centered=True, foreach=False)),
    Case("adam", lambda: Adam(0.01), lambda ps: torch.optim.Adam(ps, lr=0.01, foreach=False)),
    # eps=0.1 makes the place of eps relative to the bias correction visible.
    Case("adam_amsgrad_wd", lambda: Adam(0.02, betas=(0.8, 0.95), eps=0.1, weight_decay=0.1, amsgrad=True),
         lambda ps: torch.optim.Adam(ps, lr=0.02, betas=(0.8, 0.95), eps=0.1, weight_decay=0.1, amsgrad=True,
                                     foreach=False)),
]
CASE_IDS = [case.id for case in CASES]
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-9}, torch.float64: {"rtol": 1e-11, "atol": 1e-15}}


def random_grads(dtype, generator, step, none_for=()):
    """Gradients of varied scale; names in `none_for` get None on odd steps."""
    grads = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        if name in none_for and step % 2:
            grads[name] = None
        else:
            grads[name] = torch.randn(shape, dtype=dtype, generator=generator) * 10.0 ** (i - 1)
    return grads


def run_both(case, dtype, steps=20, none_for=(), ours=None, groups=None):
    """Run our optimizer and torch.optim side by side; return both lists of per-step updates."""
    generator = torch.Generator().manual_seed(1)
    init = {name: torch.randn(shape, dtype=dtype, generator=generator) for name, shape in SHAPES.items()}
    leaves = {name: torch.nn.Parameter(t.clone()) for name, t in init.items()}
    reference = case.reference(groups(leaves) if groups else list(leaves.values()))
    opt = ours if ours is not None else case.ours()
    params = {name: t.clone() for name, t in init.items()}
    state = opt.init(params)
    ref_updates, our_updates = [], []
    for step in range(steps):
        grads = random_grads(dtype, generator, step, none_for)
        before = {name: p.detach().clone() for name, p in leaves.items()}
        for name, p in leaves.items():
            p.grad = None if grads[name] is None else grads[name].clone()
        reference.step()
        new, state = opt.step(params, grads, state)
        ref_updates.append({name: leaves[name].detach() - before[name] for name in SHAPES})
        our_updates.append({name: new[name] - params[name] for name in SHAPES})
        params = new
    return our_updates, ref_updates


# --------------------------------------------------------------------------- trajectories vs torch.optim


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_trajectory_matches_torch_optim(case, dtype):
    ours, ref = run_both(case, dtype)
    for step, (our_step, ref_step) in enumerate(zip(ours, ref)):
        for name in SHAPES:
            assert ref_step[name].abs().min() > 0, "the reference must move every entry"
            assert our_step[name].dtype == dtype
            assert_close(our_step[name], ref_step[name], **TOLERANCE[dtype], msg=f"step {step}, {name}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_trajectory_with_missing_grads_matches_torch_optim(case):
    """torch.optim skips parameters whose .grad is None (Adam's step count stays per parameter)."""
    ours, ref = run_both(case, torch.float64, none_for=("layer.bias", "scale"))
    for step, (our_step, ref_step) in enumerate(zip(ours, ref)):
        for name in SHAPES:
            if step % 2 and name in ("layer.bias", "scale"):
                assert not our_step[name].any()
            else:
                assert ref_step[name].abs().min() > 0
            assert_close(our_step[name], ref_step[name], **TOLERANCE[torch.float64], msg=f"step {step}, {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("sgd_nesterov", "rmsprop_centered_momentum_wd",
                                                               "adam_amsgrad_wd")], ids=lambda c: c.id)
def test_tensor_lr_follows_torch_optim(case, dtype):
    """A one-element tensor lr (any shape, any float dtype) takes the tensor path and gives the same updates."""
    template = case.ours()
    opt = copy.copy(template)
    opt.lr = torch.tensor([template.lr], dtype=torch.float64)
    ours, ref = run_both(case, dtype, ours=opt)
    rtol = {torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
    for our_step, ref_step in zip(ours, ref):
        for name in SHAPES:
            assert our_step[name].dtype == dtype
            assert_close(our_step[name], ref_step[name], rtol=rtol, atol=0)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("sgd_momentum", "rmsprop", "adam")],
                         ids=lambda c: c.id)
def test_per_parameter_lr_matches_torch_param_groups(case):
    """lr as a mapping name -> tensor equals torch.optim with one param group per parameter."""
    rates = {"layer.weight": 0.03, "layer.bias": 0.01, "conv": 0.002, "scale": 0.05}
    opt = case.ours()
    # Shapes: like the parameter, broadcastable (3, 1), scalar, and float32 rates for float64 parameters.
    opt.lr = {
        "layer.weight": torch.full((3, 1), rates["layer.weight"], dtype=torch.float64),
        "layer.bias": torch.full((3,), rates["layer.bias"], dtype=torch.float64),
        "conv": torch.tensor(rates["conv"], dtype=torch.float64),
        "scale": torch.tensor([rates["scale"]], dtype=torch.float32),
        "not.a.parameter": torch.tensor(1.0),
    }
    ours, ref = run_both(case, torch.float64, ours=opt,
                         groups=lambda leaves: [{"params": [leaves[n]], "lr": rates[n]} for n in SHAPES])
    for our_step, ref_step in zip(ours, ref):
        for name in SHAPES:
            assert our_step[name].dtype == torch.float64
            # float32 rate for "scale": the rate itself is rounded to float32.
            rtol = 1e-6 if name == "scale" else 1e-10
            assert_close(our_step[name], ref_step[name], rtol=rtol, atol=0)


# --------------------------------------------------------------------------- second order


def mlp_loss(params, x, y):
    hidden = torch.tanh(x @ params["w1"].T + params["b1"])
    return ((hidden @ params["w2"] - y) ** 2).mean()


SECOND_ORDER = {
    "adam": lambda lr: Adam(lr, betas=(0.8, 0.9)),
    "adam_amsgrad": lambda lr: Adam(lr, eps=1e-3, amsgrad=True),
    "rmsprop": lambda lr: RMSprop(lr, alpha=0.9),
    "rmsprop_centered_momentum": lambda lr: RMSprop(lr, alpha=0.9, momentum=0.5, centered=True),
    "sgd_momentum": lambda lr: SGD(lr, momentum=0.9),
    "sgd_nesterov": lambda lr: SGD(lr, momentum=0.9, nesterov=True, weight_decay=0.1),
}


def adapted_query_loss(make_opt, names, tensors, support, query, steps=2, create_graph=True):
    """Inner loop with gradients from autograd.grad(create_graph=True); returns the query loss."""
    *values, lr = tensors
    params = dict(zip(names, values))
    opt = make_opt(lr)
    state = opt.init(params)
    for _ in range(steps):
        grads = torch.autograd.grad(mlp_loss(params, *support), list(params.values()), create_graph=create_graph)
        params, state = opt.step(params, dict(zip(params, grads)), state)
    return mlp_loss(params, *query)


def mlp_problem():
    generator = torch.Generator().manual_seed(3)
    kw = {"dtype": torch.float64, "generator": generator}
    params = {"w1": torch.randn(3, 2, **kw), "b1": torch.randn(3, **kw), "w2": torch.randn(3, **kw)}
    support = (torch.randn(5, 2, **kw), torch.randn(5, **kw))
    query = (torch.randn(5, 2, **kw), torch.randn(5, **kw))
    return params, support, query


@pytest.mark.parametrize("kind", list(SECOND_ORDER))
def test_gradcheck_second_order_through_two_steps(kind):
    params, support, query = mlp_problem()
    lr = torch.tensor(0.05, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (*params.values(), lr))

    def f(*tensors):
        return adapted_query_loss(SECOND_ORDER[kind], list(params), tensors, support, query)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("kind", ["adam", "rmsprop", "sgd_momentum"])
def test_second_order_differs_from_first_order(kind):
    """The gradient's own graph is used: dropping it (first order) changes the meta-gradient."""
    params, support, query = mlp_problem()
    inputs = [t.requires_grad_() for t in (*params.values(), torch.tensor(0.05, dtype=torch.float64))]
    names = list(params)
    second = torch.autograd.grad(adapted_query_loss(SECOND_ORDER[kind], names, inputs, support, query), inputs)
    first = torch.autograd.grad(
        adapted_query_loss(SECOND_ORDER[kind], names, inputs, support, query, create_graph=False), inputs
    )
    assert (second[0] - first[0]).abs().max() > 1e-4


def relu_problem():
    """A ReLU net whose unit 2 is dead for every input, plus a parameter the forward never uses."""
    generator = torch.Generator().manual_seed(5)
    kw = {"dtype": torch.float64}
    params = {
        "w1": torch.tensor([[0.5, 0.3], [-0.2, 0.6], [0.4, 0.1]], **kw),
        "b1": torch.tensor([0.5, 1.0, -100.0], **kw),  # unit 2: pre-activation < -99 on all inputs
        "gain": torch.tensor([1.0, 0.8, 1.2], **kw),  # gain[2] only multiplies the dead unit
        "w2": torch.tensor([0.7, -0.4, 0.9], **kw),
        "unused": torch.tensor([0.3, -0.3], **kw),
    }
    x = torch.rand(6, 2, generator=generator, **kw) + 0.5  # keeps units 0 and 1 active with a margin
    support = (x, torch.randn(6, generator=generator, **kw))
    query = (torch.rand(6, 2, generator=generator, **kw) + 0.5, torch.randn(6, generator=generator, **kw))
    return params, support, query


def relu_loss(params, x, y):
    hidden = torch.relu(x @ params["w1"].T + params["b1"]) * params["gain"]
    return ((hidden @ params["w2"] - y) ** 2).mean()


def relu_meta_loss(make_opt, names, tensors, support, query, steps=2):
    *values, lr = tensors
    params = dict(zip(names, values))
    opt = make_opt(lr)
    state = opt.init(params)
    for _ in range(steps):
        grads = torch.autograd.grad(relu_loss(params, *support), list(params.values()), create_graph=True,
                                    allow_unused=True, materialize_grads=True)
        params, state = opt.step(params, dict(zip(params, grads)), state)
    return relu_loss(params, *query)


DEAD_UNIT = {
    "adam": lambda lr: Adam(lr),
    "adam_amsgrad": lambda lr: Adam(lr, amsgrad=True),
    "rmsprop": lambda lr: RMSprop(lr),
    "rmsprop_centered": lambda lr: RMSprop(lr, momentum=0.5, centered=True),
}


def central_differences(f, tensors, h=1e-6):
    """Central finite differences of the scalar f() in every entry of `tensors` (perturbed in place)."""
    estimates = []
    for t in tensors:
        estimate = torch.zeros_like(t)
        flat = t.detach().view(-1)
        for i in range(flat.numel()):
            original = flat[i].item()
            flat[i] = original + h
            plus = f().item()
            flat[i] = original - h
            minus = f().item()
            flat[i] = original
            estimate.view(-1)[i] = (plus - minus) / (2 * h)
        estimates.append(estimate)
    return estimates


@pytest.mark.parametrize("kind", list(DEAD_UNIT))
def test_meta_gradient_with_exactly_zero_gradients_is_finite_and_correct(kind):
    params, support, query = relu_problem()
    names = list(params)
    inputs = [t.requires_grad_() for t in (*params.values(), torch.tensor(0.05, dtype=torch.float64))]
    # The scenario really has exactly-zero gradients on the graph.
    grads = torch.autograd.grad(relu_loss(params, *support), list(params.values()), create_graph=True,
                                allow_unused=True, materialize_grads=True)
    grads = dict(zip(names, grads))
    assert not grads["w1"][2].any() and grads["b1"][2] == 0 and grads["gain"][2] == 0 and grads["w2"][2] == 0
    assert grads["b1"].requires_grad and not grads["unused"].any()

    meta_grads = torch.autograd.grad(relu_meta_loss(DEAD_UNIT[kind], names, inputs, support, query), inputs,
                                     allow_unused=True, materialize_grads=True)
    assert all(torch.isfinite(g).all() for g in meta_grads)
    estimates = central_differences(lambda: relu_meta_loss(DEAD_UNIT[kind], names, inputs, support, query), inputs)
    for name, analytic, estimate in zip([*names, "lr"], meta_grads, estimates):
        assert_close(analytic, estimate, rtol=1e-5, atol=1e-7, msg=name)
    assert meta_grads[-1].abs() > 1e-3  # the lr meta-gradient is not trivially zero


@pytest.mark.parametrize("kind", ["adam", "rmsprop"])
def test_plain_sqrt_gives_nan_in_the_dead_unit_scenario(kind, monkeypatch):
    """Guards the test above: with torch's sqrt the same meta-gradient is NaN."""
    monkeypatch.setattr(optim, "_safe_sqrt", torch.sqrt)
    params, support, query = relu_problem()
    inputs = [t.requires_grad_() for t in (*params.values(), torch.tensor(0.05, dtype=torch.float64))]
    meta_grads = torch.autograd.grad(relu_meta_loss(DEAD_UNIT[kind], list(params), inputs, support, query),
                                     inputs, allow_unused=True, materialize_grads=True)
    assert torch.isnan(torch.cat([g.reshape(-1) for g in meta_grads])).any()


def test_safe_sqrt_values_and_derivatives():
    x = torch.tensor([0.0, 1e-300, 1e-30, 0.25, 2.0, 1e10], dtype=torch.float64, requires_grad=True)
    y = optim._safe_sqrt(x)
    assert torch.equal(y.detach(), x.detach().sqrt())
    (grad,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    assert grad[0] == 0
    assert_close(grad[1:], 0.5 / x.detach()[1:].sqrt())
    (second,) = torch.autograd.grad(grad.sum(), x)
    assert second[0] == 0
    assert_close(second[2:], -0.25 * x.detach()[2:] ** -1.5)
    assert torch.autograd.gradgradcheck(optim._safe_sqrt, (torch.tensor([0.3, 1.7], dtype=torch.float64,
                                                                        requires_grad=True),))
    plain = torch.tensor([0.0, 4.0])
    assert torch.equal(optim._safe_sqrt(plain), torch.tensor([0.0, 2.0]))


def test_learnable_per_parameter_lr_gets_meta_gradient():
    """Meta-SGD style: d(query loss)/d(lr[name]) equals the hand-written value for one SGD step."""
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    rate = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64, requires_grad=True)
    opt = SGD({"w": rate})
    grad = 2 * w  # gradient of sum(w ** 2)
    new, _ = opt.step({"w": w}, {"w": grad}, opt.init({"w": w}))
    (new["w"] ** 2).sum().backward()
    expected = -2 * (w - rate * grad) * grad  # d/d rate of sum((w - rate * g) ** 2)
    assert_close(rate.grad, expected.detach())


def test_parameter_dict_lr_is_accepted_and_learnable():
    rates = torch.nn.ParameterDict({"w": torch.nn.Parameter(torch.tensor([0.1, 0.2], dtype=torch.float64))})
    opt = Adam(rates)
    w = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    new, _ = opt.step({"w": w}, {"w": torch.tensor([1.0, 1.0], dtype=torch.float64)}, opt.init({"w": w}))
    assert_close(new["w"].detach(), torch.tensor([0.9, -1.2], dtype=torch.float64))  # first Adam step: lr * sign
    new["w"].sum().backward()
    assert_close(rates["w"].grad, torch.tensor([-1.0, -1.0], dtype=torch.float64))


# --------------------------------------------------------------------------- state and purity


def snapshot(obj):
    """Structure, identities, values and version counters of nested dicts of tensors."""
    if isinstance(obj, dict):
        return {key: (id(value), snapshot(value)) for key, value in obj.items()}
    if isinstance(obj, torch.Tensor):
        return ("tensor", obj.detach().clone(), obj._version)
    return ("value", obj)


def assert_same_snapshot(before, after):
    assert before.keys() == after.keys()
    for key in before:
        (id_before, inner_before), (id_after, inner_after) = before[key], after[key]
        assert id_before == id_after, key
        if isinstance(inner_before, dict):
            assert_same_snapshot(inner_before, inner_after)
        elif inner_before[0] == "tensor":
            assert torch.equal(inner_before[1], inner_after[1]) and inner_before[2] == inner_after[2], key
        else:
            assert inner_before == inner_after, key


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_step_mutates_none_of_its_inputs(case, seed):
    opt = case.ours()
    params = {name: torch.randn(shape, requires_grad=True) for name, shape in SHAPES.items()}
    state = opt.init(params)
    for _ in range(2):  # fill the state with tensors first
        grads = {name: torch.randn(shape) for name, shape in SHAPES.items()}
        params, state = opt.step(params, grads, state)
    grads = {name: torch.randn(shape) for name, shape in SHAPES.items()}
    before = snapshot({"params": params, "grads": grads, "state": state})
    new_params, new_state = opt.step(params, grads, state)
    assert_same_snapshot(before, snapshot({"params": params, "grads": grads, "state": state}))
    assert new_params is not params and new_state is not state
    assert all(new_state[key] is not state[key] for key in state)
    assert list(new_params) == list(params)
    assert all(not torch.equal(new_params[n], params[n]) for n in SHAPES)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_none_and_missing_grads_pass_through(case, seed):
    opt = case.ours()
    params = {name: torch.randn(shape) for name, shape in SHAPES.items()}
    state = opt.init(params)
    params, state = opt.step(params, {name: torch.randn(shape) for name, shape in SHAPES.items()}, state)
    grads = {"layer.weight": torch.randn(3, 4), "layer.bias": None}  # "conv" and "scale" missing
    new_params, new_state = opt.step(params, grads, state)
    assert list(new_params) == list(SHAPES)
    for name in ("layer.bias", "conv", "scale"):
        assert new_params[name] is params[name]
        for slot in state:
            assert new_state[slot][name] is state[slot][name]
    assert not torch.equal(new_params["layer.weight"], params["layer.weight"])
    # A name that never had a gradient gets no state at all.
    fresh = opt.init(params)
    _, after = opt.step(params, {"conv": None}, fresh)
    assert all(after[slot] == {} for slot in after)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_init_gives_fresh_state(case, seed):
    opt = case.ours()
    params = {name: torch.randn(shape) for name, shape in SHAPES.items()}
    grads = [{name: torch.randn(shape) for name, shape in SHAPES.items()} for _ in range(3)]
    first, _ = opt.step(params, grads[0], opt.init(params))
    state_a, state_b = opt.init(params), opt.init(params)
    assert state_a is not state_b and all(state_a[k] is not state_b[k] for k in state_a)
    current = params
    for g in grads:
        current, state_a = opt.step(current, g, state_a)
    assert all(not inner for inner in state_b.values())  # stepping state_a left state_b empty
    again, _ = opt.step(params, grads[0], opt.init(params))
    for name in SHAPES:
        assert torch.equal(again[name], first[name])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_one_optimizer_serves_two_models(case, seed):
    """Interleaved adaptations of two models with clashing names equal two separate optimizers."""
    shared = case.ours()
    models = [{"w": torch.randn(3, 2), "b": torch.randn(3)}, {"w": torch.randn(5), "extra": torch.randn(2, 2)}]
    grads = [[{n: torch.randn_like(p) for n, p in m.items()} for _ in range(4)] for m in models]
    expected = []
    for model, model_grads in zip(models, grads):
        separate = case.ours()
        params, state = model, separate.init(model)
        for g in model_grads:
            params, state = separate.step(params, g, state)
        expected.append(params)
    params = list(models)
    states = [shared.init(m) for m in models]
    for step in range(4):
        for i in (0, 1):
            params[i], states[i] = shared.step(params[i], grads[i][step], states[i])
    for ours, theirs in zip(params, expected):
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.equal(ours[name], theirs[name])


def test_adam_counts_steps_per_parameter(seed):
    opt = Adam(0.1)
    params = {"a": torch.randn(2), "b": torch.randn(2)}
    state = opt.init(params)
    params, state = opt.step(params, {"a": torch.randn(2), "b": torch.randn(2)}, state)
    params, state = opt.step(params, {"a": torch.randn(2)}, state)
    assert state["step"] == {"a": 2, "b": 1}


def test_lr_kinds_and_repr():
    assert SGD(1).lr == 1.0 and isinstance(SGD(1).lr, float)
    lr = torch.tensor(0.1, requires_grad=True)
    assert Adam(lr).lr is lr
    assert repr(SGD(0.1, momentum=0.9)) == "SGD(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0)"
    assert repr(Adam({"w": torch.ones(1)})) == (
        "Adam(lr=<1 per-parameter tensors>, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.0, amsgrad=False)"
    )
    assert repr(RMSprop(0.5)) == (
        "RMSprop(lr=0.5, alpha=0.99, eps=1e-08, weight_decay=0.0, momentum=0.0, centered=False)"
    )


def test_docstring_examples_run():
    result = doctest.testmod(optim, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 20 and result.failed == 0


# --------------------------------------------------------------------------- validation

CONSTRUCTION_ERRORS = [
    (lambda: SGD(-0.1), ValueError, "`SGD` expects `lr` >= 0, got -0.1."),
    (lambda: Adam(float("nan")), ValueError, "`Adam` expects `lr` >= 0, got nan."),
    (lambda: SGD("0.1"), TypeError,
     "`SGD` expects `lr` to be a number, a one-element tensor or a mapping name -> tensor, got `str` ('0.1')."),
    (lambda: SGD(True), TypeError, "got `bool` (True)"),
    (lambda: SGD(torch.tensor([0.1, 0.2])), ValueError,
     "`SGD` expects a tensor `lr` to have one element, got shape (2,). Pass a mapping name -> tensor"),
    (lambda: SGD(torch.tensor(1)), TypeError,
     "`SGD` expects `lr` to be a floating-point tensor, got dtype torch.int64."),
    (lambda: RMSprop(torch.tensor(-0.1)), ValueError, "`RMSprop` expects `lr` >= 0, got a tensor with negative"),
    (lambda: SGD({"w": 0.1}), TypeError, "`SGD` expects `lr['w']` to be a tensor, got `float` (0.1)."),
    (lambda: SGD({1: torch.ones(1)}), TypeError, "`SGD` expects the keys of `lr` to be parameter names (str), got 1."),
    (lambda: Adam({"w": torch.tensor([0.1, -0.1])}), ValueError, "`Adam` expects `lr['w']` >= 0, got a tensor"),
    (lambda: SGD(0.1, momentum=-0.9), ValueError, "`SGD` expects `momentum` >= 0, got -0.9."),
    (lambda: SGD(0.1, momentum="0.9"), TypeError, "`SGD` expects `momentum` to be a real number, got `str` ('0.9')."),
    (lambda: SGD(0.1, dampening=None), TypeError, "`SGD` expects `dampening` to be a real number, got `NoneType`"),
    (lambda: SGD(0.1, weight_decay=-1), ValueError, "`SGD` expects `weight_decay` >= 0, got -1.0."),
    (lambda: SGD(0.1, nesterov=True), ValueError,
     "`SGD` with `nesterov=True` needs `momentum` > 0 and `dampening` == 0, got momentum=0.0, dampening=0.0."),
    (lambda: SGD(0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError,
     "got momentum=0.9, dampening=0.1. Pass e.g. `momentum=0.9`."),
    (lambda: SGD(0.1, momentum=0.9, nesterov=1), TypeError, "`SGD` expects `nesterov` to be a bool, got `int` (1)."),
    (lambda: RMSprop(0.1, alpha=1.5), ValueError, "`RMSprop` expects `alpha` in [0, 1], got 1.5."),
    (lambda: RMSprop(0.1, alpha=-0.1), ValueError, "`RMSprop` expects `alpha` in [0, 1], got -0.1."),
    (lambda: RMSprop(0.1, eps=-1e-8), ValueError, "`RMSprop` expects `eps` >= 0, got -1e-08."),
    (lambda: RMSprop(0.1, momentum=-1), ValueError, "`RMSprop` expects `momentum` >= 0, got -1.0."),
    (lambda: RMSprop(0.1, weight_decay=-0.5), ValueError, "`RMSprop` expects `weight_decay` >= 0, got -0.5."),
    (lambda: RMSprop(0.1, centered="yes"), TypeError, "`RMSprop` expects `centered` to be a bool, got `str` ('yes')."),
    (lambda: Adam(0.1, betas=(1.0, 0.999)), ValueError, "`Adam` expects `betas[0]` in [0, 1), got 1.0."),
    (lambda: Adam(0.1, betas=(0.9, -0.1)), ValueError, "`Adam` expects `betas[1]` in [0, 1), got -0.1."),
    (lambda: Adam(0.1, betas=0.9), TypeError, "`Adam` expects `betas` to be a pair (beta1, beta2), got 0.9."),
    (lambda: Adam(0.1, betas=(0.9, "a")), TypeError, "`Adam` expects `betas[1]` to be a real number, got `str` ('a')."),
    (lambda: Adam(0.1, eps=-1e-8), ValueError, "`Adam` expects `eps` >= 0, got -1e-08."),
    (lambda: Adam(0.1, weight_decay=-0.1), ValueError, "`Adam` expects `weight_decay` >= 0, got -0.1."),
    (lambda: Adam(0.1, amsgrad=None), TypeError, "`Adam` expects `amsgrad` to be a bool, got `NoneType` (None)."),
]


@pytest.mark.parametrize(("make", "error", "message"), CONSTRUCTION_ERRORS,
                         ids=[f"{i}-{e.__name__}" for i, (_, e, _) in enumerate(CONSTRUCTION_ERRORS)])
def test_construction_errors(make, error, message):
    with pytest.raises(error, match=re.escape(message)):
        make()


def test_boolean_options_are_keyword_only():
    with pytest.raises(TypeError):
        SGD(0.1, 0.9, 0.0, True)  # torch.optim.SGD's 4th positional is weight_decay: refuse the ambiguity
    with pytest.raises(TypeError):
        Adam(0.1, (0.9, 0.999), 1e-8, 0.0, True)


def test_bad_lr_assignment_keeps_the_old_lr():
    opt = SGD(0.1)
    with pytest.raises(ValueError, match=re.escape("`SGD` expects `lr` >= 0, got -1.0.")):
        opt.lr = -1
    assert opt.lr == 0.1


STEP_PARAMS = {"w": torch.ones(3, 4), "b": torch.ones(3)}

STEP_ERRORS = [
    ("lr_shape", lambda: SGD({"w": torch.ones(4, 3), "b": torch.ones(3)}), STEP_PARAMS,
     {"w": torch.ones(3, 4)}, ValueError,
     "`SGD`: `lr['w']` has shape (4, 3), which does not broadcast to the shape (3, 4) of parameter 'w'."),
    ("lr_more_dims", lambda: Adam({"w": torch.ones(1, 3, 4), "b": torch.ones(3)}), STEP_PARAMS,
     {"w": torch.ones(3, 4)}, ValueError,
     "`Adam`: `lr['w']` has shape (1, 3, 4), which does not broadcast to the shape (3, 4) of parameter 'w'."),
    ("lr_missing", lambda: RMSprop({"w": torch.ones(3, 4)}), STEP_PARAMS,
     {"b": torch.ones(3)}, KeyError, "the `lr` mapping has no learning rate for parameter 'b'."),
    ("grads_tuple", lambda: SGD(0.1), STEP_PARAMS, (torch.ones(3, 4), torch.ones(3)), TypeError,
     "`SGD` expects `grads` to be a mapping name -> tensor (or None); pass `dict(zip(params, grads))`, got `tuple`."),
    ("params_list", lambda: SGD(0.1), [torch.ones(3)], {}, TypeError,
     "`SGD` expects `params` to be a mapping name -> tensor, got `list`."),
    ("grads_unknown", lambda: Adam(0.1), STEP_PARAMS, {"w": torch.ones(3, 4), "x": torch.ones(1), "a": None},
     KeyError, "`Adam.step`: `grads` has names that `params` lacks: ['a', 'x']."),
    ("grad_shape", lambda: SGD(0.1), STEP_PARAMS, {"b": torch.ones(1)}, ValueError,
     "`SGD.step`: `grads['b']` has shape (1,), expected (3,) (the shape of the parameter)."),
    ("grad_kind", lambda: SGD(0.1), STEP_PARAMS, {"b": [1.0, 1.0, 1.0]}, TypeError,
     "`SGD.step`: `grads['b']` must be a tensor or None, got `list` ([1.0, 1.0, 1.0])."),
]


@pytest.mark.parametrize(("make", "params", "grads", "error", "message"), [e[1:] for e in STEP_ERRORS],
                         ids=[e[0] for e in STEP_ERRORS])
def test_step_errors(make, params, grads, error, message):
    opt = make()
    state = opt.init(STEP_PARAMS)
    with pytest.raises(error, match=re.escape(message)):
        opt.step(params, grads, state)


def test_state_errors():
    message = "`Adam` expects `params` to be a mapping name -> tensor, got `list`."
    with pytest.raises(TypeError, match=re.escape(message)):
        Adam(0.1).init([torch.ones(1)])
    message = "`Adam.step`: `state` lacks the buffers ['step', 'exp_avg', 'exp_avg_sq']. Create the state with"
    with pytest.raises(KeyError, match=re.escape(message)):
        Adam(0.1).step(STEP_PARAMS, {}, SGD(0.1).init(STEP_PARAMS))
    message = "`RMSprop` expects `state` to be the state returned by `init` or `step`, got `NoneType`."
    with pytest.raises(TypeError, match=re.escape(message)):
        RMSprop(0.1).step(STEP_PARAMS, {}, None)


def test_base_class_needs_an_update_rule():
    opt = InnerOptimizer(0.1)
    with pytest.raises(NotImplementedError, match=re.escape("`InnerOptimizer` must implement `_update`")):
        opt.step({"w": torch.ones(1)}, {"w": torch.ones(1)}, opt.init({}))
