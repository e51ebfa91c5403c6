"""save/load_expert_state on one process without a Trainer: layouts, optimizer state, errors."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_eplb.checkpoint import install_load_checks, load_expert_state, save_expert_state
from lightning_eplb.moe import ExpertParallelMoE

H, FFN = 4, 6


class _Model(nn.Module):
    def __init__(self, num_redundant: int = 2) -> None:
        super().__init__()
        self.block = nn.ModuleDict(
            {"moe": ExpertParallelMoE(H, FFN, 4, 2, num_redundant_experts=num_redundant, init_seed=3)}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block["moe"](x)


def _layers(model: _Model) -> list[tuple[str, ExpertParallelMoE]]:
    return [("block.moe", model.block["moe"])]


def _trained(num_redundant: int = 2) -> tuple[_Model, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = _Model(num_redundant)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(7, H)).square().sum().backward()
    model.block["moe"].sync_replica_grads()
    opt.step()
    return model, opt


def _save(model: _Model, opt: torch.optim.Optimizer) -> dict:
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}
    save_expert_state(
        SimpleNamespace(layers=_layers(model)), SimpleNamespace(optimizers=[opt]), None, checkpoint
    )
    return checkpoint


def test_save_writes_logical_layout_and_leaves_live_state_alone() -> None:
    model, opt = _trained()
    layer = model.block["moe"]
    live = [opt.state[p]["momentum_buffer"].clone() for p in layer.expert_tensors()]
    ckpt = _save(model, opt)
    # the live optimizer still holds (P, ...) slots; the checkpoint (E, ...) experts
    assert [opt.state[p]["momentum_buffer"].shape[0] for p in layer.expert_tensors()] == [6, 6, 6]
    assert all(
        torch.equal(opt.state[p]["momentum_buffer"], b)
        for p, b in zip(layer.expert_tensors(), live, strict=True)
    )
    for tname, w in zip(("w1", "w3", "w2"), layer.gather_logical(layer.expert_tensors()), strict=True):
        assert torch.equal(ckpt["state_dict"][f"block.moe.{tname}"], w)
    assert ckpt["state_dict"]["block.moe.eplb_layout"] == "logical"
    entries = ckpt["eplb"]["optimizers"][0]
    # parameters in order: w1 (0), w3 (1), w2 (2), gate.weight (3)
    assert [(e["index"], e["tensor"]) for e in entries] == [(0, "w1"), (1, "w3"), (2, "w2")]
    for e, logical in zip(entries, layer.gather_logical(live), strict=True):
        assert torch.equal(ckpt["optimizer_states"][0]["state"][e["index"]]["momentum_buffer"], logical)


def test_load_into_other_redundancy_scatters_optimizer_state() -> None:
    model, opt = _trained(num_redundant=2)
    ckpt = _save(model, opt)
    logical_w1 = ckpt["optimizer_states"][0]["state"][0]["momentum_buffer"].clone()
    # P = 4 now: the saved (P = 6) placement cannot apply, the layer keeps its own
    fresh = _Model(num_redundant=0)
    install_load_checks(fresh, _layers(fresh))
    fresh.load_state_dict(ckpt["state_dict"])
    load_expert_state(SimpleNamespace(layers=_layers(fresh)), None, None, ckpt)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh_opt.load_state_dict(ckpt["optimizer_states"][0])
    layer = fresh.block["moe"]
    assert torch.equal(fresh_opt.state[layer.w1]["momentum_buffer"], logical_w1[layer.physical_to_logical])
    w1, _, _ = model.block["moe"].gather_logical(model.block["moe"].expert_tensors())
    assert torch.equal(layer.w1.detach(), w1[layer.physical_to_logical])


def test_load_checks_are_idempotent_and_picklable() -> None:
    model = _Model()
    install_load_checks(model, _layers(model))
    install_load_checks(model, _layers(model))
    assert len(model._load_state_dict_pre_hooks) == 1
    pickle.loads(pickle.dumps(model))
    state = model.state_dict()
    state["block.moe.w2"] = torch.zeros(4, H, FFN + 1)
    with pytest.raises(ValueError, match=r"block\.moe\.w2: the checkpoint holds shape \(4, 4, 7\)"):
        model.load_state_dict(state)
    del state["block.moe.w2"]
    with pytest.raises(ValueError, match=r"misses the expert tensor 'block\.moe\.w2'"):
        model.load_state_dict(state, strict=False)  # the layer is there, a tensor of it is not
    # a checkpoint without any balanced layer (say, a dense backbone) may load non-strictly
    model.load_state_dict({}, strict=False)


def test_unconvertible_optimizer_state_fails_clearly() -> None:
    model, opt = _trained()
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}
    state = checkpoint["optimizer_states"][0]["state"]
    state[1] = {
        **state[1],
        "row_var": torch.zeros(6, FFN),
    }  # factored state of w3 (a copy: not the live dict)
    with pytest.raises(ValueError, match=r"block\.moe\.w3: optimizer state 'row_var' has shape \(6, 6\)"):
        save_expert_state(
            SimpleNamespace(layers=_layers(model)), SimpleNamespace(optimizers=[opt]), None, checkpoint
        )
    ckpt = _save(model, opt)
    ckpt["eplb"]["format_version"] = 99
    with pytest.raises(ValueError, match="format_version 99"):
        load_expert_state(SimpleNamespace(layers=_layers(model)), None, None, ckpt)
