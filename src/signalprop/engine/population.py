"""A population of K same-shaped MLPs trained in one batched computation.

Every parameter is stored stacked over the members (a hidden weight is ``[K, fan_in, fan_out]``),
and all of them live in one flat buffer (layer-major: each parameter a contiguous ``[K, ...]``
block), with the gradients in a second buffer of the same layout. One training step is:

- forward: per layer one ``baddbmm`` (bias fused), the normalisation, the activation;
- backward, written by hand (no autograd graph to build and walk): per layer the fused ATen
  derivative kernel of the activation, two ``bmm`` written straight into the gradient buffer's
  views, a bias reduction;
- clipping and the optimiser update: a few element-wise ops over the *whole* flat buffer
  (:mod:`signalprop.engine.optim`), whatever the depth;
- per-member bookkeeping: the loss of every member, and divergence (a member whose loss is
  non-finite is frozen, never updated again, and marked with that step).

Per-member hyper-parameters (learning rate, momentum, weight decay, optimiser constants, clip
threshold, activation gain) are tensors over the members, expanded once to the flat layout.

Probes (the metrics of :mod:`signalprop.record`) are computed on the recorded steps only, for all
members at once with the batched kernels of :mod:`signalprop.stats`, and moved to the host in one
transfer per recorded step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from signalprop import stats
from signalprop._registry import check_choice
from signalprop.data import Dataset
from signalprop.engine.activations import get_activation
from signalprop.engine.optim import OPTIMIZERS, make_optimizer
from signalprop.engine.reference import (
    BN_MOMENTUM,
    MLP,
    NORM_EPS,
    NORM_POSITIONS,
    NORMS,
)
from signalprop.record import MODEL, LayerInfo, Record

INITS = ("lecun", "xavier", "kaiming", "orthogonal", "lsuv")
CLIPS = ("none", "norm", "value", "agc")
TASKS = ("classification", "regression")
#: Default clip thresholds (AGC: Brock et al. 2021's lambda).
CLIP_DEFAULTS = {"none": 0.0, "norm": 1.0, "value": 1.0, "agc": 0.01}
AGC_EPS = 1e-3
#: LSUV (Mishkin & Matas 2016): tolerance on |Var - 1| and the most rescaling passes per layer.
LSUV_TOL = 0.1
LSUV_MAX_ITER = 10
_MODULE_TYPES = {"batch": "BatchNorm1d", "layer": "LayerNorm"}


@dataclass(frozen=True)
class Arch:
    """The shared architecture of a population (everything that fixes tensor shapes and ops).

    Attributes:
        in_features, out_features: Data dimensions.
        depth: Hidden blocks (>= 1); width: their units.
        activation: Activation name. norm: ``none|batch|layer``; norm_position: ``pre|post``.
        norm_affine: Learnable norm gain/bias. residual: Residual blocks 1..depth-1.
        rbf: Units of an RBF first layer (0: none). task: ``classification|regression``.
    """

    in_features: int
    out_features: int
    depth: int = 4
    width: int = 64
    activation: str = "tanh"
    norm: str = "none"
    norm_position: str = "pre"
    norm_affine: bool = True
    residual: bool = False
    rbf: int = 0
    task: str = "classification"

    def __post_init__(self) -> None:
        get_activation(self.activation)
        check_choice("norm", self.norm, NORMS)
        check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        check_choice("task", self.task, TASKS)
        for k in ("in_features", "out_features", "depth", "width"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.rbf < 0:
            raise ValueError(f"rbf must be >= 0, got {self.rbf}")

    def module(self, act_scale: float = 1.0) -> MLP:
        """A fresh single-model :class:`MLP` of this architecture."""
        return MLP(
            self.in_features,
            self.out_features,
            self.depth,
            self.width,
            self.activation,
            self.norm,
            self.norm_position,
            self.norm_affine,
            self.residual,
            self.rbf,
            act_scale,
        )

    def flops_per_step(self, batch_size: int) -> int:
        """Multiply-add FLOPs of the matmuls of one training step of one member (forward plus
        the two backward products; the first layer's input gradient is not computed)."""
        dims = [self.rbf or self.in_features] + [self.width] * self.depth + [self.out_features]
        total = 0
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            total += 2 * batch_size * a * b * (2 if i == 0 and not self.rbf else 3)
        if self.rbf:
            total += 2 * batch_size * self.in_features * self.rbf * 2
        return total


@dataclass
class ParamSpec:
    """One stacked parameter: name, per-member shape (as stored), module and slice of the buffer."""

    name: str
    shape: tuple[int, ...]
    module: str
    torch_shape: tuple[int, ...]
    offset: int = 0
    numel: int = 0


@dataclass
class FitResult:
    """What :meth:`Population.fit` returns.

    Attributes:
        records: One :class:`Record` per member.
        losses: Mini-batch loss of every step and member, [steps, K] (NaN after divergence).
        diverged_step: Per member, the step whose loss was non-finite, or None.
        final: Per member, a dict of final metrics (see :meth:`Population.fit`).
        wall_time: Seconds spent training (excluding the final evaluation).
        eval_time: Seconds of the final evaluation.
    """

    records: list[Record]
    losses: np.ndarray
    diverged_step: list[int | None]
    final: list[dict[str, Any]]
    wall_time: float
    eval_time: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def member(self, k: int, model: Any = None) -> Any:
        """Member ``k`` as the package's one run result, :class:`signalprop.train.FitResult`
        (its losses up to divergence, its record; ``model`` e.g. from
        :meth:`Population.member_module`). The batched loop stops a member only on a non-finite
        loss: the ``"nonfinite"`` branch of :func:`signalprop.train.divergence_reason`."""
        from signalprop.train import FitResult as RunResult  # train imports the probe: lazy

        d = self.diverged_step[k]
        col = self.losses[:, k]
        n = d + 1 if d is not None else int(np.isfinite(col).sum())
        return RunResult(
            record=self.records[k], losses=[float(v) for v in col[:n]], diverged=d is not None,
            diverged_step=d, steps=n, wall_time=self.wall_time, model=model,
            extra=dict(self.final[k]), diverged_reason="nonfinite" if d is not None else None,
            trivial_kind="not computed by the batched engine")


def _as_member_tensor(v: Any, k: int, name: str) -> torch.Tensor:
    """A scalar or a sequence of K values -> float64 tensor [K] (on the CPU)."""
    t = torch.as_tensor(v, dtype=torch.float64).flatten()
    if t.numel() == 1:
        t = t.expand(k).clone()
    if t.numel() != k:
        raise ValueError(f"{name}: expected one value or {k} values, got {t.numel()}")
    return t


class BatchSampler:
    """Per-member mini-batch order: each epoch a fresh permutation of the training set drawn from
    the member's own generator (seeded ``2*seed+1``); the last incomplete batch is dropped.

    :func:`member_batches` yields the same indices for one member (the single-model reference).
    """

    def __init__(self, seeds: Sequence[int], n: int, batch_size: int, device: torch.device):
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} is larger than the data set ({n})")
        self.gens = [torch.Generator().manual_seed(2 * int(s) + 1) for s in seeds]
        self.n, self.b, self.device = n, batch_size, device
        self.per_epoch = n // batch_size
        self._epoch: torch.Tensor | None = None
        self._i = self.per_epoch

    def next(self) -> torch.Tensor:
        """Indices [K, B] of the next mini-batch of every member."""
        if self._i >= self.per_epoch:
            perms = torch.stack([torch.randperm(self.n, generator=g) for g in self.gens])
            self._epoch = perms[:, : self.per_epoch * self.b].view(
                len(self.gens), self.per_epoch, self.b
            ).to(self.device)
            self._i = 0
        assert self._epoch is not None
        idx = self._epoch[:, self._i]
        self._i += 1
        return idx


