"""User-facing errors: one readable line for anything the user can fix.

Errors raised inside the user's own code (the factory, the model's ``forward``, the loss, the data
iterator) are re-raised as :class:`UserCodeError`: ``error in your forward at step 5:
RuntimeError: ... (model.py:12)``; the original exception is kept as ``__cause__`` (the CLI shows
the whole traceback with ``--debug``). An exception raised inside signalprop itself is *not*
wrapped: that is our bug and keeps its traceback.

This module is the bottom layer of the checks: the exception types, :class:`user_code`, the
explanations of common mistakes (labels out of range, integer inputs, a detached loss) and the
checks of simple values. It imports nothing of the package, so the training loop and
:mod:`signalprop.validation` (which runs the loop's forward pass on a first batch) both build on
it. Every public name here is also importable from :mod:`signalprop.validation`.
"""

from __future__ import annotations

import errno
import inspect
import os
import sys
import sysconfig
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class UserError(ValueError):
    """Something the user asked for or gave cannot work; the message says what and how to fix it.

    A ``ValueError`` so that existing ``except ValueError`` handlers keep working. The CLI prints
    it as one line with exit status 2.

    Attributes:
        report: A partial :class:`signalprop.doctor.Report` of the steps trained before the error,
            when the doctor had trained any (else ``None``).
    """

    report: Any = None


class UserCodeError(UserError):
    """An exception raised inside the user's own code (factory, forward, loss, data).

    Attributes:
        where: ``"factory"``, ``"forward"``, ``"loss"`` or ``"data"``.
        step: The training step (``None`` before training).
        original: The exception the user's code raised (also ``__cause__``).
        location: ``file:line`` of the innermost frame in the user's code (or ``""``).
    """

    def __init__(self, where: str, step: int | None, original: BaseException,
                 when: str = "") -> None:
        self.where, self.step, self.original = where, step, original
        self.location = user_location(original.__traceback__)
        when = f" at step {step}" if step is not None else when
        msg = f"error in your {where}{when}: {first_line(original)}"
        if self.location:
            msg += f" ({self.location})"
        super().__init__(msg)


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (PyTorch messages often run over many lines)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


# --- where did it happen? ------------------------------------------------------------------------
def _library_roots() -> tuple[str, ...]:
    roots = {str(Path(__file__).resolve().parent), str(Path(torch.__file__).resolve().parent)}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            roots.add(str(Path(p).resolve()))
    return tuple(sorted(roots))


_LIB_ROOTS: tuple[str, ...] | None = None


def _is_library(filename: str) -> bool:
    global _LIB_ROOTS
    if _LIB_ROOTS is None:
        _LIB_ROOTS = _library_roots()
    if filename.startswith("<"):  # <frozen ...>, <string>
        return True
    try:
        f = str(Path(filename).resolve())
    except OSError:
        return False
    return f.startswith(_LIB_ROOTS)


def _frames(tb: TracebackType | None) -> list[traceback.FrameSummary]:
    return list(traceback.extract_tb(tb)) if tb is not None else []


def user_location(tb: TracebackType | None) -> str:
    """``file.py:line`` of the innermost traceback frame outside signalprop, torch and the
    standard library: the line of the user's code that failed (``""`` when there is none)."""
    for fr in reversed(_frames(tb)):
        if not _is_library(fr.filename):
            return f"{Path(fr.filename).name}:{fr.lineno}"
    return ""


def raised_in_signalprop(e: BaseException) -> bool:
    """Whether the innermost frame of ``e`` is signalprop's own code (a bug of ours, or one of
    our deliberate errors), as opposed to the user's code or a library it called."""
    frames = _frames(e.__traceback__)
    if not frames:
        return False
    pkg = str(Path(__file__).resolve().parent)
    try:
        return str(Path(frames[-1].filename).resolve()).startswith(pkg)
    except OSError:
        return False


