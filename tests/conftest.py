"""Test hygiene: every test starts from the same seed and default dtype, and leaves no process group behind."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _hygiene():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
