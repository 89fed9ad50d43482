"""Model transforms: take a model (and optionally an example input batch), return a NEW model.

The original is never modified (transforms work on a deep copy). A transform that cannot apply
raises ``ValueError`` saying why (no activation modules to find, an activation module called
several times per forward pass, no block with equal input and output widths, ...).

- :func:`insert_norm`: batch norm / layer norm before or after every activation (Ioffe & Szegedy
  2015 put batch norm before the nonlinearity); on an :class:`~signalprop.remedies.activations.RBF`
  layer "before" normalises its squared-distance pre-activation.
- :func:`weight_norm`: w = g v / ||v|| on every Linear/Conv (Salimans & Kingma 2016).
- :func:`residual`: x + alpha * block(x) around each width-preserving block (He et al. 2016).
- :func:`highway`: T(x) block(x) + (1 - T(x)) x, T = sigmoid(W_T x + b_T), b_T < 0
  (Srivastava, Greff & Schmidhuber 2015).
- :func:`swap_activation`, :func:`scale_activations`, :func:`fewer_layers`.

Blocks are found in ``nn.Sequential`` containers: a block is the run of modules up to and
including an activation (or an RBF layer), plus any norm/dropout right after it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from signalprop._registry import Registry, check_choice
from signalprop.init import call_model, weight_layers
from signalprop.remedies.activations import (
    RBF,
    RBFKernel,
    Scaled,
    activation_kind,
    make_activation,
)
from signalprop.vocab.norms import NORM_CLASSES, NORMS, norm_module

Batch = torch.Tensor | None

#: What may follow an activation inside its unit: a norm (the vocabulary's classes) or dropout.
_NORMS: tuple[type[nn.Module], ...] = (*NORM_CLASSES, nn.Dropout, nn.AlphaDropout)


def _is_unit(m: nn.Module) -> bool:
    """An activation unit: an activation module, a ``Scaled`` one, or an RBF layer."""
    if isinstance(m, RBF | Scaled):
        return True
    return activation_kind(m) is not None and not isinstance(m, RBFKernel)


def _units(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, unit) for every activation unit, not descending into units."""
    out: list[tuple[nn.Module, str, nn.Module]] = []

    def visit(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if _is_unit(child):
                out.append((parent, name, child))
            else:
                visit(child)

    if _is_unit(model):
        raise ValueError(f"the model itself is a single activation ({type(model).__name__})")
    visit(model)
    return out


def _no_units_error(model: nn.Module, what: str) -> ValueError:
    return ValueError(
        f"cannot {what}: {type(model).__name__} has no activation modules (activations called "
        "functionally in forward(), e.g. torch.tanh(x), are invisible to transforms; use "
        "nn.Tanh() modules)"
    )


def _io_shapes(model: nn.Module, batch: Any, modules: list[nn.Module]) -> dict[int, Any]:
    """id(module) -> (input shape, output shape, calls) from one forward pass on ``batch``."""
    seen: dict[int, list[Any]] = {}
    handles = []
    for m in modules:
        def hook(mod: nn.Module, inp: Any, out: Any) -> None:
            rec = seen.setdefault(id(mod), [None, None, 0])
            if rec[2] == 0:
                x = inp[0] if isinstance(inp, tuple) and inp else inp
                rec[0] = tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else None
                rec[1] = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None
            rec[2] += 1
        handles.append(m.register_forward_hook(hook))
    was = model.training
    try:
        model.eval()  # no batch-statistics side effects from the shape pass
        with torch.no_grad():
            call_model(model, batch)  # a tensor, a tuple of inputs or a dict of keyword inputs
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return {k: tuple(v) for k, v in seen.items()}


def _check_single_calls(units: list[tuple[nn.Module, str, nn.Module]], shapes: dict[int, Any],
                        what: str) -> None:
    for parent, name, m in units:
        calls = shapes.get(id(m), (None, None, 0))[2]
        if calls > 1:
            raise ValueError(
                f"cannot {what}: activation module {name!r} of {type(parent).__name__} is called "
                f"{calls} times per forward pass, so one inserted layer would be shared by "
                "several layers; give every layer its own activation module"
            )


def _width_before(parent: nn.Module, name: str) -> int | None:
    """Feature width entering activation ``name`` from the module before it in a Sequential."""
    if not isinstance(parent, nn.Sequential):
        return None
    keys = list(parent._modules)
    for k in reversed(keys[: keys.index(name)]):
        m = parent._modules[k]
        for attr in ("out_features", "out_channels", "num_features"):
            v = getattr(m, attr, None)
            if isinstance(v, int):
                return v
        if _is_unit(m) and isinstance(m, RBF):
            return m.out_features
    return None


def _make_norm(kind: str, shape: tuple[int, ...]) -> nn.Module:
    """A norm for features of ``shape`` (without the batch dim; dim 0 = channels): the
    vocabulary's module face (BatchNorm1d/2d/3d by shape; LayerNorm on [B, F], GroupNorm(1, C)
    on conv maps, which keeps per-channel gains and does not fix the spatial size)."""
    return norm_module(kind, shape)


def _replace_children(parent: nn.Module, edits: dict[str, list[nn.Module]]) -> None:
    """Replace child ``name`` by the modules ``edits[name]`` (flattened into a Sequential)."""
    if isinstance(parent, nn.Sequential):
        items: list[nn.Module] = []
        for k, m in parent._modules.items():
            items.extend(edits.get(k, [m]))  # type: ignore[list-item]
        for k in list(parent._modules):
            del parent._modules[k]
        for i, m in enumerate(items):
            parent.add_module(str(i), m)
    else:
        for k, mods in edits.items():
            setattr(parent, k, mods[0] if len(mods) == 1 else nn.Sequential(*mods))


def _refuse_sequence_models(model: nn.Module, kind: str) -> None:
    seq = next((type(m).__name__ for m in model.modules() if isinstance(
        m, (nn.MultiheadAttention, nn.RNNBase, nn.RNNCellBase)) or "Attention" in type(m).__name__),
        None)
    if seq is not None:
        # their activations see [batch, time, features]: a norm chosen by the feature shape
        # would normalise over time steps; these models place their own (layer) norms
        raise ValueError(f"cannot insert {kind} into {type(model).__name__}: it has attention or "
                         f"recurrent layers ({seq}), whose token/time features this rewrite "
                         "does not handle")


def _norm_shape(parent: nn.Module, name: str, unit: nn.Module, shapes: dict[int, Any],
                position: str) -> tuple[int, ...]:
    """The feature shape a norm before/after activation ``unit`` sees: measured on the example
    batch when there was one, else the width of the layer before it."""
    if id(unit) in shapes:
        in_shape, out_shape, _ = shapes[id(unit)]
        return in_shape if position == "before" else out_shape
    w = unit.out_features if isinstance(unit, RBF) else _width_before(parent, name)
    if w is None:
        raise ValueError(
            f"cannot infer the width at activation {name!r} of {type(parent).__name__}; "
            "pass an example input batch"
        )
    return (w,)


def insert_norm(
    model: nn.Module,
    example_batch: Batch = None,
    kind: str = "batchnorm",
    position: str = "before",
) -> nn.Module:
    """A copy of ``model`` with a normalisation layer before or after every activation.

    Args:
        model: An MLP / CNN whose activations are modules (in a Sequential or as attributes).
        example_batch: An input batch, used to find feature shapes and to check that no
            activation module is reused; without it widths come from the preceding Linear/Conv
            in a Sequential.
        kind: ``"batchnorm"``/``"batch"`` (BatchNorm1d/2d/3d by shape) or ``"layernorm"``/``"layer"`` (LayerNorm on
            [B, F], GroupNorm(1, C) on conv maps).
        position: ``"before"`` (on the pre-activation; on an RBF layer its squared distance) or
            ``"after"`` the activation.

    Raises:
        ValueError: no activation modules, a reused activation module, unknown widths.
    """
    if kind not in NORMS or NORMS.canonical(kind) == "none":
        # "batch" and "layer" are the canonical names; "batchnorm"/"layernorm" their aliases
        check_choice("norm kind", kind, ("batchnorm", "layernorm"))
    check_choice("norm position", position, ("before", "after"))
    _refuse_sequence_models(model, kind)
    new = copy.deepcopy(model)
    units = _units(new)
    if not units:
        raise _no_units_error(model, f"insert {kind}")
    shapes: dict[int, Any] = {}
    if example_batch is not None:
        shapes = _io_shapes(new, example_batch, [u for _, _, u in units])
        _check_single_calls(units, shapes, f"insert {kind}")
    by_parent: dict[int, tuple[nn.Module, dict[str, list[nn.Module]]]] = {}
    for parent, name, unit in units:
        if example_batch is not None and id(unit) not in shapes:
            continue  # never called: nothing to normalise
        if isinstance(unit, RBF) and position == "before":
            if not isinstance(unit.norm, nn.Identity):
                raise ValueError(f"RBF layer {name!r} already has a norm on its distance")
            unit.norm = _make_norm(kind, (unit.out_features,))
            continue
        norm = _make_norm(kind, _norm_shape(parent, name, unit, shapes, position))
        mods = [norm, unit] if position == "before" else [unit, norm]
        by_parent.setdefault(id(parent), (parent, {}))[1][name] = mods
    for parent, edits in by_parent.values():
        _replace_children(parent, edits)
    return _to_like(new, model)


def _to_like(new: nn.Module, old: nn.Module) -> nn.Module:
    """Move ``new`` (whose fresh layers are on the CPU) to the device/dtype of ``old``."""
    p = next(old.parameters(), None)
    if p is not None:
        new.to(device=p.device, dtype=p.dtype if p.is_floating_point() else None)
    return new


def batchnorm(model: nn.Module, example_batch: Batch = None, position: str = "before") -> nn.Module:
    """Batch norm before (default) or after each activation (Ioffe & Szegedy 2015)."""
    return insert_norm(model, example_batch, "batchnorm", position)


def layernorm(model: nn.Module, example_batch: Batch = None, position: str = "before") -> nn.Module:
    """Layer norm before (default) or after each activation (Ba, Kiros & Hinton 2016)."""
    return insert_norm(model, example_batch, "layernorm", position)


def weight_norm(model: nn.Module, example_batch: Batch = None, dim: int = 0) -> nn.Module:
    """Weight normalisation w = g v / ||v|| (per output unit) on every Linear/Conv layer.

    Uses ``torch.nn.utils.parametrizations.weight_norm`` (Salimans & Kingma 2016).
    """

    new = copy.deepcopy(model)
    layers = weight_layers(new)
    if not layers:
        raise ValueError(f"cannot apply weight norm: {type(model).__name__} has no Linear/Conv layers")
    for _, m in layers:
        if hasattr(m, "parametrizations") and "weight" in m.parametrizations:
            raise ValueError("the model already has a weight parametrisation (weight norm?)")
        nn.utils.parametrizations.weight_norm(m, name="weight", dim=dim)
    return new


class Residual(nn.Module):
    """y = x + alpha * block(x) (He et al. 2016). Input and output shapes must agree."""

    def __init__(self, block: nn.Module, alpha: float = 1.0) -> None:
        super().__init__()
        self.block = block
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * self.block(x)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class Highway(nn.Module):
    """y = T(x) * block(x) + (1 - T(x)) * x, T(x) = sigmoid(W_T x + b_T) (Srivastava et al. 2015).

    The gate bias starts negative (``gate_bias``, -2: the paper suggests -1 to -3) so each layer
    starts close to the identity ("carry" behaviour). The gate is a Linear on the last dim.
    """

    def __init__(self, block: nn.Module, features: int, gate_bias: float = -2.0) -> None:
        super().__init__()
        self.block = block
        self.gate = nn.Linear(features, features)
        with torch.no_grad():
            self.gate.bias.fill_(gate_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.sigmoid(self.gate(x))
        return t * self.block(x) + (1 - t) * x


def _blocks(seq: nn.Sequential) -> tuple[list[list[str]], list[str]]:
    """Split a Sequential's children into blocks ending at an activation unit (+ trailing norms).

    Returns (blocks, tail) as lists of child keys.
    """
    blocks: list[list[str]] = []
    cur: list[str] = []
    keys = list(seq._modules)
    i = 0
    while i < len(keys):
        m = seq._modules[keys[i]]
        cur.append(keys[i])
        i += 1
        if _is_unit(m):  # type: ignore[arg-type]
            while i < len(keys) and isinstance(seq._modules[keys[i]], _NORMS):
                cur.append(keys[i])
                i += 1
            blocks.append(cur)
            cur = []
    return blocks, cur


def _block_io(seq: nn.Sequential, block: list[str], shapes: dict[int, Any]) -> tuple[Any, Any]:
    first, last = seq._modules[block[0]], seq._modules[block[-1]]
    if shapes:
        a, b = shapes.get(id(first)), shapes.get(id(last))
        if a is None or b is None:
            return None, None
        return a[0], b[1]
    # no example batch: widths from the weight layers
    fin = getattr(first, "in_features", getattr(first, "in_channels", None))
    fout = None
    for k in block:
        m = seq._modules[k]
        fout = getattr(m, "out_features", getattr(m, "out_channels", fout))
    return ((fin,) if fin is not None else None), ((fout,) if fout is not None else None)


def _sequentials(model: nn.Module) -> list[nn.Sequential]:
    out = []
    for m in model.modules():
        if isinstance(m, nn.Sequential) and any(_is_unit(c) for c in m.children()):
            out.append(m)
    return out


def _copy_with_sequentials(model: nn.Module, cannot: str) -> tuple[nn.Module, list[nn.Sequential]]:
    """A copy of ``model`` and its sequentials of blocks (:func:`_sequentials`); raises
    "``cannot``: ... has no nn.Sequential ..." when there are none."""
    new = copy.deepcopy(model)
    seqs = _sequentials(new)
    if not seqs:
        raise ValueError(
            f"{cannot}: {type(model).__name__} has no nn.Sequential of (layer, activation) blocks"
        )
    return new, seqs


def _wrap_blocks(
    model: nn.Module,
    example_batch: Batch,
    wrap: Callable[[nn.Module, tuple[int, ...]], nn.Module],
    what: str,
) -> nn.Module:
    new, seqs = _copy_with_sequentials(model, f"cannot add {what} connections")
    shapes: dict[int, Any] = {}
    if example_batch is not None:
        shapes = _io_shapes(new, example_batch, [c for s in seqs for c in s.children()])
    wrapped = 0
    for seq in seqs:
        blocks, tail = _blocks(seq)
        items: list[nn.Module] = []
        for block in blocks:
            mods = [seq._modules[k] for k in block]
            fin, fout = _block_io(seq, block, shapes)
            if fin is not None and fin == fout:
                inner = mods[0] if len(mods) == 1 else nn.Sequential(*mods)
                items.append(wrap(inner, fin))  # type: ignore[arg-type]
                wrapped += 1
            else:
                items.extend(mods)  # type: ignore[arg-type]
        items.extend(seq._modules[k] for k in tail)  # type: ignore[misc]
        for k in list(seq._modules):
            del seq._modules[k]
        for i, m in enumerate(items):
            seq.add_module(str(i), m)
    if not wrapped:
        raise ValueError(
            f"cannot add {what} connections to {type(model).__name__}: no block has equal input "
            "and output widths (a skip connection x + f(x) needs them equal)"
        )
    return _to_like(new, model)


def residual(model: nn.Module, example_batch: Batch = None, alpha: float = 1.0) -> nn.Module:
    """Wrap every width-preserving (layer, activation) block as x + alpha * block(x).

    ``alpha`` < 1 down-weights the branch (e.g. 1/sqrt(depth); cf. De & Smith 2020).
    """
    return _wrap_blocks(model, example_batch, lambda b, s: Residual(b, alpha), "residual")


def highway(model: nn.Module, example_batch: Batch = None, gate_bias: float = -2.0) -> nn.Module:
    """Wrap every width-preserving block in a :class:`Highway` gate (gate on the last dim)."""

    def wrap(b: nn.Module, shape: tuple[int, ...]) -> nn.Module:
        if len(shape) != 1:
            raise ValueError(f"highway gates need [B, F] features, got feature shape {shape}")
        return Highway(b, shape[0], gate_bias)

    return _wrap_blocks(model, example_batch, wrap, "highway")


def swap_activation(
    model: nn.Module, example_batch: Batch = None, activation: str = "relu", **kwargs: Any
) -> nn.Module:
    """Replace every activation module (a ``Scaled`` one included) by ``activation``.

    RBF layers are left as they are (their kernel is not an elementwise activation).
    """
    new = copy.deepcopy(model)
    units = [(p, n, u) for p, n, u in _units(new) if not isinstance(u, RBF)]
    if not units:
        raise _no_units_error(model, f"swap the activation for {activation}")
    make_activation(activation, **kwargs)  # fail early on an unknown name
    for parent, name, _ in units:
        _replace_children(parent, {name: [make_activation(activation, **kwargs)]})
    return new


def scale_activations(
    model: nn.Module, example_batch: Batch = None, a: float | str = "nf", learnable: bool = False
) -> nn.Module:
    """Wrap every activation phi as ``Scaled(phi, a)``; ``a="nf"``: 1/std(phi(z)) (NFNets)."""
    new = copy.deepcopy(model)
    units = [(p, n, u) for p, n, u in _units(new) if not isinstance(u, RBF | Scaled)]
    if not units:
        raise _no_units_error(model, "scale the activations")
    for parent, name, unit in units:
        _replace_children(parent, {name: [Scaled(unit, a, learnable)]})
    return _to_like(new, model)


def fewer_layers(
    model: nn.Module,
    example_batch: Batch = None,
    fraction: float = 0.5,
    keep: int | None = None,
) -> nn.Module:
    """Drop width-preserving hidden blocks so that about ``fraction`` of the blocks remain.

    Blocks are removed from the end of the longest Sequential (just before the head); blocks
    that change the width are always kept.

    Args:
        fraction: Fraction of blocks to keep (ignored when ``keep`` is given).
        keep: Number of blocks to keep.
    """
    if keep is None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    new, seqs = _copy_with_sequentials(model, "cannot drop layers")
    seq = max(seqs, key=lambda s: len(_blocks(s)[0]))
    blocks, tail = _blocks(seq)
    n = len(blocks)
    target = keep if keep is not None else max(1, round(n * fraction))
    if target < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    shapes = _io_shapes(new, example_batch, list(seq.children())) if example_batch is not None else {}
    removable = [i for i, b in enumerate(blocks) if (lambda io: io[0] is not None and io[0] == io[1])(
        _block_io(seq, b, shapes))]
    n_remove = min(max(0, n - target), len(removable))
    if n > target and n_remove == 0:
        raise ValueError(
            f"cannot drop layers from {type(model).__name__}: no block keeps its width, so none "
            "can be removed without breaking the shapes"
        )
    drop = set(removable[len(removable) - n_remove:])
    items = [seq._modules[k] for i, b in enumerate(blocks) if i not in drop for k in b]
    items.extend(seq._modules[k] for k in tail)
    for k in list(seq._modules):
        del seq._modules[k]
    for i, m in enumerate(items):
        seq.add_module(str(i), m)  # type: ignore[arg-type]
    return new


def pre_ln(model: nn.Module, example_batch: Batch = None) -> nn.Module:
    """Switch post-LN transformer layers to pre-LN (Xiong et al. 2020).

    Every ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` with
    ``norm_first=False`` gets ``norm_first=True`` (the same parameters, normalising each
    sub-block's input instead of the residual sum), and a ``nn.TransformerEncoder`` /
    ``nn.TransformerDecoder`` without a final norm gets one, as pre-LN stacks need.

    Raises:
        ValueError: the model has no post-LN ``nn.Transformer*Layer`` (other transformer
            implementations, such as Hugging Face's, fix the placement in their code).
    """
    new = copy.deepcopy(model)
    layers = [m for m in new.modules()
              if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))]
    post = [m for m in layers if not m.norm_first]
    if not post:
        why = ("its torch.nn.Transformer layers are already pre-LN" if layers else
               "it has no torch.nn.TransformerEncoderLayer/DecoderLayer whose norm placement "
               "can be switched")
        raise ValueError(f"cannot make {type(model).__name__} pre-LN: {why}")
    for m in post:
        m.norm_first = True
    for stack in new.modules():
        if isinstance(stack, (nn.TransformerEncoder, nn.TransformerDecoder)) and stack.norm is None:
            first = stack.layers[0]
            d = first.linear1.in_features
            ref = first.norm1
            stack.norm = nn.LayerNorm(d, eps=ref.eps).to(ref.weight.device, ref.weight.dtype)
        if isinstance(stack, nn.TransformerEncoder):
            stack.use_nested_tensor = False  # the nested-tensor fast path needs post-LN
    return new


TRANSFORMS: Registry = Registry("model transform")
TRANSFORMS.register("pre_ln", pre_ln)
TRANSFORMS.register("batchnorm", batchnorm, position="before")
TRANSFORMS.register("layernorm", layernorm, position="before")
TRANSFORMS.register("weightnorm", weight_norm)
TRANSFORMS.register("residual", residual, alpha=1.0)
TRANSFORMS.register("highway", highway, gate_bias=-2.0)
TRANSFORMS.register("swap_activation", swap_activation, activation="relu")
TRANSFORMS.register("scaled_activation", scale_activations, a="nf", learnable=False)
TRANSFORMS.register("fewer_layers", fewer_layers, fraction=0.5)
