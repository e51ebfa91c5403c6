"""Placement-free checkpoints end to end with Lightning: save on 2 ranks, resume on 1 and 3.

The model has 2 MoE layers of E=4 experts and R=2 redundant slots (P=6, so 1, 2 and 3 ranks
all divide it), trained with Adam on a fixed regression task. The global batch (6 rows) is
the same at every world size: each rank takes rows r, r+N, ... of it (NOTES.md), and the
loss recorded per step is the mean over the global batch. An uninterrupted 2-epoch run on 2
ranks writes a checkpoint after epoch 0 (ModelCheckpoint) and one at the end
(trainer.save_checkpoint); runs resumed from the first on 1 and on 3 ranks must reproduce
the uninterrupted run's epoch-1 losses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_eplb.callback import EplbCallback
from lightning_eplb.checkpoint import to_dense_state_dict
from lightning_eplb.dense import DenseMoE
from lightning_eplb.moe import ExpertParallelMoE
from tests._dist import spawn

H, FFN, TOP_K = 8, 12, 2
GLOBAL_BATCH, ROWS, SEQ = 6, 36, 3  # 6 optimizer steps per epoch


def _data() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, SEQ, H, generator=gen)
    y = torch.tanh(x @ torch.randn(H, H, generator=gen)) + 0.1 * torch.randn(ROWS, SEQ, H, generator=gen)
    return TensorDataset(x, y)


class _Net(pl.LightningModule):
    def __init__(
        self, num_layers: int = 2, num_experts: int = 4, num_redundant: int = 2, ffn: int = FFN
    ) -> None:
        super().__init__()
        self.inp = nn.Linear(H, H)
        self.moes = nn.ModuleList(
            ExpertParallelMoE(
                H, ffn, num_experts, TOP_K, num_redundant_experts=num_redundant, init_seed=10 + i
            )
            for i in range(num_layers)
        )
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for moe in self.moes:
            h = h + moe(h)
        return h

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        mean = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        self.losses.append(float(mean))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-2)

    def train_dataloader(self) -> DataLoader:
        ws, rank = self.trainer.world_size, self.trainer.global_rank
        ds = _data()
        sampler = DistributedSampler(ds, num_replicas=ws, rank=rank, shuffle=False)
        return DataLoader(ds, batch_size=GLOBAL_BATCH // ws, sampler=sampler)


class _DenseNet(nn.Module):
    """_Net with every ExpertParallelMoE replaced by a DenseMoE: same parameter names."""

    def __init__(self, num_layers: int = 2, num_experts: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(H, H)
        self.moes = nn.ModuleList(
            DenseMoE(H, FFN, num_experts, TOP_K, init_seed=0) for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for moe in self.moes:
            h = h + moe(h)
        return h


def _policy(load: torch.Tensor, num_physical: int, num_ranks: int, **kwargs: Any) -> torch.Tensor:
    """Replicate the two busiest experts (a placement that changes with the load, valid on 1, 2
    and 3 ranks): slots ``[o0, o1, o2, o3, o0, o1]`` with ``o`` the experts by falling load."""
    order_LE = torch.argsort(torch.as_tensor(load, dtype=torch.float64), dim=1, descending=True, stable=True)
    return torch.cat([order_LE, order_LE[:, : num_physical - order_LE.shape[1]]], dim=1)


def _callback() -> pl.Callback:
    # rearranges every 2 steps: the checkpoint after epoch 0 holds a non-trivial placement
    return EplbCallback(step_interval=2, policy=_policy, min_improvement=-1.0, log_every_n_steps=0)


def _layers(model: nn.Module) -> list[tuple[str, ExpertParallelMoE]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertParallelMoE)]


def _logical_state(model: _Net, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every expert tensor and its Adam moments in logical layout (collective)."""
    out = {}
    for name, layer in _layers(model):
        tensors = layer.expert_tensors()
        for tname, w in zip(("w1", "w3", "w2"), layer.gather_logical(tensors), strict=True):
            out[f"{name}.{tname}"] = w.clone()
        for key in ("exp_avg", "exp_avg_sq"):
            states = [optimizer.state[p][key] for p in tensors]
            for tname, s in zip(("w1", "w3", "w2"), layer.gather_logical(states), strict=True):
                out[f"{name}.{tname}/{key}"] = s.clone()
    return out


