"""Distributed training (DDP, FSDP): combine each recorded step's per-layer values across ranks
before they are recorded, so the record describes the whole model on the whole global batch,
not one rank's shard.

    from signalprop.integrations.distributed import distributed_probe, save_on_rank_zero

    model = DDP(net)                      # or FSDP(net, use_orig_params=True)
    probe = distributed_probe(model, optimizer=opt)
    with probe:
        ...                               # the unchanged training loop, on every rank
    save_on_rank_zero(probe.record, "record.json.gz")

Every rank must record the same steps (the same schedule, which is the default) because the
reduction is a collective. The Lightning and Hugging Face callbacks install the reducer
themselves when ``torch.distributed`` is initialised with more than one process, and write
their files on rank 0 only.

How each metric is combined over ``W`` ranks (``x_r`` = rank r's value):

| metric | combined as | why |
| --- | --- | --- |
| ``grad_norm``, ``weight_norm``, ``grad_norm_total[_clipped]`` | sqrt(sum x_r^2) when parameters are sharded (FSDP), else the mean | a shard holds part of each tensor; DDP replicas hold all of it (and agree) |
| update ratios | sqrt(sum ||dW_r||^2) / sqrt(sum ||W_r||^2) when sharded | same |
| ``out_grad_norm`` | sqrt(sum x_r^2) / W | the gradient of the mean of the ranks' losses (what DDP optimises) over the global batch |
| ``*_nonfinite`` | sum | counts |
| ``out_std``, ``input_std`` | sqrt(mean(std_r^2 + mean_r^2) - mean^2) | exact pooled std for equal local batches |
| ``input_absmax`` | max | |
| ``dead_frac`` | min | a unit is dead only if it is dead on every rank: an upper bound, exact when the same units are dead everywhere |
| everything else (means, percentiles, fractions, loss) | mean | exact for means over equal local batches; percentiles are averaged (an approximation) |
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from signalprop.probe import Probe
from signalprop.record import Record

_PARAM_SUMSQ = ("grad_norm", "weight_norm", "grad_norm_total", "grad_norm_total_clipped")


def is_distributed(group: Any = None) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def is_rank_zero(group: Any = None) -> bool:
    """Rank 0 (or not distributed at all): the process that writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank(group) == 0


