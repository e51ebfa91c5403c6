from __future__ import annotations

import os

import pytest
import torch.distributed as dist

_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")


@pytest.fixture(autouse=True)
def _clean_distributed():
    """Leave no process group and no distributed environment variables behind."""
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
