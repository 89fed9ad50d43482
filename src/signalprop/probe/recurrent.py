"""Recurrent layers through time: an unrolled forward for ``nn.RNN/LSTM/GRU`` and their cells.

PyTorch's fused recurrent kernels expose only the output sequence of the last layer, whose
gradient is the *direct* gradient of the loss (zero at every t but the last for a
sequence-to-one task). The total gradient dL/dh_t, which carries the signal back through time,
flows through hidden states the fused kernel never returns. On recorded steps the probe
therefore runs the same equations step by step with the module's own weights (same results up
to float rounding; see ``tests/zoo/test_probe_recurrent.py``), hooks each h_t of the first
layer (the one nearest the input) and measures the gates on the way.

Equations (PyTorch's documentation of ``nn.RNN``, ``nn.LSTM``, ``nn.GRU``):
    RNN:  h' = act(W_ih x + b_ih + W_hh h + b_hh)
    LSTM: i, f, g, o = split(W_ih x + b_ih + W_hh h + b_hh); c' = s(f) c + s(i) tanh(g);
          h' = s(o) tanh(c') (then W_hr h' with proj_size)
    GRU:  r = s(.. r ..), z = s(.. z ..), n = tanh(W_in x + b_in + r (W_hn h + b_hn));
          h' = (1 - z) n + z h
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

#: Gates measured per recurrent kind (saturating sigmoid gates).
GATES: dict[str, tuple[str, ...]] = {"LSTM": ("i", "f", "o"), "GRU": ("z", "r")}

#: At most this many time steps get a gradient hook (longer sequences: evenly strided, always
#: including the first and the last).
MAX_TIME_HOOKS = 512

Stash = Callable[[list[list[torch.Tensor]], dict[str, list[torch.Tensor]]], None]


def kind_of(m: nn.Module) -> str | None:
    """``"RNN"``, ``"LSTM"`` or ``"GRU"`` for recurrent modules and cells, else ``None``."""
    if isinstance(m, nn.LSTM | nn.LSTMCell):
        return "LSTM"
    if isinstance(m, nn.GRU | nn.GRUCell):
        return "GRU"
    if isinstance(m, nn.RNN | nn.RNNCell):
        return "RNN"
    return None


def unsupported(m: nn.Module) -> str | None:
    """Why ``m``'s time profile cannot be measured, or ``None`` when it can."""
    if kind_of(m) is None:
        return "not a torch recurrent module"
    if isinstance(m, nn.RNNBase) and getattr(m, "proj_size", 0):
        return "LSTM with proj_size is not unrolled by the probe"
    return None


