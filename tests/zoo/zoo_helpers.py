"""Shared helpers of the model zoo: tiny models and loops whose ground truth each test computes
independently (by autograd or by definition) before comparing it with the probe and diagnosis."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from signalprop.probe import Probe


def run_probed(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    lr: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    **probe_kw: Any,
) -> Probe:
    """A plain training loop (zero_grad, forward, backward, log, step) under a probe."""
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr)
    with Probe(model, optimizer=opt, **probe_kw) as p:
        for x, y in batches:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            p.log(loss=loss)
            opt.step()
    return p


def kinds(findings: list[Any]) -> set[str]:
    """The finding kinds of a diagnosis."""
    return {f.kind for f in findings}


def finding(findings: list[Any], kind: str) -> Any:
    """The one finding of ``kind`` (fails the test when absent)."""
    got = [f for f in findings if f.kind == kind]
    assert got, f"no {kind!r} finding; got {[f.kind for f in findings]}"
    return got[0]
