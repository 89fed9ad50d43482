"""What module hooks cannot see: functional activations, residual additions, norm placement and
parameters used outside a module call, read from the torch functions a forward pass calls.

A :class:`torch.overrides.TorchFunctionMode` is pushed around the model's forward on recorded
steps only (and, after the first recorded step, only when that step found something that needs
it), so unrecorded steps run at full speed. Inside, each torch function call is checked against
small tables; everything else passes straight through. Functional activations that a module
calls through one of its attributes (``nn.TransformerEncoderLayer.activation``) are seen after
the first recorded step by patching that attribute on recorded steps instead (no mode around
every op); if a patched step sees fewer calls than the first one, the mode comes back.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from signalprop.vocab.activations import ACTIVATIONS

if TYPE_CHECKING:  # pragma: no cover
    from signalprop.probe.core import Probe

_T = torch.Tensor


#: torch function -> canonical activation kind: the functional forms of the vocabulary's entries.
ACTIVATION_FUNCTIONS: dict[Any, str] = {
    f: n for n in ACTIVATIONS for f in ACTIVATIONS.get(n).functions
}

#: In-place variants: their input is overwritten (a recorded output must be copied first).
_INPLACE = {f for n in ACTIVATIONS for f in ACTIVATIONS.get(n).inplace}

_ADD = {torch.add, _T.add, _T.__add__, _T.__radd__, _T.add_, _T.__iadd__}
_NORM = {F.layer_norm, F.batch_norm, F.group_norm, F.instance_norm}
if hasattr(F, "rms_norm"):
    _NORM.add(F.rms_norm)


def _mutates(func: Any) -> bool:
    """In-place tensor methods: ``add_``, ``__iadd__`` ... (not ``__add__``)."""
    n = getattr(func, "__name__", "")
    return (n.endswith("_") and not n.endswith("__")) or (n.startswith("__i") and n.endswith("__"))


def _fname(func: Any) -> str:
    n = getattr(func, "__name__", str(func))
    return n.strip("_") or n


class ProbeMode(TorchFunctionMode):
    """The torch-function observer of one probe (see the module docstring)."""

    def __init__(self, probe: Probe) -> None:
        super().__init__()
        self.ref = weakref.ref(probe)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        p = self.ref()
        kind = ACTIVATION_FUNCTIONS.get(func)
        if p is None or not p._active:
            return func(*args, **kwargs)
        if kind is not None and args and isinstance(args[0], torch.Tensor) and (
            func in _INPLACE or kwargs.get("inplace") is True
            or (len(args) > 1 and args[1] is True and func in (F.relu, F.elu, F.leaky_relu))
        ):
            p.save_before_inplace(args[0])
        elif args and isinstance(args[0], torch.Tensor) and _mutates(func):
            p.save_before_inplace(args[0])  # x += y, x.mul_(...): on a recorded output
        out = func(*args, **kwargs)
        if kind is not None and isinstance(out, torch.Tensor):
            p._functional_activation(kind, _fname(func), args, out, func)
        elif p._mapping:
            if func in _ADD:
                p._seen_add(args, out)
            elif func in _NORM:
                p._seen_norm(out)
            if p._free_params:
                p._seen_params(args, kwargs)
        return out
