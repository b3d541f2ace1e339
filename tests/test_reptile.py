"""Reptile: the update theta + eps * mean(phi - theta) against hand-written inner loops, eval mode, errors."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metann.data import Task
from metann.meta import MAML, Reptile, default_evaluator_regression
from metann.optim import Adam as InnerAdam
from metann.train import MetaTrainer
from tests.reference import sine_mlp, sine_mlp_forward


def make_tasks(n=3, size=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n):
        amplitude, phase = 0.5 + 4.5 * torch.rand(2, generator=g, dtype=torch.float64)
        x = torch.rand(2 * size, 1, generator=g, dtype=torch.float64) * 10 - 5
        y = amplitude * torch.sin(x + phase)
        tasks.append(Task(x[:size], y[:size], x[size:], y[size:]))
    return tasks


def hand_sgd(params, data, lr, steps):
    """Plain gradient descent on the MSE of the sine MLP, written out: returns phi (detached)."""
    fast = [p.detach().clone().requires_grad_() for p in params]
    for _ in range(steps):
        loss = F.mse_loss(sine_mlp_forward(fast, data[0]), data[1])
        grads = torch.autograd.grad(loss, fast)
        fast = [(p - lr * g).detach().requires_grad_() for p, g in zip(fast, grads)]
    return [p.detach() for p in fast]


def expected_update(net, tasks, lr, steps, eps, inner_data="support"):
    theta = [p.detach().clone() for p in net.parameters()]
    phis = []
    for task in tasks:
        data = task.support
        if inner_data == "all":
            data = (torch.cat([task.support[0], task.query[0]]), torch.cat([task.support[1], task.query[1]]))
        phis.append(hand_sgd(theta, data, lr, steps))
    new = [t + eps * torch.stack([phi[i] - t for phi in phis]).mean(0) for i, t in enumerate(theta)]
    query = [F.mse_loss(sine_mlp_forward(phi, t.query[0]), t.query[1]).item() for phi, t in zip(phis, tasks)]
    return new, sum(query) / len(query)


@pytest.mark.parametrize("inner_data", ["support", "all"])
def test_meta_trainer_step_is_theta_plus_eps_mean_of_phi_minus_theta(inner_data):
    net = sine_mlp()
    tasks = make_tasks()
    lr, steps, eps = 0.02, 4, 0.3
    expected, expected_loss = expected_update(net, tasks, lr, steps, eps, inner_data)
    reptile = Reptile(net, steps_train=steps, lr=lr, evaluator=default_evaluator_regression, inner_data=inner_data)
    trainer = MetaTrainer(reptile, torch.optim.SGD(reptile.parameters(), lr=eps), _NoSampler(), progress=False)
    before = [p.detach().clone() for p in net.parameters()]
    loss = trainer.meta_step(tasks)
    for p, e, b in zip(net.parameters(), expected, before):
        torch.testing.assert_close(p.detach(), e)
        assert not torch.equal(p.detach(), b)  # a no-op update cannot pass
    assert loss == pytest.approx(expected_loss, rel=1e-10)


class _NoSampler:
    def sample(self, n):
        raise AssertionError("meta_step does not sample")


def test_manual_loop_gives_the_same_update():
    net = sine_mlp()
    tasks = make_tasks(n=4, seed=2)
    lr, steps, eps = 0.03, 3, 0.5
    expected, _ = expected_update(net, tasks, lr, steps, eps)
    reptile = Reptile(net, steps_train=steps, lr=lr, evaluator=default_evaluator_regression)
    opt = torch.optim.SGD(reptile.parameters(), lr=eps)
    opt.zero_grad()
    for task in tasks:
        objective, reported = reptile.meta_objective(task)
        assert not reported.requires_grad
        (objective / len(tasks)).backward()
    opt.step()
    for p, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)


def test_gradient_is_theta_minus_phi_and_adam_sees_it():
    """The documented convention: .grad = mean(theta - phi), so torch.optim.Adam gives "Reptile with Adam"."""
    net = sine_mlp()
    tasks = make_tasks(n=2, seed=3)
    lr, steps = 0.02, 2
    theta = [p.detach().clone() for p in net.parameters()]
    phis = [hand_sgd(theta, t.support, lr, steps) for t in tasks]
    pseudo_grad = [torch.stack([t - phi[i] for phi in phis]).mean(0) for i, t in enumerate(theta)]
    shadow = sine_mlp()
    shadow_opt = torch.optim.Adam(shadow.parameters(), lr=0.1)
    for p, g in zip(shadow.parameters(), pseudo_grad):
        p.grad = g.clone()
    shadow_opt.step()
    reptile = Reptile(net, steps_train=steps, lr=lr, evaluator=default_evaluator_regression)
    trainer = MetaTrainer(reptile, torch.optim.Adam(reptile.parameters(), lr=0.1), _NoSampler(), progress=False)
    trainer.meta_step(tasks)
    for p, q in zip(net.parameters(), shadow.parameters()):
        torch.testing.assert_close(p.detach(), q.detach())


def test_inner_optimizer_follows_torch_optim():
    net = sine_mlp()
    (task,) = make_tasks(n=1, seed=4)
    reptile = Reptile(net, steps_train=3, optimizer=InnerAdam(0.01), evaluator=default_evaluator_regression)
    copy_net = sine_mlp()
    opt = torch.optim.Adam(copy_net.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(copy_net(task.support[0]), task.support[1]).backward()
        opt.step()
    reptile.zero_grad()
    reptile.meta_objective(task)[0].backward()
    for p, q in zip(net.parameters(), copy_net.parameters()):
        torch.testing.assert_close(p.grad, p.detach() - q.detach())


def test_no_second_order_graph_is_ever_built(monkeypatch):
    calls = []
    original = torch.autograd.grad

    def spy(*args, **kwargs):
        calls.append(bool(kwargs.get("create_graph", False)))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    reptile = Reptile(sine_mlp(), steps_train=3, lr=0.01, evaluator=default_evaluator_regression)
    objective, _ = reptile.meta_objective(make_tasks(n=1)[0])
    assert calls == [False, False, False]
    assert not reptile.second_order
    # The surrogate's graph reaches only theta: one square per parameter, nothing of the inner loop.
    reached = set()
    stack = [objective.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in reached:
            continue
        reached.add(node)
        stack.extend(n for n, _ in node.next_functions)
    variables = {id(n.variable) for n in reached if hasattr(n, "variable")}
    assert variables == {id(p) for p in reptile.parameters()}
    assert len(reached) < 8 * len(list(reptile.parameters()))


def test_eval_mode_adapts_like_maml_eval():
    net = sine_mlp()
    tasks = make_tasks(n=2, seed=5)
    reptile = Reptile(net, steps_train=1, steps_eval=5, lr=0.02, evaluator=default_evaluator_regression).eval()
    maml = MAML(net, steps_train=1, steps_eval=5, lr=0.02, evaluator=default_evaluator_regression).eval()
    fast, reference = reptile(tasks[0].support), maml(tasks[0].support)
    assert fast.steps_taken == 5
    expected = hand_sgd(list(net.parameters()), tasks[0].support, 0.02, 5)
    for got, want, e in zip(fast.params.values(), reference.params.values(), expected):
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got.detach(), e)
    reptile_trainer = MetaTrainer(reptile, torch.optim.SGD(reptile.parameters(), lr=1.0), _NoSampler(), progress=False)
    maml_trainer = MetaTrainer(maml, torch.optim.SGD(maml.parameters(), lr=1.0), _NoSampler(), progress=False)
    assert reptile_trainer.evaluate(tasks) == pytest.approx(maml_trainer.evaluate(tasks), rel=1e-12)


def test_only_adapted_parameters_move():
    net = sine_mlp()
    reptile = Reptile(net, steps_train=2, lr=0.05, adapt="4", evaluator=default_evaluator_regression)
    reptile.meta_objective(make_tasks(n=1)[0])[0].backward()
    for name, p in net.named_parameters():
        assert (p.grad is None) == (not name.startswith("4.")), name
    assert net[4].weight.grad.abs().sum() > 0


def test_zero_steps_gives_a_zero_update():
    net = sine_mlp()
    reptile = Reptile(net, steps_train=0, evaluator=default_evaluator_regression)
    reptile.meta_objective(make_tasks(n=1)[0])[0].backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in net.parameters())


def test_state_dict_and_deepcopy_round_trip():
    reptile = Reptile(sine_mlp(), steps_train=2, lr=0.05, evaluator=default_evaluator_regression, inner_data="all")
    twin = copy.deepcopy(reptile)
    assert twin.inner_data == "all" and "inner_data='all'" in repr(twin)
    assert set(twin.state_dict()) == {"model." + k for k in sine_mlp().state_dict()}


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"steps_train": -1}, ValueError, "`steps_train` must be >= 0, got -1"),
        ({"steps_eval": -1}, ValueError, "`steps_eval` must be >= 0, got -1"),
        ({"inner_data": "both"}, ValueError, "`inner_data` must be one of ['all', 'support'], got 'both'"),
        ({"inner_data": 1}, TypeError, "`inner_data` must be a string, got `int`"),
        ({"lr": nn.Parameter(torch.tensor(0.1))}, ValueError, "`Reptile` cannot meta-learn `lr`"),
        ({"lr": "fast"}, TypeError, "`lr` must be a number, a Tensor or a mapping name -> Tensor, got `str`"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        Reptile(sine_mlp(), evaluator=default_evaluator_regression, **kwargs)


def test_misuse_raises_clearly():
    reptile = Reptile(sine_mlp(), evaluator=default_evaluator_regression, inner_data="all")
    with pytest.raises(NotImplementedError, match=re.escape("Use `MetaTrainer(..., vectorize=False)`")):
        reptile.batched(make_tasks())
    odd = type("Odd", (), {"support": torch.zeros(3, 1), "query": (torch.zeros(3, 1), torch.zeros(3, 1))})()
    with pytest.raises(TypeError, match=re.escape("the support set is `Tensor`")):
        reptile.meta_objective(odd)


def test_parameters_are_the_models():
    net = sine_mlp()
    reptile = Reptile(net, evaluator=default_evaluator_regression)
    assert [id(p) for p in reptile.parameters()] == [id(p) for p in net.parameters()]