def member_batches(seed: int, n: int, batch_size: int, steps: int) -> list[torch.Tensor]:
    """The mini-batch indices (each [B]) that the engine feeds the member with this seed."""
    s = BatchSampler([seed], n, batch_size, torch.device("cpu"))
    return [s.next()[0] for _ in range(steps)]


class Population:
    """K MLPs of one architecture with stacked parameters, trained together.

    Args:
        arch: The shared :class:`Arch`.
        size: Number of members K.
        optimizer: ``sgd | rmsprop | adam | rprop | smorms3``.
        hparams: Optimiser hyper-parameters by name (``lr``, ``momentum``, ``weight_decay``,
            ``beta1`` ...): a float (all members) or K values. Missing ones take the optimiser's
            defaults (:data:`signalprop.engine.optim.OPTIMIZERS`).
        clip: ``none | norm | value | agc``; clip_threshold: a float or K values (``None``: the
            default of the kind).
        act_scale: Gain a of the scaled activation a*phi: a float or K values.
        dtype: ``torch.float32`` or ``torch.float64``. device: where everything lives.
        fast_math: Use an activation's faster float32 form where it has one (tanh as
            2 sigmoid(2z) - 1, absolute error <= 1.8e-7). Default: on for float32 on the CPU.

    Example:
        >>> pop = Population(Arch(64, 10, depth=3, width=32), 4, hparams={"lr": [0.01, 0.1, 0.3, 1]})
        >>> pop.init_(seeds=[0, 1, 2, 3])
        >>> out = pop.fit(load_dataset("digits"), steps=100, batch_size=64, seeds=[0, 1, 2, 3])
    """

    def __init__(
        self,
        arch: Arch,
        size: int,
        *,
        optimizer: str = "sgd",
        hparams: dict[str, Any] | None = None,
        clip: str = "none",
        clip_threshold: Any = None,
        act_scale: Any = 1.0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        fast_math: bool | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"population size must be >= 1, got {size}")
        self.arch, self.K = arch, int(size)
        self.device = torch.device(device)
        self.dtype = dtype
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        self.act = get_activation(arch.activation)
        if fast_math is None:  # a CPU-only win (torch's CPU tanh is the slow one)
            fast_math = dtype == torch.float32 and self.device.type == "cpu"
        self.fast = self.act.fast if fast_math else None
        self.optimizer_name = OPTIMIZERS.entry(optimizer).name
        self.clip = check_choice("clip", clip, CLIPS)
        defaults = OPTIMIZERS.defaults(optimizer)
        hparams = dict(hparams or {})
        unknown = sorted(set(hparams) - set(defaults))
        if unknown:
            raise ValueError(
                f"unknown hyper-parameter(s) {unknown} for optimizer {optimizer!r}; "
                f"valid: {', '.join(sorted(defaults))}"
            )
        self.hparams = {
            k: _as_member_tensor(hparams.get(k, d) if hparams.get(k) is not None else d, self.K, k)
            for k, d in defaults.items()
        }
        ct = CLIP_DEFAULTS[self.clip] if clip_threshold is None else clip_threshold
        self.clip_threshold = _as_member_tensor(ct, self.K, "clip_threshold")
        self.act_scale = _as_member_tensor(act_scale, self.K, "act_scale")
        self._build_params()
        self.active = torch.ones(self.K, dtype=torch.bool, device=self.device)
        self.diverged_step: list[int | None] = [None] * self.K
        self.step_count = 0
        self._opt = None
        self._hp_cache: dict[str, Any] = {}

    # ---- parameters ----------------------------------------------------------------------
    def _build_params(self) -> None:
        a = self.arch
        specs: list[ParamSpec] = []
        fan_in = a.in_features
        if a.rbf:
            specs.append(ParamSpec("rbf.centres", (a.rbf, a.in_features), "rbf", (a.rbf, a.in_features)))
            specs.append(ParamSpec("rbf.widths", (1, a.rbf), "rbf", (a.rbf,)))
            fan_in = a.rbf
        for i in range(a.depth):
            fi = fan_in if i == 0 else a.width
            m = f"layers.{i}.linear"
            specs.append(ParamSpec(f"{m}.weight", (fi, a.width), m, (a.width, fi)))
            specs.append(ParamSpec(f"{m}.bias", (1, a.width), m, (a.width,)))
            if a.norm != "none" and a.norm_affine:
                n = f"layers.{i}.norm"
                specs.append(ParamSpec(f"{n}.weight", (1, a.width), n, (a.width,)))
                specs.append(ParamSpec(f"{n}.bias", (1, a.width), n, (a.width,)))
        specs.append(ParamSpec("head.weight", (a.width, a.out_features), "head", (a.out_features, a.width)))
        specs.append(ParamSpec("head.bias", (1, a.out_features), "head", (a.out_features,)))
        off = 0
        for s in specs:
            s.numel = self.K * math.prod(s.shape)
            s.offset = off
            off += s.numel
        self.specs = specs
        self.numel = off
        kw = {"dtype": self.dtype, "device": self.device}
        self.flat = torch.zeros(off, **kw)
        self.grad = torch.zeros(off, **kw)
        self.params = {s.name: self._view(self.flat, s) for s in specs}
        self.grads = {s.name: self._view(self.grad, s) for s in specs}
        # per hidden layer (bias, weight, weight^T, weight grad, bias grad): views made once (the
        # buffers are only ever updated in place), not looked up and transposed every step
        self._lin = [
            (
                self.params[f"layers.{i}.linear.bias"],
                self.params[f"layers.{i}.linear.weight"],
                self.params[f"layers.{i}.linear.weight"].transpose(1, 2),
                self.grads[f"layers.{i}.linear.weight"],
                self.grads[f"layers.{i}.linear.bias"],
            )
            for i in range(a.depth)
        ]
        # per (param, member) segment lengths: per-member values -> the flat layout in one op
        self._seg_len = torch.tensor(
            [s.numel // self.K for s in specs for _ in range(self.K)], device=self.device
        )
        self.running: dict[str, torch.Tensor] = {}
        if a.norm == "batch":
            for i in range(a.depth):
                self.running[f"layers.{i}.norm.running_mean"] = torch.zeros(self.K, 1, a.width, **kw)
                self.running[f"layers.{i}.norm.running_var"] = torch.ones(self.K, 1, a.width, **kw)

    def _view(self, buf: torch.Tensor, s: ParamSpec) -> torch.Tensor:
        return buf[s.offset : s.offset + s.numel].view(self.K, *s.shape)

    def expand(self, v: torch.Tensor) -> torch.Tensor | float:
        """A per-member value [K] -> a float if all members agree, else a tensor over the flat
        buffer holding each element's member's value."""
        if bool((v == v[0]).all()):
            return float(v[0])
        per_seg = v.to(self.device, self.dtype).repeat(len(self.specs))
        return torch.repeat_interleave(per_seg, self._seg_len)

    def blocks(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """A flat buffer as one [K, n] view per parameter."""
        return [buf[s.offset : s.offset + s.numel].view(self.K, -1) for s in self.specs]

    def member_norms(self, buf: torch.Tensor) -> torch.Tensor:
        """Per-parameter, per-member L2 norms of a flat buffer: [n_params, K]."""
        # one reduction per parameter block (measured 0.4 ms for a 20x64 population of 32,
        # against 6 ms for a single segment_reduce over the whole buffer)
        return torch.stack([torch.linalg.vector_norm(v, dim=1) for v in self.blocks(buf)])

    # ---- initialisation ------------------------------------------------------------------
    @torch.no_grad()
    def init_(
        self,
        seeds: Sequence[int],
        init: str | Sequence[str] = "lecun",
        init_scale: Any = 1.0,
        bias_std: Any = 0.0,
        data_x: torch.Tensor | None = None,
    ) -> Population:
        """Initialise every member from its own generator (seeded ``2*seed``), in place.

        Weights: ``lecun`` std 1/sqrt(fan_in), ``xavier`` sqrt(2/(fan_in+fan_out)), ``kaiming``
        sqrt(2/fan_in) (Glorot & Bengio 2010; He et al. 2015), ``orthogonal`` (Saxe et al. 2013),
        each times ``init_scale``; ``lsuv`` (Mishkin & Matas 2016): orthogonal, then each layer
        (head included) rescaled until the variance of its output on ``data_x`` is within
        :data:`LSUV_TOL` of ``init_scale**2`` (at most :data:`LSUV_MAX_ITER` passes). Biases
        ~ N(0, bias_std^2). Norm gains 1, biases 0. RBF centres ~ N(0, 1), widths sqrt(in).

        Args:
            seeds: K seeds. init: a scheme or K schemes. init_scale, bias_std: float or K values.
            data_x: [N, in] inputs, required for ``lsuv``.
        """
        K = self.K
        if len(seeds) != K:
            raise ValueError(f"expected {K} seeds, got {len(seeds)}")
        inits = [init] * K if isinstance(init, str) else list(init)
        if len(inits) != K:
            raise ValueError(f"expected one init or {K}, got {len(inits)}")
        for s in inits:
            check_choice("init", s, INITS)
        scale = _as_member_tensor(init_scale, K, "init_scale")
        bstd = _as_member_tensor(bias_std, K, "bias_std")
        for k in range(K):
            g = torch.Generator().manual_seed(2 * int(seeds[k]))
            for s in self.specs:
                p = self.params[s.name]
                if s.name == "rbf.centres":
                    val = torch.randn(s.shape, generator=g, dtype=torch.float64)
                elif s.name == "rbf.widths":
                    val = torch.full(s.shape, self.arch.in_features**0.5, dtype=torch.float64)
                elif s.name.endswith("norm.weight"):
                    val = torch.ones(s.shape, dtype=torch.float64)
                elif s.name.endswith("norm.bias"):
                    val = torch.zeros(s.shape, dtype=torch.float64)
                elif s.name.endswith(".bias"):
                    val = torch.randn(s.shape, generator=g, dtype=torch.float64) * float(bstd[k])
                else:
                    val = self._init_weight(s.shape, inits[k], float(scale[k]), g)
                p[k].copy_(val.to(p.dtype))
        self._fix_lsuv(inits, scale, data_x)
        return self

    @staticmethod
    def _init_weight(shape: tuple[int, ...], scheme: str, scale: float, g: torch.Generator):
        fi, fo = shape
        if scheme in ("orthogonal", "lsuv"):
            w = torch.empty(fo, fi, dtype=torch.float64)
            torch.nn.init.orthogonal_(w, gain=1.0, generator=g)
            return w.T * (scale if scheme == "orthogonal" else 1.0)
        std = {
            "lecun": 1.0 / math.sqrt(fi),
            "xavier": math.sqrt(2.0 / (fi + fo)),
            "kaiming": math.sqrt(2.0 / fi),
        }[scheme]
        return torch.randn(fi, fo, generator=g, dtype=torch.float64) * (std * scale)

    def _fix_lsuv(self, inits: list[str], scale: torch.Tensor, data_x: torch.Tensor | None) -> None:
        mask = torch.tensor([s == "lsuv" for s in inits], device=self.device)
        if not bool(mask.any()):
            return
        if data_x is None:
            raise ValueError("init='lsuv' needs a data batch (data_x)")
        x = data_x.to(self.device, self.dtype)[: min(len(data_x), 512)]
        target = scale.to(self.device, self.dtype) ** 2
        names = [f"layers.{i}.linear" for i in range(self.arch.depth)] + ["head"]
        for name in names:
            w = self.params[f"{name}.weight"]
            for _ in range(LSUV_MAX_ITER):
                cache = self._forward(x.expand(self.K, *x.shape), train=True, keep=True)
                z = cache["z"][name]
                var = z.reshape(self.K, -1).var(dim=1)
                need = mask & ((var - target).abs() >= LSUV_TOL)
                if not bool(need.any()):
                    break
                f = torch.where(need, (target / var.clamp_min(1e-12)).sqrt(), torch.ones_like(var))
                w.mul_(f.view(self.K, 1, 1))
        self._reset_running()  # LSUV's forwards must not leave running statistics behind

    def _reset_running(self) -> None:
        for n, v in self.running.items():
            v.fill_(0.0 if n.endswith("running_mean") else 1.0)

    # ---- forward / backward --------------------------------------------------------------
    def _norm_fwd(self, t: torch.Tensor, i: int, train: bool, c: dict[str, Any]) -> torch.Tensor:
        a = self.arch
        if a.norm == "batch":
            rm = self.running[f"layers.{i}.norm.running_mean"]
            rv = self.running[f"layers.{i}.norm.running_var"]
            if train:
                var, mu = torch.var_mean(t, dim=1, keepdim=True, unbiased=False)
                b = t.shape[1]
                # torch's running averages: the variance is the unbiased one
                rm.mul_(1 - BN_MOMENTUM).add_(mu, alpha=BN_MOMENTUM)
                rv.mul_(1 - BN_MOMENTUM).add_(var, alpha=BN_MOMENTUM * b / max(b - 1, 1))
            else:
                mu, var = rm, rv
            dim = 1
        else:
            var, mu = torch.var_mean(t, dim=-1, keepdim=True, unbiased=False)
            dim = -1
        rstd = torch.rsqrt(var + NORM_EPS)
        zhat = (t - mu) * rstd
        c["zhat"], c["rstd"], c["dim"] = zhat, rstd, dim
        if a.norm_affine:
            return torch.addcmul(
                self.params[f"layers.{i}.norm.bias"], zhat, self.params[f"layers.{i}.norm.weight"]
            )
        return zhat

    def _norm_bwd(self, dy: torch.Tensor, i: int, c: dict[str, Any]) -> torch.Tensor:
        zhat, rstd, dim = c["zhat"], c["rstd"], c["dim"]
        if self.arch.norm_affine:
            n = f"layers.{i}.norm"
            torch.sum(dy * zhat, dim=1, keepdim=True, out=self.grads[f"{n}.weight"])
            torch.sum(dy, dim=1, keepdim=True, out=self.grads[f"{n}.bias"])
            dzh = dy * self.params[f"{n}.weight"]
        else:
            dzh = dy
        # d/dz of (z - mean)/std (Ioffe & Szegedy 2015, section 3):
        # rstd * (dzh - mean(dzh) - zhat * mean(dzh * zhat))
        m1 = dzh.mean(dim=dim, keepdim=True)
        m2 = (dzh * zhat).mean(dim=dim, keepdim=True)
        return (dzh - m1).sub_(zhat * m2).mul_(rstd)

    def _scale(self) -> torch.Tensor | None:
        if "act_scale" not in self._hp_cache:
            s = self.act_scale
            self._hp_cache["act_scale"] = (
                None
                if bool((s == 1.0).all())
                else s.to(self.device, self.dtype).view(self.K, 1, 1)
            )
        return self._hp_cache["act_scale"]

    def _forward(self, x: torch.Tensor, train: bool, keep: bool = False) -> dict[str, Any]:
        """Forward pass of all members on x [K, B, in]. Returns the cache (``out`` [K, B, O])."""
        a, P = self.arch, self.params
        scale = self._scale()
        cache: dict[str, Any] = {"x": x, "z": {}, "layers": []}
        h = x
        if a.rbf:
            c, w = P["rbf.centres"], P["rbf.widths"]
            d2 = torch.baddbmm((c * c).sum(-1).unsqueeze(1), h, c.transpose(1, 2), alpha=-2.0)
            d2 = d2.add_((h * h).sum(-1, keepdim=True)).clamp_min_(0)
            inv = 0.5 / (w * w)
            out = torch.exp(-d2 * inv)
            cache["rbf"] = (d2, out, inv)
            if keep:
                cache["z"]["rbf"] = out
            h = out
        for i in range(a.depth):
            c: dict[str, Any] = {"a": h}
            pre = a.norm != "none" and a.norm_position == "pre"
            bias, weight = self._lin[i][0], self._lin[i][1]
            if self.fast is not None and not pre:
                # fold the fast form's input scale into the matmul: s*z = baddbmm(.., s, s)
                s = self.act.fast_scale
                zs = torch.baddbmm(bias, h, weight, beta=s, alpha=s)
                if keep:
                    cache["z"][f"layers.{i}.linear"] = zs / s
                u = zs  # consumed in place: the backward of a fast activation uses h only
                phi = self.fast(zs)
            else:
                z = torch.baddbmm(bias, h, weight)
                if keep:
                    cache["z"][f"layers.{i}.linear"] = z
                u = z
                if pre:
                    c["norm"] = {}
                    u = self._norm_fwd(z, i, train, c["norm"])
                    if keep:
                        cache["z"][f"layers.{i}.norm"] = u
                if self.fast is not None:
                    phi = self.fast(u * self.act.fast_scale)
                else:
                    phi = self.act.forward(u)
            c["u"], c["phi"] = u, phi
            out = phi if scale is None else phi * scale
            c["act_out"] = out
            if a.norm != "none" and a.norm_position == "post":
                c["norm"] = {}
                out = self._norm_fwd(out, i, train, c["norm"])
                if keep:
                    cache["z"][f"layers.{i}.norm"] = out
            h = h + out if (a.residual and i > 0) else out
            cache["layers"].append(c)
        cache["h_last"] = h
        out = torch.baddbmm(P["head.bias"], h, P["head.weight"])
        cache["out"] = out
        if keep:
            cache["z"]["head"] = out
        return cache

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member mean loss [K] and d(loss_k)/d(out) [K, B, O]."""
        B = out.shape[1]
        if self.arch.task == "classification":
            logp = torch.log_softmax(out, dim=-1)
            loss = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(dim=1)
            d = logp.exp_()
            d.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(d[..., :1], -1.0))
            return loss, d.div_(B)
        diff = out - y
        loss = diff.square().mean(dim=(1, 2))
        return loss, diff.mul_(2.0 / diff[0].numel())

    def _backward(self, cache: dict[str, Any], dout: torch.Tensor, probe: dict | None) -> None:
        """Write every member's gradients into ``self.grad`` (no autograd)."""
        a, P, G = self.arch, self.params, self.grads
        scale = self._scale()
        h = cache["h_last"]
        torch.bmm(h.transpose(1, 2), dout, out=G["head.weight"])
        torch.sum(dout, dim=1, keepdim=True, out=G["head.bias"])
        if probe is not None:
            probe[("head", "out_grad_norm")] = _knorm(dout)
        da = torch.bmm(dout, P["head.weight"].transpose(1, 2))
        for i in reversed(range(a.depth)):
            c = cache["layers"][i]
            d_out = da
            if a.norm != "none" and a.norm_position == "post":
                if probe is not None:
                    probe[(f"layers.{i}.norm", "out_grad_norm")] = _knorm(d_out)
                d_out = self._norm_bwd(d_out, i, c["norm"])
            if probe is not None:
                probe[(f"layers.{i}.act", "out_grad_norm")] = _knorm(d_out)
            dphi = d_out if scale is None else d_out * scale
            du = self.act.backward(dphi, c["u"], c["phi"])
            if a.norm != "none" and a.norm_position == "pre":
                if probe is not None:
                    probe[(f"layers.{i}.norm", "out_grad_norm")] = _knorm(du)
                du = self._norm_bwd(du, i, c["norm"])
            if probe is not None:
                probe[(f"layers.{i}.linear", "out_grad_norm")] = _knorm(du)
            _, _, weight_t, g_weight, g_bias = self._lin[i]
            torch.bmm(c["a"].transpose(1, 2), du, out=g_weight)
            torch.sum(du, dim=1, keepdim=True, out=g_bias)
            if i > 0 or a.rbf:
                nda = torch.bmm(du, weight_t)
                if a.residual and i > 0:
                    nda.add_(da)
                da = nda
        if a.rbf:
            d2, out, inv = cache["rbf"]
            if probe is not None:
                probe[("rbf", "out_grad_norm")] = _knorm(da)
            e = da * out  # dL/d(exponent) up to sign
            c, w = P["rbf.centres"], P["rbf.widths"]
            # h = exp(-d2 / (2 w^2)):  dh/dw = h d2 / w^3,  dh/dd2 = -h / (2 w^2)
            torch.sum(e * d2, dim=1, keepdim=True, out=G["rbf.widths"])
            G["rbf.widths"].div_(w * w * w)
            dd2 = e.mul_(-inv)
            # d2 = |c|^2 - 2 x.c + |x|^2:  dd2/dc_j = 2 c_j - 2 x
            gc = G["rbf.centres"]
            torch.bmm(dd2.transpose(1, 2), cache["x"], out=gc)
            gc.mul_(-2.0).add_(c * (2.0 * dd2.sum(dim=1).unsqueeze(-1)))

    # ---- clipping ------------------------------------------------------------------------
    def _clip_(self) -> None:
        if self.clip == "none":
            return
        thr = self.clip_threshold.to(self.device, self.dtype)
        if self.clip == "value":
            t = self._hp("clip_threshold", self.clip_threshold)
            if isinstance(t, torch.Tensor):
                torch.clamp(self.grad, min=-t, max=t, out=self.grad)
            else:
                self.grad.clamp_(-t, t)
        elif self.clip == "norm":
            # torch.nn.utils.clip_grad_norm_: g *= min(1, max_norm / (total_norm + 1e-6))
            total = self.member_norms(self.grad).square().sum(0).sqrt()
            coef = (thr / (total + 1e-6)).clamp_max(1.0).unsqueeze(1)
            gb = self.blocks(self.grad)
            torch._foreach_mul_(gb, [coef] * len(gb))
        else:  # agc, Brock et al. 2021, unit-wise; output layer excluded
            for s in self.specs:
                if s.module == "head":
                    continue
                g, w = self.grads[s.name], self.params[s.name]
                # weights [K, fan_in, fan_out]: one unit per output column (reduce over fan-in);
                # RBF centres [K, units, in]: one unit per row; vectors: the whole vector (as the
                # NFNets code's unitwise_norm does for biases and gains)
                if s.name == "rbf.centres":
                    dims: tuple[int, ...] = (2,)
                else:
                    dims = (1,) if s.shape[0] > 1 else (1, 2)
                wn = torch.linalg.vector_norm(w, dim=dims, keepdim=True).clamp_min(AGC_EPS)
                gn = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
                lam = thr.view(self.K, 1, 1)
                maxn = lam * wn
                g.mul_(torch.where(gn > maxn, maxn / gn.clamp_min(1e-6), torch.ones_like(gn)))

    def _hp(self, name: str, v: torch.Tensor) -> Any:
        if name not in self._hp_cache:
            self._hp_cache[name] = self.expand(v)
        return self._hp_cache[name]

    def _optimizer(self):
        if self._opt is None:
            hp = {k: self._hp(k, v) for k, v in self.hparams.items()}
            layout = (self.K, [(s.offset, s.numel) for s in self.specs])
            self._opt = make_optimizer(self.optimizer_name, self.flat, hp, layout)
        return self._opt

    # ---- training ------------------------------------------------------------------------
    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, probe: bool = False
    ) -> tuple[torch.Tensor, dict | None]:
        """One optimiser step of every active member on x [K, B, in], y [K, B] (or [K, B, O]).

        Returns:
            (loss [K] before the step, probe values {(layer, metric): [K]} or None).
        """
        # batch-norm running statistics are frozen with the member's parameters
        saved_running = {n: v.clone() for n, v in self.running.items()}
        cache = self._forward(x, train=True, keep=probe)
        loss, dout = self._loss(cache["out"], y)
        pr: dict | None = {} if probe else None
        finite = torch.isfinite(loss)
        newly = self.active & ~finite
        if bool(newly.any()):
            for k in newly.nonzero().flatten().tolist():
                self.diverged_step[k] = self.step_count
            self.active &= finite
        frozen = ~self.active
        any_frozen = bool(frozen.any())
        if any_frozen:
            for n, v in self.running.items():
                v.copy_(torch.where(frozen.view(-1, 1, 1), saved_running[n], v))
        if pr is not None:
            self._probe_forward(cache, loss, y, pr)
        self._backward(cache, dout, pr)
        self._clip_()
        if pr is not None:
            gn = self.member_norms(self.grad)
            for j, s in enumerate(self.specs):
                pr[(s.name, "grad_norm")] = gn[j]
            pr[(MODEL, "grad_norm_total")] = gn.square().sum(0).sqrt()
            before = self.flat.clone()
        if any_frozen:
            fmask = torch.repeat_interleave(frozen.repeat(len(self.specs)), self._seg_len)
            keep_vals = self.flat[fmask]
        self._optimizer().step(self.flat, self.grad)
        if any_frozen:
            self.flat[fmask] = keep_vals
        if pr is not None:
            wn = self.member_norms(before)
            dn = self.member_norms(self.flat - before)
            for j, s in enumerate(self.specs):
                pr[(s.name, "weight_norm")] = wn[j]
                pr[(s.name, "update_ratio")] = dn[j] / wn[j]
        self.step_count += 1
        return loss, pr

    def _probe_forward(self, cache: dict, loss: torch.Tensor, y: torch.Tensor, pr: dict) -> None:
        a = self.arch
        pr[(MODEL, "loss")] = loss
        if a.task == "classification":
            pr[(MODEL, "accuracy")] = (cache["out"].argmax(-1) == y).to(loss.dtype).mean(1)
        for name, t in cache["z"].items():
            mean, std = stats.moments(t)
            pr[(name, "out_mean")], pr[(name, "out_std")] = mean, std
            if name != "head":
                q = stats.percentiles(t)
                for j, qq in enumerate(stats.PERCENTILES):
                    pr[(name, stats.percentile_key(qq))] = q[:, j]
        kind = a.activation
        for i, c in enumerate(cache["layers"]):
            n = f"layers.{i}.act"
            mean, std = stats.moments(c["act_out"])
            pr[(n, "out_mean")], pr[(n, "out_std")] = mean, std
            if kind in stats.SATURATING:
                uses_out = stats.SATURATING[kind][0]
                pr[(n, "saturated_frac")] = stats.saturated_fraction(
                    c["phi"] if uses_out else c["u"], kind
                )
            if kind in stats.RECTIFIERS:
                pr[(n, "dead_frac")] = stats.dead_fraction(c["phi"], batch_dim=1)

    @torch.no_grad()
    def evaluate(
        self, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and accuracy [K] of every member on the same data (evaluation mode: batch norm
        uses its running statistics). Accuracy is NaN for regression."""
        x = x.to(self.device, self.dtype)
        y = y.to(self.device)
        tot_loss = torch.zeros(self.K, dtype=torch.float64, device=self.device)
        correct = torch.zeros(self.K, dtype=torch.float64, device=self.device)
        n = x.shape[0]
        for s in range(0, n, chunk):
            xb, yb = x[s : s + chunk], y[s : s + chunk]
            out = self._forward(xb.expand(self.K, *xb.shape), train=False)["out"]
            yk = yb.expand(self.K, *yb.shape)
            if self.arch.task == "regression":
                yk = yk.to(self.dtype)
            loss, _ = self._loss(out, yk)
            tot_loss += loss.double() * xb.shape[0]
            if self.arch.task == "classification":
                correct += (out.argmax(-1) == yk).double().sum(1)
        acc = correct / n if self.arch.task == "classification" else torch.full_like(correct, math.nan)
        return (tot_loss / n).cpu(), acc.cpu()

    def fit(
        self,
        data: Dataset,
        steps: int,
        batch_size: int,
        seeds: Sequence[int],
        record_every: int = 10,
        callback: Callable[[int], None] | None = None,
        evaluate: bool = True,
        record_steps: Sequence[int] | None = None,
    ) -> FitResult:
        """Train all members for ``steps`` steps; members that diverge are frozen.

        Args:
            data: The data set (moved to the population's device).
            steps: Optimiser steps. batch_size: Mini-batch size.
            seeds: Per-member data-order seeds (see :class:`BatchSampler`).
            record_every: Probe every n steps, plus the first and last (0: those two only).
            callback: Called with the number of steps done, every ~1% of the run.
            evaluate: Compute loss/accuracy on the whole train and test splits at the end.
            record_steps: Probe exactly these steps (plus the first and last) instead of every
                ``record_every`` (e.g. log-spaced steps for a long run).

        Returns:
            :class:`FitResult`; ``final[k]`` has ``final_loss`` (mean mini-batch loss of the last
            min(10, steps) steps; NaN if diverged), ``min_loss``, ``train_loss``, ``test_loss``,
            ``train_accuracy``, ``test_accuracy``, ``diverged_step``, ``grad_ratio_init`` and
            ``grad_ratio_final`` (first layer's weight gradient norm / the head's).
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if record_every < 0:
            raise ValueError(f"record_every must be >= 0, got {record_every}")
        wanted = None if record_steps is None else {int(s) for s in record_steps}
        K = self.K
        xtr = data.x_train.to(self.device, self.dtype)
        ytr = data.y_train.to(self.device)
        if self.arch.task == "regression":
            ytr = ytr.to(self.dtype)
        sampler = BatchSampler(seeds, xtr.shape[0], batch_size, self.device)
        losses = torch.full((steps, K), math.nan, dtype=self.dtype, device=self.device)
        rec_steps: list[int] = []
        rec_keys: list[list[tuple[str, str]]] = []
        rec_vals: list[np.ndarray] = []
        rec_active: list[np.ndarray] = []
        every = max(1, steps // 100)
        t0 = time.perf_counter()
        for t in range(steps):
            probe = t == 0 or t == steps - 1 or (
                t in wanted if wanted is not None else (record_every > 0 and t % record_every == 0)
            )
            idx = sampler.next()
            was_active = self.active.clone()
            loss, pr = self.train_step(xtr[idx], ytr[idx], probe=probe)
            losses[t] = torch.where(was_active, loss, torch.full_like(loss, math.nan))
            if pr is not None:
                keys = list(pr)
                vals = torch.stack([v.to(torch.float64) for v in pr.values()]).cpu().numpy()
                rec_steps.append(t)
                rec_keys.append(keys)
                rec_vals.append(vals)
                rec_active.append(was_active.cpu().numpy())
            if callback is not None and ((t + 1) % every == 0 or t == steps - 1):
                callback(t + 1)
            if not bool(self.active.any()):
                if callback is not None:
                    callback(steps)
                break
        wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        if evaluate:
            trl, tra = self.evaluate(data.x_train, data.y_train)
            tel, tea = self.evaluate(data.x_test, data.y_test)
        else:
            trl = tra = tel = tea = torch.full((K,), math.nan, dtype=torch.float64)
        eval_time = time.perf_counter() - t1
        L = losses.cpu().double().numpy()
        records = self._records(rec_steps, rec_keys, rec_vals, rec_active)
        first = self.specs[2 if self.arch.rbf else 0].name
        final = []
        for k in range(K):
            d = self.diverged_step[k]
            lk = L[: (d if d is not None else steps), k]
            lk = lk[np.isfinite(lk)]
            tail = L[max(0, steps - 10) : steps, k]
            ratios = _grad_ratios(records[k], first, "head.weight")
            final.append(
                {
                    "final_loss": float(np.mean(tail)) if d is None else math.nan,
                    "min_loss": float(lk.min()) if lk.size else math.nan,
                    "train_loss": float(trl[k]),
                    "test_loss": float(tel[k]),
                    "train_accuracy": float(tra[k]),
                    "test_accuracy": float(tea[k]),
                    "diverged_step": d,
                    "grad_ratio_init": ratios[0],
                    "grad_ratio_final": ratios[1],
                }
            )
        return FitResult(records, L, list(self.diverged_step), final, wall, eval_time)

    # ---- records and export --------------------------------------------------------------
    def layer_infos(self) -> list[LayerInfo]:
        """The record's layer descriptions, in forward order (params after their module)."""
        a = self.arch
        infos: list[LayerInfo] = []
        by_module: dict[str, list[ParamSpec]] = {}
        for s in self.specs:
            by_module.setdefault(s.module, []).append(s)
        order: list[tuple[str, str, str | None, list[int]]] = []
        if a.rbf:
            order.append(("rbf", "RBF", None, [a.rbf]))
        act_type = type(self.act.module()).__name__
        for i in range(a.depth):
            order.append((f"layers.{i}.linear", "Linear", None, [a.width]))
            if a.norm != "none" and a.norm_position == "pre":
                order.append((f"layers.{i}.norm", _MODULE_TYPES[a.norm], None, [a.width]))
            order.append((f"layers.{i}.act", act_type, a.activation, [a.width]))
            if a.norm != "none" and a.norm_position == "post":
                order.append((f"layers.{i}.norm", _MODULE_TYPES[a.norm], None, [a.width]))
        order.append(("head", "Linear", None, [a.out_features]))
        for depth, (name, typ, actv, shape) in enumerate(order):
            infos.append(LayerInfo(name, typ, "module", depth, actv, None, shape))
            for s in by_module.get(name, []):
                infos.append(
                    LayerInfo(s.name, "Parameter", "param", depth, None, name, list(s.torch_shape))
                )
        return infos

    def _records(self, steps, keys, vals, active) -> list[Record]:
        infos = self.layer_infos()
        recs = []
        for k in range(self.K):
            r = Record(
                meta={
                    "engine": "signalprop.engine",
                    "member": k,
                    "arch": dict(self.arch.__dict__),
                    "optimizer": self.optimizer_name,
                    "hparams": {n: float(v[k]) for n, v in self.hparams.items()},
                    "clip": self.clip,
                    "clip_threshold": float(self.clip_threshold[k]),
                    "act_scale": float(self.act_scale[k]),
                    "dtype": str(self.dtype).replace("torch.", ""),
                }
            )
            for info in infos:
                r.add_layer(info)
            recs.append(r)
        for s, ks, v, act in zip(steps, keys, vals, active, strict=True):
            for k in range(self.K):
                if not act[k]:
                    continue
                row: dict[str, dict[str, float]] = {}
                for (layer, metric), val in zip(ks, v[:, k], strict=True):
                    row.setdefault(layer, {})[metric] = float(val)
                recs[k].add_many(s, row)
        return recs

    def member_module(self, k: int) -> MLP:
        """Member ``k`` as a standalone :class:`MLP` (a copy of its current parameters and
        batch-norm running statistics, float64 or float32 as the population)."""
        m = self.arch.module(float(self.act_scale[k])).to(self.dtype)
        sd = {}
        for s in self.specs:
            v = self.params[s.name][k].detach().cpu()
            if s.name.endswith("linear.weight") or s.name == "head.weight":
                v = v.T  # nn.Linear stores [fan_out, fan_in]
            sd[s.name] = v.reshape(s.torch_shape).clone()
        for n, v in self.running.items():
            sd[n] = v[k].reshape(-1).cpu().clone()
        missing = m.load_state_dict(sd, strict=False)
        bad = [x for x in missing.missing_keys if not x.endswith("num_batches_tracked")]
        if bad or missing.unexpected_keys:
            raise RuntimeError(f"state mismatch: missing {bad}, unexpected {missing.unexpected_keys}")
        return m


def _knorm(t: torch.Tensor) -> torch.Tensor:
    """Per-member L2 norm of [K, ...]."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


def _grad_ratios(rec: Record, first: str, last: str) -> tuple[float, float]:
    steps = rec.steps
    if not steps:
        return math.nan, math.nan
    out = []
    for s in (steps[0], steps[-1]):
        a, b = rec.get(s, first, "grad_norm"), rec.get(s, last, "grad_norm")
        out.append(a / b if b and math.isfinite(b) and b > 0 else math.nan)
    return out[0], out[1]
