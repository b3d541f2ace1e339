"""Memory controls: checkpointed inner steps give the plain meta-gradient; truncated back-propagation its reference."""
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metann.meta import MAML, MetaSGD, default_evaluator_classification, default_evaluator_regression
from metann.meta.memory import frozen_running_stats
from tests.reference import (
    assert_all_close,
    conv_bn,
    conv_bn_forward,
    leaves,
    max_difference,
    meta_grads,
    sine_mlp,
    sine_mlp_forward,
)
from tests.test_meta import _Encoder, image_data, sine_data

TIGHT = {"rtol": 1e-6, "atol": 1e-9}  # float64: recomputation must give the plain meta-gradient


# ----------------------------------------------------------------------------- checkpointed inner steps


@pytest.mark.parametrize("steps", [1, 5])
def test_checkpointed_steps_give_the_plain_meta_gradient(steps):
    net = sine_mlp()
    support, query = sine_data()
    kwargs = {"steps_train": steps, "lr": 0.1, "evaluator": default_evaluator_regression}
    plain = meta_grads(default_evaluator_regression(MAML(net, **kwargs)(support), query), net.parameters())
    fast = MAML(net, checkpoint_steps=True, **kwargs)(support)
    got = meta_grads(default_evaluator_regression(fast, query), net.parameters())
    assert_all_close(got, plain, **TIGHT)
    assert fast.steps_taken == steps


def test_checkpointed_steps_with_batch_norm_update_the_statistics_once():
    support, query = image_data()
    results = {}
    for checkpoint_steps in (False, True):
        net = conv_bn()
        maml = MAML(net, steps_train=3, lr=0.1, checkpoint_steps=checkpoint_steps)
        grads = meta_grads(default_evaluator_classification(maml(support), query), net.parameters())
        results[checkpoint_steps] = (grads, {n: b.clone() for n, b in net.named_buffers()})
    assert_all_close(results[True][0], results[False][0], **TIGHT)
    assert int(results[True][1]["1.num_batches_tracked"]) == 4  # three inner steps and the query forward
    for name, value in results[False][1].items():  # the recomputation in the backward did not update again
        torch.testing.assert_close(results[True][1][name], value, msg=name)


def test_checkpointed_steps_match_the_hand_written_conv_bn_reference():
    net = conv_bn()
    support, query = image_data()
    loss = default_evaluator_classification(MAML(net, steps_train=2, lr=0.1, checkpoint_steps=True)(support), query)
    params = leaves(net)
    fast = list(params)
    for _ in range(2):
        inner = F.cross_entropy(conv_bn_forward(fast, support[0]), support[1])
        fast = [p - 0.1 * g for p, g in zip(fast, torch.autograd.grad(inner, fast, create_graph=True))]
    expected = meta_grads(F.cross_entropy(conv_bn_forward(fast, query[0]), query[1]), params)
    assert_all_close(meta_grads(loss, net.parameters()), expected, **TIGHT)


def test_checkpointed_metasgd_with_multi_step_loss_and_per_step_rates():
    net = sine_mlp()
    support, query = sine_data()
    task = SimpleNamespace(support=support, query=query)
    grads = {}
    for checkpoint_steps in (False, True):
        algo = MetaSGD(net, steps_train=3, lr=0.05, evaluator=default_evaluator_regression, multi_step_loss=10,
                       per_step_lr=True, checkpoint_steps=checkpoint_steps)
        with torch.no_grad():
            for rates in algo.lrs:
                rates.copy_(torch.linspace(0.02, 0.08, rates.numel(), dtype=rates.dtype).view_as(rates))
        algo.set_iteration(3)
        objective, _ = algo.meta_objective(task)
        grads[checkpoint_steps] = meta_grads(objective, algo.parameters())
    assert_all_close(grads[True], grads[False], **TIGHT)


def test_checkpointed_steps_with_an_inner_optimizer():
    from metann.optim import Adam

    net = sine_mlp()
    support, query = sine_data()
    grads = {}
    for checkpoint_steps in (False, True):
        maml = MAML(net, steps_train=3, optimizer=Adam(0.05), evaluator=default_evaluator_regression,
                    checkpoint_steps=checkpoint_steps)
        grads[checkpoint_steps] = meta_grads(default_evaluator_regression(maml(support), query), net.parameters())
    assert_all_close(grads[True], grads[False], **TIGHT)


def test_checkpointed_steps_keep_dropout_masks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, 1)).double()
    support, query = sine_data()
    grads = {}
    for checkpoint_steps in (False, True):
        torch.manual_seed(1)  # the same masks in both runs; the recomputation must replay them
        maml = MAML(net, steps_train=3, lr=0.1, evaluator=default_evaluator_regression, checkpoint_steps=checkpoint_steps)
        grads[checkpoint_steps] = meta_grads(default_evaluator_regression(maml(support), query), net.parameters())
    assert_all_close(grads[True], grads[False], **TIGHT)


