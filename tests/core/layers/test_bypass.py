"""Bypass: the host returns its input while the adapter runs; disabling or deleting it restores the base module."""

from __future__ import annotations

import torch
from torch import nn

from modalpeft.core.inject import attach, unwrap_all
from modalpeft.core.layers import Bypass


def test_bypass_skips_the_base_module_and_restores_it():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.9)).train()
    host = attach(model, "1", "default", Bypass())
    host.active_adapter = "default"
    x = torch.randn(8, 4)
    torch.testing.assert_close(model(x), model[0](x), rtol=0, atol=0)  # no dropout while bypassed
    assert not list(host.adapters["default"].parameters())
    host.disabled = True
    torch.manual_seed(0)
    assert (model(x) == 0).float().mean() > 0.5  # the base dropout runs again
    host.disabled = False
    base = unwrap_all(model)
    assert isinstance(base[1], nn.Dropout)
