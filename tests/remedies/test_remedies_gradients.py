"""Gradient transforms: clipping invariants (property tests), AGC against a direct reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from signalprop.remedies.gradients import (
    GRAD_TRANSFORMS,
    adaptive_clip,
    add_decayed_weights,
    chain,
    clip_by_global_norm,
    clip_by_value,
    gradient_context,
)


def _params_with_grads(shapes, scale: float, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True)
        p.grad = torch.randn(*s, generator=g, dtype=torch.float64) * scale
        ps.append(p)
    return ps


def _global(ps) -> float:
    return float(np.sqrt(sum(float((p.grad**2).sum()) for p in ps)))


shapes_st = st.lists(
    st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple), min_size=1, max_size=5
)


@settings(max_examples=60, deadline=None)
@given(
    shapes=shapes_st,
    scale=st.floats(1e-4, 1e4),
    max_norm=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_clip_by_global_norm_property(shapes, scale, max_norm, seed) -> None:
    ps = _params_with_grads(shapes, scale, seed)
    before = _global(ps)
    old = [p.grad.clone() for p in ps]
    t = clip_by_global_norm(max_norm)
    t(ps)
    after = _global(ps)
    if before > max_norm:
        assert after == pytest.approx(max_norm, rel=1e-6)
        # direction unchanged: every gradient scaled by the same factor
        for o, p in zip(old, ps, strict=True):
            torch.testing.assert_close(p.grad, o * (max_norm / before), rtol=1e-6, atol=0)
    else:
        assert after == pytest.approx(before, rel=1e-12)
    s = t.stats()
    assert s["norm_before"] == pytest.approx(before, rel=1e-5)
    assert s["norm_after"] == pytest.approx(after, rel=1e-5)


@settings(max_examples=40, deadline=None)
@given(shapes=shapes_st, scale=st.floats(1e-3, 1e3), c=st.floats(1e-3, 10), seed=st.integers(0, 999))
def test_clip_by_value_property(shapes, scale, c, seed) -> None:
    ps = _params_with_grads(shapes, scale, seed)
    old = [p.grad.clone() for p in ps]
    clip_by_value(c)(ps)
    for o, p in zip(old, ps, strict=True):
        assert float(p.grad.abs().max()) <= c
        torch.testing.assert_close(p.grad, o.clamp(-c, c))


def test_clip_leaves_nonfinite_alone() -> None:
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.tensor([1.0, float("inf"), 2.0])
    clip_by_global_norm(1.0)(p)
    assert torch.isinf(p.grad[1])  # the trainer sees and reports the divergence


def _agc_reference(w: np.ndarray, g: np.ndarray, lam: float, eps: float) -> np.ndarray:
    """Brock et al. 2021 eq. 3, written directly with NumPy (units = rows; vectors whole)."""
    if w.ndim <= 1:
        wn = max(np.linalg.norm(w), eps)
        gn = np.linalg.norm(g)
        return g * (lam * wn / max(gn, 1e-6)) if gn / wn > lam else g
    out = g.copy()
    for i in range(w.shape[0]):
        wn = max(np.linalg.norm(w[i]), eps)
        gn = np.linalg.norm(g[i])
        if gn / wn > lam:
            out[i] = g[i] * (lam * wn / max(gn, 1e-6))
    return out


@pytest.mark.parametrize("lam", [0.01, 0.1])
def test_agc_matches_reference_and_bounds_unit_ratios(lam: float) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Conv1d(4, 5, 3), nn.Linear(20, 3))
    model = model.double()
    # gradients of mixed sizes: some units far above the threshold, some below
    for p in model.parameters():
        scale = torch.logspace(-5, 0, p.shape[0], dtype=torch.float64)
        p.grad = torch.randn_like(p) * scale.reshape(-1, *([1] * (p.dim() - 1)))
    with torch.no_grad():
        model[0].weight[0].zero_()  # a zero unit: eps floor applies
    ref = {n: _agc_reference(p.detach().numpy(), p.grad.numpy(), lam, 1e-3)
           for n, p in model.named_parameters()}
    final_before = [p.grad.clone() for p in model[3].parameters()]
    t = adaptive_clip(lam)
    t(model)
    for n, p in model.named_parameters():
        if n.startswith("3."):
            continue
        np.testing.assert_allclose(p.grad.numpy(), ref[n], rtol=1e-12, atol=1e-15)
        # every unit's ratio ||G_i|| / max(||W_i||, eps) is at most lambda afterwards
        if p.dim() >= 2:
            gn = p.grad.flatten(1).norm(dim=1)
            wn = p.detach().flatten(1).norm(dim=1).clamp_min(1e-3)
            assert float((gn / wn).max()) <= lam * (1 + 1e-9)
    # the final layer is excluded
    for b, p in zip(final_before, model[3].parameters(), strict=True):
        torch.testing.assert_close(p.grad, b, rtol=0, atol=0)
    # something was actually clipped and something was not
    w0 = model[0].weight
    ratios = w0.grad.norm(dim=1) / w0.detach().norm(dim=1).clamp_min(1e-3)
    assert float(ratios.max()) == pytest.approx(lam, rel=1e-9)
    assert float(ratios.min()) < lam / 2


def test_agc_on_parameter_list_excludes_last_matrix() -> None:
    w1, b1, w2, b2 = (torch.ones(3, 3, requires_grad=True), torch.ones(3, requires_grad=True),
                      torch.ones(2, 3, requires_grad=True), torch.ones(2, requires_grad=True))
    for p in (w1, b1, w2, b2):
        p.grad = torch.full_like(p, 100.0)
    ctx = gradient_context([w1, b1, w2, b2])
    assert ctx.final == [False, False, True, True]
    adaptive_clip(0.01)([w1, b1, w2, b2])
    assert float(w1.grad.norm(dim=1).max()) == pytest.approx(0.01 * 3**0.5, rel=1e-5)
    assert float(w2.grad.max()) == 100.0


def test_chain_applies_in_order_and_records_norms() -> None:
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.tensor([3.0, -4.0, 0.0, 0.0])
    t = chain(clip_by_value(2.0), clip_by_global_norm(1.0))
    t(p)
    # value clip first: [2, -2, 0, 0] (norm 2.83), then rescaled to norm 1
    torch.testing.assert_close(p.grad, torch.tensor([2.0, -2.0, 0.0, 0.0]) / 8**0.5)
    s = t.stats()
    assert s["norm_before"] == pytest.approx(5.0)
    assert s["norm_after"] == pytest.approx(1.0)
    assert t.transforms[0].stats()["norm_after"] == pytest.approx(8**0.5)
    # nested chains flatten; non-transforms are refused
    assert len(chain(t, clip_by_value(1.0)).transforms) == 3
    with pytest.raises(TypeError):
        chain(lambda g: g)


def test_weight_decay_adds_scaled_weights_to_matrices_only() -> None:
    lin = nn.Linear(3, 2)
    for p in lin.parameters():
        p.grad = torch.zeros_like(p)
    add_decayed_weights(0.1).apply(lin)
    torch.testing.assert_close(lin.weight.grad, 0.1 * lin.weight.detach())
    assert float(lin.bias.grad.abs().max()) == 0.0


def test_works_with_any_optimizer_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    t = chain(adaptive_clip(), clip_by_global_norm(0.5))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 5)).pow(2).mean().backward()
        t(model)
        assert t.stats()["norm_after"] <= 0.5 + 1e-6
        opt.step()
    assert t.calls == 3


def test_registry_and_bad_hparams() -> None:
    assert set(GRAD_TRANSFORMS.names()) == {"clip_by_global_norm", "clip_by_value",
                                            "adaptive_clip", "add_decayed_weights"}
    assert GRAD_TRANSFORMS.build("adaptive_clip").clipping == 0.01
    with pytest.raises(ValueError, match="max_norm"):
        clip_by_global_norm(0.0)
    with pytest.raises(ValueError, match="valid choices"):
        GRAD_TRANSFORMS.get("clip_norms")
