"""UpdateNorms' closed forms against the oracle: the actual change of the weights."""

import pytest
import torch
from torch import nn

from signalprop.probe.update import UpdateNorms

# (optimiser factory, method UpdateNorms must pick)
ADAMS = {
    "adamw-wd": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
    "adamw-wd-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1, amsgrad=True),
    "adamw-tiny-wd": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=1e-9),
    "adam-l2": lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.01, amsgrad=True),
    # two groups, one without decay, in one chunk: the mixed-chunk path
    "adamw-groups": lambda ps: torch.optim.AdamW(
        [{"params": ps[::2], "weight_decay": 0.2}, {"params": ps[1::2], "weight_decay": 0.0}],
        lr=0.05),
}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}  # (measured: 1e-15, 6e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(ADAMS))
def test_adam_closed_form_matches_the_weights_actual_change(name, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)
    params = list(model.parameters())
    opt = ADAMS[name](params)
    upd = UpdateNorms(opt, params)
    assert upd.method == "adam"
    upd.limit = 20  # small chunks: tensors cut into pieces, chunks holding several tensors
    x, y = torch.randn(16, 6, dtype=dtype), torch.randint(0, 3, (16,))
    for step in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        upd.before(None)
        w0 = [p.detach().clone() for p in params]
        opt.step()
        upd.advance()
        got = upd.after()
        want = torch.stack([(p.detach() - w).double().norm() for p, w in zip(params, w0, strict=True)])
        assert got.dtype == torch.float64
        assert got.tolist() == pytest.approx(want.tolist(), rel=TOL[dtype], abs=1e-12), (name, step)
