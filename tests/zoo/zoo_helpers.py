"""Shared helpers of the model zoo: tiny models and loops whose ground truth each test computes
independently (by autograd or by definition) before comparing it with the probe and diagnosis."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from signalprop.probe import Probe

from ..helpers import train_probed


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
    return train_probed(model, Probe(model, optimizer=opt, **probe_kw), opt, batches, loss_fn)


def kinds(findings: list[Any]) -> set[str]:
    """The finding kinds of a diagnosis."""
    return {f.kind for f in findings}


def finding(findings: list[Any], kind: str) -> Any:
    """The one finding of ``kind`` (fails the test when absent)."""
    got = [f for f in findings if f.kind == kind]
    assert got, f"no {kind!r} finding; got {[f.kind for f in findings]}"
    return got[0]


class PosTransformer(nn.Module):
    """Token embedding + a root-level positional nn.Parameter + TransformerEncoder + head."""

    def __init__(self, layers: int = 12, d: int = 16, heads: int = 2, ff: int = 32,
                 norm_first: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, d)
        self.pos = nn.Parameter(torch.randn(10, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.pos).mean(1))
