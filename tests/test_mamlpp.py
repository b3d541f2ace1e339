"""MAML++ options (multi-step loss, per-step rates, per-step batch norm, order annealing) against hand-written references."""
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from metann.meta import MAML, MetaSGD, default_evaluator_classification, default_evaluator_regression
from metann.meta.mamlpp import MAMLpp
from metann.meta.perstep import PerStepBatchNorm, multi_step_loss_weights
from tests.reference import assert_all_close, conv_bn, leaves, max_difference, meta_grads, sine_mlp, sine_mlp_forward
from tests.test_meta import image_data, sine_data


def task(support, query):
    return SimpleNamespace(support=support, query=query)


# ----------------------------------------------------------------------------- multi-step loss


def test_multi_step_loss_weights_follow_the_papers_schedule():
    n, t = 5, 100
    assert multi_step_loss_weights(n, 0, t) == [0.2] * 5
    middle = multi_step_loss_weights(n, 50, t)  # decay 50 / 500 = 0.1 per non-final step
    assert middle[:4] == pytest.approx([0.1] * 4) and middle[4] == pytest.approx(0.6)
    late = multi_step_loss_weights(n, 99, t)  # non-final weights at the floor 0.03 / 5
    assert late[:4] == pytest.approx([0.006] * 4) and late[4] == pytest.approx(1 - 4 * 0.006)
    for iteration in (0, 10, 50, 99):
        assert sum(multi_step_loss_weights(n, iteration, t)) == pytest.approx(1.0)
    assert multi_step_loss_weights(n, 100, t) == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert multi_step_loss_weights(n, 5000, t) == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert multi_step_loss_weights(1, 0, t) == [1.0]
    assert multi_step_loss_weights(0, 0, t) == []


def msl_reference(params, support, query, *, lr, weights, rates=None, first_order=False):
    """Weighted query losses after each of len(weights) plain gradient steps (sine MLP)."""
    fast = list(params)
    objective = 0.0
    for k, w in enumerate(weights):
        loss = F.mse_loss(sine_mlp_forward(fast, support[0]), support[1])
        grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
        fast = [p - (lr if rates is None else rates[i][k]) * g for i, (p, g) in enumerate(zip(fast, grads))]
        objective = objective + w * F.mse_loss(sine_mlp_forward(fast, query[0]), query[1])
    return objective


@pytest.mark.parametrize("iteration", [0, 30, 59])
def test_multi_step_loss_meta_gradient_matches_reference(iteration):
    net = sine_mlp()
    support, query = sine_data()
    maml = MAML(net, steps_train=3, lr=0.1, evaluator=default_evaluator_regression, multi_step_loss=60)
    maml.set_iteration(iteration)
    weights = maml.loss_weights()
    assert weights == multi_step_loss_weights(3, iteration, 60)
    objective, reported = maml.meta_objective(task(support, query))
    got = meta_grads(objective, net.parameters())
    params = leaves(net)
    expected_objective = msl_reference(params, support, query, lr=0.1, weights=weights)
    torch.testing.assert_close(objective, expected_objective)
    assert_all_close(got, meta_grads(expected_objective, params))
    final = msl_reference(params, support, query, lr=0.1, weights=[0.0, 0.0, 1.0])
    torch.testing.assert_close(reported, final)  # the reported number is the final query loss


def test_multi_step_loss_ends_after_its_iterations_and_outside_training():
    net = sine_mlp()
    support, query = sine_data()
    maml = MAML(net, steps_train=3, lr=0.1, evaluator=default_evaluator_regression, multi_step_loss=60)
    plain = MAML(net, steps_train=3, lr=0.1, evaluator=default_evaluator_regression)
    expected = meta_grads(plain.meta_objective(task(support, query))[0], net.parameters())
    early = meta_grads(maml.meta_objective(task(support, query))[0], net.parameters())
    assert max_difference(early, expected) > 1e-3  # the multi-step loss is a different objective
    maml.set_iteration(60)
    assert maml.loss_weights() is None
    assert_all_close(meta_grads(maml.meta_objective(task(support, query))[0], net.parameters()), expected)
    maml.set_iteration(0)
    maml.eval()
    assert maml.loss_weights() is None


