"""Resuming an EPLB run is exact on every supported Lightning version (>= 2.4).

Lightning before 2.5.0 restores a checkpoint written inside ``on_train_batch_end`` (what
``ModelCheckpoint(every_n_train_steps=...)`` writes) one batch behind: the saved batch
progress has ``completed == processed - 1`` (Lightning issues #18060 and #14579, fixed in
2.5.0 by pull request #20379). Resumed from such a checkpoint at the last batch of an epoch,
2.4 runs one more batch in the old epoch, so the losses after the resume differ from the
uninterrupted run *for any model*, with or without EPLB. The tests here therefore prove the
two things that hold on every version:

- a checkpoint written after validation (the default place of ``ModelCheckpoint``) resumes
  to the very losses, rearrangement steps and decisions of the uninterrupted run;
- from an ``every_n_train_steps`` checkpoint, the EPLB run resumes to the same losses as
  Lightning's own resume of the model without expert parallelism (the same batches are
  replayed); on Lightning >= 2.5 these are the uninterrupted losses too.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from lightning_eplb import EplbCallback
from tests._dist import spawn
from tests.test_callback_train import (
    LIGHTNING_RESUMES_BATCH_END_EXACTLY,
    _decisions,
    _fit,
    _global_losses,
    _Net,
)


class _ValNet(_Net):
    """The training test's model with a validation step (eval-mode forwards count nothing)."""

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self(batch[0])


def _checkpoints(tmp: str, prefix: str) -> list[ModelCheckpoint]:
    """One checkpoint written in ``on_train_batch_end`` at step 4, one after validation at step 4."""
    return [
        ModelCheckpoint(
            dirpath=tmp, filename=f"{prefix}-steps-{{step}}", every_n_train_steps=4, save_top_k=-1
        ),
        ModelCheckpoint(dirpath=tmp, filename=f"{prefix}-val-{{step}}", every_n_epochs=1, save_top_k=-1),
    ]


def _train_and_resume(world_size: int, tmp: str, eplb: bool) -> dict:
    """Losses (and EPLB decisions) of a full run and of resumes from its two step-4 checkpoints."""
    prefix = f"{'eplb' if eplb else 'plain'}{world_size}"

    def callbacks() -> list:
        # rearranges every step from a window of 3 steps: the restored window decides step 5
        return [EplbCallback(step_interval=1, window_size=3, min_improvement=0.0)] if eplb else []

    out: dict = {}
    model = _ValNet(num_redundant=2 if eplb else 0)
    cbs = callbacks()
    _fit(model, world_size, tmp, cbs + _checkpoints(tmp, prefix), validate=True)
    out["full"] = _global_losses(model)
    out["full_records"] = _decisions(cbs[0].rearrangements) if eplb else []
    for kind in ("steps", "val"):
        model = _ValNet(num_redundant=2 if eplb else 0)
        cbs = callbacks()
        _fit(
            model,
            world_size,
            tmp,
            cbs,
            ckpt_path=os.path.join(tmp, f"{prefix}-{kind}-step=4.ckpt"),
            validate=True,
        )
        out[kind] = _global_losses(model)
        out[f"{kind}_records"] = _decisions(cbs[0].rearrangements) if eplb else []
    return out


def _run_eplb_two_ranks(rank: int, world_size: int, tmp: str) -> None:
    torch.set_default_dtype(torch.float64)
    out = _train_and_resume(world_size, tmp, eplb=True)
    if rank == 0:
        torch.save(out, os.path.join(tmp, "eplb2.pt"))


def test_resume_is_exact_on_this_lightning_version(tmp_path):
    torch.set_default_dtype(torch.float64)
    try:
        plain = _train_and_resume(1, str(tmp_path), eplb=False)  # the dense model, one process
    finally:
        torch.set_default_dtype(torch.float32)
    spawn(_run_eplb_two_ranks, world_size=2, args=(str(tmp_path),), timeout_s=240, init=False)
    eplb = torch.load(tmp_path / "eplb2.pt")
    # float64 end to end: equal to rounding
    torch.testing.assert_close(eplb["full"], plain["full"], rtol=1e-9, atol=0)
    # after validation: the uninterrupted losses and decisions, on every version
    torch.testing.assert_close(plain["val"], plain["full"][4:], rtol=1e-9, atol=0)
    torch.testing.assert_close(eplb["val"], plain["full"][4:], rtol=1e-9, atol=0)
    assert len(eplb["full_records"]) == 8
    assert eplb["val_records"] == eplb["full_records"][4:]
    # in on_train_batch_end: whatever Lightning replays, EPLB adds no difference of its own
    torch.testing.assert_close(eplb["steps"], plain["steps"], rtol=1e-9, atol=0)
    if LIGHTNING_RESUMES_BATCH_END_EXACTLY:
        torch.testing.assert_close(plain["steps"], plain["full"][4:], rtol=1e-9, atol=0)
        assert eplb["steps_records"] == eplb["full_records"][4:]