class _RestoreProbe(pl.Callback):
    """At the first training step after a resume, compare the live state with the checkpoint's."""

    def __init__(self, ckpt: Path) -> None:
        self.ckpt = ckpt

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        saved = torch.load(self.ckpt, weights_only=False)
        live = _logical_state(pl_module, trainer.optimizers[0])  # type: ignore[arg-type]
        index = {int(e["index"]): e for e in saved["eplb"]["optimizers"][0]}
        by_name = {f"{e['layer']}.{e['tensor']}": i for i, e in index.items()}
        for key, value in live.items():
            name, _, state_key = key.partition("/")
            expected = (
                saved["state_dict"][name]
                if not state_key
                else saved["optimizer_states"][0]["state"][by_name[name]][state_key]
            )
            assert torch.equal(value, expected), key


def _trainer(world_size: int, root: Path, max_epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy="ddp" if world_size > 1 else "auto",
        max_epochs=max_epochs,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
        callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
    )


def _fit(rank: int, world_size: int, root: Path, tag: str, ckpt: Path | None) -> None:
    pl.seed_everything(0, verbose=False)
    model = _Net()
    callbacks = [_callback()]
    if ckpt is None:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", filename="{epoch}", save_top_k=-1)
        )
        callbacks.append(  # Lightning calls no callback hook for these: still placement-free
            pl.callbacks.ModelCheckpoint(
                dirpath=root / "weights",
                filename="{epoch}",
                save_top_k=-1,
                save_weights_only=True,
                every_n_train_steps=6,  # an epoch; also gives it its own state key
            )
        )
    else:
        callbacks.append(_RestoreProbe(ckpt))
    trainer = _trainer(world_size, root, 2, callbacks)
    trainer.fit(model, ckpt_path=ckpt)
    trainer.save_checkpoint(root / f"{tag}-final.ckpt")
    final = _logical_state(model, trainer.optimizers[0])  # type: ignore[arg-type]
    if rank == 0:
        torch.save({"losses": model.losses, "final": final}, root / f"{tag}.pt")


