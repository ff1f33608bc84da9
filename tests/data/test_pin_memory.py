"""``data.pin_memory``: true | false | auto (pinned exactly when CUDA is available)."""

from __future__ import annotations

import pytest
import torch

from ddtas_lightning.config.validation import ConfigError
from ddtas_lightning.data.datamodule import resolve_pin_memory


def test_auto_follows_cuda(monkeypatch):
    for available in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        assert resolve_pin_memory("auto") is available
    assert resolve_pin_memory(True) is True and resolve_pin_memory(False) is False


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_other_values_name_the_key(bad):
    with pytest.raises(ConfigError, match="data.pin_memory must be true, false or auto"):
        resolve_pin_memory(bad)
