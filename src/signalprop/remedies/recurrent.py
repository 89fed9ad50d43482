"""Remedies for recurrent networks (gradients through time).

Each transform copies the model and changes only its recurrent modules; a model without the
modules a remedy acts on raises ``ValueError`` naming what is missing (not applicable).

- :func:`to_gated`: vanilla ``nn.RNN`` -> ``nn.GRU`` or an LSTM with the RNN's call signature
  (Hochreiter & Schmidhuber 1997; Cho et al. 2014): gates give the gradient an additive path.
- :func:`orthogonal_recurrent_init`: orthogonal W_hh per gate block (Saxe et al. 2014; Henaff
  et al. 2016): all singular values 1, so the linear part of a step preserves norms.
- :func:`identity_recurrent_init`: W_hh = I, zero recurrent bias (IRNN, Le et al. 2015).
- :func:`forget_gate_bias`: LSTM forget-gate bias 1 (Gers et al. 2000; Jozefowicz et al. 2015).
- :func:`truncated_bptt`: back-propagate through at most ``k`` time steps (Williams & Peng 1990):
  the hidden state is detached between chunks of ``k`` steps, bounding the product of Jacobians.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _recurrent(model: nn.Module, types: tuple[type, ...]) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every submodule of the given types."""
    out = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, types):
                out.append((parent, name, child))
    return out


def _none(model: nn.Module, what: str) -> ValueError:
    return ValueError(f"not applicable: {type(model).__name__} has no {what}")


class LSTMAsRNN(nn.LSTM):
    """An ``nn.LSTM`` called like the ``nn.RNN`` it replaces: ``(output, h_n)`` out, and an
    optional ``h_0`` in (the cell state starts at zero)."""

    def forward(self, input: Any, hx: Any = None) -> Any:  # type: ignore[override]
        if hx is not None and not isinstance(hx, tuple):
            hx = (hx, torch.zeros_like(hx))
        out, (h, _) = super().forward(input, hx)
        return out, h


def to_gated(model: nn.Module, example_batch: Any = None, cell: str = "lstm") -> nn.Module:
    """Replace every vanilla ``nn.RNN`` (and ``nn.RNNCell`` by ``nn.GRUCell``) by a gated one."""
    if cell not in ("lstm", "gru"):
        raise ValueError(f"unknown gated cell {cell!r}; valid: 'gru', 'lstm'")
    new = copy.deepcopy(model)
    found = _recurrent(new, (nn.RNN, nn.RNNCell))
    if isinstance(new, nn.RNN | nn.RNNCell):
        raise ValueError("not applicable: the model is a bare recurrent module; wrap it")
    if not found:
        raise _none(model, "nn.RNN or nn.RNNCell to replace")
    for parent, name, m in found:
        if isinstance(m, nn.RNNCell):
            rep: nn.Module = nn.GRUCell(m.input_size, m.hidden_size, bias=m.bias)
        else:
            cls = LSTMAsRNN if cell == "lstm" else nn.GRU
            rep = cls(m.input_size, m.hidden_size, num_layers=m.num_layers, bias=m.bias,
                      batch_first=m.batch_first, dropout=m.dropout, bidirectional=m.bidirectional)
        p = next(m.parameters())
        setattr(parent, name, rep.to(device=p.device, dtype=p.dtype))
    return new


def _hh_weights(model: nn.Module, types: tuple[type, ...]) -> list[tuple[nn.Module, str, str]]:
    out = []
    for m in model.modules():
        if isinstance(m, types):
            for n, _ in m.named_parameters(recurse=False):
                if n.startswith("weight_hh"):
                    out.append((m, n, n.replace("weight", "bias")))
    return out


def _init_hh_weights(model: nn.Module, types: tuple[type, ...], what: str,
                     init: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], None]
                     ) -> nn.Module:
    """A copy of ``model`` with ``init(module, W_hh, b_hh or None)`` applied to each recurrent
    weight of a module of ``types``; raises naming ``what`` is missing when there is none."""
    new = copy.deepcopy(model)
    ws = _hh_weights(new, types)
    if not ws:
        raise _none(model, what)
    with torch.no_grad():
        for m, wn, bn in ws:
            init(m, getattr(m, wn), getattr(m, bn, None))
    return new


