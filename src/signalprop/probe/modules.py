"""Which modules a probe watches, and what kind of activation each one is."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

# the canonical name of a module (torch classes, Hugging Face class names, custom
# ``signalprop_activation``) is defined once, in the activation vocabulary
from signalprop.vocab.activations import activation_kind

__all__ = ["activation_kind", "scripted", "watched_modules"]

# Leaf modules that only reshape or pass data through: watching them adds cost and no signal.
_PASSTHROUGH: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)


def _is_leaf(m: nn.Module) -> bool:
    """No children, not counting the ``parametrizations`` of a parametrized module
    (``weight_norm``, ``spectral_norm``, ``orthogonal``: a parametrized ``nn.Linear`` is still
    a layer)."""
    if not parametrize.is_parametrized(m):
        return next(m.children(), None) is None
    return all(n == "parametrizations" for n, _ in m.named_children())


def watched_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules to hook: leaves (no children) that are not pass-through, plus any module that
    declares an activation kind or owns parameters directly while having children. The
    modules that compute a parametrized weight are not on the signal path: not watched, nor
    TorchScript modules (``torch.jit.script``: they take no hooks; see :func:`scripted`)."""
    out = []
    skip: list[str] = []  # the parametrizations' subtrees, by name prefix
    for name, m in model.named_modules():
        if skip and any(name.startswith(s) for s in skip):
            continue
        if isinstance(m, torch.jit.ScriptModule):
            # TorchScript runs it as one compiled graph: no hooks on it or inside it
            skip.append(f"{name}." if name else "")
            continue
        if parametrize.is_parametrized(m):
            skip.append(f"{name}.parametrizations" if name else "parametrizations")
        is_leaf = _is_leaf(m)
        if isinstance(m, _PASSTHROUGH):
            continue
        own_params = next(m.parameters(recurse=False), None) is not None
        if is_leaf or activation_kind(m) is not None or (own_params and not is_leaf):
            if name == "" and not is_leaf:
                # the model itself: its output is the network's output, already seen by the loss
                continue
            out.append((name or type(m).__name__, m))
    return out


def scripted(model: nn.Module) -> list[str]:
    """The outermost TorchScript submodules of ``model`` (``torch.jit.script``): they run as
    compiled graphs that take no module hooks, so nothing inside them is observed."""
    out: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, torch.jit.ScriptModule) and not any(
                name.startswith(f"{o}.") for o in out):
            out.append(name or type(m).__name__)
    return out
