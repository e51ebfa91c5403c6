"""EplbCallback inside Trainer.fit: training math unchanged while experts move.

Runs on CPU with gloo. One spawned pair of processes runs several ``Trainer.fit`` calls
(Lightning sees the environment variables of an external launcher and joins the process
group already there), so the ~3 s start-up is paid once.
"""

from __future__ import annotations

import os
import warnings

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import lightning_eplb.placement as _pm  # TEMPORARY until rebalance lands
from lightning_eplb import EplbCallback, ExpertParallelMoE
from lightning_eplb.placement import Placement
from tests._dist import spawn

if not hasattr(_pm, "rebalance"):

    def _fake(load, num_physical, num_ranks, *, num_nodes=1, num_groups=1, previous=None, policy="balanced"):
        return Placement.from_physical_to_logical(torch.roll(previous, 1, dims=1), load.shape[1], num_ranks)

    _pm.rebalance = _fake

H, F, E, TOP_K, T = 8, 12, 4, 2, 4  # hidden, ffn, experts, top-k, tokens per sample
GLOBAL_BATCH, NUM_SAMPLES = 8, 32  # 4 optimizer steps per epoch


def _data() -> TensorDataset:
    """Skewed inputs: a constant offset makes the router prefer the same few experts."""
    g = torch.Generator().manual_seed(1)
    offset = 2.0 * torch.randn(H, generator=g)
    x = offset + 0.5 * torch.randn(NUM_SAMPLES, T, H, generator=g)
    y = torch.sin(x.sum(-1, keepdim=True))
    return TensorDataset(x, y)


class _Net(pl.LightningModule):
    """Linear in, two MoE layers with residuals, linear head; per-step local losses kept."""

    def __init__(self, num_redundant: int = 2, num_physical: int | None = None, lr: float = 0.02) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(H, H)
        num_redundant = num_redundant if num_physical is None else num_physical - E
        self.moes = nn.ModuleList(
            ExpertParallelMoE(H, F, E, TOP_K, num_redundant_experts=num_redundant, init_seed=10 + i)
            for i in range(2)
        )
        self.head = nn.Linear(H, 1)
        self.lr = lr
        self.losses: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for moe in self.moes:
            h = h + moe(h)
        return self.head(h)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(loss.detach().clone())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _fit(
    model: _Net,
    world_size: int,
    tmp: str,
    callback: EplbCallback | None,
    *,
    accumulate: int = 1,
    max_steps: int = 8,
    strategy: object = "auto",
    ckpt_path: str | None = None,
    enable_checkpointing: bool = False,
) -> pl.Trainer:
    data = _data()
    rank = dist.get_rank() if dist.is_initialized() else 0
    sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // world_size // accumulate, sampler=sampler)
    if strategy == "auto":
        strategy = "ddp" if world_size > 1 else "auto"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=strategy,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        callbacks=[callback] if callback is not None else [],
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=enable_checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
        gradient_clip_val=1.0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader, ckpt_path=ckpt_path)
    return trainer


def _global_losses(model: _Net, accumulate: int = 1) -> Tensor:
    """Per optimizer step loss of the global batch: mean over ranks and micro-batches."""
    local = torch.stack(model.losses).view(-1, accumulate).mean(1)
    if dist.is_initialized():
        dist.all_reduce(local)
        local /= dist.get_world_size()
    return local


def _run_training(rank: int, world_size: int, tmp: str) -> None:
    torch.set_default_dtype(torch.float64)
    out = {}
    cb = EplbCallback(step_interval=2, min_improvement=0.0, log_every_n_steps=1)
    model = _Net()
    _fit(model, world_size, tmp, cb)
    out["eplb"] = _global_losses(model)
    out["moved"] = sum(r["slots_changed"] for r in cb.rearrangements)
    out["bytes"] = sum(r["bytes_sent"] for r in cb.rearrangements)
    out["stats"] = cb.last_stats
    cb = EplbCallback(step_interval=2, min_improvement=0.0)
    model = _Net()
    _fit(model, world_size, tmp, cb, accumulate=2)
    out["accumulate"] = _global_losses(model, 2)
    out["moved_acc"] = sum(r["slots_changed"] for r in cb.rearrangements)
    if rank == 0:
        torch.save(out, os.path.join(tmp, f"out{world_size}.pt"))


def test_losses_equal_with_and_without_eplb(tmp_path):
    torch.set_default_dtype(torch.float64)
    try:
        ref = _Net(num_redundant=0)
        _fit(ref, 1, str(tmp_path), None)
        reference = _global_losses(ref)
        _run_training(0, 1, str(tmp_path))
    finally:
        torch.set_default_dtype(torch.float32)
    spawn(_run_training, world_size=2, args=(str(tmp_path),), timeout_s=120)
    one, two = torch.load(tmp_path / "out1.pt"), torch.load(tmp_path / "out2.pt")
    print(reference, one, two)
    for run in (one, two):
        torch.testing.assert_close(run["eplb"], reference, rtol=1e-9, atol=0)
        torch.testing.assert_close(run["accumulate"], reference, rtol=1e-9, atol=0)
    assert two["moved"] > 0 and two["bytes"] > 0
