"""The train package split by responsibility keeps every name importable from ``signalprop.train``,
and the error types the loop raises are the ones callers catch from ``signalprop.validation``
(``signalprop.errors`` sits below both, which broke the train <-> validation circle)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import signalprop.errors as E
import signalprop.train as T
import signalprop.validation as V


def test_every_public_name_of_the_loop_is_importable_from_the_package() -> None:
    for name in T.__all__:
        assert getattr(T, name) is not None, name
    assert T.TrainResult is T.FitResult
    assert T.fit.__module__ == "signalprop.train.loop"  # the loop lives in one module


def test_validation_re_exports_the_error_layer() -> None:
    for name in V.__all__:
        if hasattr(E, name):
            assert getattr(V, name) is getattr(E, name), name


def test_the_loop_raises_the_error_callers_catch_from_validation() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    with pytest.raises(V.UserError, match="not attached"):
        T.fit(model, (x, y), lambda p, t: ((p - t) ** 2).mean().detach(), steps=1, probe=None)
    with pytest.raises(V.UserCodeError, match="error in your loss at step 0"):
        T.fit(model, (x, y), lambda p, t: 1 / 0, steps=1, probe=None)

