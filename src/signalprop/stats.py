"""Pure tensor -> number kernels shared by the probe, the batched engine and the tests.

Every kernel works on a *batch of layers at once*: the leading dimension of the input indexes
independent tensors (layers of one shape, or members of a population), so a probe can compute the
statistics of many layers with a handful of tensor ops instead of a Python loop per layer.
All kernels return tensors on the input's device; callers move results to the CPU once.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from signalprop._registry import unknown_name_message
from signalprop.vocab.activations import ACTIVATIONS

#: Percentiles recorded for every layer output (in percent).
PERCENTILES: tuple[float, ...] = (5.0, 15.0, 50.0, 85.0, 95.0)

#: A unit is *saturated* when its local derivative |phi'(z)| is below this fraction of the
#: activation's largest derivative (0.1: sigmoid |z| > 3.64, tanh |z| > 1.82).
SATURATION_DERIVATIVE_RATIO: float = 0.1

#: Percentiles are estimated from at most this many values per tensor (a fixed strided
#: subsample; exact when the tensor is smaller). Sorting every element of every layer on every
#: step would dominate the cost of a probed step (standard error of the 5th percentile of a
#: Gaussian from 1024 samples: about 0.07 standard deviations).
MAX_PERCENTILE_SAMPLES: int = 1024

#: Forward statistics of a layer's output (moments, percentiles, saturated fraction, NaN/Inf
#: count) are computed on a fixed strided sample of at most this many of its values (the whole
#: output when it is smaller): 256 values at a stride of ceil(numel / 256), bumped to be coprime
#: with numel (so with the row length too) so the sample spreads over units and examples; the
#: positions wrap around modulo numel, so every output of at least 256 values gives exactly 256
#: and the samples of all layers stack into one batch for the statistics. The probe copies the sample in the
#: forward hook, so it keeps 1 KiB per layer alive through backward instead of the output
#: (memory: under 5% of the weights of a 20 x 128 MLP at batch 128). Standard error of a
#: Gaussian output's std from 256 values: about 4.4%; of its 5th percentile: about 0.13 std.
#: Dead fractions always use the whole batch (one active example keeps a unit alive).
MAX_FORWARD_SAMPLES: int = 256


def percentile_key(q: float) -> str:
    """Metric name of a percentile: 5 -> ``out_p05``."""
    return f"out_p{int(round(q)):02d}"


def flat_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` of shape [G, ...] as [G, N] in float32 (or float64 if already)."""
    x = x.reshape(x.shape[0], -1)
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) standard deviation of each row of a [G, ...] tensor.

    Computed from the sum and the sum of squares of values shifted by the row's first value
    (shifting keeps the one-pass formula accurate when |mean| >> std); on the CPU this is about
    30x faster than ``torch.var_mean``. Non-finite values propagate (a NaN layer has a NaN mean),
    which is what a diagnosis wants.

    Returns:
        (mean [G], std [G])
    """
    x = flat_rows(x)
    if x.device.type != "cpu":
        # an accelerator: one fused launch and no [G, N] temporary (Welford in the kernel),
        # where the formula below costs ~12 launches; on the CPU var_mean is ~30x slower
        var, mean = torch.var_mean(x, dim=1, correction=0)
        return mean, var.sqrt()
    n = x.shape[1]
    shift = x[:, :1]
    d = x - shift
    s1 = d.sum(dim=1)
    s2 = torch.linalg.vector_norm(d, dim=1).square()
    m = s1 / n
    var = (s2 / n - m * m).clamp_min(0)
    return m + shift[:, 0], var.sqrt()


def nonfinite_count(x: torch.Tensor) -> torch.Tensor:
    """Number of NaN/Inf entries in each row of a [G, ...] tensor. Returns [G] (float)."""
    x = flat_rows(x)
    return (~torch.isfinite(x)).sum(dim=1).to(x.dtype)


def subsample_index(n: int, max_samples: int = MAX_PERCENTILE_SAMPLES) -> slice:
    """A deterministic strided subsample of ``n`` items with at most ``max_samples`` items."""
    if n <= max_samples:
        return slice(None)
    step = math.ceil(n / max_samples)
    return slice(0, n, step)


def percentiles(
    x: torch.Tensor,
    qs: Sequence[float] = PERCENTILES,
    max_samples: int | None = MAX_PERCENTILE_SAMPLES,
) -> torch.Tensor:
    """Percentiles (linear interpolation, as ``numpy.percentile``) of each row of [G, ...].

    Args:
        x: Tensor [G, ...].
        qs: Percentiles in [0, 100].
        max_samples: Estimate from a strided subsample of this many values per row (``None``:
            all values, exact).

    Returns:
        Tensor [G, len(qs)]. Rows containing NaN give NaN; a percentile between two equal
        values is that value (a row of +inf gives +inf, where ``numpy.percentile`` gives NaN).
    """
    x = flat_rows(x)
    if max_samples is not None:
        x = x[:, subsample_index(x.shape[1], max_samples)]
    # On the CPU one NumPy sort per group (quantile() would re-sort for every q; NumPy's SIMD
    # sort is ~50x faster than torch.sort for these sizes, and the interpolation in NumPy costs a
    # quarter of the same ops in torch); elsewhere order statistics without a sort's memory
    if x.device.type == "cpu":
        return torch.from_numpy(percentiles_host(x.detach().numpy(), qs))
    return _percentiles_select(x, qs)


def _percentiles_select(x: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """:func:`percentiles` of each row of a [G, N] tensor from order statistics picked by
    ``torch.kthvalue`` (at most two per percentile), not a sort: a sort's values and int64
    indices would add 12 bytes per value to the peak memory of a recorded step on an
    accelerator. The interpolation positions come from the host (no device read)."""
    n = x.shape[1]
    dt = np.dtype(_NP_DTYPES.get(x.dtype, "float64")).str
    lo, hi, w = _interp(n, tuple(float(q) for q in qs), dt)
    ks = sorted({int(k) for k in (*lo, *hi)})
    order = {k: torch.kthvalue(x, k + 1, dim=1).values for k in ks}  # (k-th smallest, 1-based)
    s_lo = torch.stack([order[int(k)] for k in lo], dim=1)
    s_hi = torch.stack([order[int(k)] for k in hi], dim=1)
    wt = torch.from_numpy(w.astype(np.float64)).to(x.dtype)
    wt = wt.to(x.device, non_blocking=True).unsqueeze(0)  # a copy that does not wait
    out = torch.where(s_lo == s_hi, s_lo, s_lo * (1 - wt) + s_hi * wt)  # (+inf rows: not NaN)
    has_nan = torch.isnan(x).any(dim=1, keepdim=True)
    return torch.where(has_nan, torch.full_like(out, float("nan")), out)


#: NumPy names of the float dtypes (the interpolation weights are computed in the input's dtype)
_NP_DTYPES = {torch.float16: "float16", torch.float32: "float32", torch.float64: "float64"}


# --- host (NumPy) kernels ----------------------------------------------------------------------
# The same statistics on a [G, N] NumPy array: on the CPU a probe's recorded step is bound by
# per-operation dispatch (each torch op costs ~3 us alone, ~10 us inside a training step whose
# matmuls have evicted the caches), and NumPy's ops on these small arrays cost a fraction of it.

@functools.lru_cache(maxsize=64)
def _interp(n: int, qs: tuple[float, ...], dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = np.asarray([v / 100.0 for v in qs], dtype=dtype) * (n - 1)
    lo = np.clip(np.floor(pos).astype(np.int64), 0, n - 1)
    hi = np.clip(np.ceil(pos).astype(np.int64), 0, n - 1)
    return lo, hi, pos - lo.astype(dtype)


def percentiles_host(a: np.ndarray, qs: Sequence[float] = PERCENTILES) -> np.ndarray:
    """:func:`percentiles` of each row of a [G, N] NumPy array (all N values; same rules for
    NaN and infinite rows). Returns [G, len(qs)] in ``a``'s dtype."""
    a = np.sort(a, axis=1)
    lo, hi, w = _interp(a.shape[1], tuple(float(q) for q in qs), a.dtype.str)
    a_lo, a_hi = a[:, lo], a[:, hi]
    with np.errstate(invalid="ignore"):  # inf * 0 below: replaced by the equal neighbour
        res = a_lo * (1 - w) + a_hi * w
    # equal neighbours (a row of +inf: inf * 0 = NaN in the interpolation) are the value
    res = np.where(a_lo == a_hi, a_lo, res)
    res[np.isnan(a[:, -1])] = np.nan  # a row holding NaN has it last
    return res


