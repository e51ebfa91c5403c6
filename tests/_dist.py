"""Run a function on several CPU processes joined by a gloo process group.

Usage::

    def _run_check(rank: int, world_size: int, some_arg: int) -> None:
        ...  # assertions; an exception fails the test

    def test_check():
        spawn(_run_check, world_size=2, args=(3,))

Workers must be module-level functions (they are pickled by ``torch.multiprocessing``).
A worker that raises fails the test with its traceback; a hang fails it at ``timeout``.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_TEARDOWN_MAY_DEADLOCK = tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 8)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int, fn: Callable[..., Any], world_size: int, port: int, timeout_s: float, args: tuple, init: bool = True
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    if init:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        fn(rank, world_size, *args)
        if _TEARDOWN_MAY_DEADLOCK and dist.is_initialized():
            # torch < 2.8: destroy_process_group joins gloo's worker threads while holding the
            # GIL, and a worker freeing the last reference to a collective's tensor waits for
            # the GIL: a deadlock now and then (pytorch#154976). Wait for every rank, then
            # leave without the teardown; the OS closes the sockets.
            try:
                dist.barrier()
            except RuntimeError:  # a worker that left its group unusable on purpose
                pass
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any], world_size: int, args: tuple = (), timeout_s: float = 60.0, init: bool = True
) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; re-raise a worker's error.

    With ``init=False`` the workers get the environment variables (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) but no process group: Lightning (or the
    worker) creates it, as under an external launcher such as torchrun.
    """
    mp.start_processes(
        _entry,
        args=(fn, world_size, free_port(), timeout_s, args, init),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the device machine)")


def requires_gpus(n: int) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        torch.cuda.device_count() < n, reason=f"needs {n} CUDA GPUs, found {torch.cuda.device_count()}"
    )
