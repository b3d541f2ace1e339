"""The module zoo: model and input factories that every engine test runs over, plus test helpers."""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations

__all__ = [
    "RNN_IDS",
    "ZOO",
    "BilinearSelf",
    "Case",
    "Frozen",
    "Nested",
    "RawParams",
    "SelfAttention",
    "Tied",
    "Unused",
    "assert_unchanged",
    "case_ids",
    "copies",
    "double",
    "leaves",
    "loss_of",
    "zoo_params",
]


@dataclass(frozen=True)
class Case:
    """One zoo entry: a model factory and an input factory (a tuple of forward arguments).

    ``random_train``: the train-mode forward draws random numbers (dropout), so outputs
    only match when the global seed is reset before each call.
    ``picklable``: False where torch refuses to pickle the model (parametrized modules).
    ``marks``: pytest marks for every test of this case (narrow warning filters).
    """

    id: str
    make: Callable[[], nn.Module]
    args: Callable[[], tuple]
    random_train: bool = False
    picklable: bool = True
    marks: tuple = ()


# ---------------------------------------------------------------------------- models
def _randomise(module: nn.Module) -> nn.Module:
    """Move affine weights and running statistics away from 1/0 so that a wrong tensor shows."""
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                tensor.uniform_(-0.8, 0.8)
            else:
                tensor.add_(0.3 * torch.randn_like(tensor))
    return module


class Tied(nn.Module):
    """One Parameter used by two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


class Frozen(nn.Sequential):
    """An MLP whose first layer has ``requires_grad=False``."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
        self[0].requires_grad_(False)


class Unused(nn.Module):
    """A forward that ignores one of the parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(3, 2)
        self.unused = nn.Parameter(torch.randn(4))

    def forward(self, x: Tensor) -> Tensor:
        return self.used(x)


class RawParams(nn.Module):
    """Raw ``nn.Parameter`` attributes and a hand-written forward."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))
        self.b = nn.Parameter(torch.randn(4))
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w + self.b) * self.scale


class Nested(nn.Module):
    """A ModuleDict holding a ModuleList and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict(
            {"enc": nn.ModuleList([nn.Linear(3, 4), nn.Linear(4, 4)]), "head": nn.Linear(4, 2)}
        )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.blocks["enc"]:
            x = torch.relu(layer(x)) + 0.1 * x.sum(-1, keepdim=True)
        return self.blocks["head"](x)


class SelfAttention(nn.Module):
    """``MultiheadAttention`` called as self-attention on one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class BilinearSelf(nn.Module):
    """``Bilinear`` on two different views of one input."""

    def __init__(self) -> None:
        super().__init__()
        self.bilinear = nn.Bilinear(3, 4, 2)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.bilinear(x, y)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


def _conv_bn() -> nn.Module:
    return _randomise(nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU()))


def _weight_norm() -> nn.Module:
    return nn.Sequential(parametrizations.weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2))


def _transformer() -> nn.Module:
    return _randomise(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True))


def _dropout() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2))


def _randn(*shape: int) -> Callable[[], tuple]:
    return lambda: (torch.randn(*shape),)