def test_trainer_meta_step_uses_the_multi_step_loss():
    from metann.train import MetaTrainer

    net = sine_mlp()
    support, query = sine_data()
    maml = MAML(net, steps_train=2, lr=0.1, evaluator=default_evaluator_regression, multi_step_loss=10)
    maml.set_iteration(4)
    params = leaves(net)
    expected = meta_grads(msl_reference(params, support, query, lr=0.1, weights=maml.loss_weights()), params)
    before = [p.detach().clone() for p in net.parameters()]
    trainer = MetaTrainer(maml, torch.optim.SGD(maml.parameters(), lr=1.0), SimpleNamespace(sample=lambda n: []), progress=False)
    trainer.meta_step([task(support, query)])
    assert_all_close([b - p.detach() for b, p in zip(before, net.parameters())], list(expected))


# ----------------------------------------------------------------------------- per-step learning rates


def distinct_step_rates(rate_list, steps):
    """Give every (parameter, step) rate its own value, so a mixed-up pairing cannot pass."""
    with torch.no_grad():
        for i, rates in enumerate(rate_list):
            for k in range(steps):
                rates[k] = 0.05 * (1 + 0.1 * i + 0.3 * k)


def test_per_step_rates_are_registered_after_the_model():
    net = sine_mlp()
    maml = MAML(net, steps_train=3, steps_eval=5, lr=0.2, per_step_lr=True, evaluator=default_evaluator_regression)
    names = [n for n, _ in maml.named_parameters()]
    assert names[:6] == ["model." + n for n, _ in net.named_parameters()]
    assert names[6:] == [f"step_lrs.{i}" for i in range(6)]
    for rates in maml.step_lrs:
        assert rates.shape == (5,) and rates.dtype == torch.float64 and torch.all(rates == 0.2)


@pytest.mark.parametrize("steps", [1, 3])
def test_per_step_rates_meta_gradients_match_reference(steps):
    net = sine_mlp()
    support, query = sine_data()
    maml = MAML(net, steps_train=steps, lr=0.1, per_step_lr=True, evaluator=default_evaluator_regression)
    distinct_step_rates(maml.step_lrs, steps)
    loss = default_evaluator_regression(maml(support), query)
    got = meta_grads(loss, maml.parameters())
    params = leaves(net)
    rates = [r.detach().clone().requires_grad_() for r in maml.step_lrs]
    weights = [0.0] * (steps - 1) + [1.0]
    expected_loss = msl_reference(params, support, query, lr=None, weights=weights, rates=rates)
    torch.testing.assert_close(loss, expected_loss)
    assert_all_close(got, meta_grads(expected_loss, params + rates))


def test_multi_step_loss_with_per_step_rates_matches_reference():
    net = sine_mlp()
    support, query = sine_data()
    maml = MAML(net, steps_train=3, lr=0.1, per_step_lr=True, multi_step_loss=20,
                evaluator=default_evaluator_regression)
    distinct_step_rates(maml.step_lrs, 3)
    maml.set_iteration(7)
    objective, _ = maml.meta_objective(task(support, query))
    params = leaves(net)
    rates = [r.detach().clone().requires_grad_() for r in maml.step_lrs]
    expected = msl_reference(params, support, query, lr=None, weights=maml.loss_weights(), rates=rates)
    assert_all_close(meta_grads(objective, maml.parameters()), meta_grads(expected, params + rates))


def test_metasgd_per_step_rates_match_reference():
    net = sine_mlp()
    support, query = sine_data()
    metasgd = MetaSGD(net, steps_train=2, lr=0.05, per_step_lr=True, evaluator=default_evaluator_regression)
    assert [n for n, _ in metasgd.named_parameters()][6:] == [f"lrs.{i}" for i in range(6)]
    with torch.no_grad():
        for rates, p in zip(metasgd.lrs, net.parameters()):
            assert rates.shape == (2, *p.shape)
            rates.copy_(torch.rand_like(rates) * 0.1)
    loss = default_evaluator_regression(metasgd(support), query)
    params = leaves(net)
    rates = [r.detach().clone().requires_grad_() for r in metasgd.lrs]
    expected = msl_reference(params, support, query, lr=None, weights=[0.0, 1.0], rates=rates)
    assert_all_close(meta_grads(loss, metasgd.parameters()), meta_grads(expected, params + rates))


def test_more_steps_than_rates_is_refused():
    maml = MAML(sine_mlp(), steps_train=2, per_step_lr=True, evaluator=default_evaluator_regression)
    support, _ = sine_data()
    with pytest.raises(RuntimeError, match=re.escape("`per_step_lr` has learning rates for 2 inner steps, and "
                                                     "inner step 3 was asked for")):
        maml.clone().adapt_on(support, steps=3)


