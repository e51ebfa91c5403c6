"""EplbCallback without training: arguments, schedule, setup checks, DDP exclusions, clipping."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import (
    DDPStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_eplb import EplbCallback, ExpertParallelMoE
from lightning_eplb import _callback_utils as utils
from lightning_eplb.load import ExpertLoadWindow
from lightning_eplb.placement import Placement
from tests._dist import requires_cuda


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step_interval": 0}, r"step_interval \(0\) must be an int >= 1"),
        ({"step_interval": 2.5}, r"step_interval \(2.5\)"),
        ({"step_interval": True}, r"step_interval \(True\)"),
        ({"window_size": -1}, r"window_size \(-1\)"),
        ({"policy": "greedy"}, r"policy \('greedy'\) must be one of"),
        ({"policy": 3}, r"policy \(3\)"),
        ({"num_nodes": 0}, r"num_nodes \(0\)"),
        ({"first_rearrangement_step": 0}, r"first_rearrangement_step \(0\)"),
        ({"min_improvement": float("nan")}, r"min_improvement \(nan\) must be a finite number"),
        ({"min_improvement": 2.0}, r"min_improvement \(2.0\) must lie in \[-1, 1\]"),
        ({"log_every_n_steps": -1}, r"log_every_n_steps \(-1\) must be an int >= 0"),
        ({"max_buffer_bytes": 1}, r"max_buffer_bytes \(1\) must be an int >= 2"),
        ({"migrate_optimizer_state": 1}, r"migrate_optimizer_state \(1\) must be True or False"),
        ({"trace": "yes"}, r"trace \('yes'\)"),
        ({"trace_every_n_steps": 5}, r"trace_every_n_steps \(5\) needs trace=True"),
        ({"trace": True, "trace_every_n_steps": 0}, r"trace_every_n_steps \(0\)"),
        ({"rearrange": None}, r"rearrange \(None\)"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EplbCallback(**kwargs)


def test_defaults_and_schedule():
    cb = EplbCallback()
    assert (cb.step_interval, cb.window_size, cb.first_rearrangement_step) == (200, 200, 200)
    assert cb.policy == "balanced" and cb.min_improvement == 0.01 and cb.rearrange
    cb = EplbCallback(step_interval=3, first_rearrangement_step=5)
    assert [s for s in range(1, 15) if cb.is_rearrangement_step(s)] == [5, 8, 11, 14]
    # several optimizer steps in one batch (manual optimization): a crossed boundary counts once
    assert EplbCallback._crossed(4, 6, 5, 3) and not EplbCallback._crossed(5, 7, 5, 3)
    assert EplbCallback._crossed(7, 12, 5, 3)  # 8 and 11 crossed: one rearrangement
    assert not EplbCallback._crossed(0, 100, 0, 0)  # logging switched off
    assert EplbCallback(policy=lambda *a, **k: None).policy is not None


def test_yaml_arguments_parse():
    """LightningCLI builds callbacks with jsonargparse from the constructor's type hints."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(EplbCallback, "eplb")
    cfg = parser.parse_string(
        "eplb:\n  step_interval: 25\n  window_size: 10\n  policy: deepseek\n  min_improvement: 0.05\n"
        "  log_every_n_steps: 0\n  max_buffer_bytes: 1048576\n  trace: true\n  trace_every_n_steps: 5\n"
    )
    cb = parser.instantiate_classes(cfg).eplb
    assert isinstance(cb, EplbCallback)
    assert (cb.step_interval, cb.window_size, cb.policy, cb.min_improvement) == (25, 10, "deepseek", 0.05)
    assert (cb.log_every_n_steps, cb.max_buffer_bytes, cb.trace, cb.trace_every_n_steps) == (
        0,
        1 << 20,
        True,
        5,
    )


