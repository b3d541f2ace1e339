"""The vectorised meta-batch path against the per-task loop."""
import re

import pytest
import torch
from torch import nn

from metann.data import SinusoidTaskSampler
from metann.meta import ANIL, MAML, MetaSGD, default_evaluator_classification, default_evaluator_regression
from metann.optim import SGD, Adam
from metann.train import MetaTrainer
from tests.reference import sine_mlp


def sine_tasks(n=4):
    return [t.to(dtype=torch.float64) for t in SinusoidTaskSampler(seed=11).sample(n)]


def loop_and_batched(wrapper, tasks):
    params = [p for p in wrapper.parameters() if p.requires_grad]
    loop = torch.stack([wrapper.evaluator(wrapper(t.support), t.query) for t in tasks])
    loop_grads = torch.autograd.grad(loop.mean(), params, allow_unused=True)
    batched = wrapper.batched(tasks)
    batched_grads = torch.autograd.grad(batched.mean(), params, allow_unused=True)
    return loop, loop_grads, batched, batched_grads


ALGOS = {
    "maml-second": lambda net: MAML(net, 3, lr=0.05, evaluator=default_evaluator_regression),
    "maml-first": lambda net: MAML(net, 3, lr=0.05, evaluator=default_evaluator_regression, first_order=True),
    "metasgd": lambda net: MetaSGD(net, 2, lr=0.05, evaluator=default_evaluator_regression),
    "anil": lambda net: ANIL(net, "4", 3, lr=0.05, evaluator=default_evaluator_regression),
    "adam": lambda net: MAML(net, 2, evaluator=default_evaluator_regression, optimizer=Adam(0.01)),
    "sgd-momentum": lambda net: MAML(net, 3, evaluator=default_evaluator_regression, optimizer=SGD(0.05, 0.9)),
}


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_batched_meta_gradient_equals_the_loop(algo):
    wrapper = ALGOS[algo](sine_mlp())
    loop, loop_grads, batched, batched_grads = loop_and_batched(wrapper, sine_tasks())
    torch.testing.assert_close(batched, loop)
    for a, b in zip(batched_grads, loop_grads):
        torch.testing.assert_close(a, b)


def test_batched_accepts_stacked_tensors_and_eval_mode():
    wrapper = MAML(sine_mlp(), 1, steps_eval=3, lr=0.05, evaluator=default_evaluator_regression).eval()
    tasks = sine_tasks(3)
    stacked = tuple(torch.stack(c) for c in zip(*[(*t.support, *t.query) for t in tasks]))
    expected = torch.stack([wrapper.evaluator(wrapper(t.support), t.query) for t in tasks])
    torch.testing.assert_close(wrapper.batched(stacked), expected)


def conv_bn_net(track):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=track), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    ).double()


def image_tasks(n=3):
    g = torch.Generator().manual_seed(0)
    tasks = []
    for _ in range(n):
        x = torch.randn(12, 1, 6, 6, generator=g, dtype=torch.float64)
        y = torch.arange(12) % 3
        tasks.append(((x[:6], y[:6]), (x[6:], y[6:])))
    return tasks


class _Task:
    def __init__(self, support, query):
        self.support, self.query = support, query


def test_second_order_through_conv_and_batch_norm_is_refused():
    maml = MAML(conv_bn_net(track=False), 1, lr=0.1)
    with pytest.raises(ValueError, match=re.escape(
        "cannot vectorise second-order MAML through a convolution followed by module '1' (`BatchNorm2d`)"
    )):
        maml.batched(image_tasks())
    # Without the guard, torch.func.vmap really is wrong here: compare it with the loop by hand.
    from metann.meta import batched as batched_module

    original = batched_module.check_vectorizable
    batched_module.check_vectorizable = lambda *args, **kwargs: None
    try:
        tasks = [_Task(*t) for t in image_tasks()]
        _, loop_grads, _, batched_grads = loop_and_batched(maml, tasks)
    finally:
        batched_module.check_vectorizable = original
    worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(batched_grads, loop_grads))
    assert worst > 1e-4  # the wrong answer the guard protects from


def test_first_order_conv_batch_norm_is_allowed_and_exact():
    maml = MAML(conv_bn_net(track=False), 2, lr=0.1, first_order=True)
    tasks = [_Task(*t) for t in image_tasks()]
    loop, loop_grads, batched, batched_grads = loop_and_batched(maml, tasks)
    torch.testing.assert_close(batched, loop)
    for a, b in zip(batched_grads, loop_grads):
        torch.testing.assert_close(a, b)


def test_running_statistics_and_ragged_tasks_are_refused():
    maml = MAML(conv_bn_net(track=True), 1, lr=0.1, first_order=True)
    with pytest.raises(ValueError, match=re.escape("module '1' (`BatchNorm2d`) tracks running statistics")):
        maml.batched(image_tasks())
    ragged = [((torch.randn(5, 1), torch.randn(5, 1)), (torch.randn(5, 1), torch.randn(5, 1))),
              ((torch.randn(6, 1), torch.randn(6, 1)), (torch.randn(5, 1), torch.randn(5, 1)))]
    with pytest.raises(ValueError, match="vectorised tasks must share their shapes"):
        MAML(nn.Linear(1, 1), evaluator=default_evaluator_regression).batched(ragged)


def test_trainer_vectorize_matches_the_loop():
    def trainer(vectorize):
        net = sine_mlp(torch.float32)
        maml = MAML(net, 2, lr=0.05, evaluator=default_evaluator_regression)
        return MetaTrainer(maml, torch.optim.SGD(maml.parameters(), lr=0.01), SinusoidTaskSampler(seed=3),
                           progress=False, vectorize=vectorize)

    a, b = trainer(False), trainer(True)
    history_a, history_b = a.fit(3, 5), b.fit(3, 5)
    assert history_a.meta_loss == pytest.approx(history_b.meta_loss, rel=1e-5)
    for p, q in zip(a.maml.parameters(), b.maml.parameters()):
        torch.testing.assert_close(p, q)


def test_classification_batched():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    maml = MAML(net, 2, lr=0.2, evaluator=default_evaluator_classification)
    g = torch.Generator().manual_seed(1)
    tasks = [_Task((torch.randn(6, 4, generator=g, dtype=torch.float64), torch.arange(6) % 3),
                   (torch.randn(9, 4, generator=g, dtype=torch.float64), torch.arange(9) % 3)) for _ in range(4)]
    loop, loop_grads, batched, batched_grads = loop_and_batched(maml, tasks)
    torch.testing.assert_close(batched, loop)
    for a, b in zip(batched_grads, loop_grads):
        torch.testing.assert_close(a, b)