# ----------------------------------------------------------------------------- per-step batch norm


def conv_bn_step_forward(params, gamma, beta, x, running=None, training=True):
    """conv_bn's forward with explicit batch-norm affine (and statistics) of one step."""
    cw, cb, lw, lb = params
    h = F.conv2d(x, cw, cb)
    mean, var = running if running is not None else (None, None)
    h = F.batch_norm(h, mean, var, gamma, beta, training=training)
    h = F.max_pool2d(F.relu(h), 2)
    return F.linear(h.flatten(1), lw, lb)


def test_per_step_batch_norm_meta_gradient_matches_reference():
    net = conv_bn()
    support, query = image_data()
    maml = MAML(net, steps_train=2, lr=0.1, per_step_bn=True)
    assert maml.adapt_names == ("0.weight", "0.bias", "5.weight", "5.bias")  # batch norm learns per step instead
    tables = maml.bn_tables.layers[0]
    assert tables.weight.shape == (3, 4) and tables.running_mean.shape == (3, 4)
    with torch.no_grad():  # a different affine per step
        tables.weight.copy_(torch.rand(3, 4, dtype=torch.float64) + 0.5)
        tables.bias.copy_(torch.randn(3, 4, dtype=torch.float64))
    loss = default_evaluator_classification(maml(support), query)
    meta = [net[0].weight, net[0].bias, net[5].weight, net[5].bias, tables.weight, tables.bias]
    got = meta_grads(loss, meta)
    assert net[1].weight.grad is None and meta_grads(loss, [net[1].weight])[0] is None
    params = [p.detach().clone().requires_grad_() for p in meta[:4]]
    gamma, beta = (t.detach().clone().requires_grad_() for t in meta[4:])
    fast = list(params)
    for k in range(2):
        inner = F.cross_entropy(conv_bn_step_forward(fast, gamma[k], beta[k], support[0]), support[1])
        fast = [p - 0.1 * g for p, g in zip(fast, torch.autograd.grad(inner, fast, create_graph=True))]
    expected_loss = F.cross_entropy(conv_bn_step_forward(fast, gamma[2], beta[2], query[0]), query[1])
    torch.testing.assert_close(loss, expected_loss)
    assert_all_close(got, meta_grads(expected_loss, [*params, gamma, beta]))


def test_per_step_batch_norm_updates_each_steps_statistics():
    net = conv_bn()
    support, query = image_data()
    bn = net[1]
    own = {n: b.clone() for n, b in bn.named_buffers()}
    maml = MAML(net, steps_train=2, lr=0.1, per_step_bn=True)
    tables = maml.bn_tables.layers[0]
    start_mean, start_var = tables.running_mean.clone(), tables.running_var.clone()
    fast = maml.clone()
    expected_means, expected_vars = [], []
    for k in range(3):
        data = support if k < 2 else query
        h = F.conv2d(data[0], fast.params["0.weight"], fast.params["0.bias"])  # batch norm's input at step k
        expected_means.append(h.mean((0, 2, 3)).detach())
        expected_vars.append(h.var((0, 2, 3), unbiased=True).detach())
        if k < 2:
            fast.adapt(default_evaluator_classification(fast, support))
        else:
            fast(query[0])
    m = bn.momentum
    for k in range(3):
        torch.testing.assert_close(tables.running_mean[k], (1 - m) * start_mean[k] + m * expected_means[k])
        torch.testing.assert_close(tables.running_var[k], (1 - m) * start_var[k] + m * expected_vars[k])
    assert tables.num_batches_tracked.tolist() == [1, 1, 1]
    for name, value in bn.named_buffers():  # the layer's own statistics are not used
        torch.testing.assert_close(value, own[name])


def test_per_step_batch_norm_in_eval_mode_reads_each_steps_statistics():
    net = conv_bn()
    support, query = image_data()
    maml = MAML(net, steps_train=1, lr=0.1, per_step_bn=True).eval()
    tables = maml.bn_tables.layers[0]
    with torch.no_grad():
        tables.running_mean.copy_(torch.randn(2, 4, dtype=torch.float64))
        tables.running_var.copy_(torch.rand(2, 4, dtype=torch.float64) + 0.5)
        tables.weight.copy_(torch.rand(2, 4, dtype=torch.float64) + 0.5)
    saved = {n: b.clone() for n, b in maml.bn_tables.named_buffers()}
    fast = maml(support)
    params = [fast.params[n] for n in ("0.weight", "0.bias", "5.weight", "5.bias")]
    expected = conv_bn_step_forward(params, tables.weight[1], tables.bias[1], query[0],
                                    running=(tables.running_mean[1], tables.running_var[1]), training=False)
    torch.testing.assert_close(fast(query[0]), expected)
    wrong_row = conv_bn_step_forward(params, tables.weight[1], tables.bias[1], query[0],
                                     running=(tables.running_mean[0], tables.running_var[0]), training=False)
    assert (fast(query[0]) - wrong_row).abs().max() > 1e-3
    for name, value in maml.bn_tables.named_buffers():  # eval mode changes no statistics
        torch.testing.assert_close(value, saved[name])


