"""stats kernels against direct NumPy computations."""

import math

import numpy as np
import pytest
import torch

from signalprop import stats


def test_moments_match_numpy():
    x = torch.randn(3, 50, 7, dtype=torch.float64)
    mean, std = stats.moments(x)
    ref = x.reshape(3, -1).numpy()
    np.testing.assert_allclose(mean.numpy(), ref.mean(1), rtol=1e-12)
    np.testing.assert_allclose(std.numpy(), ref.std(1), rtol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 17, 1000])
def test_percentiles_exact_match_numpy(n):
    x = torch.randn(4, n, dtype=torch.float64)
    p = stats.percentiles(x, stats.PERCENTILES, max_samples=None)
    ref = np.percentile(x.numpy(), stats.PERCENTILES, axis=1).T
    np.testing.assert_allclose(p.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_percentiles_subsample_close():
    x = torch.randn(2, 100_000, dtype=torch.float64)
    p = stats.percentiles(x, (5, 50, 95), max_samples=4096)
    ref = np.percentile(x.numpy(), (5, 50, 95), axis=1).T
    np.testing.assert_allclose(p.numpy(), ref, atol=0.08)


def test_percentiles_nan_row():
    x = torch.randn(2, 10)
    x[1, 3] = float("nan")
    p = stats.percentiles(x)
    assert torch.isfinite(p[0]).all() and torch.isnan(p[1]).all()


@pytest.mark.parametrize("n", [1, 21, 64])  # 21: the 5th..95th percentiles fall on samples
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_percentiles_infinite_rows(device, n):
    # a row of +inf (an overflowed layer) has every percentile +inf, not NaN (inf * 0 in the
    # interpolation); a row of -inf likewise; finite rows next to it are unaffected
    x = torch.randn(4, n, device=device)
    x[1] = float("inf")
    x[2] = -float("inf")
    x[3, : max(1, n - 3)] = float("inf")  # mostly +inf: low percentiles finite or +inf, none NaN
    p = stats.percentiles(x, stats.PERCENTILES).cpu()
    assert torch.isfinite(p[0]).all()
    assert (p[1] == float("inf")).all() and (p[2] == -float("inf")).all()
    assert not torch.isnan(p[3]).any() and p[3, -1] == float("inf")
    ref = np.percentile(x[0].cpu().double().numpy(), stats.PERCENTILES)
    np.testing.assert_allclose(p[0].double().numpy(), ref, rtol=1e-5, atol=1e-6)


def test_nonfinite_count():
    x = torch.zeros(2, 5)
    x[0, 1] = float("inf")
    x[1, 0] = float("nan")
    x[1, 4] = -float("inf")
    assert stats.nonfinite_count(x).tolist() == [1.0, 2.0]


@pytest.mark.parametrize("kind,fn", [("sigmoid", torch.sigmoid), ("tanh", torch.tanh)])
def test_saturated_fraction_against_autograd(kind, fn):
    z = (torch.randn(3, 2000, dtype=torch.float64) * 4).requires_grad_(True)
    h = fn(z)
    (d,) = torch.autograd.grad(h.sum(), z)
    dmax = stats.SATURATING[kind][2]
    ref = (d.abs() < stats.SATURATION_DERIVATIVE_RATIO * dmax).double().mean(1)
    got = stats.saturated_fraction(h.detach(), kind)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-12)


def test_saturated_fraction_gaussian_from_input():
    z = torch.randn(2, 3000, dtype=torch.float64) * 3
    zz = z.clone().requires_grad_(True)
    (d,) = torch.autograd.grad(torch.exp(-0.5 * zz**2).sum(), zz)
    ref = (d.abs() < 0.1 * np.exp(-0.5)).double().mean(1)
    np.testing.assert_allclose(stats.saturated_fraction(z, "gaussian").numpy(), ref.numpy())


def test_saturated_fraction_unknown_kind():
    with pytest.raises(ValueError, match="valid choices"):
        stats.saturated_fraction(torch.zeros(1, 3), "sigmiod")


