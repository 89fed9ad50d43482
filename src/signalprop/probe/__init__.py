"""Probes: attach to any ``torch.nn.Module`` and record the forward and backward signal."""

from signalprop.probe.core import Probe, probe
from signalprop.probe.modules import activation_kind, watched_modules
from signalprop.probe.schedule import as_schedule, at_steps, every, log_spaced

__all__ = [
    "Probe",
    "probe",
    "every",
    "at_steps",
    "log_spaced",
    "as_schedule",
    "activation_kind",
    "watched_modules",
]

from signalprop._callable import make_module_callable  # noqa: E402

make_module_callable(__name__, "probe")
