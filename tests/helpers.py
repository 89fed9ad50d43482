"""Helpers shared by tests in several folders."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from signalprop.probe import Probe


def train_probed(
    model: nn.Module,
    probe: Probe,
    opt: torch.optim.Optimizer,
    batches: Iterable[tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], torch.Tensor] = nn.functional.cross_entropy,
) -> Probe:
    """The probe's documented loop (zero_grad, forward, backward, log, step) over ``batches``."""
    with probe:
        for x, y in batches:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            probe.log(loss=loss)
            opt.step()
    return probe


def mlp(width: int, depth: int, activation: Callable[[], nn.Module], out: int) -> nn.Sequential:
    """``depth`` blocks (Linear(width, width), activation) and a Linear(width, out) head."""
    blocks = [m for _ in range(depth) for m in (nn.Linear(width, width), activation())]
    return nn.Sequential(*blocks, nn.Linear(width, out))