def test_dead_fraction():
    h = torch.ones(2, 8, 4)  # [G, B, units]
    h[0, :, 0] = 0.0  # unit 0 of layer 0 dead for the whole batch
    h[0, :4, 1] = 0.0  # unit 1 only partly inactive: alive
    h[1] = 0.0
    assert stats.dead_fraction(h).tolist() == [0.25, 1.0]


def test_norms_and_global_norm():
    ts = [torch.randn(3, 4), torch.randn(5)]
    n = stats.norms(ts)
    np.testing.assert_allclose(n.numpy(), [t.norm().item() for t in ts], rtol=1e-6)
    g = stats.global_norm(ts)
    assert g.item() == pytest.approx(torch.cat([t.flatten() for t in ts]).norm().item(), rel=1e-6)


def test_norms_survive_float32_underflow_and_overflow():
    tiny = torch.full((64, 64), 3e-26)  # squares underflow in float32
    huge = torch.full((8,), 3e20)  # squares overflow in float32
    n = stats.norms([tiny, huge, torch.zeros(3), torch.ones(4)])
    assert n[0].item() == pytest.approx(3e-26 * 64, rel=1e-6)
    assert n[1].item() == pytest.approx(3e20 * 8**0.5, rel=1e-6)
    assert n[2].item() == 0.0 and n[3].item() == pytest.approx(2.0)


def test_rbf_saturation_is_output_below_ratio():
    h = torch.tensor([[1.0, 0.5, 0.05, 0.0]])
    assert stats.saturated_fraction(h, "rbf").item() == pytest.approx(0.5)


def test_probe_module_is_callable_after_import():
    import signalprop
    import signalprop.probe

    model = torch.nn.Linear(2, 2)
    assert isinstance(signalprop.probe(model), signalprop.Probe)


# ---- host (NumPy) kernels: the torch kernels above are their reference --------------------------
def test_host_moments_match_the_torch_kernel_and_numpy():
    torch.manual_seed(0)
    x = torch.randn(6, 256) * torch.tensor([1e-3, 1.0, 30.0, 1.0, 1.0, 1.0]).unsqueeze(1)
    x[3] += 1e4  # |mean| >> std: the shifted one-pass formula
    x[4, 7] = float("nan")
    x[5, 2] = float("inf")
    mean, std = stats.moments_host(x.numpy())
    tm, ts = stats.moments(x)
    ref = x[:4].double().numpy()
    tol = 1e-5 * ref.std(1) + 1e-6 * np.abs(ref.mean(1))  # float32 input: its rounding
    assert (np.abs(mean[:4] - tm[:4].double().numpy()) <= tol).all()
    assert (np.abs(mean[:4] - ref.mean(1)) <= tol).all()
    np.testing.assert_allclose(std[:4], ts[:4].double().numpy(), rtol=1e-4)
    np.testing.assert_allclose(std[:4], ref.std(1), rtol=1e-4)
    assert np.isnan(mean[4]) and np.isnan(std[4]) and not np.isfinite(mean[5])


@pytest.mark.parametrize("n", [1, 21, 256])
def test_host_percentiles_equal_the_kernel_and_numpy(n):
    x = torch.randn(5, n, dtype=torch.float64)
    x[1] = float("inf")
    x[2, 0] = float("nan")
    p = stats.percentiles_host(x.numpy(), stats.PERCENTILES)
    np.testing.assert_array_equal(p, stats.percentiles(x, max_samples=None).numpy())
    ref = np.percentile(x[3:].numpy(), stats.PERCENTILES, axis=1).T
    np.testing.assert_allclose(p[3:], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(k for k in stats.SATURATING if stats.host_saturation(k)))
def test_host_saturated_fraction_equals_the_kernel(kind):
    torch.manual_seed(1)
    h = torch.tanh(torch.randn(4, 512) * 3) if kind != "sigmoid" else torch.sigmoid(
        torch.randn(4, 512) * 5)
    got = stats.saturated_fraction_host(h.numpy(), kind, 0.1)
    np.testing.assert_array_equal(got, stats.saturated_fraction(h, kind, 0.1).double().numpy())
    assert stats.saturated_fraction_host(h.numpy(), "relu") is None  # no output threshold


