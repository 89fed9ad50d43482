"""The lab's networks and runs in the library's own terms.

A study's MLP is :class:`signalprop.engine.MLP` (the sweep runner's model: activations and norms
by registry name, ``layers.<i>.{linear,norm,act}`` and ``head``), initialised by
:data:`signalprop.init.INITS` names, trained by :func:`signalprop.train.fit` (one loop, one
divergence policy), and measured by :class:`signalprop.probe.Probe` records. The helpers here
only join those pieces: a fixed *probe batch* pass recorded by a probe (batch statistics in BN,
running statistics untouched) and test accuracy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from signalprop.data import Dataset, load_dataset
from signalprop.engine import MLP
from signalprop.init import apply_init
from signalprop.probe import Probe
from signalprop.train import FitResult
from signalprop.train import fit as _fit


def dataset(name: str, device: str = "cpu") -> Dataset:
    """A registered data set (:data:`signalprop.data.DATASETS`) on ``device``."""
    return load_dataset(name).to(device)


def mlp(
    data: Dataset, width: int, depth: int, activation: str, norm: str = "none", *,
    init: str = "kaiming", scale: float = 1.0, seed: int = 0, **init_kw: Any,
) -> MLP:
    """``depth`` hidden layers of ``width`` units (``Linear -> [norm] -> activation``) and a
    linear head, initialised by the registered ``init`` (``kaiming`` with
    ``nonlinearity="linear"``: W ~ N(0, 1/fan_in); ``nonlinearity="relu"``: He), zero biases,
    then every weight matrix times ``scale`` (the registered ``scale`` init). ``seed`` seeds
    torch's global generator first, so the same seed builds the same network."""
    torch.manual_seed(seed)
    model = MLP(data.in_features, data.num_classes, depth=depth, width=width,
                activation=activation, norm=norm)
    apply_init(init, model, **init_kw)
    if scale != 1.0:
        apply_init("scale", model, factor=scale)
    return model


def fit(*args: Any, **kwargs: Any) -> FitResult:
    """:func:`signalprop.train.fit`, except that a run stopped by Ctrl-C raises
    ``KeyboardInterrupt`` instead of returning its partial result: the loop hands a user the
    steps trained, but a study would store that partial run in its cache as if it had finished."""
    res = _fit(*args, **kwargs)
    if res.interrupted:
        raise KeyboardInterrupt
    return res


@contextlib.contextmanager
def batch_stats_only(model: nn.Module) -> Iterator[None]:
    """Batch norm normalises with the batch's statistics and leaves its running statistics as
    they are (momentum 0 inside the block): a measurement pass does not change the model."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom


def probe_pass(probe: Probe, model: nn.Module, x: torch.Tensor) -> None:
    """Record one forward pass of ``model`` on ``x`` as the probe's next step (train mode,
    batch statistics, no weight or running-statistic change)."""
    with batch_stats_only(model):
        probe.attach()
        try:
            model(x)
            probe.step()
        finally:
            probe.detach()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Predicted classes in eval mode (the mode is restored)."""
    was = model.training
    model.eval()
    out = model(x).argmax(1)
    model.train(was)
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy in eval mode."""
    return float((predict(model, x) == y).float().mean())


def train(
    model: nn.Module, data: Dataset, *, steps: int, lr: float, batch_size: int, seed: int,
    every: int = 0, on_record: Callable[[int], None] | None = None, optimizer: str = "sgd",
    **fit_kw: Any,
) -> tuple[FitResult, list[int], list[float]]:
    """:func:`signalprop.train.fit` with ``optimizer`` (a registered name; SGD by default) and
    cross-entropy on the training split, plus test accuracy (and ``on_record(step)``) before
    step 0, every ``every`` steps and at the end.

    Returns ``(fit result, evaluation steps, test accuracies)``.
    """
    steps_at: list[int] = []
    accs: list[float] = []

    def record(step: int) -> None:
        steps_at.append(step)
        accs.append(accuracy(model, data.x_test, data.y_test))
        if on_record is not None:
            on_record(step)

    def cb(step: int, m: nn.Module, loss: float) -> None:
        if every and (step + 1) % every == 0 and step + 1 < steps:
            record(step + 1)

    fit_kw.setdefault("probe", None)
    record(0)
    r = fit(model, (data.x_train, data.y_train), F.cross_entropy, steps=steps, optimizer=optimizer,
            lr=lr, batch_size=batch_size, seed=seed, callback=cb, device=data.x_train.device,
            **fit_kw)
    record(r.steps)  # a diverged network is evaluated as it is (NaN outputs: chance level)
    return r, steps_at, accs
