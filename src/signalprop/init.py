"""Weight initialisations, in place, in ``torch.nn.init`` style (names end in ``_``).

The implementations and the registry :data:`INITS` live in the initialisation vocabulary,
:mod:`signalprop.vocab.inits` (one registry per concept; aliases ``he`` -> ``kaiming`` and
``gaussian`` -> ``lecun`` resolved there); this module is its public name.

Schemes: :func:`lecun_`, :func:`xavier_`, :func:`kaiming_`, :func:`orthogonal_`, :func:`lsuv_`
(Mishkin & Matas 2016), :func:`scale_`, :func:`critical_` (edge of chaos, from the mean-field
theory), :func:`default_` (PyTorch's own); formulas and sources in :mod:`signalprop.vocab.inits`.
"""

from __future__ import annotations

from signalprop.vocab.inits import *  # noqa: F403 (this module is the vocabulary's public name)
from signalprop.vocab.inits import __all__  # noqa: F401
