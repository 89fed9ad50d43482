"""Built-in doctor examples: small models on built-in data, each built to show (or not show) a
finding. ``signalprop doctor --example NAME`` runs one; every example is also a test fixture.

Each example factory returns ``(model, data, loss_fn)`` and is registered with the doctor
settings (steps, optimiser, learning rate) it is meant to be run with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from signalprop._registry import Registry
from signalprop.data import Dataset, load_dataset

Example = tuple[nn.Module, Any, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]

#: name -> factory() -> (model, data, loss_fn); defaults = doctor settings for the example.
EXAMPLES: Registry = Registry("example")


def mlp(
    in_features: int,
    out_features: int,
    depth: int,
    width: int,
    activation: Callable[[], nn.Module],
    norm: Callable[[int], nn.Module] | None = None,
) -> nn.Sequential:
    """``depth`` Linear layers (``depth - 1`` hidden) with ``[norm] -> activation`` after each
    hidden Linear: ``Linear, [BN], act, ..., Linear``. PyTorch's default init."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    layers: list[nn.Module] = []
    d = in_features
    for _ in range(depth - 1):
        layers.append(nn.Linear(d, width))
        if norm is not None:
            layers.append(norm(width))
        layers.append(activation())
        d = width
    layers.append(nn.Linear(d, out_features))
    return nn.Sequential(*layers)


def _digits() -> Dataset:
    return load_dataset("digits")


def _ce() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return nn.CrossEntropyLoss()


def _init_linear_(model: nn.Module, std_fn: Callable[[int], float], bias: float = 0.0) -> None:
    """Gaussian weights with std ``std_fn(fan_in)`` and constant biases, in place."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std_fn(m.in_features))
                if m.bias is not None:
                    m.bias.fill_(bias)


@EXAMPLES.register(
    "deep-sigmoid", steps=300, optimizer="adam", lr=0.01,
    doc="30-layer sigmoid MLP (width 64) on digits, PyTorch's default init, Adam lr 1e-2",
)
def deep_sigmoid(depth: int = 30, width: int = 64) -> Example:
    """The textbook vanishing-gradient net: 30 Linear layers with sigmoids and PyTorch's default
    init (U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. sigma_w^2 = 1/3) on the digits data.

    Trained with Adam at lr 1e-2, a common first choice, the top hidden layers also saturate
    within a few hundred steps (the effect Glorot & Bengio 2010 describe for sigmoid nets). With
    plain SGD (``--optimizer sgd --lr 0.1``) the gradients vanish just as badly but the units do
    not saturate: the vanishing then comes from sigmoid' <= 1/4 times sigma_w^2 = 1/3 alone.
    """
    ds = _digits()
    return mlp(ds.in_features, ds.num_classes, depth, width, nn.Sigmoid), ds, _ce()


@EXAMPLES.register(
    "healthy", steps=200, optimizer="sgd", lr=0.1,
    doc="4-layer ReLU MLP (width 64) on digits, He init",
)
def healthy(depth: int = 4, width: int = 64) -> Example:
    """A 4-layer ReLU MLP with He (Kaiming normal) init and zero biases on digits."""
    ds = _digits()
    model = mlp(ds.in_features, ds.num_classes, depth, width, nn.ReLU)
    _init_linear_(model, lambda fan_in: math.sqrt(2.0 / fan_in))
    return model, ds, _ce()


@EXAMPLES.register(
    "bn-tanh", steps=200, optimizer="sgd", lr=0.1,
    doc="10-layer tanh MLP with batch norm before each tanh, on digits",
)
def bn_tanh(depth: int = 10, width: int = 64) -> Example:
    """A 10-layer tanh MLP with BatchNorm1d before every tanh (default init): healthy."""
    ds = _digits()
    return mlp(ds.in_features, ds.num_classes, depth, width, nn.Tanh, nn.BatchNorm1d), ds, _ce()


@EXAMPLES.register(
    "exploding", steps=30, optimizer="sgd", lr=1e-4,
    doc="12-layer ReLU MLP with weights 2x too large (sigma_w = 2 sqrt 2)",
)
def exploding(depth: int = 12, width: int = 64, gain: float = 2.0) -> Example:
    """ReLU MLP with Var W = gain^2 * 2/fan_in: each layer doubles the signal both ways
    (chi_1 = gain^2), so the gradient at layer 1 is ~gain^(depth-1) x that at the last."""
    ds = _digits()
    model = mlp(ds.in_features, ds.num_classes, depth, width, nn.ReLU)
    _init_linear_(model, lambda fan_in: gain * math.sqrt(2.0 / fan_in))
    return model, ds, _ce()


@EXAMPLES.register(
    "saturated-tanh", steps=100, optimizer="sgd", lr=0.01,
    doc="6-layer tanh MLP with weights 4x the critical scale (sigma_w = 4)",
)
def saturated_tanh(depth: int = 6, width: int = 64, sigma_w: float = 4.0) -> Example:
    """tanh MLP deep in the chaotic phase (sigma_w = 4): most pre-activations have |z| > 1.8,
    where tanh' < 0.1."""
    ds = _digits()
    model = mlp(ds.in_features, ds.num_classes, depth, width, nn.Tanh)
    _init_linear_(model, lambda fan_in: sigma_w / math.sqrt(fan_in))
    return model, ds, _ce()


@EXAMPLES.register(
    "dead-relu", steps=100, optimizer="sgd", lr=0.1,
    doc="4-layer ReLU MLP whose hidden biases start at -3 (most units never fire)",
)
def dead_relu(depth: int = 4, width: int = 64, bias: float = -3.0) -> Example:
    """ReLU MLP with He init but biases of -3: pre-activations (std ~1.4) are below 0 for every
    example in most units, which then never receive gradient."""
    ds = _digits()
    model = mlp(ds.in_features, ds.num_classes, depth, width, nn.ReLU)
    _init_linear_(model, lambda fan_in: math.sqrt(2.0 / fan_in), bias=bias)
    return model, ds, _ce()


@EXAMPLES.register(
    "diverging", steps=100, optimizer="sgd", lr=50.0,
    doc="4-layer ReLU MLP trained with a far too large learning rate (50)",
)
def diverging(depth: int = 4, width: int = 64) -> Example:
    """The healthy net with lr = 50: the loss blows up to Inf/NaN within a few steps."""
    return healthy(depth, width)


def example_names() -> list[str]:
    """Names of the built-in examples."""
    return EXAMPLES.names()


def load_example(name: str) -> tuple[Example, dict[str, Any]]:
    """``((model, data, loss_fn), doctor_settings)`` of a built-in example.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    entry = EXAMPLES.entry(name)
    return entry.fn(), dict(entry.defaults)