def test_per_step_batch_norm_restores_the_layers_buffers_after_an_error():
    net = conv_bn()
    maml = MAML(net, steps_train=1, per_step_bn=True)
    buffers = [b for b in net[1].buffers()]
    with pytest.raises(RuntimeError):
        maml.clone()(torch.zeros(2, 3, 6, 6, dtype=torch.float64))  # wrong channel count
    assert all(a is b for a, b in zip(net[1].buffers(), buffers))


def test_per_step_batch_norm_tables_refuse_other_models():
    with pytest.raises(ValueError, match=re.escape("`per_step_bn` needs batch-norm layers, and `Sequential` has none")):
        MAML(sine_mlp(), per_step_bn=True)
    with pytest.raises(ValueError, match=re.escape("`adapt` selects only batch-norm weights and biases ['1.bias', '1.weight']")):
        MAML(conv_bn(), adapt="1", per_step_bn=True)
    with pytest.raises(RuntimeError, match=re.escape("per-step batch norm has tables for 1 inner steps, and inner step 3")):
        PerStepBatchNorm(conv_bn(), 2).substitute([], 2)


# ----------------------------------------------------------------------------- derivative-order annealing


def test_order_annealing_switches_at_the_given_iteration():
    net = sine_mlp()
    support, query = sine_data()
    kwargs = {"steps_train": 3, "lr": 0.1, "evaluator": default_evaluator_regression}
    params = leaves(net)

    def reference(first_order):
        loss = msl_reference(params, support, query, lr=0.1, weights=[0.0, 0.0, 1.0], first_order=first_order)
        return meta_grads(loss, params)

    first, second = reference(True), reference(False)
    assert max_difference(first, second) > 1e-4  # the two orders differ on this nonlinear model
    maml = MAML(net, first_order_iterations=2, **kwargs)
    for iteration in range(4):
        assert maml.meta_iteration == iteration
        assert maml.second_order == (iteration >= 2)
        got = meta_grads(default_evaluator_regression(maml(support), query), net.parameters())
        assert_all_close(got, second if iteration >= 2 else first)
        assert maml.step_schedule() == iteration + 1
    assert not maml.eval().second_order  # eval mode never builds the second-order graph


def test_schedule_counter_is_saved_only_when_a_schedule_uses_it():
    plain = MAML(sine_mlp(), evaluator=default_evaluator_regression)
    assert "_meta_iteration" not in plain.state_dict()
    plain.step_schedule()  # harmless without a schedule
    scheduled = MAML(sine_mlp(), first_order_iterations=5, evaluator=default_evaluator_regression)
    scheduled.set_iteration(7)
    state = scheduled.state_dict()
    assert int(state["_meta_iteration"]) == 7
    fresh = MAML(sine_mlp(), first_order_iterations=5, evaluator=default_evaluator_regression)
    fresh.load_state_dict(state)
    assert fresh.meta_iteration == 7 and fresh.second_order


def test_batched_refuses_the_per_step_options_and_follows_the_order_schedule():
    net = sine_mlp()
    support, query = sine_data()
    tasks = [(support, query)] * 2
    with pytest.raises(ValueError, match=re.escape(
            "`batched` does not support the inner-loop options ['multi_step_loss', 'per_step_lr']; use the per-task loop")):
        MAML(net, per_step_lr=True, multi_step_loss=5, evaluator=default_evaluator_regression).batched(tasks)
    maml = MAML(net, steps_train=2, lr=0.1, first_order_iterations=1, evaluator=default_evaluator_regression)
    loop = MAML(net, steps_train=2, lr=0.1, first_order=True, evaluator=default_evaluator_regression)
    got = meta_grads(maml.batched(tasks).mean(), net.parameters())
    assert_all_close(got, meta_grads(default_evaluator_regression(loop(support), query), net.parameters()))


# ----------------------------------------------------------------------------- MAMLpp


