"""What the probe puts around a model and its optimisers: unwrapping (DDP, torch.compile),
temporary patches removed when the probe detaches, and the scaler hook."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


class _Sentinel:
    """Marks an attached probe that has no optimiser hooks."""

    def remove(self) -> None:
        pass


class _ScalerHook:
    """Wraps ``GradScaler.update`` (restored on remove): the update that follows a step the
    scaler skipped (inf/NaN gradients) closes that step as skipped instead of merging it into
    the next one."""

    def __init__(self, scaler: Any, ref: weakref.ref) -> None:
        self.scaler = scaler
        orig = scaler.update
        self.had_attr = "update" in vars(scaler)

        def update(*a: Any, **k: Any) -> Any:
            p = ref()
            if p is not None:
                p._scaler_update()
            return orig(*a, **k)

        scaler.update = update

    def remove(self) -> None:
        if self.had_attr:
            return
        vars(self.scaler).pop("update", None)


def _is_optimized(m: nn.Module) -> bool:
    return type(m).__name__ == "OptimizedModule" and hasattr(m, "_orig_mod")


def unwrap(model: nn.Module) -> nn.Module:
    """The module that actually runs: DDP/DataParallel wrappers are unwrapped to ``.module``,
    ``torch.compile``'s wrapper to the original module (``._orig_mod``)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, DistributedDataParallel | DataParallel) or _is_optimized(model):
        model = model._orig_mod if _is_optimized(model) else model.module
    return model


def _compiled_modules(model: nn.Module) -> list[nn.Module]:
    """Compiled modules in ``model`` (torch.compile wrappers, modules compiled in place)."""
    out = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if _is_optimized(m) or getattr(m, "_compiled_call_impl", None) is not None:
            out.append(m)
        stack.extend(m.children())
        if isinstance(getattr(m, "module", None), nn.Module):
            stack.append(m.module)
    return out


class _EagerPatch:
    """Runs a compiled module eagerly until removed (the recorded steps only), so the probe's
    hooks run; the compiled graph serves every other step."""

    def __init__(self, m: nn.Module) -> None:
        self.m = m
        if _is_optimized(m):
            self.attr, self.saved = "forward", vars(m).get("forward")
            m.forward = m._orig_mod.__call__  # type: ignore[method-assign]
        else:
            self.attr, self.saved = "_compiled_call_impl", m._compiled_call_impl
            m._compiled_call_impl = None

    def remove(self) -> None:
        if self.saved is None and self.attr == "forward":
            vars(self.m).pop("forward", None)
        else:
            setattr(self.m, self.attr, self.saved)


def _as_optimizers(
    optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None,
) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    opts = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
    for o in opts:
        if not isinstance(o, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(o).__name__}")
    return opts



class _ForwardPatch:
    """Replaces ``module.forward`` by an instance attribute until removed."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        self.module = module
        module.forward = fn  # type: ignore[method-assign]

    def remove(self) -> None:
        vars(self.module).pop("forward", None)



def _call(ref: weakref.ref, method: str, *args: Any) -> None:
    p = ref()
    if p is not None:
        getattr(p, method)(*args)


def _step_hook(ref: weakref.ref, post: bool, k: int, opt: Any = None, args: tuple = (),
               kwargs: dict[str, Any] | None = None) -> tuple[tuple, dict[str, Any]] | None:
    """Optimiser ``k``'s step pre-hook (``post``: post-hook) of the probe behind ``ref``.

    A pre-hook that returns ``(args, kwargs)`` replaces the step's arguments: a closure
    (``LBFGS.step(closure)``, which runs forward and backward inside the step) is wrapped so
    that the step's statistics are taken after its first evaluation (:meth:`Probe._closure`).
    """
    p = ref()
    if p is None:
        return None
    if post:
        p._opt_post(k)
        return None
    # (``args`` holds the optimiser itself first, then the step's own arguments)
    closure = args[1] if len(args) > 1 else (kwargs or {}).get("closure")
    if closure is not None and p._active:
        return _closure_step(p, k, closure, args, kwargs or {})
    p._opt_pre(k)
    return None


def _closure_step(p: Any, k: int, closure: Callable[[], Any], args: tuple,
                  kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """``step(closure)`` of a recorded step: the optimiser evaluates the loss itself (LBFGS:
    several times, at moving weights, in its line search). The step's statistics are those of
    the first evaluation, at the weights the step starts from (what the probe records for an
    optimiser without a closure); later evaluations are not recorded. The closure's loss is
    logged unless the loop logged one. Returns the step's arguments, the closure wrapped."""
    if k in p._stepped_opts:
        p._post_step()  # (as Probe._opt_pre: a second step of this optimiser)
    ref = p._ref
    first = [True]

    def probed() -> Any:
        loss = closure()
        q = ref()
        if first and q is not None and q._active:
            first.clear()
            if "loss" not in q._scalars and isinstance(loss, torch.Tensor | float):
                q.log(loss=loss)
            if q._pending is None:
                q._pre_step()
            q._set_active(False)  # (hooks off for the later evaluations ...)
            q._active = True  # (... the step is still recorded: committed after it)
        return loss

    if len(args) > 1:  # (args[0] is the optimiser)
        return (args[0], probed, *args[2:]), kwargs
    return args, {**kwargs, "closure": probed}


class _AttrPatch:
    """Replaces a function held in a module attribute (``layer.activation = F.gelu``) by a
    wrapper until removed."""

    def __init__(self, module: nn.Module, attr: str, fn: Callable[..., Any]) -> None:
        self.module, self.attr = module, attr
        self.saved = vars(module)[attr]
        vars(module)[attr] = fn

    def remove(self) -> None:
        vars(self.module)[self.attr] = self.saved

