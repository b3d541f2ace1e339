"""iMAML on ridge regression, where the proximal optimum and the implicit meta-gradient have closed forms."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metann.data import Task
from metann.meta import MAML, default_evaluator_regression, iMAML
from metann.meta.imaml import conjugate_gradient
from metann.optim import SGD as InnerSGD
from metann.train import MetaTrainer

D, N, M = 5, 12, 9


def ridge_task(seed=0, bias=False):
    """A linear model and a regression task in float64; the support loss is quadratic in the weight."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Linear(D, 1, bias=bias).double()
    x = torch.randn(N + M, D, generator=g, dtype=torch.float64) * torch.linspace(0.3, 1.0, D, dtype=torch.float64)
    y = x @ torch.randn(D, 1, generator=g, dtype=torch.float64) + 0.1 * torch.randn(N + M, 1, generator=g, dtype=torch.float64)
    return net, (x[:N], y[:N]), (x[N:], y[N:])


def hessian(support):
    x = support[0]
    return 2.0 / x.shape[0] * x.T @ x  # of mse_loss(x @ w, y) in w


def proximal_optimum(theta, support, lam, bias=0.0):
    x, y = support
    eye = torch.eye(D, dtype=torch.float64)
    return torch.linalg.solve(hessian(support) + lam * eye, 2.0 / x.shape[0] * x.T @ (y.reshape(-1) - bias) + lam * theta)


def query_grad(phi, query, bias=0.0):
    x, y = query
    return 2.0 / x.shape[0] * x.T @ (x @ phi + bias - y.reshape(-1))


def closed_form(phi, support, query, lam, damping=0.0):
    """(I (1 + damping) + H / lam)^{-1} grad L_query(phi)."""
    eye = torch.eye(D, dtype=torch.float64)
    return torch.linalg.solve((1 + damping) * eye + hessian(support) / lam, query_grad(phi, query))


def meta_grad(imaml, support, query):
    imaml.zero_grad()
    default_evaluator_regression(imaml(support), query).backward()
    return imaml.model.weight.grad.reshape(-1).clone()


@pytest.mark.parametrize("lam", [0.3, 2.0])
def test_meta_gradient_equals_the_closed_form(lam):
    net, support, query = ridge_task()
    imaml = iMAML(net, steps_train=500, lr=0.2, lam=lam, cg_steps=D, evaluator=default_evaluator_regression)
    got = meta_grad(imaml, support, query)
    phi_star = proximal_optimum(net.weight.detach().reshape(-1), support, lam)
    torch.testing.assert_close(got, closed_form(phi_star, support, query, lam), rtol=1e-8, atol=1e-10)
    # ... and that is the derivative of the query loss at the proximal optimum, taken through the solve.
    theta = net.weight.detach().reshape(-1).clone().requires_grad_()
    x, y = query
    (exact,) = torch.autograd.grad(F.mse_loss(x @ proximal_optimum(theta, support, lam), y.reshape(-1)), theta)
    torch.testing.assert_close(got, exact, rtol=1e-8, atol=1e-10)
    assert imaml.last_solve.positive_definite and imaml.last_solve.residual <= 1e-10


def test_truncated_conjugate_gradient_is_within_its_reported_residual():
    net, support, query = ridge_task(seed=1)
    lam = 0.2
    imaml = iMAML(net, steps_train=20, lr=0.2, lam=lam, cg_steps=2, evaluator=default_evaluator_regression)
    got = meta_grad(imaml, support, query)
    phi = imaml.solve(support)  # same detached inner solution (the inner loop is deterministic)
    b = query_grad(phi["weight"].reshape(-1), query)
    operator = torch.eye(D, dtype=torch.float64) + hessian(support) / lam
    exact = torch.linalg.solve(operator, b)
    assert imaml.last_solve.iterations == 2
    residual = (operator @ got - b).norm() / b.norm()
    assert residual.item() == pytest.approx(imaml.last_solve.residual, rel=1e-6)
    assert 1e-6 < (got - exact).norm() / exact.norm() <= torch.linalg.cond(operator) * residual  # truncated, bounded
    imaml.cg_steps = D
    torch.testing.assert_close(meta_grad(imaml, support, query), exact, rtol=1e-8, atol=1e-10)


def test_formula_holds_at_the_computed_solution_before_convergence():
    """The implicit formula is applied at the inner solution actually reached, whatever the number of steps."""
    net, support, query = ridge_task(seed=2)
    imaml = iMAML(net, steps_train=3, lr=0.1, lam=1.0, cg_steps=D, evaluator=default_evaluator_regression)
    phi = imaml.solve(support)["weight"].reshape(-1)
    torch.testing.assert_close(meta_grad(imaml, support, query), closed_form(phi, support, query, 1.0))


