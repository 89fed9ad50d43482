"""Models, initialisation and a lean training loop shared by the studies.

The studies train many small MLPs on small data sets, so the loop here is kept minimal: mini-batches
are indexed out of tensors already on the device, the test set is evaluated only at chosen steps,
and a run that produces a non-finite (or absurdly large) loss stops and says so instead of
crashing. Everything takes a ``device`` (CPU by default; CUDA when asked for).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from signalprop import stats, vocab
from signalprop._device import resolve_device as _resolve_device
from signalprop._registry import check_choice
from signalprop.data import Dataset, load_dataset
from signalprop.train import make_optimizer  # noqa: F401 (the optimiser vocabulary's torch face)


# --- activations ------------------------------------------------------------------------------
def make_activation(name: str) -> nn.Module:
    """An activation module by name or alias (the vocabulary's ``nn.Module`` face)."""
    return vocab.activation(name)()


# --- the MLP ----------------------------------------------------------------------------------
#: The norms a Block takes (aliases ``bn``, ``ln`` included): the vocabulary's.
NORMS = tuple(vocab.NORMS.names())


class Block(nn.Module):
    """One hidden layer: ``Linear -> [norm] -> activation`` (norm before the activation, as in
    Ioffe & Szegedy 2015), optionally wrapped in a residual connection ``h + block(h)``."""

    def __init__(
        self,
        fan_in: int,
        fan_out: int,
        activation: str,
        norm: str = "none",
        residual: bool = False,
        norm_affine: bool = True,
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(fan_in, fan_out)
        self.norm: nn.Module = vocab.norm_module(norm, fan_out, affine=norm_affine)
        self.act = make_activation(activation)
        self.residual = bool(residual) and fan_in == fan_out
        #: the last pre-activation (input of the activation), kept when ``capture`` is set
        self.capture = False
        self.preact: torch.Tensor | None = None
        self.post: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.norm(self.linear(h))
        a = self.act(z)
        if self.capture:
            self.preact = z.detach()
            self.post = a.detach()
        return h + a if self.residual else a


class MLP(nn.Module):
    """``in -> depth x Block(width) -> Linear(out)``.

    Args:
        in_features, out_features, width: Sizes.
        depth: Number of hidden layers (>= 1).
        activation: Activation name (see :func:`make_activation`).
        norm: ``"none"``, ``"batch"`` (BatchNorm1d before each activation) or ``"layer"``
            (aliases ``"bn"``, ``"ln"``).
        residual: Residual connections around every hidden layer whose input and output widths
            agree (all but the first).
        norm_affine: Whether the norm has learnable gain/shift.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        width: int,
        depth: int,
        activation: str = "relu",
        norm: str = "none",
        residual: bool = False,
        norm_affine: bool = True,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        dims = [in_features] + [width] * depth
        self.blocks = nn.ModuleList(
            Block(a, b, activation, norm, residual, norm_affine)
            for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.head = nn.Linear(width, out_features)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)

    def linears(self) -> list[nn.Linear]:
        """All Linear layers in forward order (hidden layers, then the head)."""
        return [b.linear for b in self.blocks] + [self.head]

    def set_capture(self, on: bool) -> None:
        for b in self.blocks:
            b.capture = on
            if not on:
                b.preact = b.post = None


# --- initialisation ---------------------------------------------------------------------------
#: The schemes :func:`init_linears_` takes: the initialisation vocabulary's Gaussian schemes
#: (aliases ``gaussian`` -> ``lecun``, ``he`` -> ``kaiming`` included), ``orthogonal`` and
#: ``default``.
INITS = tuple(n for n in vocab.INITS
              if vocab.init(n).std is not None or n in ("default", "orthogonal"))


@torch.no_grad()
def init_linears_(
    linears: Sequence[nn.Linear],
    scheme: str = "default",
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    sigma_b: float = 0.0,
) -> None:
    """Initialise Linear layers in place, then multiply every weight matrix by ``scale``.

    Schemes (fan_in/fan_out of each layer):
      ``default``: PyTorch's own initialisation (left untouched, only scaled).
      ``lecun`` (alias ``gaussian``): W ~ N(0, 1/fan_in) (LeCun et al. 1998).
      ``xavier``: W ~ N(0, 2/(fan_in + fan_out)) (Glorot & Bengio 2010).
      ``kaiming`` (alias ``he``): W ~ N(0, 2/fan_in) (He et al. 2015).
    The standard deviations are the vocabulary's (:data:`signalprop.vocab.INITS`).
      ``orthogonal``: a (semi-)orthogonal matrix times sqrt(1) (Saxe et al. 2013); with
      ``scale`` = sigma_w this is the orthogonal network of Pennington et al. 2017.
    Biases are set to N(0, sigma_b^2) (zero by default) unless the scheme is ``default``.
    """
    scheme = vocab.INITS.canonical(scheme) if scheme in vocab.INITS else scheme
    check_choice("init scheme", scheme, INITS)
    std = vocab.init(scheme).std
    for lin in linears:
        w = lin.weight
        fan_out, fan_in = w.shape
        if std is not None:
            w.copy_(torch.randn(w.shape, generator=generator) * std(fan_in, fan_out))
        elif scheme == "orthogonal":
            w.copy_(orthogonal_matrix(fan_out, fan_in, generator))
        w.mul_(scale)
        if lin.bias is not None and scheme != "default":
            if sigma_b > 0:
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=generator) * sigma_b)
            else:
                lin.bias.zero_()


def orthogonal_matrix(rows: int, cols: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-random (semi-)orthogonal [rows, cols] matrix (QR of a Gaussian matrix with the sign
    correction of Mezzadri 2007, so the distribution is uniform)."""
    n, m = max(rows, cols), min(rows, cols)
    a = torch.randn(n, m, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    q = q if rows >= cols else q.T
    return q.to(torch.float32)


# --- data -------------------------------------------------------------------------------------
def get_data(name: str, device: str = "cpu") -> Dataset:
    """A built-in data set moved to ``device``."""
    return load_dataset(name).to(device)


# --- training ---------------------------------------------------------------------------------
@dataclass
class RunResult:
    """One training run.

    Attributes:
        losses: Mini-batch training loss at the logged steps (``loss_steps``).
        eval_steps, test_acc, test_loss: Test-set evaluations.
        final_train_loss: Loss on the whole training set after training (NaN if diverged).
        final_test_acc: Test accuracy after training (chance-level if diverged: recorded as is).
        diverged, diverged_step: Whether/when the loss became non-finite or exceeded the bound.
        grad_ratio_init: ||dL/dW_first|| / ||dL/dW_last|| of the hidden Linear layers at step 0.
        grad_norm_init: Global gradient norm over all parameters at step 0.
        grad_ratio_io_init: ||dL/dW|| of the first weight matrix over that of the last one (the
            output layer), at step 0: the sweep runner's ``grad_ratio_init``.
        wall_s: Seconds spent training.
        extra: Whatever the step callback stored.
    """

    loss_steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    final_train_loss: float = math.nan
    final_test_acc: float = math.nan
    initial_loss: float = math.nan
    diverged: bool = False
    diverged_step: int | None = None
    grad_ratio_init: float = math.nan
    grad_norm_init: float = math.nan
    grad_ratio_io_init: float = math.nan
    steps_done: int = 0
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on (x, y), in eval mode."""
    was = model.training
    model.eval()
    tot_loss, correct = 0.0, 0
    for i in range(0, x.shape[0], chunk):
        out = model(x[i : i + chunk])
        tot_loss += float(F.cross_entropy(out, y[i : i + chunk], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + chunk]).sum())
    model.train(was)
    n = x.shape[0]
    return tot_loss / n, correct / n


def first_last_grad_ratio(linears: Sequence[nn.Linear]) -> float:
    """||dL/dW|| of the first hidden Linear divided by that of the last hidden Linear (the head
    excluded): << 1 means vanishing towards the input, >> 1 exploding."""
    hidden = list(linears[:-1]) if len(linears) > 2 else list(linears)
    g0, g1 = hidden[0].weight.grad, hidden[-1].weight.grad
    if g0 is None or g1 is None:
        return math.nan
    a, b = float(g0.norm()), float(g1.norm())
    if b == 0:
        return math.inf if a > 0 else math.nan
    return a / b


def first_output_grad_ratio(model: nn.Module) -> float:
    """||grad|| of the first parameter with >= 2 dims over that of the last such parameter (the
    output layer's weight), as the sweep runner reports ``grad_ratio_init``."""
    mats = [p for p in model.parameters() if p.dim() >= 2 and p.grad is not None]
    if len(mats) < 2:
        return math.nan
    a, b = float(mats[0].grad.norm()), float(mats[-1].grad.norm())
    if b == 0:
        return math.inf if a > 0 else math.nan
    return a / b


GradTransform = Callable[[nn.Module], None]
StepCallback = Callable[[int, nn.Module, float, RunResult], None]


def train_classifier(
    model: nn.Module,
    data: Dataset,
    *,
    steps: int,
    batch_size: int = 64,
    optimizer: str | Callable[[nn.Module], torch.optim.Optimizer] = "sgd",
    lr: float = 0.1,
    opt_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    grad_transform: GradTransform | None = None,
    eval_every: int | None = None,
    log_every: int = 1,
    callback: StepCallback | None = None,
    diverge_factor: float = 100.0,
    full_batch: bool = False,
) -> RunResult:
    """Train a classifier with cross-entropy; stop (and say so) on divergence.

    Args:
        model: The network (already on ``data``'s device, already initialised).
        data: Train/test tensors.
        steps: Optimiser steps.
        batch_size: Mini-batch size (sampled without replacement, reshuffled each epoch).
        optimizer: A registered name or ``f(model) -> Optimizer``.
        lr, opt_kwargs: Optimiser settings.
        seed: Shuffling seed.
        grad_transform: Called after ``backward`` and before ``step`` (clipping, AGC ...).
        eval_every: Evaluate the test set every this many steps (and at the end).
        log_every: Keep the mini-batch loss every this many steps.
        callback: ``f(step, model, loss, result)`` after each optimiser step.
        diverge_factor: A loss above ``diverge_factor * max(initial_loss, 1)`` counts as divergence
            (as does a non-finite loss or gradient).
        full_batch: Use the whole training set every step (Rprop is a full-batch method).
    """
    opt = (
        make_optimizer(optimizer, model, lr, **(opt_kwargs or {}))
        if isinstance(optimizer, str)
        else optimizer(model)
    )
    res = RunResult()
    x, y = data.x_train, data.y_train
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).to(x.device)
    pos = 0
    linears = model.linears() if hasattr(model, "linears") else []
    t0 = time.perf_counter()
    model.train()
    bound = math.inf
    for step in range(steps):
        if full_batch:
            xb, yb = x, y
        else:
            if pos + batch_size > n:
                perm = torch.randperm(n, generator=g).to(x.device)
                pos = 0
            idx = perm[pos : pos + batch_size]
            pos += batch_size
            xb, yb = x[idx], y[idx]
        if eval_every and step % eval_every == 0:
            tl, ta = evaluate(model, data.x_test, data.y_test)
            res.eval_steps.append(step)
            res.test_loss.append(tl)
            res.test_acc.append(ta)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        lv = float(loss.detach())
        if step == 0:
            res.initial_loss = lv
            bound = diverge_factor * max(lv, 1.0)
        if not math.isfinite(lv) or lv > bound:
            res.diverged, res.diverged_step = True, step
            res.loss_steps.append(step)
            res.losses.append(lv)
            break
        loss.backward()
        if step == 0:
            if linears:
                res.grad_ratio_init = first_last_grad_ratio(linears)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            res.grad_norm_init = float(stats.global_norm(grads)) if grads else math.nan
            res.grad_ratio_io_init = first_output_grad_ratio(model)
        if grad_transform is not None:
            grad_transform(model)
        opt.step()
        if step % log_every == 0:
            res.loss_steps.append(step)
            res.losses.append(lv)
        if callback is not None:
            callback(step, model, lv, res)
        res.steps_done = step + 1
    res.wall_s = time.perf_counter() - t0
    if not res.diverged:
        params_ok = all(torch.isfinite(p).all() for p in model.parameters())
        if not params_ok:
            res.diverged, res.diverged_step = True, res.steps_done
    if res.diverged:
        res.final_train_loss = math.nan
        _, res.final_test_acc = _safe_eval(model, data.x_test, data.y_test)
    else:
        res.final_train_loss, _ = evaluate(model, x, y)
        tl, ta = evaluate(model, data.x_test, data.y_test)
        res.final_test_acc = ta
        if eval_every:
            res.eval_steps.append(res.steps_done)
            res.test_loss.append(tl)
            res.test_acc.append(ta)
    return res


def _safe_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    try:
        return evaluate(model, x, y)
    except (RuntimeError, ValueError):
        return math.nan, math.nan


def predictions(model: nn.Module, x: torch.Tensor) -> list[int]:
    """Predicted classes of ``model`` on ``x`` (eval mode)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x).argmax(1).tolist()
    model.train(was)
    return out


def seeded(seed: int) -> torch.Generator:
    """Seed torch's global RNG (for modules that draw from it) and return a CPU generator."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available else ``"cpu"``; others are checked and kept
    (:func:`signalprop._device.resolve_device`, as a string)."""
    return str(_resolve_device(device))