def has_sharded_params(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are sharded across ranks (FSDP, FSDP2/DTensor)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover - torch built without distributed
        FSDP = ()  # type: ignore[assignment]  # noqa: N806
    for m in model.modules():
        if isinstance(m, FSDP) or type(m).__name__.startswith("FSDP"):
            return True
    return any(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor"
               for p in model.parameters())


class DistributedReducer:
    """Combines one step's flat value vector across ranks (see the module docstring).

    Args:
        sharded: Parameters are sharded (FSDP): parameter norms add in squares.
        group: Process group (default: the world).
    """

    def __init__(self, sharded: bool = False, group: Any = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("DistributedReducer needs torch.distributed initialised "
                             "(torch.distributed.init_process_group)")
        self.sharded = bool(sharded)
        self.group = group
        self.world = dist.get_world_size(group)
        self._plans: dict[int, tuple[Any, ...]] = {}

    # ---- the probe's hooks ------------------------------------------------------------------
    def reduce(
        self, names: Sequence[tuple[str, str]], vec: torch.Tensor
    ) -> tuple[list[tuple[str, str]], torch.Tensor]:
        """Combine ``vec`` (labelled by ``names``) across ranks; every rank gets the same
        ``(names, values)``: the union of every rank's names (an FSDP rank whose shard of a
        parameter is empty has no gradient for it)."""
        names = list(names)
        if self.world == 1:
            return names, vec
        key = _names_key(names)
        if not self._same_everywhere(key, len(names)):
            return self._reduce_by_name(names, vec)
        return names, self._reduce_aligned(names, vec, key)

    def update_norms(self, num: torch.Tensor, den: torch.Tensor) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
        """Per-parameter ``||dW||`` and ``||W||`` over the whole tensor (sharded parameters)."""
        if self.world == 1 or not self.sharded:
            return num, den
        both = torch.cat([num.reshape(-1), den.reshape(-1)]).to("cpu", torch.float64).square()
        dist.all_reduce(both, group=self.group)
        both = both.sqrt()
        return both[: num.numel()], both[num.numel():]

    # ---- internals ----------------------------------------------------------------------------
    def _same_everywhere(self, key: int, n: int) -> bool:
        # one tiny collective: min and max of (key, n) agree on every rank
        t = torch.tensor([key, n, -key, -n], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t[0] == key and t[1] == n and -t[2] == key and -t[3] == n

    def _plan(self, names: list[tuple[str, str]], key: int) -> tuple[Any, ...]:
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        pos = {nm: i for i, nm in enumerate(names)}
        sumsq, sumsq_w, summed, mean, mx, mn, std = [], [], [], [], [], [], []
        for i, (layer, metric) in enumerate(names):
            if metric in _PARAM_SUMSQ:
                (sumsq if self.sharded else mean).append(i)
            elif metric == "out_grad_norm":
                sumsq_w.append(i)
            elif metric.endswith("nonfinite"):
                summed.append(i)
            elif metric == "input_absmax":
                mx.append(i)
            elif metric == "dead_frac":
                mn.append(i)
            elif metric.endswith("_std"):
                m = pos.get((layer, metric[: -len("std")] + "mean"))
                if m is None:
                    mean.append(i)
                else:
                    std.append((i, m))
            else:
                mean.append(i)
        plan = tuple(torch.tensor(v, dtype=torch.long) for v in
                     (sumsq, sumsq_w, summed, mean, mx, mn)) + (
            torch.tensor([i for i, _ in std], dtype=torch.long),
            torch.tensor([m for _, m in std], dtype=torch.long),
        )
        self._plans[key] = plan
        return plan

    def _reduce_aligned(self, names: list[tuple[str, str]], vec: torch.Tensor,
                        key: int) -> torch.Tensor:
        sumsq, sumsq_w, summed, mean, mx, mn, std_i, std_m = self._plan(names, key)
        v = vec.to("cpu", torch.float64)
        # one SUM collective for squares, counts, means and second moments; one MAX for max/min
        pack = torch.cat([v[sumsq].square(), v[sumsq_w].square(), v[summed], v[mean],
                          v[std_i].square() + v[std_m].square()])
        dist.all_reduce(pack, group=self.group)
        ext = torch.cat([v[mx], -v[mn]])
        if ext.numel():
            dist.all_reduce(ext, op=dist.ReduceOp.MAX, group=self.group)
        out = v.clone()
        k = 0
        for idx, f in ((sumsq, lambda x: x.sqrt()),
                       (sumsq_w, lambda x: x.sqrt() / self.world),
                       (summed, lambda x: x),
                       (mean, lambda x: x / self.world)):
            out[idx] = f(pack[k : k + idx.numel()])
            k += idx.numel()
        if std_i.numel():
            second = pack[k:] / self.world
            mu = out[std_m]  # already the global mean
            out[std_i] = (second - mu.square()).clamp_min(0).sqrt()
        out[mx] = ext[: mx.numel()]
        out[mn] = -ext[mx.numel():]
        return out

    def _reduce_by_name(
        self, names: list[tuple[str, str]], vec: torch.Tensor
    ) -> tuple[list[tuple[str, str]], torch.Tensor]:
        """Ranks disagree on which values exist (e.g. FSDP shards without a gradient): gather
        every rank's values by name, then combine the union in the same way."""
        mine = dict(zip(names, vec.tolist(), strict=True))
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, mine, group=self.group)
        union = list(dict.fromkeys(nm for g in gathered for nm in g))  # rank 0's order first
        out = []
        for nm in union:
            xs = [g[nm] for g in gathered if nm in g]
            out.append(self._combine(nm, xs, {k: [g[k] for g in gathered if k in g]
                                              for k in [(nm[0], nm[1][:-3] + "mean")]}))
        return union, torch.tensor(out, dtype=torch.float64)

    def _combine(self, name: tuple[str, str], xs: list[float],
                 means: dict[tuple[str, str], list[float]]) -> float:
        layer, metric = name
        w = self.world
        if metric in _PARAM_SUMSQ:
            return math.sqrt(sum(x * x for x in xs)) if self.sharded else sum(xs) / len(xs)
        if metric == "out_grad_norm":
            return math.sqrt(sum(x * x for x in xs)) / w
        if metric.endswith("nonfinite"):
            return sum(xs)
        if metric == "input_absmax":
            return max(xs)
        if metric == "dead_frac":
            return min(xs)
        if metric.endswith("_std"):
            ms = means.get((layer, metric[:-3] + "mean"), [])
            if len(ms) == len(xs):
                mu = sum(ms) / len(ms)
                second = sum(s * s + m * m for s, m in zip(xs, ms, strict=True)) / len(xs)
                return math.sqrt(max(second - mu * mu, 0.0))
        return sum(xs) / len(xs)


def _names_key(names: list[tuple[str, str]]) -> int:
    # a 31-bit checksum: exact in float64, so the MAX collective compares it exactly
    return zlib.crc32("\x00".join(f"{a}\x01{b}" for a, b in names).encode()) & 0x7FFFFFFF


def auto_reducer(model: nn.Module, group: Any = None) -> DistributedReducer | None:
    """A :class:`DistributedReducer` for ``model`` when running distributed, else ``None``."""
    if not is_distributed(group):
        return None
    return DistributedReducer(sharded=has_sharded_params(model), group=group)


def _unwrap_fsdp(model: nn.Module) -> nn.Module:
    # the root FSDP wrapper adds "_fsdp_wrapped_module." to every name; its .module holds the
    # user's modules, whose parameters (use_orig_params=True) are the sharded originals
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover
        return model
    while isinstance(model, FSDP):
        model = model.module
    return model


def distributed_probe(model: nn.Module, *, group: Any = None, **kwargs: Any) -> Probe:
    """A :class:`~signalprop.probe.Probe` whose values are combined across ranks (DDP and a
    root FSDP wrapper are unwrapped, so layer names are the model's own)."""
    probe = Probe(_unwrap_fsdp(model), **kwargs)
    install_reducer(probe, model, group)
    return probe


def install_reducer(probe: Probe, model: nn.Module | None = None, group: Any = None) -> bool:
    """Give ``probe`` a :class:`DistributedReducer` when running distributed (the callbacks
    call this at train start); the record's meta notes the world size. Returns whether one
    was installed."""
    if probe.reducer is not None or not is_distributed(group):
        return False
    probe.reducer = DistributedReducer(
        sharded=has_sharded_params(model if model is not None else probe.model), group=group
    )
    probe.record.meta["world_size"] = probe.reducer.world
    probe.record.meta["sharded_params"] = probe.reducer.sharded
    return True


def save_on_rank_zero(record: Record, path: str | os.PathLike[str]) -> Path | None:
    """Save ``record`` on rank 0 only; other ranks return ``None``."""
    if not is_rank_zero():
        return None
    return record.save(path)
