"""What the examples share: their ``--steps`` / ``--out`` options and the layers of a deep MLP.

Every example still runs on its own (``python examples/NAME.py``): Python puts this folder on the
import path of the script it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from torch import nn


def parser(doc: str | None, steps: int, out: str, steps_help: str | None = None
           ) -> argparse.ArgumentParser:
    """An argument parser described by the first line of ``doc``, with ``--steps`` (default
    ``steps``) and ``--out`` (default ``out``); add an example's own options to it."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    ap.add_argument("--steps", type=int, default=steps, help=steps_help)
    ap.add_argument("--out", type=Path, default=Path(out))
    return ap


def mlp_layers(d_in: int, depth: int, width: int, act: Callable[[], nn.Module]) -> list[nn.Module]:
    """``depth`` blocks of ``Linear`` then ``act()``: the body of a deep MLP (its head is the
    example's own)."""
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    return layers
