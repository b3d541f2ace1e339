"""metann.functional against torch.func.functional_call and hand-written steps."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metann.functional import adapt, functional_forward, inner_step, math_attention, named_buffers, named_params
from tests.reference import conv_bn, leaves, maml_meta_grads, sine_mlp, sine_mlp_forward


def test_named_params_and_buffers():
    net = conv_bn()
    assert list(named_params(net)) == [n for n, _ in net.named_parameters()]
    assert all(named_params(net)[n] is p for n, p in net.named_parameters())
    assert list(named_buffers(net)) == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]


def test_functional_forward_matches_functional_call():
    net = conv_bn()
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    params = {n: p * 1.5 for n, p in net.named_parameters()}
    expected = torch.func.functional_call(net, params, (x,))
    before = {n: b.clone() for n, b in net.named_buffers()}
    got = functional_forward(net, params, x)
    torch.testing.assert_close(got, expected)
    # Train mode: running statistics land in the model's own buffers, as functional_call's do.
    assert net[1].num_batches_tracked.item() == before["1.num_batches_tracked"].item() + 1 == 2
    # Partial mappings fall back to the model's own parameters.
    partial = {"5.weight": params["5.weight"]}
    torch.testing.assert_close(
        functional_forward(net.eval(), partial, x), torch.func.functional_call(net, partial, (x,))
    )
    # Gradients reach the given tensors and not the model's parameters.
    g = torch.autograd.grad(functional_forward(net, params, x).sum(), [params["0.weight"]])[0]
    e = torch.autograd.grad(torch.func.functional_call(net, params, (x,)).sum(), [params["0.weight"]])[0]
    torch.testing.assert_close(g, e)
    assert all(p.grad is None for p in net.parameters())


def test_functional_forward_with_buffers_leaves_the_model_alone():
    net = conv_bn().eval()
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    buffers = {"1.running_mean": torch.full((4,), 0.5, dtype=torch.float64)}
    params = named_params(net)
    expected = torch.func.functional_call(net, {**params, **buffers}, (x,))
    torch.testing.assert_close(functional_forward(net, params, x, buffers=buffers), expected)
    torch.testing.assert_close(net[1].running_mean, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(KeyError, match=re.escape("`buffers` names '1.nothing'")):
        functional_forward(net, params, x, buffers={"1.nothing": torch.zeros(4)})


@pytest.mark.parametrize("first_order", [False, True])
def test_adapt_equals_reference(first_order):
    net = sine_mlp()
    x = torch.linspace(-5, 5, 20, dtype=torch.float64).unsqueeze(1)
    y = torch.sin(x)
    support, query = (x[::2], y[::2]), (x[1::2], y[1::2])

    def support_loss(p):
        return F.mse_loss(functional_forward(net, p, support[0]), support[1])

    fast = adapt(net, named_params(net), support_loss, lr=0.1, inner_steps=3, first_order=first_order)
    meta = torch.autograd.grad(F.mse_loss(functional_forward(net, fast, query[0]), query[1]), list(net.parameters()))
    expected, _, expected_fast = maml_meta_grads(
        sine_mlp_forward, leaves(net), support, query, F.mse_loss, lr=0.1, steps=3, first_order=first_order
    )
    for got, e in zip(fast.values(), expected_fast):
        torch.testing.assert_close(got, e)
    for got, e in zip(meta, expected):
        torch.testing.assert_close(got, e)


def test_inner_step_options():
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([3.0], requires_grad=True)
    unused = torch.tensor([5.0], requires_grad=True)
    params = {"a": a, "b": b, "unused": unused}
    loss = (a**2).sum() + (b**3).sum()
    new = inner_step(params, loss, {"a": torch.tensor(0.5), "b": torch.tensor([0.1])}, adapt_names=["a", "b"])
    torch.testing.assert_close(new["a"], a - 0.5 * 2 * a)
    torch.testing.assert_close(new["b"], b - 0.1 * 3 * b**2)
    assert new["unused"] is unused and list(new) == ["a", "b", "unused"]
    only_a = inner_step(params, (a**2).sum() + b.sum(), 0.5, adapt_names=["a"])
    assert only_a["b"] is b
    # Second order: d(new_a)/da = 1 - 0.5 * 2 = 0 for every element.
    (grad,) = torch.autograd.grad(only_a["a"].sum(), [a])
    torch.testing.assert_close(grad, torch.zeros(2))
    first = inner_step({"a": a}, (a**2).sum(), 0.5, first_order=True)
    (grad,) = torch.autograd.grad(first["a"].sum(), [a])
    torch.testing.assert_close(grad, torch.ones(2))
    with pytest.raises(RuntimeError, match="appears to not have been used"):
        inner_step(params, (a**2).sum(), 0.1, allow_unused=False)


def test_gradcheck_through_adapt():
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    y = torch.randn(5, 1, dtype=torch.float64)
    names = list(named_params(net))

    def meta_loss(*flat):
        params = dict(zip(names, flat))
        fast = adapt(net, params, lambda p: F.mse_loss(functional_forward(net, p, x), y), lr=0.3, inner_steps=2)
        return F.mse_loss(functional_forward(net, fast, x * 2), y)

    assert torch.autograd.gradcheck(meta_loss, tuple(leaves(net)))


def test_bad_arguments():
    net = nn.Linear(2, 1)
    params = named_params(net)
    with pytest.raises(ValueError, match=re.escape("`inner_steps` must be >= 0, got -1")):
        adapt(net, params, lambda p: p["bias"].sum(), inner_steps=-1)
    with pytest.raises(TypeError, match=re.escape("`lr` must be a number, a Tensor or a mapping")):
        inner_step(params, net.bias.sum(), "0.1")
    with pytest.raises(KeyError, match=re.escape("per-parameter `lr` has no rate for ['bias']")):
        inner_step(params, net.bias.sum(), {"weight": torch.tensor(0.1)})
    assert adapt(net, params, lambda p: p["bias"].sum(), inner_steps=0) == params


def test_math_attention_gives_second_order_through_attention():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    params = named_params(layer)
    with math_attention(layer):
        fast = adapt(layer, params, lambda p: functional_forward(layer, p, x).pow(2).mean(), lr=0.1)
    meta = torch.autograd.grad(functional_forward(layer, fast, x).sum(), list(params.values()))
    assert all(torch.isfinite(g).all() for g in meta)