def deliberate(e: BaseException) -> bool:
    """Whether ``e`` was raised on purpose by signalprop (a ``raise`` statement in our code) or
    is a :class:`UserError`: such errors are user errors even when they are ``TypeError`` or
    ``KeyError``. A ``TypeError`` raised by Python itself inside signalprop is a bug of ours."""
    if isinstance(e, UserError):
        return True
    frames = _frames(e.__traceback__)
    if not frames or not raised_in_signalprop(e):
        return False
    return (frames[-1].line or "").lstrip().startswith("raise")


class user_code:  # noqa: N801 - used like a function: ``with user_code("forward", step):``
    """Context manager: exceptions from the user's code become :class:`UserCodeError`.

    ``StopIteration``, :class:`UserError` and exceptions raised inside signalprop itself pass
    through unchanged (the latter are our bugs and keep their tracebacks).

    Args:
        where: What is being called (``"forward"``, ``"loss"``, ``"factory"``, ``"data"``).
        step: The training step, or ``None``.
        explain: Optional ``f(exception) -> str | None``: a specific diagnosis that replaces the
            generic message (e.g. labels out of range).
        when: Said instead of ``at step N`` when ``step`` is ``None`` (``" on the first
            batch"``).
    """

    def __init__(self, where: str, step: int | None = None,
                 explain: Callable[[BaseException], str | None] | None = None,
                 when: str = "") -> None:
        self.where, self.step, self.explain, self.when = where, step, explain, when

    def __enter__(self) -> user_code:
        return self

    def __exit__(self, tp: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if e is None or not isinstance(e, Exception):
            return False  # no error, or KeyboardInterrupt/SystemExit: not ours to convert
        if isinstance(e, (StopIteration, UserError)) or raised_in_signalprop(e):
            return False
        hint = self.explain(e) if self.explain is not None else None
        if hint is not None:
            when = f" at step {self.step}" if self.step is not None else self.when
            raise UserError(f"{hint} (your {self.where}{when} raised {first_line(e)})") from e
        raise UserCodeError(self.where, self.step, e, self.when) from e


def check_signature(fn: Callable[..., Any], n_args: int, what: str, rule: str) -> None:
    """Refuse a callable that cannot be called with ``n_args`` positional arguments (the
    ``TypeError`` would otherwise come from signalprop's call site and look like our bug)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins, C extensions: nothing to check
        return
    try:
        sig.bind(*range(n_args))
    except TypeError as e:
        raise UserError(f"{what} must {rule}; its signature is {sig} ({e})") from None


# --- simple values -------------------------------------------------------------------------------
def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` or a :class:`UserError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_batch_size(batch_size: Any) -> int:
    """A positive batch size (``--batch-size 0`` used to fail as 'range() arg 3 must not be
    zero')."""
    return check_positive_int("batch_size", batch_size)


def check_out_dir(path: str | os.PathLike[str], what: str = "--out") -> Path:
    """Make sure results can be written to the folder ``path`` *before* any work starts.

    Creates the folder, then writes, fsyncs and deletes a small probe file so that a read-only
    location, a path under a file or a full disk is reported now rather than after training.

    Raises:
        UserError: naming the path and the reason.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {str(p)!r} is a file, not a folder: give a folder path")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".signalprop-write-test-{uuid.uuid4().hex[:8]}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            if probe.exists():
                probe.unlink()
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        fix = {errno.ENOSPC: "free some space or choose another folder",
               errno.EDQUOT: "free some space or choose another folder"}.get(
            e.errno or 0, "choose a folder you can write to")
        raise UserError(f"cannot write to {what} {str(p)!r}: {reason}; {fix}") from None
    return p


# --- the data against the model ------------------------------------------------------------------
_CLASS_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)


def _class_loss(loss_fn: Any) -> tuple[str, int] | None:
    """``(name, ignore_index)`` when ``loss_fn`` takes class indices (cross-entropy, NLL)."""
    if isinstance(loss_fn, _CLASS_LOSSES):
        return type(loss_fn).__name__, int(loss_fn.ignore_index)
    if loss_fn in (F.cross_entropy, F.nll_loss):
        return loss_fn.__name__, -100
    return None


def _first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding,
                          nn.Bilinear, nn.LazyLinear)):
            return name or type(m).__name__, m
    return None


def explain_forward_error(model: nn.Module, x: Any) -> str | None:
    """Why a forward pass on ``x`` failed, when the first layer makes it plain: integer inputs or
    a wrong feature count (else ``None``, and the user sees the original message)."""
    if not isinstance(x, torch.Tensor):
        return None
    first = _first_layer(model)
    if first is None:
        return None
    name, m = first
    if isinstance(m, nn.Embedding) or isinstance(m, nn.LazyLinear):
        return None
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point() and not x.is_floating_point() \
            and not x.is_complex():
        return (f"the inputs are {str(x.dtype).replace('torch.', '')} but the model's first layer "
                f"{name!r} ({type(m).__name__}) has {str(w.dtype).replace('torch.', '')} weights: "
                "convert them with x.float()")
    if isinstance(m, nn.Linear) and x.dim() >= 1 and x.shape[-1] != m.in_features:
        return (f"the inputs have {x.shape[-1]} features but the model's first layer {name!r} "
                f"(Linear) expects {m.in_features}: give data with {m.in_features} features "
                f"or build the model with in_features={x.shape[-1]}")
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    if isinstance(m, conv) and x.dim() >= 2 and x.shape[1] != m.in_channels:
        return (f"the inputs have {x.shape[1]} channels (dimension 1) but the model's first "
                f"layer {name!r} ({type(m).__name__}) expects {m.in_channels}")
    return None


def _label_problem(out: Any, y: Any, ignore_index: int = -100) -> str | None:
    """Class labels that do not fit the model's output width (or are not labels at all)."""
    if not (isinstance(out, torch.Tensor) and isinstance(y, torch.Tensor)):
        return None
    if out.dim() < 2 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        return None
    if y.numel() == 0:
        return None
    width = int(out.shape[1])
    valid = y[y != ignore_index]
    if valid.numel() == 0:
        return None
    lo, hi = int(valid.min()), int(valid.max())
    if lo < 0 or hi >= width:
        bad = lo if lo < 0 else hi
        return (f"label {bad} is out of range for a model with {width} outputs (labels must be "
                f"in 0..{width - 1}; the labels run from {lo} to {hi}): "
                + ("remap the labels to 0..C-1" if lo < 0 else
                   f"give the model's last layer {hi + 1} outputs or remap the labels"))
    return None



def _float_target_problem(loss_fn: Any, pred: Any, y: Any) -> str | None:
    cls = _class_loss(loss_fn)
    if cls is None or not isinstance(y, torch.Tensor) or not y.is_floating_point():
        return None
    if isinstance(pred, torch.Tensor) and y.shape == pred.shape:
        return None  # class probabilities: a valid target for cross-entropy
    return (f"the targets are {str(y.dtype).replace('torch.', '')} but {cls[0]} takes integer "
            "class labels: convert them with y.long() (or give class probabilities of the "
            "output's shape)")



def not_attached_message(src: str = "the loss", step: int | None = None) -> str:
    """The message for a loss that does not require grad."""
    when = f" at step {step}" if step is not None else ""
    return (f"{src}{when} returned a loss that is not attached to the model's graph "
            "(requires_grad=False), so there is nothing to back-propagate: remove "
            ".detach()/.item()/torch.no_grad() from the loss")


def explain_loss_error(pred: Any, y: Any, loss_fn: Any = None
                       ) -> Callable[[BaseException], str | None]:
    """An ``explain`` hook for :class:`user_code` around the loss: labels out of range or float
    labels for a class loss."""
    def explain(e: BaseException) -> str | None:
        if pred is None:
            return ("your model's forward returned None: does it end with a return statement?")
        return _float_target_problem(loss_fn, pred, y) or _label_problem(pred, y)

    return explain


def debug_requested() -> bool:
    """``$SIGNALPROP_DEBUG`` set to something true (the CLI's ``--debug`` sets it too)."""
    return os.environ.get("SIGNALPROP_DEBUG", "").lower() not in ("", "0", "false", "no")


def print_debug(e: BaseException) -> None:
    """The full traceback (chained causes included) on stderr."""
    traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
