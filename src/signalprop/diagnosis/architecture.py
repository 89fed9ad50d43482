"""Architecture facts read from a model's module types, for prescriptions that fit the model.

The doctor writes these into ``record.meta`` (without overwriting values the probe measured) and
:func:`signalprop.diagnosis.context_of` reads them back, so a diagnosis from a saved record knows
them too. Facts that module types cannot settle are ``None`` (unknown), never guessed.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from signalprop.remedies.transforms import _sequentials, _units

#: Class names of blocks that add their input to their output (ResNet, transformer and
#: Hugging Face layers).
_RESIDUAL_NAME = re.compile(
    r"(Residual|BasicBlock|Bottleneck|ResBlock|ResnetBlock|EncoderLayer|DecoderLayer|"
    r"^Bert(Layer)$|^Roberta(Layer)$|^GPT2Block$|^GPTNeoBlock$|^LlamaDecoderLayer$|Block$)"
)

#: Hugging Face ``config.model_type`` -> where each layer normalises (post-LN: after the
#: residual sum, as in the original transformer and BERT; pre-LN: before each sub-block).
_HF_NORM_PLACEMENT: dict[str, str] = {
    "bert": "post", "roberta": "post", "electra": "post", "albert": "post",
    "distilbert": "post", "xlm-roberta": "post", "camembert": "post", "deberta": "post",
    "gpt2": "pre", "gpt_neo": "pre", "gptj": "pre", "gpt_neox": "pre", "llama": "pre",
    "mistral": "pre", "opt": "pre", "bloom": "pre", "phi": "pre", "qwen2": "pre", "t5": "pre",
}


def _is_attention(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__


def architecture_facts(model: nn.Module) -> dict[str, Any]:
    """What a model's module types say about its architecture.

    Returns:
        ``residual`` (True: a known residual block type is present; False: the model is built
        only of ``nn.Sequential`` containers around leaf modules, which cannot add a skip;
        None: unknown), ``norm_placement`` (``"pre"``/``"post"``/``None``) of transformer
        layers, ``transformer`` (attention modules present), ``recurrent`` (``nn.RNN/LSTM/GRU``
        or cells), ``sequential_blocks`` (an ``nn.Sequential`` of (layer, activation) blocks
        exists: what the structural remedies rewrite) and ``pre_ln_switchable`` (post-LN
        ``torch.nn.Transformer*Layer`` modules that the ``pre_ln`` remedy can switch) and
        ``activation_modules`` (activation modules exist: what ``relu`` / ``scaled_activation``
        swap; activations called as functions cannot be swapped).
    """
    mods = list(model.modules())
    names = [type(m).__name__ for m in mods]
    torch_layers = [m for m in mods
                    if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))]
    residual: bool | None
    if any(_RESIDUAL_NAME.search(n) for n in names):
        residual = True
    elif all(isinstance(m, nn.Sequential) or not list(m.children()) for m in mods):
        residual = False
    else:
        residual = None
    placement: str | None = None
    if torch_layers:
        firsts = {bool(m.norm_first) for m in torch_layers}
        placement = "pre" if firsts == {True} else "post" if firsts == {False} else "mixed"
    else:
        cfg = getattr(model, "config", None)
        placement = _HF_NORM_PLACEMENT.get(str(getattr(cfg, "model_type", "")), None)
    return {
        "residual": residual,
        "norm_placement": placement,
        "transformer": any(_is_attention(m) for m in mods),
        "recurrent": any(isinstance(m, (nn.RNNBase, nn.RNNCellBase)) for m in mods),
        "sequential_blocks": bool(_sequentials(model)),
        "pre_ln_switchable": any(not m.norm_first for m in torch_layers),
        "activation_modules": _has_activation_modules(model),
    }


def _has_activation_modules(model: nn.Module) -> bool:
    try:
        return bool(_units(model))
    except ValueError:  # the model itself is one activation
        return True
