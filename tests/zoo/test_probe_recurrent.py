"""Zoo: recurrent networks through time. ||dL/dh_t|| per time step is checked against autograd
on an explicit cell-by-cell loop, and the through-time findings against that truth."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from signalprop.diagnosis import diagnose
from signalprop.report import figures

from .zoo_helpers import finding, kinds, run_probed

T = 150


def adding_problem(batch: int, steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hochreiter & Schmidhuber's adding problem: sum the two marked values of a sequence."""
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(batch, steps, generator=g)
    mark = torch.zeros(batch, steps)
    first = torch.randint(0, steps // 2, (batch,), generator=g)
    second = torch.randint(steps // 2, steps, (batch,), generator=g)
    mark[torch.arange(batch), first] = 1.0
    mark[torch.arange(batch), second] = 1.0
    return torch.stack([v, mark], -1), (v * mark).sum(1, keepdim=True)


class SeqToOne(nn.Module):
    def __init__(self, cls: type[nn.RNNBase], hidden: int = 24, **kw) -> None:
        super().__init__()
        self.rnn = cls(2, hidden, batch_first=True, **kw)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


_CELL = {nn.RNN: nn.RNNCell, nn.LSTM: nn.LSTMCell, nn.GRU: nn.GRUCell}


def truth_profile(model: SeqToOne, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """||dL/dh_t|| for every t by autograd through an explicit loop over a cell that shares the
    module's weights (the total gradient through time, not the direct one)."""
    rnn = model.rnn
    kw = {"nonlinearity": rnn.nonlinearity} if isinstance(rnn, nn.RNN) else {}
    cell = _CELL[type(rnn)](rnn.input_size, rnn.hidden_size, **kw)
    cell.load_state_dict({"weight_ih": rnn.weight_ih_l0, "weight_hh": rnn.weight_hh_l0,
                          "bias_ih": rnn.bias_ih_l0, "bias_hh": rnn.bias_hh_l0})
    h = torch.zeros(x.shape[0], rnn.hidden_size)
    c = torch.zeros_like(h)
    hs = []
    for t in range(x.shape[1]):
        if isinstance(rnn, nn.LSTM):
            h, c = cell(x[:, t], (h, c))
        else:
            h = cell(x[:, t], h)
        h.retain_grad()
        hs.append(h)
    F.mse_loss(model.head(h), y).backward()
    return [hh.grad.double().norm().item() for hh in hs]  # float64: no underflow


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
def test_adding_problem_vanishes_through_time(cls):
    torch.manual_seed(0)
    model = SeqToOne(cls)
    x, y = adding_problem(16, T)
    truth = truth_profile(model, x, y)
    p = run_probed(model, [(x, y)] * 2, F.mse_loss, lr=0.0)
    r = p.record
    t, g = r.time_profile("rnn", 0)
    assert list(t) == list(range(T)) and r.layers["rnn"].time_steps == T
    for k in (0, 1, T // 2, T - 2, T - 1):
        assert g[k] == pytest.approx(truth[k], rel=1e-3, abs=0)
    ratio = truth[0] / truth[-1]
    assert 0 < ratio < 1e-6  # the truth: no learning signal reaches the first inputs
    f = diagnose(r)
    v = finding(f, "vanishing_through_time")
    assert v.layers == ["rnn"] and v.severity == "critical"
    assert v.numbers["ratio"] == pytest.approx(ratio, rel=1e-2, abs=0)
    assert v.numbers["time_steps"] == T and f"t={T - 1}" in v.evidence
    # remedies fit the cell: gated units for a vanilla RNN, forget-gate bias for an LSTM
    first = v.remedies[:2]
    assert {"RNN": "lstm", "LSTM": "forget_gate_bias", "GRU": "orthogonal_recurrent_init"}[
        cls.__name__] in first
    if cls is nn.LSTM:
        assert 0.3 < v.numbers["gate_f_mean"] < 0.7  # default init: forget gate ~ sigmoid(0)
        assert "lstm" not in v.remedies
    # wrong findings absent: nothing explodes, the depth path (rnn -> head) is fine
    assert not kinds(f) & {"exploding_through_time", "exploding_gradients",
                           "vanishing_gradients", "nonfinite"}
    assert figures.time_profile(r) is not None


def test_rnn_exploding_through_time():
    torch.manual_seed(0)
    model = SeqToOne(nn.RNN, hidden=16, nonlinearity="relu")
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(1.12 * torch.eye(16))
    x, y = adding_problem(8, 120)
    truth = truth_profile(model, x, y)
    p = run_probed(model, [(x, y)] * 2, F.mse_loss, lr=0.0)
    _, g = p.record.time_profile("rnn", 1)
    assert g[0] == pytest.approx(truth[0], rel=1e-3, abs=0) and g[-1] == pytest.approx(truth[-1], rel=1e-3, abs=0)
    ratio = truth[0] / truth[-1]
    assert ratio > 1e4
    f = diagnose(p.record)
    e = finding(f, "exploding_through_time")
    assert e.numbers["ratio"] == pytest.approx(ratio, rel=1e-2, abs=0)
    assert e.remedies[0] == "clip_norm" and "truncated_bptt" in e.remedies[:3]
    assert math.isclose(e.numbers["per_step_factor"], ratio ** (1 / 119), rel_tol=1e-6)
    assert "vanishing_through_time" not in kinds(f)
    assert "each layer multiplies" not in " ".join(x.evidence for x in f)


def test_gru_cell_loop_time_profile():
    torch.manual_seed(0)

    class CellLoop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.GRUCell(2, 16)
            self.head = nn.Linear(16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.zeros(x.shape[0], 16)
            for t in range(x.shape[1]):
                h = self.cell(x[:, t], h)
            return self.head(h)

    model = CellLoop()
    x, y = adding_problem(8, 100)
    ref = SeqToOne(nn.GRU, hidden=16)
    ref.rnn.load_state_dict({k + "_l0": v for k, v in model.cell.state_dict().items()})
    ref.head.load_state_dict(model.head.state_dict())
    truth = truth_profile(ref, x, y)
    p = run_probed(model, [(x, y)] * 2, F.mse_loss, lr=0.0)
    r = p.record
    assert p.layer_map == ["cell", "head"]  # the time steps of one layer, not 100 layers
    t, g = r.time_profile("cell", 1)
    assert len(t) == 100
    assert g[0] == pytest.approx(truth[0], rel=1e-3, abs=0) and g[50] == pytest.approx(truth[50], rel=1e-3, abs=0)
    for gate in ("z", "r"):
        assert 0.0 <= r.get(1, "cell", f"gate_{gate}_saturated_frac") <= 1.0
    v = finding(diagnose(r), "vanishing_through_time")
    assert v.numbers["ratio"] == pytest.approx(truth[0] / truth[-1], rel=1e-2, abs=0)


def test_unrolled_forward_matches_the_fused_kernel_and_packed_input_is_unchecked():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 8, num_layers=2, bidirectional=True, batch_first=True)
    ref = nn.LSTM(3, 8, num_layers=2, bidirectional=True, batch_first=True)
    ref.load_state_dict(lstm.state_dict())
    x = torch.randn(4, 12, 3)
    from signalprop.probe import Probe

    with Probe(lstm) as p:
        out, (h, c) = lstm(x)
        out.sum().backward()
        p.step()
        packed = nn.utils.rnn.pack_padded_sequence(x, [12, 9, 5, 3], batch_first=True)
        out2, _ = lstm(packed)
        out2.data.sum().backward()
        p.step()
    o_ref, (h_ref, c_ref) = ref(x)
    assert torch.allclose(out, o_ref, atol=1e-6) and torch.allclose(c, c_ref, atol=1e-6)
    assert p.record.layers["LSTM"].time_steps == 12
    assert "packed" in p.record.meta["unchecked"]["LSTM"]


def test_recurrent_remedies_apply_where_they_fit():
    from signalprop.remedies import get_remedy

    torch.manual_seed(0)
    model = SeqToOne(nn.RNN)
    x, _ = adding_problem(4, 30)
    for name in ("lstm", "gru", "orthogonal_recurrent_init", "identity_recurrent_init",
                 "truncated_bptt"):
        new = get_remedy(name).apply(model, x)
        assert new(x).shape == (4, 1), name
    assert isinstance(get_remedy("gru").apply(model, x).rnn, nn.GRU)
    w = get_remedy("orthogonal_recurrent_init").apply(model, x).rnn.weight_hh_l0
    assert torch.allclose(w @ w.T, torch.eye(24), atol=1e-5)
    with pytest.raises(ValueError, match="not applicable"):
        get_remedy("forget_gate_bias").apply(model, x)
    lstm = SeqToOne(nn.LSTM)
    b = get_remedy("forget_gate_bias").apply(lstm, x).rnn.bias_ih_l0
    assert torch.all(b[24:48] == 1.0)
    # truncated BPTT: same outputs, no gradient beyond k steps back
    tb = get_remedy("truncated_bptt", k=10).apply(model, x)
    assert torch.allclose(tb(x), model(x), atol=1e-6)
    xg = x.clone().requires_grad_(True)
    tb(xg).sum().backward()
    assert xg.grad[:, :20].abs().max() == 0 and xg.grad[:, 20:].abs().max() > 0