def test_checkpointed_steps_through_attention_use_a_differentiable_kernel():
    torch.manual_seed(0)
    net = _Encoder().double()
    x = torch.randn(6, 3, 8, dtype=torch.float64)
    y = torch.randn(6, 1, dtype=torch.float64)
    support, query = (x[:3], y[:3]), (x[3:], y[3:])
    kwargs = {"steps_train": 2, "lr": 0.1, "evaluator": default_evaluator_regression}
    plain = meta_grads(default_evaluator_regression(MAML(net, **kwargs)(support), query), net.parameters())
    maml = MAML(net, checkpoint_steps=True, **kwargs)
    loss = default_evaluator_regression(maml(support), query)
    maml.eval()  # the recomputation in the backward pass keeps the forward's mode and a differentiable kernel
    assert_all_close(meta_grads(loss, net.parameters()), plain, **TIGHT)


def test_hand_written_adapt_is_not_recomputed_but_correct():
    net = sine_mlp()
    support, query = sine_data()
    maml = MAML(net, steps_train=2, lr=0.1, evaluator=default_evaluator_regression, checkpoint_steps=True)
    fast = maml.clone()
    for _ in range(2):
        fast.adapt(F.mse_loss(fast(support[0]), support[1]))
    plain = MAML(net, steps_train=2, lr=0.1, evaluator=default_evaluator_regression)
    expected = meta_grads(default_evaluator_regression(plain(support), query), net.parameters())
    assert_all_close(meta_grads(default_evaluator_regression(fast, query), net.parameters()), expected, **TIGHT)


def test_frozen_running_stats_restores_the_buffers_after_an_error():
    net = conv_bn()
    bn = net[1]
    buffers = {n: b for n, b in bn.named_buffers()}
    values = {n: b.clone() for n, b in bn.named_buffers()}
    with pytest.raises(RuntimeError), frozen_running_stats(net):
        net(torch.randn(4, 1, 6, 6, dtype=torch.float64))  # updates the copies
        assert bn.running_mean is not buffers["running_mean"]
        raise RuntimeError("boom")
    for name, value in bn.named_buffers():
        assert value is buffers[name]
        torch.testing.assert_close(value, values[name])


# ----------------------------------------------------------------------------- truncated back-propagation


def truncated_reference(params, support, query, *, lr, steps, last):
    """Meta-gradient with second order through only the last ``last`` of ``steps`` inner steps (sine MLP)."""
    fast = list(params)
    for k in range(steps):
        loss = F.mse_loss(sine_mlp_forward(fast, support[0]), support[1])
        grads = torch.autograd.grad(loss, fast, create_graph=k >= steps - last)
        fast = [p - lr * g for p, g in zip(fast, grads)]
    return meta_grads(F.mse_loss(sine_mlp_forward(fast, query[0]), query[1]), params)


@pytest.mark.parametrize("checkpoint_steps", [False, True], ids=["plain", "checkpointed"])
def test_truncated_back_propagation_matches_reference(checkpoint_steps):
    net = sine_mlp()
    support, query = sine_data()
    maml = MAML(net, steps_train=5, lr=0.1, evaluator=default_evaluator_regression, second_order_steps=2,
                checkpoint_steps=checkpoint_steps)
    got = meta_grads(default_evaluator_regression(maml(support), query), net.parameters())
    params = leaves(net)
    expected = truncated_reference(params, support, query, lr=0.1, steps=5, last=2)
    assert_all_close(got, expected, **TIGHT)
    first = truncated_reference(params, support, query, lr=0.1, steps=5, last=0)
    second = truncated_reference(params, support, query, lr=0.1, steps=5, last=5)
    assert max_difference(expected, first) > 1e-5 and max_difference(expected, second) > 1e-5


def test_truncation_longer_than_the_loop_is_plain_maml():
    net = sine_mlp()
    support, query = sine_data()
    kwargs = {"steps_train": 3, "lr": 0.1, "evaluator": default_evaluator_regression}
    plain = meta_grads(default_evaluator_regression(MAML(net, **kwargs)(support), query), net.parameters())
    got = meta_grads(default_evaluator_regression(MAML(net, second_order_steps=8, **kwargs)(support), query),
                     net.parameters())
    assert_all_close(got, plain, **TIGHT)


def test_truncation_counts_from_the_end_of_adapt_on():
    net = sine_mlp()
    support, query = sine_data()
    maml = MAML(net, steps_train=1, lr=0.1, evaluator=default_evaluator_regression, second_order_steps=1)
    fast = maml.clone().adapt_on(support, steps=4)  # only the 4th step is second order
    got = meta_grads(default_evaluator_regression(fast, query), net.parameters())
    assert_all_close(got, truncated_reference(leaves(net), support, query, lr=0.1, steps=4, last=1), **TIGHT)


def test_memory_options_refuse_first_order():
    with pytest.raises(ValueError, match=re.escape(
            "`first_order=True` builds no second-order graph, so ['checkpoint_steps'] would have no effect")):
        MAML(sine_mlp(), first_order=True, checkpoint_steps=True)
