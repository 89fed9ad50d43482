"""The one "auto" device resolver (the doctor, the lab and the sweep runner use it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """A usable ``torch.device``: ``"auto"`` is CUDA when available, else the CPU.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a ``torch.device``.

    Raises:
        ValueError: for a name torch does not know, or an accelerator this machine lacks.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    # lazy: importing torch takes 0.5-4 s; the lab runner and the CLI import this module, and
    # spawned sweep workers must reach their die-with-parent initialiser before that cost
    import torch

    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"invalid device {device!r}: {e} (valid: auto, cpu, cuda, cuda:N, mps)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available here")
    return dev
