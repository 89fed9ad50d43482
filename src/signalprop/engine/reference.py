"""The single-model reference: one member of a population as a plain ``nn.Module``.

:class:`MLP` computes exactly what one member of :class:`signalprop.engine.Population` computes,
with ordinary modules and autograd. It is the oracle of the engine's equivalence tests, the way to
take one trained member out of a population (``Population.member_module(k)``), and it fixes the
layer names the engine's records use (``layers.3.act`` ...), which are those a
:class:`signalprop.Probe` on this module would use.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from signalprop._registry import check_choice
from signalprop.engine.activations import get_activation
from signalprop.vocab.norms import BN_MOMENTUM, NORM_EPS, norm_module  # noqa: F401 (public names)
from signalprop.vocab.norms import NORMS as VOCAB_NORMS
from signalprop.vocab.optimizers import OPTIMIZERS as VOCAB_OPTIMIZERS

#: The norms (canonical names; the aliases ``bn``, ``ln`` resolve to them): the vocabulary's,
#: "none" first.
NORMS = tuple(sorted(VOCAB_NORMS.names(), key=lambda n: n != "none"))
NORM_POSITIONS = ("pre", "post")


class RBF(nn.Module):
    """Radial-basis layer: unit j computes exp(-||x - c_j||^2 / (2 s_j^2)).

    The squared distance is expanded as |x|^2 - 2 x.c_j + |c_j|^2 (one matmul instead of a
    [B, units, in] difference tensor), clamped at 0 against rounding, as the engine does.

    Args:
        in_features: Input dimension.
        units: Number of centres.

    Shapes: input [B, in_features] -> output [B, units]. Parameters ``centres`` [units, in],
    ``widths`` [units].
    """

    def __init__(self, in_features: int, units: int) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.randn(units, in_features))
        self.widths = nn.Parameter(torch.full((units,), float(in_features) ** 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.centres
        d2 = (c * c).sum(-1) - 2 * x @ c.T + (x * x).sum(-1, keepdim=True)
        d2 = d2.clamp_min(0)
        return torch.exp(-d2 / (2 * self.widths.square()))


class Scale(nn.Module):
    """Multiply by a fixed gain a (the scaled activation a*phi(z))."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = float(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class Block(nn.Module):
    """One hidden layer: linear -> [norm] -> activation [-> norm], optionally residual.

    Args:
        fan_in, fan_out: Linear dimensions.
        activation: Activation name (see :data:`signalprop.engine.activations.ACTIVATIONS`).
        norm: ``none`` | ``batch`` | ``layer``.
        norm_position: ``pre`` (normalise the activation's input) | ``post`` (its output).
        norm_affine: Learnable gain and bias in the norm.
        residual: Output ``x + branch(x)`` (needs fan_in == fan_out).
        act_scale: Gain a of a*phi.
    """

    def __init__(
        self,
        fan_in: int,
        fan_out: int,
        activation: str = "tanh",
        norm: str = "none",
        norm_position: str = "pre",
        norm_affine: bool = True,
        residual: bool = False,
        act_scale: float = 1.0,
    ) -> None:
        super().__init__()
        norm = VOCAB_NORMS.canonical(norm)
        check_choice("norm_position", norm_position, NORM_POSITIONS)
        if residual and fan_in != fan_out:
            raise ValueError(f"a residual block needs fan_in == fan_out, got {fan_in}, {fan_out}")
        self.linear = nn.Linear(fan_in, fan_out)
        self.norm: nn.Module | None = (
            None if norm == "none" else norm_module(norm, fan_out, affine=norm_affine)
        )
        act = get_activation(activation).module()
        self.act = act if act_scale == 1.0 else nn.Sequential(act, Scale(act_scale))
        self.norm_position = norm_position
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        if self.norm is not None and self.norm_position == "pre":
            h = self.norm(h)
        h = self.act(h)
        if self.norm is not None and self.norm_position == "post":
            h = self.norm(h)
        return x + h if self.residual else h


class MLP(nn.Module):
    """The architecture of one population member.

    ``[rbf ->] layers.0 -> ... -> layers.{depth-1} -> head``; residual connections on layers 1..
    (layer 0 changes the dimension).

    Args:
        in_features, out_features: Data dimensions.
        depth: Number of hidden blocks (>= 1).
        width: Units per hidden block.
        activation, norm, norm_position, norm_affine, act_scale: As :class:`Block`.
        residual: Residual connections on blocks 1..depth-1.
        rbf: Units of an RBF first layer (0: none).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        depth: int = 4,
        width: int = 64,
        activation: str = "tanh",
        norm: str = "none",
        norm_position: str = "pre",
        norm_affine: bool = True,
        residual: bool = False,
        rbf: int = 0,
        act_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.rbf = RBF(in_features, rbf) if rbf else None
        fan_in = rbf if rbf else in_features
        blocks = []
        for i in range(depth):
            blocks.append(
                Block(
                    fan_in if i == 0 else width,
                    width,
                    activation,
                    norm,
                    norm_position,
                    norm_affine,
                    residual and i > 0,
                    act_scale,
                )
            )
        self.layers = nn.ModuleList(blocks)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rbf is not None:
            x = self.rbf(x)
        for block in self.layers:
            x = block(x)
        return self.head(x)


def torch_optimizer(
    name: str, params: Any, hparams: dict[str, float]
) -> torch.optim.Optimizer:
    """The torch optimiser equivalent to the engine's ``name``: the vocabulary's torch face, with
    the run config's flat hyper-parameters (``beta1`` ...) over the registered defaults."""
    d = VOCAB_OPTIMIZERS.get(name)
    kw = d.torch_kwargs({**d.engine_defaults(), **hparams})
    return d.torch(params, **kw)


def fit_reference(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batches: list[torch.Tensor],
    optimizer: str = "sgd",
    hparams: dict[str, float] | None = None,
    clip: str = "none",
    clip_threshold: float = 1.0,
    task: str = "classification",
) -> list[float]:
    """Train one model the ordinary way (autograd + ``torch.optim``) on the given mini-batch
    indices; the oracle the engine is tested against. Stops at the first non-finite loss.

    Returns:
        The mini-batch loss of every step taken.
    """
    opt = torch_optimizer(optimizer, model.parameters(), dict(hparams or {}))
    loss_fn = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()
    losses = []
    model.train()
    for idx in batches:
        opt.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        losses.append(float(loss.detach()))
        if not torch.isfinite(loss):
            break
        loss.backward()
        if clip == "norm":
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_threshold)
        elif clip == "value":
            torch.nn.utils.clip_grad_value_(model.parameters(), clip_threshold)
        elif clip != "none":
            raise ValueError(f"fit_reference supports clip none|norm|value, got {clip!r}")
        opt.step()
    return losses