class _Two(nn.Module):
    def __init__(self, physical: tuple[int, int] = (6, 6), groups: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        self.a = ExpertParallelMoE(8, 8, 4, 2, physical[0] - 4, num_expert_groups=groups[0], init_seed=0)
        self.b = nn.Sequential(
            ExpertParallelMoE(8, 8, 4, 2, physical[1] - 4, num_expert_groups=groups[1], init_seed=1)
        )


class _Module(pl.LightningModule):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body


def test_setup_checks():
    layers = utils.find_layers(_Module(_Two()))
    assert [name for name, _ in layers] == ["body.a", "body.b.0"]
    assert utils.check_layers(layers, 2) == (4, 6, 1)
    with pytest.raises(
        MisconfigurationException, match=r"num_physical_experts \(6\) .* divisible by the world size \(4\)"
    ):
        utils.check_layers(layers, 4)
    with pytest.raises(
        MisconfigurationException, match=r"same \(num_logical_experts, num_physical_experts\)"
    ):
        utils.check_layers(utils.find_layers(_Module(_Two(physical=(6, 8)))), 2)
    with pytest.raises(MisconfigurationException, match="same num_expert_groups"):
        utils.check_layers(utils.find_layers(_Module(_Two(groups=(1, 2)))), 2)
    with pytest.raises(MisconfigurationException, match="found no balanceable MoE layer"):
        utils.find_layers(_Module(nn.Linear(2, 2)))
    utils.check_strategy(DDPStrategy())
    utils.check_strategy(SingleDeviceStrategy("cpu"))
    for strategy in (FSDPStrategy(), ModelParallelStrategy()):
        with pytest.raises(MisconfigurationException, match=f"got {type(strategy).__name__}"):
            utils.check_strategy(strategy)


def test_ddp_ignores_expert_tensors_and_layer_buffers():
    module = _Module(_Two())
    module._ddp_params_and_buffers_to_ignore = ["user.thing"]
    utils.ignore_in_ddp(module, utils.find_layers(module))
    utils.ignore_in_ddp(module, utils.find_layers(module))  # idempotent (fit, then validate)
    expected = ["user.thing"]
    for prefix in ("body.a", "body.b.0"):
        expected += [f"{prefix}.{n}" for n in ("w1", "w3", "w2")]
        expected += [f"{prefix}.{n}" for n in utils.LAYER_BUFFERS]
    assert module._ddp_params_and_buffers_to_ignore == expected
    names = dict(module.named_parameters()) | dict(module.named_buffers())
    assert all(n in names for n in expected[1:])
    assert "body.a.gate.weight" not in expected  # the router stays with DDP


def test_clip_by_true_norm_counts_each_expert_once():
    """One process, expert 0 has two replicas holding the same (synced) gradient: the norm
    must count it once, as the model without replicas does."""
    torch.manual_seed(0)
    moe = ExpertParallelMoE(4, 4, 2, 1, num_redundant_experts=1, init_seed=0)  # slots hold experts 0, 1, 0
    dense = nn.Linear(3, 3)
    params = [dense.weight, *moe.expert_tensors()]
    for p in params:
        p.grad = torch.randn_like(p)
    for p in moe.expert_tensors():
        p.grad[2] = p.grad[0]  # replicas carry equal gradients after sync_replica_grads
    opt = torch.optim.SGD(params, lr=0.1)
    logical = [dense.weight.grad.clone()] + [p.grad[:2].clone() for p in moe.expert_tensors()]
    reference = torch.sqrt(sum(g.pow(2).sum() for g in logical))
    expected = [g * min(1.0, 0.5 / (float(reference) + 1e-6)) for g in logical]
    utils.clip_global_norm(opt, [("moe", moe)], max_norm=0.5)
    got = [dense.weight.grad] + [p.grad[:2] for p in moe.expert_tensors()]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    for p in moe.expert_tensors():
        assert torch.equal(p.grad[2], p.grad[0])


@requires_cuda
def test_no_host_sync_on_quiet_steps():
    """Recording a step and clipping add no host synchronisation (run on the GPU machine)."""
    layer = ExpertParallelMoE(16, 32, 8, 2, num_redundant_experts=8, init_seed=0).cuda()
    cb = EplbCallback(step_interval=100)
    cb.layers = [("moe", layer)]
    cb._window = ExpertLoadWindow(1, 8, 16, 100).cuda()
    layer(torch.randn(64, 16, device="cuda")).sum().backward()
    opt = torch.optim.AdamW(layer.parameters())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            cb._record()
            utils.clip_global_norm(opt, cb.layers, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(cb._window.compute().slot_LP.sum()) == 64 * 2


def test_placement_round_trip_helpers():
    """The broadcast and stats helpers are identities on one process."""
    p2l = Placement.contiguous(2, 4, 6, 2).physical_to_logical
    assert torch.equal(utils.broadcast_from_rank_zero(p2l, torch.device("cpu")), p2l)
    assert utils.broadcast_from_rank_zero(p2l, torch.device("cpu"), failed=True) is None
    assert utils.reduce_stats(10, 20, 0.5, 0.25, torch.device("cpu")) == (10.0, 20.0, 0.5, 0.25, 0.0)
    assert utils.reduce_stats(10, 20, 0.5, 0.25, torch.device("cpu"), 7.0)[-1] == 7.0