def orthogonal_recurrent_init(model: nn.Module, example_batch: Any = None,
                              gain: float = 1.0) -> nn.Module:
    """Orthogonal recurrent weights, one H x H block per gate."""

    def init(m: nn.Module, w: torch.Tensor, b: torch.Tensor | None) -> None:
        for block in w.split(m.hidden_size, 0):
            nn.init.orthogonal_(block, gain=gain)

    return _init_hh_weights(model, (nn.RNNBase, nn.RNNCellBase),
                            "recurrent module (nn.RNN/LSTM/GRU or a cell)", init)


def identity_recurrent_init(model: nn.Module, example_batch: Any = None,
                            scale: float = 1.0) -> nn.Module:
    """W_hh = scale * I and a zero recurrent bias on vanilla RNNs (IRNN)."""

    def init(m: nn.Module, w: torch.Tensor, b: torch.Tensor | None) -> None:
        w.copy_(scale * torch.eye(w.shape[0], w.shape[1], dtype=w.dtype, device=w.device))
        if b is not None:
            b.zero_()

    return _init_hh_weights(model, (nn.RNN, nn.RNNCell),
                            "vanilla nn.RNN or nn.RNNCell (identity init is for plain RNNs)", init)


def forget_gate_bias(model: nn.Module, example_batch: Any = None, value: float = 1.0) -> nn.Module:
    """LSTM forget-gate bias ``value`` (split as b_ih = value, b_hh = 0)."""
    new = copy.deepcopy(model)
    mods = [m for m in new.modules() if isinstance(m, nn.LSTM | nn.LSTMCell) and m.bias]
    if not mods:
        raise _none(model, "nn.LSTM or nn.LSTMCell with biases")
    with torch.no_grad():
        for m in mods:
            h = m.hidden_size
            for n, b in m.named_parameters(recurse=False):
                if n.startswith("bias_ih"):
                    b[h : 2 * h] = value
                elif n.startswith("bias_hh"):
                    b[h : 2 * h] = 0.0
    return new


class TruncatedBPTT(nn.Module):
    """Runs the wrapped ``nn.RNN/LSTM/GRU`` over chunks of ``k`` time steps, detaching the
    hidden state between chunks (same outputs, gradients truncated at ``k`` steps)."""

    def __init__(self, rnn: nn.RNNBase, k: int) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"truncated_bptt needs k >= 1, got {k}")
        self.rnn, self.k = rnn, int(k)

    def forward(self, input: torch.Tensor, hx: Any = None) -> Any:
        if isinstance(input, nn.utils.rnn.PackedSequence) or self.rnn.bidirectional:
            return self.rnn(input, hx)  # a backward direction cannot be chunked causally
        tdim = 1 if self.rnn.batch_first and input.dim() == 3 else 0
        outs = []
        h_n = hx
        for chunk in input.split(self.k, tdim):
            out, h_n = self.rnn(chunk, hx)
            outs.append(out)
            # the next chunk starts from a detached state: no gradient flows further back
            hx = tuple(h.detach() for h in h_n) if isinstance(h_n, tuple) else h_n.detach()
        return torch.cat(outs, tdim), h_n


def truncated_bptt(model: nn.Module, example_batch: Any = None, k: int = 20) -> nn.Module:
    """Wrap every ``nn.RNN/LSTM/GRU`` in :class:`TruncatedBPTT`."""
    new = copy.deepcopy(model)
    found = [(p, n, m) for p, n, m in _recurrent(new, (nn.RNNBase,))
             if not isinstance(p, TruncatedBPTT)]
    if not found:
        raise _none(model, "nn.RNN/LSTM/GRU module (cell loops are truncated in the loop itself)")
    for parent, name, m in found:
        setattr(parent, name, TruncatedBPTT(m, k))
    return new