def moments_host(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`moments` of each row of a [G, N] NumPy array (same shifted one-pass formula,
    sums accumulated in float64). Returns (mean [G], std [G]) in float64."""
    n = a.shape[1]
    shift = a[:, :1].astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf propagate, as in moments()
        d = a - a[:, :1]
        m = np.add.reduce(d, axis=1, dtype=np.float64) / n
        s2 = np.add.reduce(np.square(d, out=d), axis=1, dtype=np.float64) / n
        var = np.maximum(s2 - m * m, 0.0)
    return m + shift[:, 0], np.sqrt(var)


def host_saturation(kind: str) -> bool:
    """Whether :func:`saturated_fraction_host` measures ``kind`` (a threshold on the output)."""
    return kind in _OUTPUT_THRESHOLDS and kind in SATURATING and SATURATING[kind][0]


def saturated_fraction_host(a: np.ndarray, kind: str, ratio: float = SATURATION_DERIVATIVE_RATIO
                            ) -> np.ndarray | None:
    """:func:`saturated_fraction` of each row of a [G, N] NumPy array of outputs, for the
    kinds whose rule is a threshold on the output (``None`` for the others)."""
    if not host_saturation(kind):
        return None
    center, c = _OUTPUT_THRESHOLDS[kind](ratio)
    dev = np.abs(a - center) if center else np.abs(a)
    return np.count_nonzero(dev > c, axis=1) / a.shape[1]


# --- activation derivatives -------------------------------------------------------------------
# |phi'| as a function of the activation's *output* h where that is possible (no recomputation),
# else of its input z: the saturation face of each activation in the vocabulary.
DerivFn = Callable[[torch.Tensor], torch.Tensor]

#: name -> (uses_output, |phi'| function, max |phi'|): a view of the vocabulary's saturation rules,
#: plus the RBF unit h = exp(-u / (2 s^2)) of the squared distance u (a layer, not an element-wise
#: activation): dh/du = -h / (2 s^2), so the derivative relative to its maximum (u = 0) is h itself
SATURATING: dict[str, tuple[bool, DerivFn, float]] = {
    **{n: (d.saturation.uses_output, d.saturation.derivative, d.saturation.dmax)
       for n, d in ((n, ACTIVATIONS.get(n)) for n in ACTIVATIONS) if d.saturation is not None},
    "rbf": (True, lambda h: h.abs(), 1.0),
}

#: Saturation as a threshold on the output: kind -> ratio -> (center, c) (the vocabulary's).
_OUTPUT_THRESHOLDS: dict[str, Callable[[float], tuple[float, float]]] = {
    n: d.saturation.output_threshold for n, d in ((n, ACTIVATIONS.get(n)) for n in ACTIVATIONS)
    if d.saturation is not None and d.saturation.output_threshold is not None
}

#: Activations whose units can die (zero output and zero derivative for all inputs of a batch).
RECTIFIERS: frozenset[str] = frozenset(n for n in ACTIVATIONS if ACTIVATIONS.get(n).rectifier)


def saturated_fraction(
    t: torch.Tensor,
    kind: str,
    ratio: float = SATURATION_DERIVATIVE_RATIO,
) -> torch.Tensor:
    """Fraction of entries whose |phi'| < ratio * max|phi'|, for each row of [G, ...].

    Args:
        t: The activation's output h (if ``SATURATING[kind][0]``) or input z, shape [G, ...].
        kind: A key of :data:`SATURATING`.
        ratio: Threshold relative to the largest derivative.

    Returns:
        Tensor [G] in [0, 1].
    """
    if kind not in SATURATING:
        raise ValueError(unknown_name_message("saturating activation", kind, sorted(SATURATING)))
    _, fn, dmax = SATURATING[kind]
    t = flat_rows(t)
    fast = _OUTPUT_THRESHOLDS.get(kind)  # the vocabulary's rule as a threshold on the output
    if fast is not None:
        # |phi'| < r * max|phi'|  <=>  |h - center| > c(r): one comparison instead of the
        # derivative (same set of entries; checked against autograd in the tests)
        center, c = fast(ratio)
        dev = (t - center).abs() if center else t.abs()
        return (dev > c).sum(dim=1).to(t.dtype) / t.shape[1]
    d = fn(t)
    return (d < ratio * dmax).to(d.dtype).mean(dim=1)


def dead_fraction(h: torch.Tensor, batch_dim: int = 1) -> torch.Tensor:
    """Fraction of units that are inactive (output <= 0) for *every* example of the batch.

    Args:
        h: Rectifier outputs, shape [G, B, units...] (``batch_dim`` = 1) where G indexes layers.
            Conv feature maps [G, B, C, H, W] count each (channel, position) as a unit.
        batch_dim: Which dimension is the batch.

    Returns:
        Tensor [G] in [0, 1].
    """
    active = (h > 0).any(dim=batch_dim)
    active = active.reshape(active.shape[0], -1)
    return 1.0 - active.float().mean(dim=1)


def norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each tensor, computed in one fused call. Returns [len(tensors)] (float64).

    ``torch._foreach_norm`` squares in the tensor's dtype, so a float32 gradient with entries
    around 1e-26 (a 30-layer sigmoid net's first layer) gets norm 0, and entries above ~1e19 get
    norm inf. Those are exactly the numbers a vanishing/exploding diagnosis needs, so norms that
    come out zero, subnormal or infinite are recomputed in float64 (a rare path: healthy layers
    pay nothing). The result is float64 so that tiny norms survive.
    """
    if len(tensors) == 0:
        return torch.zeros(0, dtype=torch.float64)
    tensors = list(tensors)
    raw = torch._foreach_norm(tensors)
    if all(o.dtype == raw[0].dtype for o in raw):
        out = torch.stack(raw).to(torch.float64)  # one op instead of one per tensor
    else:
        out = torch.stack([o.to(torch.float64) for o in raw])
    suspect = (out < _RECHECK_BELOW) | torch.isinf(out)
    if bool(suspect.any()):
        for i in torch.nonzero(suspect).flatten().tolist():
            t = tensors[i]
            if t.dtype != torch.float64 and t.is_floating_point():
                out[i] = torch.linalg.vector_norm(t.to(torch.float64))
    return out


#: float32 norms below this (around the square root of the smallest normal float32) may have
#: lost precision or underflowed while squaring.
_RECHECK_BELOW = 1e-18


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """sqrt(sum ||t||^2) over tensors (the norm clip_grad_norm_ uses). Scalar tensor."""
    n = norms(tensors)
    return n.square().sum().sqrt() if n.numel() else torch.zeros(())


# --- summary numbers of a training run ----------------------------------------------------------
# One definition each, used by ``fit``'s result, the trials, the doctor and the lab. They read a
# ``signalprop.record.Record`` (duck-typed: this module stays free of package imports).

#: Losses averaged for a run's final loss.
FINAL_LOSS_WINDOW: int = 10

#: A loss must be at least this fraction below the trivial baseline to count as beating it.
TRIVIAL_MARGIN: float = 0.02


#: Elements of the largest piece :func:`norm64` converts to float64 at once where no fused
#: kernel reads float32 directly (the CPU without BLAS, other accelerators).
NORM64_CHUNK: int = 1 << 11
#: ... in at most this many pieces (each a reduction: time against the pieces' memory).
NORM64_PIECES: int = 8


def dense_values(t: torch.Tensor) -> torch.Tensor:
    """The stored values of a sparse tensor (COO coalesced first: duplicate indices sum), whose
    norm and NaN/Inf count are the dense tensor's; any other tensor as it is. Sparse gradients
    come from ``nn.Embedding(sparse=True)`` and ``nn.EmbeddingBag(sparse=True)``."""
    if t.layout is torch.sparse_coo:
        return t.coalesce().values()
    if t.layout in (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
        return t.values()
    return t


def norm64(g: torch.Tensor) -> torch.Tensor:
    """||g|| accumulated in float64 (no underflow of tiny squares) as a 0-dim float64 tensor,
    with no host read and no float64 copy of ``g``.

    ``torch.linalg.vector_norm(g, dtype=torch.float64)`` converts the whole of a float32 ``g``
    to float64 first: a temporary twice g's size, alive inside backward where a step's memory
    peaks. On CUDA the fused ``torch._foreach_norm`` reads a contiguous float32 ``g`` as it is
    and accumulates in float64 (no copy; other CUDA gradients as before); elsewhere ``g`` is
    reduced in pieces of at most :data:`NORM64_CHUNK` elements (at most :data:`NORM64_PIECES`
    pieces), so only a piece is copied at a time.
    """
    if g.is_complex():  # (|z|^2 = re^2 + im^2: the norm of its real view)
        return norm64(torch.view_as_real(g))
    if g.is_cuda:
        if g.dtype == torch.float32 and g.is_contiguous() and not g.requires_grad:
            # (the combination ``device_norms`` uses for parameters, measured on an H100)
            return torch._foreach_norm([g], 2, dtype=torch.float64)[0]
        return torch.linalg.vector_norm(g, dtype=torch.float64)  # (half precision: as before)
    if g.dtype == torch.float64 or not g.is_floating_point() or g.numel() <= NORM64_CHUNK:
        return torch.linalg.vector_norm(g, dtype=torch.float64)
    flat = g.reshape(-1)
    parts = flat.split(max(NORM64_CHUNK, -(-flat.numel() // NORM64_PIECES)))
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(parts, 2, dtype=torch.float64)))


# --- CPU norms (the probe's gradient hooks, Adam's closed form) ------------------------------
def _host_norms() -> dict[torch.dtype, Callable[[np.ndarray], float]]:
    try:
        from scipy.linalg import blas
    except ImportError:
        return {}
    return {torch.float32: dot_norm(blas.sdot, blas.snrm2, np.finfo(np.float32).tiny),
            torch.float64: dot_norm(blas.ddot, blas.dnrm2, np.finfo(np.float64).tiny)}


#: Values per BLAS dot in the CPU gradient norm: one float32 dot's relative error grows with
#: length (6e-8 at 2^18 values, 8e-7 at 2^20, 4e-5 at 2^24; nrm2 ~3e-8 at any length).
DOT_PIECE: int = 1 << 16


def dot_norm(dot: Callable[[np.ndarray, np.ndarray], float],
              nrm2: Callable[[np.ndarray], float], tiny: float) -> Callable[[np.ndarray], float]:
    """||a|| from BLAS dots over pieces of :data:`DOT_PIECE` values summed in double precision
    (16k float32 values: ~1 us against ~4 us for nrm2; long arrays: no slower), else nrm2
    where squares could have lost anything: a sum below ``1e9 * n * tiny`` (each underflowed
    square loses at most ``tiny``) or not finite (overflow, NaN, Inf). Relative error ~1e-7."""
    floor = 1e9 * float(tiny)
    k = DOT_PIECE

    def norm(a: np.ndarray) -> float:
        n = a.shape[0]
        if n == 0:  # (BLAS rejects empty arrays: an empty batch's gradient)
            return 0.0
        if n <= k:
            ss = float(dot(a, a))
        else:
            ss = math.fsum(dot(p, p) for p in (a[i:i + k] for i in range(0, n, k)))
        if floor * n <= ss < math.inf:
            return math.sqrt(ss)
        return float(nrm2(a))

    return norm


#: CPU norms of 1-D NumPy arrays by torch dtype (:func:`dot_norm`; empty without SciPy, and
#: then the CPU takes the accelerators' path, :func:`norm64`).
HOST_NORMS: dict[torch.dtype, Callable[[np.ndarray], float]] = _host_norms()

_PTR, _SHAPE = torch.Tensor.data_ptr, operator.attrgetter("shape")
_DTYPE, _LAYOUT = operator.attrgetter("dtype"), operator.attrgetter("layout")
_REQ, _CPU = operator.attrgetter("requires_grad"), operator.attrgetter("is_cpu")


def host_norms(tensors: Sequence[torch.Tensor]) -> list[float] | None:
    """L2 norms of CPU tensors as host floats (float64) from :data:`HOST_NORMS` on NumPy
    views, without torch's per-tensor dispatch (``torch._foreach_norm`` on the CPU: ~1.5-3 us
    per tensor, most of a transformer's tensors are biases and norms of a few hundred values);
    NaN/Inf where a tensor holds them, exact where float32 squares would under- or overflow.
    ``None`` unless every tensor is a dense, contiguous, plain CPU tensor of a dtype in
    :data:`HOST_NORMS` that does not require grad: the caller takes the torch path. (Small
    tensors taken together, one concatenation and float64 squares, cost as much inside a
    training step, where every tensor touched is a cache miss: measured, not done.)"""
    if not tensors or not tensors[0].is_cpu or not HOST_NORMS or not all(map(_CPU, tensors)) \
            or set(map(type, tensors)) != {torch.Tensor} or any(map(_REQ, tensors)) \
            or set(map(_LAYOUT, tensors)) != {torch.strided} \
            or not all(map(torch.Tensor.is_contiguous, tensors)):
        return None
    if not set(map(_DTYPE, tensors)) <= HOST_NORMS.keys():
        return None
    return [HOST_NORMS[t.dtype](t.numpy().reshape(-1)) for t in tensors]  # (empty: 0.0)


class HostNorms:
    """:func:`host_norms` of a fixed list of CPU parameters (``ok``: all of them dense,
    contiguous, plain or ``nn.Parameter``, of a dtype in :data:`HOST_NORMS`), on NumPy views
    made once. ``load_state_dict`` copies into the same memory; a parameter whose memory or
    shape changes (``.data`` replaced, ``.to()``) needs a new plan: :meth:`of`."""

    __slots__ = ("key", "ok", "calls")

    def __init__(self, params: Sequence[torch.Tensor], key: tuple[Any, ...]) -> None:
        self.key = key
        self.ok = bool(params) and all(
            type(p) in (torch.Tensor, torch.nn.Parameter) and p.layout == torch.strided
            and p.is_cpu and p.dtype in HOST_NORMS and p.is_contiguous() and not p.is_neg()
            for p in params)
        # (the views keep the parameters' memory alive: no address in ``key`` is reused)
        self.calls = [(HOST_NORMS[p.dtype], p.detach().numpy().reshape(-1)) if p.numel()
                      else (_zero, None) for p in params] if self.ok else []

    @classmethod
    def of(cls, params: Sequence[torch.Tensor], old: HostNorms | None) -> HostNorms:
        """The plan for ``params``: ``old`` while their memory and shapes are those it was
        made for (two reads per parameter), else a new one."""
        key = (tuple(map(_PTR, params)), tuple(map(_SHAPE, params)))
        return old if old is not None and old.key == key else cls(params, key)

    def weights(self) -> list[float]:
        """||W|| of every parameter, in order."""
        return [nrm(v) for nrm, v in self.calls]


def _zero(a: Any) -> float:
    return 0.0  # (BLAS rejects empty arrays)


#: :func:`axpy_norm` keeps its dots while ``(||d|| + |a| ||w||)^2 <= AXPY_CANCEL ||d + a w||^2``:
#: a dot's relative error ``delta`` (float32, :data:`DOT_PIECE` values: ~1e-7, against the sum of
#: its products' magnitudes) then moves the norm by at most ``AXPY_CANCEL * delta / 2``.
AXPY_CANCEL: float = 4.0
_Axpy = Callable[[np.ndarray, np.ndarray, float, np.ndarray], float]


def axpy_norm(dot: Callable[[np.ndarray, np.ndarray], float], norm: Callable[[np.ndarray], float],
              tiny: float) -> _Axpy:
    """``||d + a w||`` of 1-D arrays of at most :data:`DOT_PIECE` values: ``||d||^2 + 2 a <d, w>
    + a^2 ||w||^2`` by BLAS dots summed in double; where they could have lost anything (terms
    cancelling past :data:`AXPY_CANCEL`, a sum below ``1e9 n (1 + |a|)^2 tiny``, not finite)
    ``norm`` (a :func:`dot_norm`) of ``a w + d`` formed in ``tmp`` (at least as long as ``d``)."""
    floor = 1e9 * float(tiny)

    def axpy(d: np.ndarray, w: np.ndarray, a: float, tmp: np.ndarray) -> float:
        n = d.shape[0]
        dd = float(dot(d, d))
        if not a:
            return math.sqrt(dd) if floor * n <= dd < math.inf else norm(d)
        aww = a * a * float(dot(w, w))
        ss = dd + 2.0 * a * float(dot(d, w)) + aww
        top = dd + aww + 2.0 * math.sqrt(dd * aww)  # (||d|| + |a| ||w||)^2
        if top <= AXPY_CANCEL * ss and floor * n * (1.0 + abs(a)) ** 2 <= ss and top < math.inf:
            return math.sqrt(ss)
        t = np.multiply(w, a, out=tmp[:n])
        return norm(np.add(t, d, out=t))

    return axpy


def _host_axpy() -> dict[torch.dtype, _Axpy]:
    if not HOST_NORMS:  # (no SciPy)
        return {}
    from scipy.linalg import blas
    return {t: axpy_norm(dot, HOST_NORMS[t], np.finfo(f).tiny) for t, dot, f in (
        (torch.float32, blas.sdot, np.float32), (torch.float64, blas.ddot, np.float64))}


#: CPU ``||d + a w||`` of 1-D NumPy arrays by torch dtype (:func:`axpy_norm`; empty without SciPy).
HOST_AXPY: dict[torch.dtype, _Axpy] = _host_axpy()


def final_loss(losses: Sequence[float], window: int = FINAL_LOSS_WINDOW) -> float:
    """Mean of the last ``min(window, len(losses))`` losses (NaN when empty or non-finite)."""
    if not losses:
        return math.nan
    tail = list(losses)[-window:]
    return float(sum(tail) / len(tail))


def _weight_params(record: object) -> list[str]:
    """Parameters with >= 2 dimensions that have gradient norms, in forward order."""
    names = record.layer_names(role="param", metric="grad_norm")  # type: ignore[attr-defined]
    layers = record.layers  # type: ignore[attr-defined]
    ws = [n for n in names if layers[n].shape is not None and len(layers[n].shape or []) >= 2]
    order = sorted(range(len(ws)), key=lambda i: (layers[ws[i]].depth, i))
    return [ws[i] for i in order]


def _grad_step(record: object, ws: list[str], step: int | str) -> int | None:
    steps = record.steps  # type: ignore[attr-defined]
    if not steps:
        return None
    if isinstance(step, int):
        return step
    data = record.data  # type: ignore[attr-defined]
    with_grads = [s for s in steps if any("grad_norm" in data[s].get(n, {}) for n in ws)]
    pool = with_grads or steps
    return pool[0] if step == "first" else pool[-1]


def grad_ratio(record: object, step: int | str = "last") -> float:
    """||dL/dW|| of the weight matrix nearest the input over that of the one nearest the loss
    (the output head included), at one recorded step.

    ``< 1``: gradients vanish towards the input; ``> 1``: they explode there. ``0`` when the
    first layer's gradient is exactly 0 and the last one's is not (a real outcome: underflow);
    NaN with fewer than two weight matrices, or when the last one's gradient is 0 or non-finite.

    Args:
        record: A probe record.
        step: ``"last"`` / ``"first"`` recorded step that has gradients, or a step number.
    """
    ws = _weight_params(record)
    s = _grad_step(record, ws, step)
    if len(ws) < 2 or s is None:
        return math.nan
    g0 = record.get(s, ws[0], "grad_norm")  # type: ignore[attr-defined]
    g1 = record.get(s, ws[-1], "grad_norm")  # type: ignore[attr-defined]
    if math.isfinite(g0) and math.isfinite(g1) and g1 > 0:
        return g0 / g1
    return math.nan


def layer_mean(record: object, metric: str, step: int | str = "last") -> float:
    """Mean over layers of a per-layer ``metric`` (e.g. ``saturated_frac``, ``dead_frac``) at
    one recorded step (``"last"``/``"first"`` with gradients, or a number); NaN when absent."""
    ws = _weight_params(record)
    s = _grad_step(record, ws, step)
    if s is None:
        return math.nan
    vals = [v for v in record.at(s, metric).values() if math.isfinite(v)]  # type: ignore
    return float(np.mean(vals)) if vals else math.nan


def saturated_frac(record: object, step: int | str = "last") -> float:
    """Mean saturated fraction over saturating activation layers (see :func:`layer_mean`)."""
    return layer_mean(record, "saturated_frac", step)


def dead_frac(record: object, step: int | str = "last") -> float:
    """Mean dead-unit fraction over rectifier layers (see :func:`layer_mean`)."""
    return layer_mean(record, "dead_frac", step)


def beats_trivial(loss: float, trivial: float, margin: float = TRIVIAL_MARGIN) -> bool | None:
    """Whether ``loss`` is below the trivial baseline by more than ``margin`` of it (``None``
    when either number is unknown)."""
    if not (math.isfinite(loss) and math.isfinite(trivial)):
        return None
    return loss < trivial - margin * abs(trivial)