def _run_fit(rank: int, world_size: int, root: str, tag: str, ckpt: str | None) -> None:
    _fit(rank, world_size, Path(root), tag, Path(ckpt) if ckpt else None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-epoch run on 2 ranks."""
    root = tmp_path_factory.mktemp("eplb_ckpt")
    spawn(_run_fit, world_size=2, args=(str(root), "full", None), timeout_s=120)
    return root


def _check_resumed(root: Path, tag: str) -> None:
    full = torch.load(root / "full.pt", weights_only=False)
    resumed = torch.load(root / f"{tag}.pt", weights_only=False)
    assert len(full["losses"]) == 12 and len(resumed["losses"]) == 6
    expected, got = torch.tensor(full["losses"][6:]), torch.tensor(resumed["losses"])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0.0)
    for key, value in full["final"].items():
        torch.testing.assert_close(resumed["final"][key], value, rtol=1e-3, atol=1e-5, msg=key)


def test_resume_on_one_rank(trained: Path) -> None:
    _fit(0, 1, trained, "one", trained / "ckpt" / "epoch=0.ckpt")
    _check_resumed(trained, "one")


def test_resume_on_three_ranks(trained: Path) -> None:
    spawn(
        _run_fit,
        world_size=3,
        args=(str(trained), "three", str(trained / "ckpt" / "epoch=0.ckpt")),
        timeout_s=120,
    )
    _check_resumed(trained, "three")


def test_checkpoint_contents_and_plain_loading(trained: Path) -> None:
    ckpt = torch.load(trained / "full-final.ckpt", weights_only=False)
    final = torch.load(trained / "full.pt", weights_only=False)["final"]
    meta = ckpt["eplb"]
    assert meta["format_version"] == 1 and meta["world_size"] == 2
    assert meta["placement"].shape == (2, 6)
    # the callback rearranged: the saved placement is not the starting one
    assert not torch.equal(meta["placement"], torch.tensor([[0, 1, 2, 3, 0, 1]] * 2))
    assert [m["name"] for m in meta["layers"]] == ["moes.0", "moes.1"]
    assert meta["layers"][0]["tensors"] == {"w1": [4, FFN, H], "w3": [4, FFN, H], "w2": [4, H, FFN]}
    # optimizer indices number parameters as torch's state_dict does
    ref = _Net()
    numbering = {id(p): i for i, p in enumerate(ref.parameters())}
    names = {id(p): n for n, p in ref.named_parameters()}
    for entry in meta["optimizers"][0]:
        assert (
            names[next(k for k, v in numbering.items() if v == entry["index"])]
            == f"{entry['layer']}.{entry['tensor']}"
        )
    # logical weights and Adam moments equal the 2-rank run's, exactly
    state = ckpt["optimizer_states"][0]["state"]
    for entry in meta["optimizers"][0]:
        name = f"{entry['layer']}.{entry['tensor']}"
        assert torch.equal(ckpt["state_dict"][name], final[name])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[entry["index"]][key], final[f"{name}/{key}"])
        assert state[entry["index"]]["step"].numel() == 1
    # plain load_state_dict into the same model on one process, through the layer's pre-hook
    ref.load_state_dict(ckpt["state_dict"])
    for name, layer in _layers(ref):
        assert torch.equal(layer.physical_to_logical, meta["placement"][int(name[-1])])
        for tname, w in zip(("w1", "w3", "w2"), layer.gather_logical(layer.expert_tensors()), strict=True):
            assert torch.equal(w, final[f"{name}.{tname}"])
    # a weights-only checkpoint (end of the last epoch): logical weights, no optimizer state
    weights = torch.load(trained / "weights" / "epoch=1.ckpt", weights_only=False)
    assert "optimizer_states" not in weights and weights["eplb"]["optimizers"] == []
    assert torch.equal(weights["eplb"]["placement"], meta["placement"])
    for entry in meta["optimizers"][0]:
        name = f"{entry['layer']}.{entry['tensor']}"
        assert torch.equal(weights["state_dict"][name], final[name])
    fresh = _Net()
    fresh.load_state_dict(weights["state_dict"])
    for (_, a), (_, b) in zip(_layers(fresh), _layers(ref), strict=True):
        for wa, wb in zip(a.expert_tensors(), b.expert_tensors(), strict=True):
            assert torch.equal(wa, wb)
    # and into the dense reference model
    dense = _DenseNet()
    dense.load_state_dict(to_dense_state_dict(ckpt))
    x = torch.randn(5, SEQ, H)
    torch.testing.assert_close(dense(x), ref(x), rtol=1e-5, atol=1e-6)


def _fit_from(ckpt: Path, root: Path, model: _Net) -> None:
    _trainer(1, root, 2, [_callback()]).fit(model, ckpt_path=ckpt)


@pytest.mark.parametrize(
    ("model_kwargs", "match"),
    [
        ({"num_experts": 6, "num_redundant": 0}, r"moes\.0\.w1.*num_experts=6"),
        ({"ffn": FFN + 4}, r"moes\.0\.w1: the checkpoint holds shape \(4, 12, 8\)"),
        ({"num_layers": 1}, r"MoE layers the model lacks: \['moes\.1'\]"),
        ({"num_layers": 3}, r"lacks the MoE layer 'moes\.2' \(it holds \['moes\.0', 'moes\.1'\]\)"),
    ],
)
def test_other_model_shape_fails_clearly(
    trained: Path, tmp_path: Path, model_kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        _fit_from(trained / "ckpt" / "epoch=0.ckpt", tmp_path, _Net(**model_kwargs))


def test_missing_entries_fail_clearly(trained: Path, tmp_path: Path) -> None:
    ckpt = torch.load(trained / "ckpt" / "epoch=0.ckpt", weights_only=False)
    del ckpt["state_dict"]["moes.0.w3"]
    torch.save(ckpt, tmp_path / "no_w3.ckpt")
    with pytest.raises(ValueError, match=r"misses the expert tensor 'moes\.0\.w3'"):
        _fit_from(tmp_path / "no_w3.ckpt", tmp_path, _Net())
    ckpt = torch.load(trained / "ckpt" / "epoch=0.ckpt", weights_only=False)
    del ckpt["eplb"]
    torch.save(ckpt, tmp_path / "no_meta.ckpt")
    with pytest.raises(ValueError, match="no 'eplb' entry"):
        _fit_from(tmp_path / "no_meta.ckpt", tmp_path, _Net())
    ckpt = torch.load(trained / "ckpt" / "epoch=0.ckpt", weights_only=False)
    ckpt["eplb"]["layers"][1]["tensors"]["w2"] = [4, H, FFN + 1]
    torch.save(ckpt, tmp_path / "bad_meta.ckpt")
    with pytest.raises(ValueError, match=r"moes\.1\.w2: checkpoint has logical shape \(4, 8, 13\)"):
        _fit_from(tmp_path / "bad_meta.ckpt", tmp_path, _Net())
