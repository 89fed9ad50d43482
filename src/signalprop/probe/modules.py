"""Which modules a probe watches, and what kind of activation each one is."""

from __future__ import annotations

from torch import nn

# torch classes -> canonical activation names (shared with theory and remedies registries).
# Order matters: ReLU6 subclasses Hardtanh, so it is checked first.
_TORCH_ACTIVATIONS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.ReLU6, "relu6"),
    (nn.Sigmoid, "sigmoid"),
    (nn.Tanh, "tanh"),
    (nn.Softsign, "softsign"),
    (nn.Hardtanh, "hardtanh"),
    (nn.ReLU, "relu"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.RReLU, "rrelu"),
    (nn.ELU, "elu"),
    (nn.SELU, "selu"),
    (nn.CELU, "celu"),
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
    (nn.Mish, "mish"),
    (nn.Softplus, "softplus"),
    (nn.Hardsigmoid, "hardsigmoid"),
    (nn.Hardswish, "hardswish"),
    (nn.LogSigmoid, "logsigmoid"),
    (nn.Tanhshrink, "tanhshrink"),
)

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


#: Activation modules known by class name (Hugging Face ``transformers.activations``): some
#: compute their function from others (NewGELU from tanh), so the name is the only safe guide.
_BY_NAME: dict[str, str] = {
    "GELUActivation": "gelu", "NewGELUActivation": "gelu", "FastGELUActivation": "gelu",
    "QuickGELUActivation": "gelu", "GELUTanh": "gelu", "ClippedGELUActivation": "gelu",
    "AccurateGELUActivation": "gelu", "PytorchGELUTanh": "gelu", "SiLUActivation": "silu",
    "MishActivation": "mish",
}


def activation_kind(module: nn.Module) -> str | None:
    """Canonical activation name of ``module`` or ``None``.

    Custom modules declare theirs with a class attribute ``signalprop_activation = "gaussian"``.
    """
    custom = getattr(module, "signalprop_activation", None)
    if isinstance(custom, str):
        return custom
    for cls, name in _TORCH_ACTIVATIONS:
        if isinstance(module, cls):
            return name
    return _BY_NAME.get(type(module).__name__)


def watched_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules to hook: leaves (no children) that are not pass-through, plus any module that
    declares an activation kind or owns parameters directly while having children."""
    out = []
    for name, m in model.named_modules():
        is_leaf = next(m.children(), None) is None
        if isinstance(m, _PASSTHROUGH):
            continue
        own_params = next(m.parameters(recurse=False), None) is not None
        if is_leaf or activation_kind(m) is not None or (own_params and not is_leaf):
            if name == "" and not is_leaf:
                # the model itself: its output is the network's output, already seen by the loss
                continue
            out.append((name or type(m).__name__, m))
    return out
