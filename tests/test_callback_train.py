"""EplbCallback inside Trainer.fit: training math unchanged while experts move.

Runs on CPU with gloo. One spawned pair of processes runs several ``Trainer.fit`` calls
(Lightning sees the environment variables of an external launcher and joins the process
group already there), so the ~3 s start-up is paid once.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_utilities.core.imports import compare_version
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from lightning_eplb import EplbCallback, ExpertParallelMoE
from lightning_eplb.load import ExpertLoadWindow
from tests._dist import spawn

# Lightning < 2.5 resumes a checkpoint written in on_train_batch_end one batch behind, for any
# model (Lightning #18060, fixed by #20379); tests/test_compat_resume.py covers 2.4 instead.
LIGHTNING_RESUMES_BATCH_END_EXACTLY = compare_version("lightning", lambda a, b: a >= b, "2.5.0")

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


class _LateNet(_Net):
    """The same model with its MoE layers built in ``configure_model`` (after the callback's
    ``setup``, inside Lightning's init contexts): gates copied from ``_Net``'s, experts from
    the same seeds."""

    def __init__(self) -> None:
        super().__init__()
        self._gates = [m.gate.weight.detach().clone() for m in self.moes]
        del self.moes

    def configure_model(self) -> None:
        if hasattr(self, "moes"):
            return
        self.moes = nn.ModuleList(
            ExpertParallelMoE(H, F, E, TOP_K, num_redundant_experts=2, init_seed=10 + i) for i in range(2)
        )
        with torch.no_grad():
            for moe, gate in zip(self.moes, self._gates, strict=True):
                moe.gate.weight.copy_(gate)


class _Plain(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(H, 1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return nn.functional.mse_loss(self.lin(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _rotate(load, num_physical, num_ranks, *, previous, **kwargs):
    """A policy that moves every slot each time: slot p takes slot p-1's expert. It may put
    two replicas of an expert on one rank (a local copy in the migration)."""
    return torch.roll(torch.as_tensor(previous), 1, dims=1)


def _fails_on_rank_zero(load, num_physical, num_ranks, *, previous, **kwargs):
    if dist.get_rank() == 0:
        raise ValueError("boom on rank 0")
    return torch.as_tensor(previous)


def _fit(
    model: pl.LightningModule,
    world_size: int,
    tmp: str,
    callbacks: list[pl.Callback],
    *,
    accumulate: int = 1,
    max_steps: int = 8,
    ckpt_path: str | None = None,
    clip: float | None = 0.5,
    validate: bool = False,
    plugins: list | None = None,
) -> pl.Trainer:
    """Fit on the fixed global batches of ``_data`` (rank r takes rows r, r+N, ...).

    Lightning's own DistributedSampler shuffles even for a DataLoader built without
    shuffling, so the global batches would differ between world sizes: the runs switch it
    off (``use_distributed_sampler=False``) and bring their own, unshuffled.
    """
    data = _data()
    rank = int(os.environ.get("RANK", "0"))  # the process group may not exist yet (Lightning makes it)
    sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // world_size // accumulate, sampler=sampler)
    # with validate: one validation batch per epoch (the model needs a validation_step)
    val = DataLoader(data, batch_size=GLOBAL_BATCH // world_size, sampler=sampler) if validate else None
    strategy = DDPStrategy(timeout=timedelta(seconds=60)) if world_size > 1 else "auto"
    trainer = pl.Trainer(
        accelerator=os.environ.get("EPLB_TEST_ACCELERATOR", "cpu"),  # "gpu": the same runs under NCCL
        devices=world_size,
        strategy=strategy,
        max_steps=max_steps,
        limit_val_batches=1 if validate else None,
        accumulate_grad_batches=accumulate,
        callbacks=callbacks,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp,
        gradient_clip_val=clip,  # clipping must see the norm of the model without expert parallelism
        plugins=plugins,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader, val, ckpt_path=ckpt_path)
    return trainer


def _global_losses(model: _Net, accumulate: int = 1) -> Tensor:
    """Per optimizer step loss of the global batch: mean over ranks and micro-batches."""
    local = torch.stack(model.losses).view(-1, accumulate).mean(1)
    if dist.is_initialized():
        dist.all_reduce(local)
        local /= dist.get_world_size()
    return local


@contextmanager
def counting_launches() -> Iterator[list[int]]:
    """Record every replica sync started from gradient hooks during the backward."""
    launches: list[int] = []
    start = ExpertParallelMoE.start_replica_grad_sync
    ExpertParallelMoE.start_replica_grad_sync = lambda self, *a: launches.append(1) or start(self, *a)
    try:
        yield launches
    finally:
        ExpertParallelMoE.start_replica_grad_sync = start


def _runs(world_size: int, tmp: str) -> dict:
    """The EPLB runs compared with the reference, on this process group (or one process)."""
    out: dict = {}
    # real policy, every 2 steps, window of 3 steps (it spans the previous rearrangement)
    cb = EplbCallback(step_interval=2, window_size=3, min_improvement=0.0, log_every_n_steps=1)
    model = _Net()
    ckpt = ModelCheckpoint(
        dirpath=tmp, filename=f"n{world_size}-{{step}}", every_n_train_steps=4, save_top_k=-1
    )
    with counting_launches() as launches:
        _fit(model, world_size, tmp, [cb, ckpt])
    out["launches"] = len(launches)
    out["eplb"], out["records"], out["stats"] = _global_losses(model), cb.rearrangements, cb.last_stats
    out["rearrangements"] = cb.num_rearrangements
    out["final_p2l"] = [m.physical_to_logical.clone() for m in model.moes]
    # resume from step 4: the same losses, rearrangement steps and decisions afterwards
    cb = EplbCallback(step_interval=2, window_size=3, min_improvement=0.0, log_every_n_steps=1)
    model = _Net()
    _fit(model, world_size, tmp, [cb], ckpt_path=os.path.join(tmp, f"n{world_size}-step=4.ckpt"))
    out["resumed"], out["resumed_records"] = _global_losses(model), cb.rearrangements
    out["resumed_rearrangements"] = cb.num_rearrangements
    # gradient accumulation, a policy moving every slot every 2 steps, no logging: the
    # window is reduced on rearrangement steps only
    cb = EplbCallback(step_interval=2, policy=_rotate, min_improvement=-1.0, log_every_n_steps=0)
    model = _Net()
    calls = []
    compute = ExpertLoadWindow.compute
    ExpertLoadWindow.compute = lambda self: calls.append(1) or compute(self)
    try:
        with counting_launches() as launches:
            _fit(model, world_size, tmp, [cb], accumulate=2)
    finally:
        ExpertLoadWindow.compute = compute
    out["accumulate_launches"] = len(launches)
    out["accumulate"], out["computes"] = _global_losses(model, 2), len(calls)
    out["rotated"] = sum(r["slots_changed"] for r in cb.rearrangements)
    # layers built in configure_model: set up right after it, before DDP wraps the model
    model = _LateNet()
    cb = EplbCallback(step_interval=2, window_size=3, min_improvement=0.0, log_every_n_steps=1)
    _fit(model, world_size, tmp, [cb])
    out["late"], out["late_records"] = _global_losses(model), cb.rearrangements
    out["late_rearrangements"] = cb.num_rearrangements
    out["late_slots"] = model.moes[0].num_local_experts
    return out


def _run_two_ranks(rank: int, world_size: int, tmp: str) -> None:
    torch.set_default_dtype(torch.float64)
    # misconfigurations raise on every rank at setup, nothing hangs; the models are built
    # before Lightning creates the process group, as in a user's script
    bad, plain = _Net(num_physical=5), _Plain()
    with pytest.raises(
        MisconfigurationException, match=r"\(5\) .* must be divisible by the world size \(2\)"
    ):
        _fit(bad, world_size, tmp, [EplbCallback(step_interval=2)])
    with pytest.raises(MisconfigurationException, match="found no balanceable MoE layer"):
        _fit(plain, world_size, tmp, [EplbCallback(step_interval=2)])
    # a policy failing on rank 0 only stops every rank (rank 0's own error, a RuntimeError
    # elsewhere) instead of leaving the others waiting in the broadcast
    with pytest.raises((ValueError, RuntimeError), match=r"boom on rank 0|policy failed on rank 0"):
        _fit(_Net(), world_size, tmp, [EplbCallback(step_interval=2, policy=_fails_on_rank_zero)])
    out = _runs(world_size, tmp)
    if rank == 0:
        torch.save(out, os.path.join(tmp, "two.pt"))


def replica_bytes_brute_force(p2l_per_layer: list[Tensor], num_ranks: int) -> float:
    """The most bytes a rank sends per optimizer step to sum replica gradients, each of its
    replicated experts sent once to every other rank holding it (float64 experts of ``_Net``)."""
    row_bytes = 3 * H * F * 8
    most = 0
    for rank in range(num_ranks):
        rows = 0
        for p2l in p2l_per_layer:
            slots = len(p2l) // num_ranks
            holders: dict[int, set[int]] = {}
            for slot, expert in enumerate(p2l.tolist()):
                holders.setdefault(expert, set()).add(slot // slots)
            rows += sum(len(holders[e]) - 1 for e in set(p2l[rank * slots : (rank + 1) * slots].tolist()))
        most = max(most, rows)
    return float(most * row_bytes)


def _decisions(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in records]


def reference_losses(tmp: str, **fit_kw) -> Tensor:
    """Per-step global losses of the model without replicas or callback, one process, float64."""
    torch.set_default_dtype(torch.float64)
    try:
        reference = _Net(num_redundant=0)
        _fit(reference, 1, tmp, [], **fit_kw)
        return _global_losses(reference)
    finally:
        torch.set_default_dtype(torch.float32)


def test_training_unchanged_by_eplb_on_one_and_two_ranks(tmp_path):
    expected = reference_losses(str(tmp_path))
    torch.set_default_dtype(torch.float64)
    try:
        one = _runs(1, str(tmp_path))
    finally:
        torch.set_default_dtype(torch.float32)
    spawn(_run_two_ranks, world_size=2, args=(str(tmp_path),), timeout_s=240, init=False)
    two = torch.load(tmp_path / "two.pt")
    for run in (one, two):
        # float64 end to end: equal to rounding, far inside the 1e-4 the issue asks for
        torch.testing.assert_close(run["eplb"], expected, rtol=1e-9, atol=0)
        torch.testing.assert_close(run["accumulate"], expected, rtol=1e-9, atol=0)
        assert [r["step"] for r in run["records"]] == [2.0, 4.0, 6.0, 8.0]
        if LIGHTNING_RESUMES_BATCH_END_EXACTLY:
            torch.testing.assert_close(run["resumed"], expected[4:], rtol=1e-9, atol=0)
            # the restored window gives the same decisions (only the wall time differs)
            assert _decisions(run["resumed_records"]) == _decisions(run["records"][2:])
            assert run["resumed_rearrangements"] == run["rearrangements"]
        assert run["rotated"] == 4 * 2 * 6  # 4 rearrangements x 2 layers x 6 slots
        assert run["computes"] == 4
        torch.testing.assert_close(run["late"], expected, rtol=1e-9, atol=0)
        assert [r["step"] for r in run["late_records"]] == [2.0, 4.0, 6.0, 8.0]
    assert two["late_rearrangements"] > 0  # experts really moved
    assert (one["late_slots"], two["late_slots"]) == (E + 2, (E + 2) // 2)
    # the replica sync overlapped the backward: once per layer per optimizer step (never on an
    # accumulating micro-batch), bit-identical (the losses above); one process has nothing to sync
    assert (two["launches"], two["accumulate_launches"]) == (8 * 2, 8 * 2)
    assert (one["launches"], one["accumulate_launches"]) == (0, 0)
    moved = [r for r in two["records"] if r["slots_changed"] > 0]
    assert moved and all(r["bytes_sent"] > 0 for r in moved)
    # what the placement in force costs per step: replica gradients sent by the busiest rank
    # (none on one process, where every replica is local)
    for run, ranks in ((one, 1), (two, 2)):
        want = replica_bytes_brute_force(run["final_p2l"], ranks)
        assert run["records"][-1]["replica_grad_bytes_max"] == want
    assert replica_bytes_brute_force(two["final_p2l"], 2) > 0
    # a proposal predicted to be worse is kept out by min_improvement=0
    assert all(r["skipped"] for r in two["records"] if r["balancedness_after"] < r["balancedness_before"])
    assert set(two["stats"]) == {"eplb/balancedness", "eplb/max_tokens", "eplb/avg_tokens"}
    assert 0.5 <= two["stats"]["eplb/balancedness"] <= 1.0


class _Manual(_Net):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        opt.step()  # through LightningOptimizer: the callback syncs replica gradients


def test_manual_optimization_and_trace(tmp_path):
    """Manual optimization (one process, experts moving every 2 steps) trains like the
    reference; trace=True writes every window and rearrangement to eplb_trace.npz; plot=True
    saves the heatmaps of every rearrangement as PNG (no TensorBoard logger here)."""
    pytest.importorskip("matplotlib")
    from lightning_eplb.trace import read_trace

    torch.set_default_dtype(torch.float64)
    try:
        reference = _Net(num_redundant=0)
        _fit(reference, 1, str(tmp_path), [], clip=None)
        manual = _Manual()
        cb = EplbCallback(
            step_interval=2,
            policy=_rotate,
            min_improvement=-1.0,
            trace=True,
            trace_every_n_steps=1,
            plot=True,
        )
        _fit(manual, 1, str(tmp_path), [cb], clip=None)
    finally:
        torch.set_default_dtype(torch.float32)
    torch.testing.assert_close(_global_losses(manual), _global_losses(reference), rtol=1e-9, atol=0)
    trace = read_trace(tmp_path / "eplb_trace.npz")
    assert trace.steps.tolist() == list(range(1, 9))  # one window per step, none twice
    assert trace.rearrangement_steps.tolist() == [2, 4, 6, 8]
    pngs = sorted(p.name for p in tmp_path.rglob("*.png"))
    assert len(pngs) >= 4 and all(p.startswith(("expert_load", "rank_load")) for p in pngs), pngs
    assert trace.slots_changed.tolist() == [12] * 4
    assert torch.equal(trace.placements[:-1], trace.placements_before[1:])
    assert trace.loads.shape == (8, 2, E) and float(trace.loads[0].sum()) == 2 * GLOBAL_BATCH * T * TOP_K