ZOO = [
    Case("linear", lambda: nn.Linear(3, 2), _randn(4, 3)),
    Case("linear_no_bias", lambda: nn.Linear(3, 2, bias=False), _randn(4, 3)),
    Case("mlp", _mlp, _randn(4, 3)),
    Case("conv1d", lambda: nn.Conv1d(2, 3, 3), _randn(2, 2, 7)),
    Case("conv2d", lambda: nn.Conv2d(2, 3, 3, padding=1), _randn(2, 2, 5, 5)),
    Case("conv3d", lambda: nn.Conv3d(1, 2, 2), _randn(1, 1, 4, 4, 4)),
    Case("conv_transpose2d", lambda: nn.ConvTranspose2d(2, 3, 3, stride=2), _randn(2, 2, 4, 4)),
    Case("conv_bn", _conv_bn, _randn(4, 1, 6, 6)),  # buffers; train and eval differ
    Case("layer_norm", lambda: _randomise(nn.LayerNorm(5)), _randn(3, 4, 5)),
    Case("group_norm", lambda: _randomise(nn.GroupNorm(2, 4)), _randn(2, 4, 3, 3)),
    Case("instance_norm", lambda: _randomise(nn.InstanceNorm2d(3, affine=True)), _randn(2, 3, 4, 4)),
    Case("embedding", lambda: nn.Embedding(10, 4), lambda: (torch.randint(0, 10, (2, 5)),)),
    Case("bilinear", BilinearSelf, lambda: (torch.randn(5, 3), torch.randn(5, 4))),
    Case("prelu", lambda: _randomise(nn.PReLU(4)), _randn(2, 4)),
    Case("tied", Tied, _randn(4, 3)),  # one weight used twice
    Case("frozen", Frozen, _randn(4, 3)),  # requires_grad=False
    Case("unused", Unused, _randn(4, 3)),  # forward ignores a parameter
    Case("raw_params", RawParams, _randn(4, 3)),
    Case("nested", Nested, _randn(4, 3)),  # ModuleDict / ModuleList
    Case("rnn", lambda: nn.RNN(3, 4, num_layers=2, bidirectional=True, batch_first=True), _randn(2, 5, 3)),
    Case("lstm", lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True), _randn(2, 5, 3)),
    Case(
        "lstm_proj",
        lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2),
        _randn(5, 2, 3),
        # torch 2.13 warns once that oneDNN has no projected LSTM and falls back; nothing to fix here.
        marks=(pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN"),),
    ),
    Case("gru", lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True), _randn(2, 5, 3)),
    Case("mha", SelfAttention, _randn(2, 5, 8)),
    Case("transformer", _transformer, _randn(2, 5, 8)),
    Case("weight_norm", _weight_norm, _randn(4, 3), picklable=False),  # torch refuses to pickle
    Case("dropout", _dropout, _randn(4, 3), random_train=True),
]
RNN_IDS = ("rnn", "lstm", "lstm_proj", "gru")


# ---------------------------------------------------------------------------- helpers
def leaves(output: object) -> list[Tensor]:
    """The floating-point tensors of a (possibly nested tuple/list) output."""
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in leaves(item)]
    raise TypeError(f"unexpected output type {type(output).__name__}")


def loss_of(output: object) -> Tensor:
    """A scalar that depends on every output element with a different, fixed weight."""
    total = 0
    for t in leaves(output):
        w = torch.arange(t.numel(), dtype=t.dtype).mul(0.7).add(0.3).sin().reshape(t.shape)
        total = total + (t * w).sum()
    return total


def double(args: tuple) -> tuple:
    """Floating-point arguments converted to float64; others (indices) unchanged."""
    return tuple(a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


def zoo_params(module: nn.Module, *, scale: float = 1.3) -> list[Tensor]:
    """Leaf tensors that differ from ``module``'s parameters, in ``parameters()`` order, requiring grad."""
    gen = torch.Generator().manual_seed(1)
    return [
        (p.detach() * scale + 0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype)).requires_grad_()
        for p in module.parameters()
    ]


@contextlib.contextmanager
def assert_unchanged(module: nn.Module, *, buffers: bool = True) -> Iterator[None]:
    """Check that ``module``'s parameters (and buffers) are the same objects with the same values afterwards.

    Also checks classes, training flags and ``requires_grad``. Runs its checks even when the
    body raises (the exception is re-raised after the checks pass).
    """

    def snapshot() -> dict:
        tensors = dict(module.named_parameters(remove_duplicate=False))
        if buffers:
            tensors.update({"buffer:" + n: b for n, b in module.named_buffers(remove_duplicate=False)})
        return {
            "tensors": {n: (t, t.detach().clone(), t.requires_grad) for n, t in tensors.items()},
            "modules": [(n, type(m), m.training) for n, m in module.named_modules(remove_duplicate=False)],
        }

    before = snapshot()
    try:
        yield
    finally:
        after = snapshot()
        assert after["modules"] == before["modules"]
        assert list(after["tensors"]) == list(before["tensors"])
        for name, (tensor, value, requires_grad) in before["tensors"].items():
            now = after["tensors"][name][0]
            assert now is tensor, f"{name} was replaced"
            assert now.requires_grad == requires_grad, f"{name}.requires_grad changed"
            torch.testing.assert_close(now.detach(), value, rtol=0, atol=0, msg=f"{name} changed")


def case_ids(cases: list[Case]) -> list:
    """``pytest.param`` objects with readable ids."""
    return [pytest.param(c, id=c.id, marks=c.marks) for c in cases]


def copies(module: nn.Module, n: int) -> list[nn.Module]:
    """``n`` independent deep copies of ``module``."""
    return [copy.deepcopy(module) for _ in range(n)]