def test_mamlpp_turns_every_piece_on_with_the_papers_values():
    net = conv_bn()
    mamlpp = MAMLpp(net)
    assert (mamlpp.steps_train, mamlpp.steps_eval, mamlpp.lr) == (5, 5, 0.1)
    assert mamlpp.multi_step_loss == 5000 and mamlpp.first_order_iterations == 25000
    assert mamlpp.per_step_lr and mamlpp.per_step_bn and not mamlpp.checkpoint_steps
    names = [n for n, _ in mamlpp.named_parameters()]
    assert names[:6] == ["model." + n for n, _ in net.named_parameters()]
    assert names[6:] == [f"step_lrs.{i}" for i in range(4)] + ["bn_tables.layers.0.weight", "bn_tables.layers.0.bias"]
    assert not MAMLpp(sine_mlp(), evaluator=default_evaluator_regression).per_step_bn  # no batch norm: no tables
    assert "multi_step_loss=5000" in repr(mamlpp)


def test_mamlpp_meta_objective_reaches_every_meta_parameter():
    net = conv_bn()
    support, query = image_data()
    mamlpp = MAMLpp(net, steps_train=2, first_order_iterations=0)
    objective, reported = mamlpp.meta_objective(task(support, query))
    objective.backward()
    for name, p in mamlpp.named_parameters():
        if name.startswith("model.1."):
            assert p.grad is None, name  # batch norm's own affine is replaced by the per-step tables
        elif name != "model.0.bias":  # batch norm cancels the convolution's bias
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert torch.isfinite(reported)


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"multi_step_loss": 0}, ValueError, "`multi_step_loss` must be >= 1, got 0"),
        ({"multi_step_loss": 2.5}, TypeError, "`multi_step_loss` must be an int or None, got `float`"),
        ({"per_step_lr": 1}, TypeError, "`per_step_lr` must be a bool (True or False), got `int`"),
        ({"per_step_bn": "yes"}, TypeError, "`per_step_bn` must be a bool (True or False), got `str`"),
        ({"first_order_iterations": -1}, ValueError, "`first_order_iterations` must be >= 0, got -1"),
        ({"first_order_iterations": None}, TypeError, "`first_order_iterations` must be an int, got `NoneType`"),
        ({"checkpoint_steps": None}, TypeError, "`checkpoint_steps` must be a bool (True or False), got `NoneType`"),
        ({"second_order_steps": 0}, ValueError, "`second_order_steps` must be >= 1, got 0"),
        ({"per_step_lr": True, "lr": torch.tensor(0.1)}, TypeError,
         "`per_step_lr` learns its own rates and needs a number as the initial `lr`, got `Tensor`"),
        ({"first_order": True, "first_order_iterations": 3}, ValueError,
         "`first_order=True` builds no second-order graph, so ['first_order_iterations'] would have no effect"),
        ({"first_order": True, "checkpoint_steps": True, "second_order_steps": 2}, ValueError,
         "so ['checkpoint_steps', 'second_order_steps'] would have no effect"),
    ],
)
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        MAML(sine_mlp(), evaluator=default_evaluator_regression, **kwargs)


def test_bad_option_combinations_and_schedule_values():
    from metann.optim import Adam

    with pytest.raises(ValueError, match=re.escape("`per_step_lr` and `optimizer` both set the inner update; got `Adam`")):
        MAML(sine_mlp(), per_step_lr=True, optimizer=Adam(0.01))
    with pytest.raises(TypeError, match=re.escape("`MetaSGD` learns its own inner update and takes no `optimizer`")):
        MetaSGD(sine_mlp(), optimizer=Adam(0.01))
    maml = MAML(sine_mlp(), multi_step_loss=3)
    with pytest.raises(ValueError, match=re.escape("`iteration` must be >= 0, got -1")):
        maml.set_iteration(-1)
    with pytest.raises(TypeError, match=re.escape("`iteration` must be an int, got `float`")):
        maml.set_iteration(1.0)
    with pytest.raises(ValueError, match=re.escape("`anneal_iterations` must be >= 1, got 0")):
        multi_step_loss_weights(3, 0, 0)
    with pytest.raises(ValueError, match=re.escape("`floor` must be in [0, 1], got 2")):
        multi_step_loss_weights(3, 0, 5, floor=2)
    with pytest.raises(TypeError, match=re.escape("`multi_step_loss` must be an int or None, got `bool`")):
        MAMLpp(conv_bn(), multi_step_loss=True)
