"""fp16 mixed precision (``GradScaler``) with expert parallelism: the scaler decides from
each rank's own gradients, and expert gradients differ between ranks, so an overflow on one
rank alone must still make every rank skip that optimizer step (and lower the loss scale
alike), else ranks drift apart. 2 gloo ranks on the CPU, with Lightning's fp16 plugin and a
CPU ``GradScaler``; an overflow is put into one expert gradient of rank 1 at one step.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_eplb import EplbCallback
from tests._dist import spawn
from tests.test_callback_train import _fit, _Net

INF_STEP = 3  # rank 1's expert gradient overflows at this optimizer step

class _Overflow(pl.Callback):
    """Before the scaler looks (on_after_backward runs inside the closure): an inf in one
    expert gradient of rank 1 at ``INF_STEP``."""

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == INF_STEP and dist.get_rank() == 1:
            pl_module.moes[0].w2.grad[0].fill_(float("inf"))


class _Record(pl.Callback):
    """After EplbCallback's hook: the skip decision and the loss scale of each step."""

    def __init__(self) -> None:
        self.found: list[float] = []
        self.scales: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        scaler = trainer.precision_plugin.scaler
        flags = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        self.found.append(float(sum(v.item() for v in flags.values())))
        self.scales.append(float(scaler.get_scale()))


def _run(rank: int, world_size: int, tmp: str) -> None:
    model, record = _Net(), _Record()
    device = "cuda" if os.environ.get("EPLB_TEST_ACCELERATOR") == "gpu" else "cpu"
    fp16 = MixedPrecision("16-mixed", device, torch.amp.GradScaler(device))
    callbacks = [_Overflow(), EplbCallback(step_interval=2, log_every_n_steps=0), record]
    _fit(model, world_size, tmp, callbacks, max_steps=6, plugins=[fp16])
    # every parameter outside the experts is the same on both ranks (DDP's, if no rank
    # stepped alone); expert slots differ by design
    expert = {id(p) for m in model.moes for p in m.expert_tensors()}
    dense = torch.cat([p.detach().reshape(-1).double() for p in model.parameters() if id(p) not in expert])
    copies = [torch.empty_like(dense) for _ in range(world_size)]
    dist.all_gather(copies, dense)
    out = {"found": record.found, "scales": record.scales, "dense_equal": torch.equal(copies[0], copies[1])}
    torch.save(out, os.path.join(tmp, f"fp16-{rank}.pt"))


def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path) -> None:
    spawn(_run, world_size=2, args=(str(tmp_path),), timeout_s=240, init=False)
    runs = [torch.load(tmp_path / f"fp16-{r}.pt") for r in range(2)]
    assert runs[0]["found"] == runs[1]["found"]  # one decision, taken on both ranks
    assert runs[0]["found"][INF_STEP] == 1.0  # rank 0 skips the step of rank 1's overflow too
    assert runs[0]["scales"] == runs[1]["scales"]
    assert runs[0]["dense_equal"] and runs[1]["dense_equal"]