@pytest.mark.parametrize("n", [1, 2, 21, 256])
def test_order_statistic_percentiles_equal_the_sorted_ones(n):
    # the accelerators' path (kthvalue, no sort's memory), run here on the CPU: the same
    # values as the host kernel, NaN and infinite rows included
    torch.manual_seed(2)
    x = torch.randn(5, n)
    x[1] = float("inf")
    x[2, 0] = float("nan")
    x[3, : max(1, n - 3)] = -float("inf")
    got = stats._percentiles_select(x, stats.PERCENTILES)
    ref = torch.from_numpy(stats.percentiles_host(x.numpy(), stats.PERCENTILES))
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    assert torch.equal(got[ok], ref[ok])


def _axpy_case(case, n, a, dtype, rng):
    d = rng.standard_normal(n)
    w = rng.standard_normal(n)
    if case == "cancel":  # w nearly -d / a: ||d + a w|| ~ 1e-3 ||d||
        w = -d / a + 1e-3 * w / abs(a)
    elif case == "tiny":  # squares underflow (float32: below 1e-38)
        d, w = 1e-25 * d, 1e-26 * w
    elif case == "huge":  # squares overflow
        d, w = 1e25 * d, 1e24 * w
    elif case == "subnormal-w":  # a w's square underflows, d's does not
        w = 1e-30 * w
    d, w = d.astype(dtype), w.astype(dtype)
    if case == "nan":
        d[n // 2] = np.nan
    elif case == "inf":
        w[0] = np.inf
    return d, w


AXPY_CASES = ["plain", "cancel", "tiny", "huge", "subnormal-w", "nan", "inf"]


@pytest.mark.skipif(not stats.HOST_AXPY, reason="needs SciPy's BLAS")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", AXPY_CASES)
def test_axpy_norm_matches_extended_precision(case, dtype, monkeypatch):
    # ||d + a w|| from three BLAS dots (or the direct way where they could lose anything) against
    # the same sum in extended precision: relative 1e-6 (measured ~1e-7 in float32), plus, where
    # the terms cancel, the float rounding of the terms themselves: eps (||d|| + |a| ||w||)
    rng = np.random.default_rng(0)
    axpy = stats.HOST_AXPY[torch.float32 if dtype == np.float32 else torch.float64]
    eps = float(np.finfo(dtype).eps)
    for n in (1, 1000, stats.DOT_PIECE):
        for a in (0.0, 0.01, -3.0, 1e3):
            if case == "cancel" and not a:
                continue
            d, w = _axpy_case(case, n, a, dtype, rng)
            tmp = np.full(n, np.nan, dtype)
            with np.errstate(all="ignore"):
                got = axpy(d, w, a, tmp)
                x, mag = d.astype(np.longdouble), float(np.linalg.norm(d.astype(np.longdouble)))
                if a:  # (a = 0: w takes no part, as Adam without decay ignores W)
                    x = x + np.longdouble(a) * w.astype(np.longdouble)
                    mag += abs(a) * float(np.linalg.norm(w.astype(np.longdouble)))
                want = float(np.sqrt(np.sum(x * x)))
            if not math.isfinite(want):
                assert got == want or (math.isnan(got) and math.isnan(want)), (case, n, a)
            else:
                assert abs(got - want) <= 1e-6 * want + eps * mag, (case, n, a, got, want)
    if case == "cancel" and dtype == np.float32:
        # without the cancellation guard the three dots alone are far off: the guard is needed
        monkeypatch.setattr(stats, "AXPY_CANCEL", math.inf)
        d, w = _axpy_case(case, stats.DOT_PIECE, 0.01, dtype, rng)
        got = axpy(d, w, 0.01, np.empty_like(d))
        x = d.astype(np.float64) + 0.01 * w.astype(np.float64)
        want, mag = float(np.linalg.norm(x)), float(np.linalg.norm(d) + 0.01 * np.linalg.norm(w))
        assert abs(got - want) > 1e-6 * want + eps * mag