def _time_index(T: int) -> set[int]:
    if T <= MAX_TIME_HOOKS:
        return set(range(T))
    step = -(-T // MAX_TIME_HOOKS)
    return set(range(0, T, step)) | {T - 1}


def _cell_step(kind: str, nonlin: str, x_proj: torch.Tensor, h: torch.Tensor,
               c: torch.Tensor | None, w_hh: torch.Tensor, b_hh: torch.Tensor | None,
               gates: dict[str, list[torch.Tensor]] | None) -> tuple[torch.Tensor, Any]:
    """One time step given the input projection ``x_proj = W_ih x + b_ih``."""
    hp = F.linear(h, w_hh, b_hh)
    if kind == "LSTM":
        i, f, g, o = (x_proj + hp).chunk(4, -1)
        i, f, o = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o)
        c2 = f * c + i * torch.tanh(g)
        h2 = o * torch.tanh(c2)
        if gates is not None:
            for name, v in (("i", i), ("f", f), ("o", o)):
                gates.setdefault(name, []).append(v.detach())
        return h2, c2
    if kind == "GRU":
        xr, xz, xn = x_proj.chunk(3, -1)
        hr, hz, hn = hp.chunk(3, -1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        if gates is not None:
            gates.setdefault("z", []).append(z.detach())
            gates.setdefault("r", []).append(r.detach())
        return (1 - z) * n + z * h, None
    a = x_proj + hp
    return (torch.tanh(a) if nonlin == "tanh" else torch.relu(a)), None


def unrolled_rnn(m: nn.RNNBase, stash: Stash, input: Any, hx: Any = None) -> Any:
    """``m.forward(input, hx)`` computed step by step; calls ``stash(h_ts, gates)`` with the
    first layer's hidden states (both directions pooled later) and the gate values."""
    if isinstance(input, nn.utils.rnn.PackedSequence):
        return type(m).forward(m, input, hx)
    kind = kind_of(m)
    assert kind is not None
    nonlin = getattr(m, "nonlinearity", "tanh")
    unbatched = input.dim() == 2
    x = input.unsqueeze(1 if not m.batch_first else 0) if unbatched else input
    if m.batch_first:
        x = x.transpose(0, 1)  # [T, B, F]
    T = x.shape[0]
    dirs = 2 if m.bidirectional else 1
    L = m.num_layers
    h0, c0 = _initial_state(m, kind, x, hx, unbatched)
    keep = _time_index(T)
    hs_first: list[list[torch.Tensor]] = [[] for _ in range(T)]
    gates: dict[str, list[torch.Tensor]] = {}
    h_n, c_n = [], []
    layer_in = x
    for layer in range(L):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(m, "weight_ih" + sfx), getattr(m, "weight_hh" + sfx)
            b_ih = getattr(m, "bias_ih" + sfx) if m.bias else None
            b_hh = getattr(m, "bias_hh" + sfx) if m.bias else None
            xp = F.linear(layer_in, w_ih, b_ih)  # all time steps at once: [T, B, G*H]
            h = h0[layer * dirs + d]
            c = c0[layer * dirs + d] if c0 is not None else None
            seq: list[torch.Tensor] = [None] * T  # type: ignore[list-item]
            order = range(T - 1, -1, -1) if d else range(T)
            for t in order:
                h, c2 = _cell_step(kind, nonlin, xp[t], h, c, w_hh, b_hh, gates)
                c = c2 if kind == "LSTM" else None
                seq[t] = h
                if layer == 0 and t in keep:
                    hs_first[t].append(h)  # both directions at time t: pooled later
            outs.append(torch.stack(seq))
            h_n.append(h)
            if kind == "LSTM":
                c_n.append(c)
        layer_in = outs[0] if dirs == 1 else torch.cat(outs, -1)
        if m.dropout and m.training and layer < L - 1:
            layer_in = F.dropout(layer_in, m.dropout, True)
    out = layer_in.transpose(0, 1) if m.batch_first else layer_in
    hn = torch.stack(h_n)
    if unbatched:
        out = out.squeeze(1 if not m.batch_first else 0)
        hn = hn.squeeze(1)
    stash(hs_first, gates)
    if kind == "LSTM":
        cn = torch.stack(c_n)
        return out, (hn, cn.squeeze(1) if unbatched else cn)
    return out, hn


def _initial_state(m: nn.RNNBase, kind: str, x: torch.Tensor, hx: Any,
                   unbatched: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(h0, c0) of every layer and direction, batched ([L * dirs, B, H]; c0 None but for LSTM)."""
    if hx is None:
        dirs = 2 if m.bidirectional else 1
        z = x.new_zeros(m.num_layers * dirs, x.shape[1], m.hidden_size)
        return z, (z if kind == "LSTM" else None)
    if kind == "LSTM":
        h0, c0 = hx
        return (h0.unsqueeze(1), c0.unsqueeze(1)) if unbatched else (h0, c0)
    return (hx.unsqueeze(1) if unbatched else hx), None


def unrolled_cell(m: nn.RNNCellBase, stash: Stash, input: torch.Tensor, hx: Any = None) -> Any:
    """``m.forward(input, hx)`` with the gates computed in the open (same equations)."""
    kind = kind_of(m)
    assert kind is not None
    unbatched = input.dim() == 1
    x = input.unsqueeze(0) if unbatched else input
    H = m.hidden_size
    if hx is None:
        z = x.new_zeros(x.shape[0], H)
        h, c = z, (z if kind == "LSTM" else None)
    elif kind == "LSTM":
        h, c = hx
        if unbatched:
            h, c = h.unsqueeze(0), c.unsqueeze(0)
    else:
        h, c = (hx.unsqueeze(0) if unbatched else hx), None
    gates: dict[str, list[torch.Tensor]] = {}
    xp = F.linear(x, m.weight_ih, m.bias_ih)
    h2, c2 = _cell_step(kind, getattr(m, "nonlinearity", "tanh"), xp, h, c, m.weight_hh,
                        m.bias_hh, gates)
    stash([], gates)
    if unbatched:
        h2 = h2.squeeze(0)
        c2 = c2.squeeze(0) if c2 is not None else None
    return (h2, c2) if kind == "LSTM" else h2
