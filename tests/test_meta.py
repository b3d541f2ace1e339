"""MAML, first-order MAML, MetaSGD and ANIL against hand-written references."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metann.meta import (
    ANIL,
    MAML,
    FastModel,
    MetaSGD,
    default_evaluator_classification,
    default_evaluator_regression,
)
from tests.reference import conv_bn, conv_bn_forward, leaves, maml_meta_grads, sine_mlp, sine_mlp_forward


def sine_data(dtype=torch.float64, n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2 * n, 1, generator=g, dtype=dtype) * 10 - 5
    y = 2.0 * torch.sin(x + 0.5)
    return (x[:n], y[:n]), (x[n:], y[n:])


def image_data(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 1, 6, 6, generator=g, dtype=dtype)
    y = torch.arange(12) % 3
    return (x[:6], y[:6]), (x[6:], y[6:])


def grads_of(loss, module):
    module.zero_grad()
    loss.backward()
    return [p.grad for p in module.parameters()]


CASES = {
    "sine": (sine_mlp, sine_mlp_forward, sine_data, default_evaluator_regression, F.mse_loss),
    "conv_bn": (conv_bn, conv_bn_forward, image_data, default_evaluator_classification, F.cross_entropy),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_maml_meta_gradient_matches_reference(case, steps, first_order):
    make, forward, data, evaluator, loss_fn = CASES[case]
    net = make()
    support, query = data()
    maml = MAML(net, steps_train=steps, lr=0.1, evaluator=evaluator, first_order=first_order)
    got = grads_of(evaluator(maml(support), query), net)
    params = leaves(net)
    expected, _, _ = maml_meta_grads(
        forward, params, support, query, loss_fn, lr=0.1, steps=steps, first_order=first_order
    )
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("how", ["setattr", "load_state_dict(assign=True)", "to(float64)"])
def test_parameters_replaced_after_construction_are_the_meta_parameters(how):
    net = sine_mlp().float()
    maml = MAML(net, steps_train=2, lr=0.1, evaluator=default_evaluator_regression)
    old = list(net.parameters())
    if how == "setattr":
        net[0].weight = nn.Parameter(net[0].weight.detach() * 2)
        net = net.double()
    elif how == "load_state_dict(assign=True)":
        state = {k: v.double() * 1.5 for k, v in net.state_dict().items()}
        net.load_state_dict(state, assign=True)
    else:  # `.to()` that makes new Parameter objects instead of changing `.data`
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            net = net.double()
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert any(p is not q for p, q in zip(net.parameters(), old))  # new parameter objects
    support, query = sine_data()
    got = grads_of(default_evaluator_regression(maml(support), query), net)
    expected, _, _ = maml_meta_grads(sine_mlp_forward, leaves(net), support, query, F.mse_loss, lr=0.1, steps=2)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9)


def test_a_deep_copy_adapts_and_meta_learns_its_own_model():
    net = sine_mlp()
    maml = MAML(net, steps_train=2, lr=0.1, evaluator=default_evaluator_regression)
    twin = copy.deepcopy(maml)
    support, query = sine_data()
    default_evaluator_regression(twin(support), query).backward()
    assert all(p.grad is None for p in net.parameters())
    assert all(p.grad is not None for p in twin.model.parameters())
    assert all(a is b for a, b in zip(twin._model_params().values(), twin.model.parameters()))


def test_second_and_first_order_differ():
    net = sine_mlp()
    support, query = sine_data()
    kwargs = {"lr": 0.1, "evaluator": default_evaluator_regression}
    second = grads_of(default_evaluator_regression(MAML(net, 3, **kwargs)(support), query), net)
    first = grads_of(default_evaluator_regression(MAML(net, 3, first_order=True, **kwargs)(support), query), net)
    assert max((a - b).abs().max().item() for a, b in zip(second, first)) > 1e-4


def test_zero_steps_computes_the_unadapted_function():
    net = sine_mlp()
    support, query = sine_data()
    fast = MAML(net, steps_train=0, evaluator=default_evaluator_regression)(support)
    torch.testing.assert_close(fast(query[0]), net(query[0]))
    assert all(fast.params[n] is p for n, p in net.named_parameters())


def test_seed_example_runs_as_written():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 100), nn.ReLU(), nn.Linear(100, 5))
    maml = MAML(net, steps_train=5, steps_eval=10, lr=0.01)
    data_train = (torch.randn(5, 10), torch.arange(5))
    data_test = (torch.randn(15, 10), torch.arange(5).repeat(3))
    output = maml(data_train)
    loss = default_evaluator_classification(output, data_test)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert output.steps_taken == 5
    maml.eval()
    assert maml(data_train).steps_taken == 10


def test_eval_mode_takes_steps_eval_first_order_steps():
    net = sine_mlp()
    support, _ = sine_data()
    maml = MAML(net, steps_train=1, steps_eval=4, lr=0.05, evaluator=default_evaluator_regression).eval()
    fast = maml(support)
    assert fast.steps_taken == 4
    _, _, expected = maml_meta_grads(
        sine_mlp_forward, leaves(net), support, support, F.mse_loss, lr=0.05, steps=4, first_order=True
    )
    for got, e in zip(fast.params.values(), expected):
        torch.testing.assert_close(got, e)
    # No second-order graph: the adapted weights depend on the meta-parameters only through the identity path.
    (fast.params["0.weight"].sum()).backward()
    torch.testing.assert_close(net[0].weight.grad, torch.ones_like(net[0].weight))


def test_hand_written_loop_with_clone_equals_maml_call():
    net = sine_mlp()
    support, query = sine_data()
    maml = MAML(net, steps_train=3, lr=0.1, evaluator=default_evaluator_regression)
    fast = maml.clone()
    assert isinstance(fast, FastModel)
    for _ in range(3):
        fast.adapt(F.mse_loss(fast(support[0]), support[1]))
    by_hand = grads_of(F.mse_loss(fast(query[0]), query[1]), net)
    by_call = grads_of(default_evaluator_regression(maml(support), query), net)
    for a, b in zip(by_hand, by_call):
        torch.testing.assert_close(a, b)
    assert maml.clone().adapt_on(support, steps=2).steps_taken == 2


def test_metasgd_rate_gradients_match_reference():
    net = sine_mlp()
    support, query = sine_data()
    metasgd = MetaSGD(net, steps_train=2, lr=0.05, evaluator=default_evaluator_regression)
    names = [n for n, _ in metasgd.named_parameters()]
    assert names[:6] == ["model." + n for n, _ in net.named_parameters()]
    assert names[6:] == [f"lrs.{i}" for i in range(6)]
    for rate, p in zip(metasgd.lrs, net.parameters()):
        assert rate.shape == p.shape and torch.all(rate == 0.05)
    with torch.no_grad():  # distinct rates, so a mixed-up pairing cannot pass
        for i, rate in enumerate(metasgd.lrs):
            rate.mul_(1 + 0.1 * i)
    metasgd.zero_grad()
    default_evaluator_regression(metasgd(support), query).backward()
    rates = [r.detach().clone().requires_grad_() for r in metasgd.lrs]
    expected, rate_grads, _ = maml_meta_grads(
        sine_mlp_forward, leaves(net), support, query, F.mse_loss, lr=None, steps=2, rates=rates
    )
    for p, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, e)
    for r, e in zip(metasgd.lrs, rate_grads):
        torch.testing.assert_close(r.grad, e)


def test_anil_adapts_only_the_head():
    net = conv_bn()
    support, query = image_data()
    anil = ANIL(net, head="5", steps_train=3, lr=0.1)
    assert anil.adapt_names == ("5.weight", "5.bias")
    fast = anil(support)
    for name, p in net.named_parameters():
        assert (fast.params[name] is p) == (not name.startswith("5."))
    got = grads_of(default_evaluator_classification(fast, query), net)
    expected, _, _ = maml_meta_grads(
        conv_bn_forward, leaves(net), support, query, F.cross_entropy, lr=0.1, steps=3, adapt=[4, 5]
    )
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    assert ANIL(net, head=net[5]).adapt_names == ("5.weight", "5.bias")


@pytest.mark.parametrize(
    "adapt, expected",
    [
        (["2.weight", "0.bias"], ("0.bias", "2.weight")),
        (lambda n: n.endswith("bias"), ("0.bias", "2.bias", "4.bias")),
        ("4", ("4.weight", "4.bias")),
        ("2.weight", ("2.weight",)),
    ],
    ids=["names", "predicate", "submodule-name", "parameter-name"],
)
def test_adapt_selection(adapt, expected):
    net = sine_mlp()
    maml = MAML(net, adapt=adapt, evaluator=default_evaluator_regression)
    assert maml.adapt_names == expected
    fast = maml(sine_data()[0])
    for name, p in net.named_parameters():
        assert (fast.params[name] is p) == (name not in expected)


def test_frozen_parameters_pass_through():
    net = sine_mlp()
    net[0].weight.requires_grad_(False)
    fast = MAML(net, steps_train=2, evaluator=default_evaluator_regression)(sine_data()[0])
    assert fast.params["0.weight"] is net[0].weight
    assert fast.params["0.bias"] is not net[0].bias


def test_learnable_scalar_lr_gets_a_gradient():
    net = sine_mlp()
    support, query = sine_data()
    lr = nn.Parameter(torch.tensor(0.05, dtype=torch.float64))
    maml = MAML(net, steps_train=2, lr=lr, evaluator=default_evaluator_regression)
    assert sum(p is lr for p in maml.parameters()) == 1
    default_evaluator_regression(maml(support), query).backward()
    rates = [lr.detach().clone().requires_grad_()]
    params = leaves(net)
    fast = list(params)
    rate = rates[0]
    for _ in range(2):
        g = torch.autograd.grad(F.mse_loss(sine_mlp_forward(fast, support[0]), support[1]), fast, create_graph=True)
        fast = [p - rate * gi for p, gi in zip(fast, g)]
    (expected,) = torch.autograd.grad(F.mse_loss(sine_mlp_forward(fast, query[0]), query[1]), [rate])
    torch.testing.assert_close(lr.grad, expected)


def test_batch_norm_running_statistics_follow_the_mode():
    net = conv_bn()
    support, _ = image_data()
    bn = net[1]
    maml = MAML(net, steps_train=2, lr=0.1)
    before = bn.running_mean.clone()
    maml(support)
    assert bn.num_batches_tracked.item() == 2  # one forward per inner step, as a normal forward would
    assert not torch.equal(bn.running_mean, before)
    maml.eval()
    frozen = bn.running_mean.clone()
    fast = maml(support)
    torch.testing.assert_close(bn.running_mean, frozen)
    net.eval()
    torch.testing.assert_close(MAML(net, 0).eval()(support)(support[0]), net(support[0]))
    assert fast.steps_taken == 2


class _LSTMRegressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(2, 5, num_layers=2, batch_first=True)
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


@pytest.mark.parametrize("make, shape", [(_LSTMRegressor, (6, 4, 2)), (_Encoder, (6, 3, 8))], ids=["lstm", "encoder"])
def test_maml_through_recurrent_and_attention_models(make, shape):
    torch.manual_seed(0)
    net = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randn(shape[0], 1, dtype=torch.float64)
    support, query = (x[:3], y[:3]), (x[3:], y[3:])
    maml = MAML(net, steps_train=2, lr=0.1, evaluator=default_evaluator_regression)
    got = grads_of(default_evaluator_regression(maml(support), query), net)  # no kernel chosen by the user

    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = [n for n, _ in net.named_parameters()]
    params = leaves(net)

    def forward(p, inp):
        return torch.func.functional_call(net, dict(zip(names, p)), (inp,))

    with sdpa_kernel(SDPBackend.MATH):
        expected, _, _ = maml_meta_grads(forward, params, support, query, F.mse_loss, lr=0.1, steps=2)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_optimizer_in_eval_mode_follows_torch_optim():
    from metann.optim import Adam

    net = sine_mlp()
    support, _ = sine_data()
    maml = MAML(net, steps_eval=4, optimizer=Adam(0.01), evaluator=default_evaluator_regression).eval()
    fast = maml(support)
    copy = sine_mlp()
    opt = torch.optim.Adam(copy.parameters(), lr=0.01)
    for _ in range(4):
        opt.zero_grad()
        F.mse_loss(copy(support[0]), support[1]).backward()
        opt.step()
    for (name, p), q in zip(net.named_parameters(), copy.parameters()):
        torch.testing.assert_close(fast.params[name] - p, q.detach() - p.detach())


def test_optimizer_second_order_matches_finite_differences():
    from metann.optim import Adam

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    support, query = sine_data(n=4)
    support = (support[0].repeat(1, 2), support[1])
    query = (query[0].repeat(1, 2), query[1])
    maml = MAML(net, steps_train=2, optimizer=Adam(0.05), evaluator=default_evaluator_regression)
    names = [n for n, _ in net.named_parameters()]

    def meta_loss(*flat):
        with torch.no_grad():
            for p, v in zip(net.parameters(), flat):
                p.copy_(v)
        return default_evaluator_regression(maml(support), query)

    got = grads_of(meta_loss(*[p.detach() for p in net.parameters()]), net)
    base = [p.detach().clone() for p in net.parameters()]
    eps = 1e-6
    for i, name in enumerate(names):
        numeric = torch.zeros_like(base[i])
        for j in range(base[i].numel()):
            plus = [b.clone() for b in base]
            minus = [b.clone() for b in base]
            plus[i].view(-1)[j] += eps
            minus[i].view(-1)[j] -= eps
            numeric.view(-1)[j] = (meta_loss(*plus).item() - meta_loss(*minus).item()) / (2 * eps)
        torch.testing.assert_close(got[i], numeric, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"steps_train": -1}, ValueError, "`steps_train` must be >= 0, got -1"),
        ({"steps_eval": -2}, ValueError, "`steps_eval` must be >= 0, got -2"),
        ({"steps_train": 1.5}, TypeError, "`steps_train` must be an int, got `float`"),
        ({"lr": "fast"}, TypeError, "`lr` must be a number, a Tensor or a mapping name -> Tensor, got `str`"),
        ({"adapt": lambda n: False}, ValueError, "matches no parameter of the model"),
        ({"adapt": ["0.weight", "9.bias"]}, KeyError, "`adapt` names ['9.bias'], which are not parameters"),
        ({"lr": {"0.weight": torch.ones(3)}}, KeyError, "per-parameter `lr` has no rate for"),
        ({"optimizer": torch.optim.SGD}, TypeError, "`optimizer` must be an inner optimizer from `metann.optim`"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        MAML(sine_mlp(), **kwargs)


def test_bad_per_parameter_lr_shape():
    net = nn.Linear(2, 3)
    with pytest.raises(ValueError, match=re.escape("per-parameter `lr['weight']` has shape (2, 1, 1)")):
        MAML(net, lr={"weight": torch.ones(2, 1, 1), "bias": torch.ones(3)})


def test_bad_model_and_head():
    with pytest.raises(TypeError, match=re.escape("expects an `nn.Module` as `model`, got `list`")):
        MAML([nn.Linear(1, 1)])
    net = sine_mlp()
    with pytest.raises(ValueError, match=re.escape("`head` `Linear` is not part of the model")):
        ANIL(net, head=nn.Linear(1, 1))
    with pytest.raises(ValueError, match=re.escape("`head` 'classifier' is not the name of a submodule")):
        ANIL(net, head="classifier")
    with pytest.raises(ValueError, match=re.escape("`steps` must be >= 0, got -3")):
        MAML(net).clone().adapt_on(sine_data()[0], steps=-3)
    with pytest.raises(TypeError, match=re.escape("expects `data` as a pair `(x, y)`")):
        MAML(net, evaluator=default_evaluator_regression)(torch.zeros(3, 1))
