"""Failures inside ``Trainer.fit`` on 2 gloo ranks: a migration failing on one rank stops
every rank, no checkpoint is written from the half-migrated state, the last good checkpoint
resumes exactly; an uneven last batch is caught at the next rearrangement; replicas that
differ between ranks are refused when training starts.

One spawned pair runs every fit (Lightning joins the process group of the launcher's
environment); a second pair runs the last check on a group with a 5 s timeout.
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Subset

from lightning_eplb import EplbCallback, migration
from lightning_eplb import _callback_utils as utils
from lightning_eplb._safety import MigrationError, RankDisagreementError
from tests._dist import spawn
from tests.test_callback_train import (
    LIGHTNING_RESUMES_BATCH_END_EXACTLY,
    _data,
    _global_losses,
    _Net,
    _rotate,
)


def _fit(
    model: _Net,
    tmp: str,
    callbacks: list,
    *,
    rows: list[int] | None = None,
    ckpt_path: str | None = None,
    **kw,
) -> pl.Trainer:
    """Rank r takes rows r, r+2, ... (or ``rows``), 4 per batch, one process group of 2 ranks."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    data = _data()
    rows = list(range(rank, len(data), 2)) if rows is None else rows
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(timeout=timedelta(seconds=30)),
        callbacks=callbacks,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp,
        **kw,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(Subset(data, rows), batch_size=4), ckpt_path=ckpt_path)
    return trainer


def _eplb() -> EplbCallback:
    """Every 2 steps, every slot moves (weights and Adam state)."""
    return EplbCallback(step_interval=2, policy=_rotate, min_improvement=-1.0, log_every_n_steps=0)


def _fail_third_migration_on_rank_one(rank: int) -> list[int]:
    """On rank 1, the 3rd migration raises in its last unpack, after writing the received
    rows (a half-migrated rank; the peers' transfers complete). Returns the call counter."""
    calls: list[int] = []
    real_migrate, real_build = migration.migrate_experts, migration._build_batches
    real_finish = migration._Executor.finish
    batches: list[int] = []

    def build(*args, **kwargs):
        out = real_build(*args, **kwargs)
        batches.append(len(out))
        return out

    def failing_finish(self, handle):
        real_finish(self, handle)
        batches[-1] -= 1
        if batches[-1] == 0:
            raise OSError("injected unpack failure")

    def migrate(*args, **kwargs):
        calls.append(1)
        if rank == 1 and len(calls) == 3:
            migration._Executor.finish, migration._build_batches = failing_finish, build
        try:
            return real_migrate(*args, **kwargs)
        finally:
            migration._Executor.finish, migration._build_batches = real_finish, real_build

    migration.migrate_experts = migrate
    return calls


def _run(rank: int, world_size: int, tmp: str) -> None:
    torch.set_default_dtype(torch.float64)
    # reference: 8 steps (2 epochs of 4), rearranging at 2, 4, 6 and 8
    reference = _Net()
    _fit(reference, tmp, [_eplb()], max_steps=8)
    expected = _global_losses(reference)

    # the migration of step 6 fails on rank 1 after its transfers: every rank raises
    real_migrate = migration.migrate_experts
    calls = _fail_third_migration_on_rank_one(rank)
    ckpt = ModelCheckpoint(dirpath=tmp, filename="{step}", every_n_train_steps=4, save_top_k=-1)
    cb, model = _eplb(), _Net()
    try:
        with pytest.raises(
            MigrationError, match=r"EPLB migration failed on rank 1 \(OSError: injected unpack"
        ):
            _fit(model, tmp, [cb, ckpt], max_steps=8)
    finally:
        migration.migrate_experts = real_migrate
    assert len(calls) == 3 and cb.num_rearrangements == 2
    # no checkpoint from the half-migrated state: step 8's was never written, and saving now
    # is refused on every rank (before any collective, so nobody waits)
    assert sorted(os.listdir(tmp)) == ["step=4.ckpt"]
    with pytest.raises(RuntimeError, match=r"refuses to save a checkpoint: the migration at step 6"):
        model.trainer.save_checkpoint(os.path.join(tmp, "broken.ckpt"))
    dist.barrier()
    assert not os.path.exists(os.path.join(tmp, "broken.ckpt"))
    # the last good checkpoint resumes exactly: same losses as the run without failure
    resumed = _Net()
    _fit(resumed, tmp, [_eplb()], max_steps=8, ckpt_path=os.path.join(tmp, "step=4.ckpt"))
    if LIGHTNING_RESUMES_BATCH_END_EXACTLY:
        torch.testing.assert_close(_global_losses(resumed), expected[4:], rtol=1e-9, atol=0)

    # an uneven last batch: rank 0 has 5 batches an epoch, rank 1 has 4; the global steps stay
    # equal (every step runs the same collectives) but at the step-5 rearrangement rank 0 is
    # in epoch 0 and rank 1 in epoch 1
    rows = list(range(20)) if rank == 0 else list(range(16, 32))
    cb = EplbCallback(step_interval=5, log_every_n_steps=0)
    with pytest.raises(
        RankDisagreementError,
        match=r"EPLB step 5: ranks disagree on epoch \(ranks \[0\]: 0; ranks \[1\]: 1\)",
    ):
        _fit(_Net(), tmp, [cb], rows=rows, max_steps=6)

    # replicas that differ between ranks (as when ranks draw experts from different seeds):
    # refused when training starts, on every rank, naming the layer, experts and slots
    model = _Net()
    with torch.no_grad():
        model.moes[1].w3.add_(0.5 * rank)  # every slot of rank 1: replicas split over ranks differ
    with pytest.raises(
        MisconfigurationException,
        match=r"replicas of one expert hold different weights: moes\.1: expert 0 in slots \[0, 4\]; "
        r"expert 1 in slots \[1, 5\]\. .*init_seed",
    ):
        _fit(model, tmp, [EplbCallback(step_interval=2, log_every_n_steps=0)], max_steps=2)


def _run_pack_failure(rank: int, world_size: int) -> None:
    """A failure before the transfers (packing on rank 1) leaves rank 0 waiting for messages
    that never come: it fails at the process group's timeout (5 s here), rank 1 fails too.

    A pair of its own, not the one above with its group destroyed and re-created: on torch < 2.8
    ``destroy_process_group`` deadlocks now and then (see ``tests/_dist.py``)."""
    torch.set_default_dtype(torch.float64)
    # the store gets a generous connect timeout (ranks arrive here at different times); the
    # process group's 5 s timeout is the one under test
    port = int(os.environ["MASTER_PORT"])
    store = dist.TCPStore("127.0.0.1", port, world_size, rank == 0, timeout=timedelta(seconds=60))
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=5)
    )
    model = _Net()
    layers = [(f"moes.{i}", m) for i, m in enumerate(model.moes)]
    old = torch.stack([m.physical_to_logical for m in model.moes])
    if rank == 1:
        migration._Executor.start = lambda self, batch: (_ for _ in ()).throw(
            OSError("injected pack failure")
        )
    trainer = type("T", (), {"optimizers": []})()
    with pytest.raises(MigrationError, match="half-migrated") as info:
        utils.migrate(trainer, layers, old, torch.roll(old, 1, dims=1), None, 1, False)
    assert info.value.half_done


def test_failures_during_fit_stop_every_rank(tmp_path):
    spawn(_run, world_size=2, args=(str(tmp_path),), timeout_s=120, init=False)
    spawn(_run_pack_failure, world_size=2, init=False)