def test_damping_changes_the_operator_as_documented():
    net, support, query = ridge_task(seed=3)
    imaml = iMAML(net, steps_train=5, lr=0.1, lam=0.5, cg_steps=D, cg_damping=0.3, evaluator=default_evaluator_regression)
    phi = imaml.solve(support)["weight"].reshape(-1)
    torch.testing.assert_close(meta_grad(imaml, support, query), closed_form(phi, support, query, 0.5, damping=0.3))


def test_inner_loop_approaches_the_proximal_optimum():
    net, support, _ = ridge_task(seed=4)
    lam = 0.5
    imaml = iMAML(net, lr=0.2, lam=lam, evaluator=default_evaluator_regression)
    target = proximal_optimum(net.weight.detach().reshape(-1), support, lam)
    errors = [(imaml.solve(support, steps)["weight"].reshape(-1) - target).norm().item() for steps in (0, 5, 50, 400)]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-10
    # The same with a metann.optim inner optimizer (it sees the proximal gradient).
    with_momentum = iMAML(net, lr=0.05, lam=lam, optimizer=InnerSGD(0.05, momentum=0.5), evaluator=default_evaluator_regression)
    torch.testing.assert_close(with_momentum.solve(support, 400)["weight"].reshape(-1), target)


def test_fixed_parameters_get_the_mixed_term():
    """adapt=['weight']: the bias stays at theta in the inner loop; its meta-gradient includes -M^T (H + lam I)^{-1} g."""
    net, support, query = ridge_task(seed=5, bias=True)
    lam = 0.7
    imaml = iMAML(net, steps_train=400, lr=0.2, lam=lam, cg_steps=D, adapt=["weight"], evaluator=default_evaluator_regression)
    imaml.zero_grad()
    default_evaluator_regression(imaml(support), query).backward()
    theta = net.weight.detach().reshape(-1).clone().requires_grad_()
    bias = net.bias.detach().clone().requires_grad_()
    phi = proximal_optimum(theta, support, lam, bias=bias)
    x, y = query
    expected = torch.autograd.grad(F.mse_loss(x @ phi + bias, y.reshape(-1)), [theta, bias])
    torch.testing.assert_close(net.weight.grad.reshape(-1), expected[0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(net.bias.grad, expected[1], rtol=1e-8, atol=1e-10)
    # Without the mixed term the bias gradient would be the direct one only, which differs here.
    direct = 2.0 / M * (x @ phi.detach() + bias.detach() - y.reshape(-1)).sum()
    assert (direct - expected[1]).abs().item() > 1e-3


def graph_of(loss):
    nodes, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in nodes:
            continue
        nodes.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return nodes


@pytest.mark.parametrize("bias", [False, True])
def test_graph_is_independent_of_the_number_of_inner_steps(bias):
    net, support, query = ridge_task(seed=6, bias=bias)
    sizes = []
    for steps in (1, 40):
        imaml = iMAML(net, steps_train=steps, lr=0.1, lam=1.0, evaluator=default_evaluator_regression)
        loss = default_evaluator_regression(imaml(support), query)
        nodes = graph_of(loss)
        variables = {id(n.variable) for n in nodes if hasattr(n, "variable")}
        assert variables == {id(p) for p in net.parameters()}  # the graph reaches theta and nothing else
        assert sum(type(n).__name__ == "_ImplicitBackward" for n in nodes) == 1  # one implicit node
        sizes.append(len(nodes))
    assert sizes[0] == sizes[1]
    phi = imaml.solve(support)
    assert all(t.grad_fn is None and not t.requires_grad for t in phi.values())


def test_meta_trainer_works_unchanged():
    net, support, query = ridge_task(seed=7)
    lam, eta = 1.5, 0.1
    tasks = [Task(*support, *query), Task(*ridge_task(seed=8)[1], *ridge_task(seed=8)[2])]
    theta = net.weight.detach().reshape(-1).clone()
    grads = [closed_form(proximal_optimum(theta, t.support, lam), t.support, t.query, lam) for t in tasks]
    imaml = iMAML(net, steps_train=500, lr=0.2, lam=lam, cg_steps=D, evaluator=default_evaluator_regression)
    trainer = MetaTrainer(imaml, torch.optim.SGD(imaml.parameters(), lr=eta), _NoSampler(), progress=False)
    trainer.meta_step(tasks)
    torch.testing.assert_close(net.weight.detach().reshape(-1), theta - eta * (grads[0] + grads[1]) / 2)


class _NoSampler:
    def sample(self, n):
        raise AssertionError("meta_step does not sample")


def test_eval_mode_and_no_grad_give_detached_weights():
    net, support, _ = ridge_task(seed=9)
    imaml = iMAML(net, steps_train=2, steps_eval=7, lr=0.1, evaluator=default_evaluator_regression).eval()
    fast = imaml(support)
    assert fast.steps_taken == 7 and not fast.params["weight"].requires_grad
    imaml.train()
    with torch.no_grad():
        assert not imaml(support).params["weight"].requires_grad
    assert imaml(support).params["weight"].requires_grad


def test_batch_norm_statistics_are_not_moved_by_the_backward():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    imaml = iMAML(net, steps_train=3, lr=0.1, lam=2.0, evaluator=default_evaluator_regression)
    loss = default_evaluator_regression(imaml((x[:8], y[:8])), (x[8:], y[8:]))
    state = {k: v.clone() for k, v in net[1].state_dict().items()}
    assert state["num_batches_tracked"].item() == 4  # 3 inner steps and the query forward, as in MAML
    loss.backward()
    for key, value in net[1].state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is not None for p in net.parameters())


def test_mode_change_between_forward_and_backward_raises():
    net, support, query = ridge_task(seed=10)
    imaml = iMAML(net, steps_train=2, lr=0.1, evaluator=default_evaluator_regression)
    loss = default_evaluator_regression(imaml(support), query)
    imaml.eval()
    with pytest.raises(RuntimeError, match=re.escape("the train/eval mode changed between the forward and the backward")):
        loss.backward()


def test_negative_curvature_warns():
    net, support, query = ridge_task(seed=11)

    def concave(model, data):  # a support loss whose Hessian is -H: I + (-H)/lam is indefinite for small lam
        return -default_evaluator_regression(model, data)

    imaml = iMAML(net, steps_train=1, lr=0.01, lam=0.05, cg_steps=D, evaluator=concave)
    loss = default_evaluator_regression(imaml(support), query)
    with pytest.warns(UserWarning, match=re.escape("conjugate gradient met non-positive curvature")):
        loss.backward()
    assert not imaml.last_solve.positive_definite


def test_conjugate_gradient_solves_a_spd_system():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    spd = a @ a.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = [torch.randn(2, 3, generator=g, dtype=torch.float64)]
    x, info = conjugate_gradient(lambda v: [(spd @ v[0].reshape(-1)).reshape(2, 3)], b, steps=6)
    torch.testing.assert_close(x[0].reshape(-1), torch.linalg.solve(spd, b[0].reshape(-1)))
    assert info.iterations <= 6 and info.residual < 1e-8
    x0, info0 = conjugate_gradient(lambda v: v, [torch.zeros(3)], steps=4)
    assert info0.iterations == 0 and torch.equal(x0[0], torch.zeros(3))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"lam": 0.0}, ValueError, "`lam` must be > 0 and finite, got 0.0"),
        ({"lam": -1}, ValueError, "`lam` must be > 0 and finite, got -1.0"),
        ({"lam": float("inf")}, ValueError, "`lam` must be > 0 and finite, got inf"),
        ({"lam": "big"}, TypeError, "`lam` must be a number, got `str`"),
        ({"cg_steps": 0}, ValueError, "`cg_steps` must be >= 1, got 0"),
        ({"cg_steps": 2.5}, TypeError, "`cg_steps` must be an int, got `float`"),
        ({"cg_damping": -0.1}, ValueError, "`cg_damping` must be >= 0 and finite, got -0.1"),
        ({"cg_tol": -1e-3}, ValueError, "`cg_tol` must be >= 0 and finite, got -0.001"),
        ({"steps_train": -2}, ValueError, "`steps_train` must be >= 0, got -2"),
        ({"lr": nn.Parameter(torch.tensor(0.1))}, ValueError, "`iMAML` cannot meta-learn `lr`"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        iMAML(nn.Linear(2, 1), evaluator=default_evaluator_regression, **kwargs)


# torch 2.13: the first `torch.compile` imports torch._dynamo, which warns about torch's own `torch.jit.script_method`.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("how", ["wrapped", "in_place", "forward"])
def test_compiled_models_are_refused(how):
    """The Hessian-vector products need a twice-differentiable backward, which compiled code lacks (torch 2.13)."""
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    if how == "wrapped":
        model, where = torch.compile(net), "['<model>']"
    elif how == "in_place":
        net[0].compile()
        model, where = net, "['0']"
    else:
        net[2].forward = torch.compile(net[2].forward)
        model, where = net, "['2']"
    with pytest.raises(ValueError, match=re.escape(f"`iMAML` cannot run on code compiled with `torch.compile` (found in {where})")):
        iMAML(model, evaluator=default_evaluator_regression)


def test_misuse_raises_clearly():
    net, support, _ = ridge_task()
    imaml = iMAML(net, evaluator=default_evaluator_regression)
    with pytest.raises(NotImplementedError, match=re.escape("Call `imaml(support)`")):
        imaml.clone()
    with pytest.raises(NotImplementedError, match=re.escape("Use `MetaTrainer(..., vectorize=False)`")):
        imaml.batched([])
    with pytest.raises(ValueError, match=re.escape("`steps` must be >= 0, got -1")):
        imaml.solve(support, -1)
    assert isinstance(imaml, MAML) and "lam=1.0" in repr(imaml)
