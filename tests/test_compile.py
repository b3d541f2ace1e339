"""torch.compile safety: compiled models are refused for second order; first order under torch.compile is correct."""
import re

import pytest
import torch
from torch import nn

from metann.meta import MAML, MetaSGD, default_evaluator_regression
from metann.meta.compiled import compiled_parts
from metann.meta.mamlpp import MAMLpp

pytestmark = [
    # Importing torch's compiler stack (on the first `torch.compile`) warns about torch's own deprecated JIT APIs.
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    # Dynamo (torch 2.13) reads `.grad` of every tensor attribute it traces, also of the computed weights that
    # the engine puts in the model's slots, which warns once per compilation.
    pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning"),
]


def small_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 1, generator=g, dtype=torch.float64)
    y = torch.sin(x)
    return (x[:5], y[:5]), (x[5:], y[5:])


def compiled_forward_method():
    class CompiledForward(nn.Module):  # defined here: the first `torch.compile` imports torch's compiler stack
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(1, 1)

        @torch.compile
        def forward(self, x):
            return self.layer(x)

    return CompiledForward()


def compiled_in_place():
    net = small_mlp()
    net.compile()
    return net


def compiled_submodule_forward():
    net = small_mlp()
    net[2].forward = torch.compile(net[2].forward)
    return net


COMPILED = {
    "torch.compile(model)": (lambda: torch.compile(small_mlp()), ["<model>"]),
    "model.compile()": (compiled_in_place, ["<model>"]),
    "submodule.forward": (compiled_submodule_forward, ["2"]),
    "@torch.compile forward": (compiled_forward_method, ["<model>"]),
}


@pytest.mark.parametrize("case", sorted(COMPILED))
def test_compiled_parts_are_found(case):
    make, expected = COMPILED[case]
    assert compiled_parts(make()) == expected


def test_eager_models_have_no_compiled_parts():
    assert compiled_parts(small_mlp()) == []
    assert compiled_parts(nn.TransformerEncoderLayer(4, 2)) == []


@pytest.mark.parametrize("case", sorted(COMPILED))
@pytest.mark.parametrize("algorithm", [MAML, MetaSGD, MAMLpp], ids=lambda a: a.__name__)
def test_second_order_through_compiled_code_is_refused(case, algorithm):
    make, parts = COMPILED[case]
    message = (f"`{algorithm.__name__}` cannot take second-order meta-gradients through code compiled with "
               f"`torch.compile` (found in {parts}): the compiled backward is not differentiable twice")
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        algorithm(make(), evaluator=default_evaluator_regression)
    assert "`first_order=True`" in str(error.value) and "eager module" in str(error.value)


def test_first_order_is_accepted_for_compiled_models():
    maml = MAML(torch.compile(small_mlp()), first_order=True, evaluator=default_evaluator_regression)
    assert maml.first_order and not maml.second_order


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_first_order_under_torch_compile_matches_eager(backend):
    """AOTAutograd compiles the forward and the backward (``aot_eager`` skips code generation; ``inductor`` is the default)."""
    from torch._dynamo.backends.registry import lookup_backend

    compilations = []

    def counting(graph, inputs):  # the named backend, counting the graphs it compiles
        compilations.append(graph)
        return lookup_backend(backend)(graph, inputs)

    support, query = data()
    eager = small_mlp()
    compiled = torch.compile(small_mlp(), backend=counting)
    results = []
    for net in (eager, compiled):
        maml = MAML(net, steps_train=2, lr=0.1, first_order=True, evaluator=default_evaluator_regression)
        loss = default_evaluator_regression(maml(support), query)
        results.append((loss, torch.autograd.grad(loss, list(net.parameters()))))
    torch.testing.assert_close(results[1][0], results[0][0])
    for got, expected in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, expected)
    assert compilations, "nothing was compiled: the test would not test torch.compile"
    assert next(n for n, _ in compiled.named_parameters()) == "_orig_mod.0.weight"
