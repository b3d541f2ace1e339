"""metann._autograd.grad: the inner loop's direct engine call equals torch.autograd.grad, and falls back to it."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch.testing import assert_close

from metann import _autograd
from tests.reference import sine_mlp, sine_mlp_forward


def _loss(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(10, 1, generator=g, dtype=torch.float64) * 10 - 5
    return torch.nn.functional.mse_loss(sine_mlp_forward(params, x), torch.sin(x))


@pytest.fixture
def engine_calls(monkeypatch):
    """Count the calls that take the direct engine path."""
    calls = []
    engine = _autograd._ENGINE

    class Spy:
        def run_backward(self, *args):
            calls.append(args)
            return engine.run_backward(*args)

    monkeypatch.setattr(_autograd, "_ENGINE", Spy())
    return calls


@pytest.mark.parametrize("create_graph", [False, True])
def test_equals_torch_autograd_grad(engine_calls, create_graph):
    params = list(sine_mlp().parameters())
    ours = _autograd.grad(_loss(params), params, create_graph)
    theirs = torch.autograd.grad(_loss(params), params, create_graph=create_graph)
    assert len(engine_calls) == 1
    assert_close(ours, theirs, rtol=0, atol=0)
    assert all(g.requires_grad == create_graph for g in ours)
    if create_graph:  # second derivatives through the gradient agree as well
        second = torch.autograd.grad(sum((g**2).sum() for g in ours), params)
        reference = torch.autograd.grad(sum((g**2).sum() for g in theirs), params)
        assert_close(second, reference, rtol=0, atol=0)


def test_second_order_gradient_is_the_finite_difference():
    params = [p.detach().requires_grad_() for p in sine_mlp().parameters()]

    def squared_gradient(*ps):
        return sum((g**2).sum() for g in _autograd.grad(_loss(ps), ps, True))

    assert torch.autograd.gradcheck(squared_gradient, params)


def test_unused_inputs(engine_calls):
    params = list(sine_mlp().parameters())
    unused = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    grads = _autograd.grad(_loss(params), [*params, unused], False)
    assert grads[-1] is None
    assert_close(grads[:-1], torch.autograd.grad(_loss(params), params))
    with pytest.raises(RuntimeError, match="appears to not have been used in the graph"):
        _autograd.grad(_loss(params), [*params, unused], False, allow_unused=False)


def test_errors_are_torchs():
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="grad can be implicitly created only for scalar outputs"):
        _autograd.grad(w * 2, [w], False)
    with pytest.raises(RuntimeError, match="does not require grad"):
        _autograd.grad(torch.ones(()), [w], False)
    with pytest.raises(RuntimeError, match="cannot be empty"):
        _autograd.grad((w**2).sum(), [], False)


def test_patched_torch_autograd_grad_is_honoured(engine_calls, monkeypatch):
    seen = []
    original = torch.autograd.grad

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", recording)
    w = torch.ones(3, requires_grad=True)
    (g,) = _autograd.grad((w**2).sum(), [w], False)
    assert seen == [{"create_graph": False, "allow_unused": True}]
    assert not engine_calls
    assert_close(g, 2 * w.detach())


class Traced(torch.Tensor):
    """A tensor subclass that records the functions ``__torch_function__`` sees."""

    seen: ClassVar[list] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_subclasses_go_through_torch_autograd_grad(engine_calls):
    Traced.seen = []
    w = torch.ones(3, requires_grad=True)
    traced = w.as_subclass(Traced)
    (g,) = _autograd.grad((traced**2).sum(), [traced], False)
    assert torch.autograd.grad in Traced.seen
    assert not engine_calls
    assert_close(g.as_subclass(torch.Tensor), 2 * w.detach())


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_inner_steps_take_the_direct_path(engine_calls, first_order):
    from metann.meta import MAML, default_evaluator_regression
    from tests.reference import leaves, maml_meta_grads

    net = sine_mlp()
    maml = MAML(net, steps_train=3, lr=0.01, first_order=first_order, evaluator=default_evaluator_regression)
    x = torch.linspace(-5, 5, 10, dtype=torch.float64).unsqueeze(1)
    loss = torch.nn.functional.mse_loss(maml((x, torch.sin(x)))(x), torch.cos(x))
    assert len(engine_calls) == 3
    ours = torch.autograd.grad(loss, list(net.parameters()))
    expected, _, _ = maml_meta_grads(
        sine_mlp_forward,
        leaves(net),
        (x, torch.sin(x)),
        (x, torch.cos(x)),
        torch.nn.functional.mse_loss,
        lr=0.01,
        steps=3,
        first_order=first_order,
    )
    assert_close(ours, tuple(expected))


def test_arguments_torch_accepts_go_through_torch_autograd_grad(engine_calls):
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    # a single tensor as `inputs` (not iterated), a generator, `allow_unused=None`
    assert_close(_autograd.grad((w**2).sum(), w, False), (2 * w.detach(),))
    assert_close(_autograd.grad((w**2).sum(), (t for t in [w]), False), (2 * w.detach(),))
    assert_close(_autograd.grad((w**2).sum(), [w], False, allow_unused=None), (2 * w.detach(),))
    assert not engine_calls
    with pytest.raises(RuntimeError, match="all inputs have to be Tensors"):
        _autograd.grad((w**2).sum(), [w, None], False)


def test_not_while_torch_compile_traces(engine_calls, monkeypatch):
    monkeypatch.setattr(_autograd, "_IS_COMPILING", lambda: True)
    w = torch.ones(3, requires_grad=True)
    assert_close(_autograd.grad((w**2).sum(), [w], False), (2 * w.detach(),))
    assert not engine_calls


@pytest.mark.skipif(_autograd._ENGINE_RUN_BACKWARD is None, reason="torch < 2.2 has no `_engine_run_backward`")
def test_a_patched_engine_entry_point_is_honoured(engine_calls, monkeypatch):
    seen = []
    original = torch.autograd._engine_run_backward  # what `torch.autograd.grad` calls

    def recording(*args, **kwargs):
        seen.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "_engine_run_backward", recording)
    w = torch.ones(3, requires_grad=True)
    assert_close(_autograd.grad((w**2).sum(), [w], False), (2 * w.detach(),))
    assert len(seen) == 1 and not engine_calls


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_loss_is_refused_as_torch_refuses_it(engine_calls):
    x = torch.ones(1, 1, requires_grad=True)
    with pytest.raises(RuntimeError) as ours:
        _autograd.grad((x * 3).to_sparse_csr(), [x], False)
    with pytest.raises(RuntimeError) as theirs:
        torch.autograd.grad((x * 3).to_sparse_csr(), [x])
    assert str(ours.value) == str(theirs.value)
