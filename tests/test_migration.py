"""Migration executor: gloo with 2 and 4 processes, single process, optimizer state.

Every slot is filled with rows that encode (layer, logical expert, tensor), so after a
migration each slot is checked bit for bit against the expert the new placement gives it.
The helpers at the top are shared with ``test_migration_plan.py``.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from lightning_eplb.migration import MigrationStats, migrate_experts, optimizer_state_tensors, plan_migration
from lightning_eplb.placement import Placement
from tests._dist import free_port, requires_gpus, spawn

# Per-slot shapes and dtypes of the tensors of each test layer: mixed dtypes, ranks 0 to 3.
LAYER_SPECS: list[list[tuple[tuple[int, ...], torch.dtype]]] = [
    [((3, 5), torch.bfloat16), ((7,), torch.float32), ((2, 3), torch.int64)],
    [((4,), torch.float32), ((), torch.int64), ((1, 9), torch.bfloat16), ((2, 1, 3), torch.float32)],
]


def random_placement(gen: torch.Generator, num_layers: int, num_logical: int, num_physical: int) -> Tensor:
    """``(L, P)``: every expert gets one slot, the others random replicas, then shuffled.

    Replicas may land on the same rank (a second replica that is a local copy)."""
    rows = []
    for _ in range(num_layers):
        extra = torch.randint(0, num_logical, (num_physical - num_logical,), generator=gen)
        ids = torch.cat([torch.arange(num_logical), extra])
        rows.append(ids[torch.randperm(num_physical, generator=gen)])
    return torch.stack(rows)


def expected_row(layer: int, expert: int, tensor: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Content of one slot of tensor ``tensor`` of ``layer`` holding logical ``expert``."""
    gen = torch.Generator().manual_seed((layer * 1000 + expert) * 16 + tensor)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-(2**40), 2**40, shape, generator=gen, dtype=dtype)


def fill_layers(
    p2l_LP: Tensor, rank: int, num_slots: int, specs=LAYER_SPECS, device="cpu"
) -> list[list[Tensor]]:
    """This rank's ``(S, ...)`` tensors holding the experts of placement ``p2l_LP``."""
    layers = []
    for layer, layer_specs in enumerate(specs):
        local = p2l_LP[layer, rank * num_slots : (rank + 1) * num_slots].tolist()
        tensors = []
        for t, (shape, dtype) in enumerate(layer_specs):
            rows = [expected_row(layer, e, t, shape, dtype) for e in local]
            tensors.append(torch.stack(rows).to(device))
        layers.append(tensors)
    return layers


def check_layers(
    layers: list[list[Tensor]], p2l_LP: Tensor, rank: int, num_slots: int, specs=LAYER_SPECS
) -> None:
    """Every slot holds exactly (bit for bit) its expert's rows under ``p2l_LP``."""
    for layer, layer_specs in enumerate(specs):
        local = p2l_LP[layer, rank * num_slots : (rank + 1) * num_slots].tolist()
        for t, (shape, dtype) in enumerate(layer_specs):
            got = layers[layer][t].cpu()
            for slot, e in enumerate(local):
                want = expected_row(layer, e, t, shape, dtype)
                if not torch.equal(
                    got[slot].reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)
                ):
                    raise AssertionError(f"rank {rank} layer {layer} tensor {t} slot {slot}: not expert {e}")


def slot_bytes(specs=LAYER_SPECS) -> list[int]:
    """Bytes of one slot, summed over each layer's tensors."""
    return [sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in layer) for layer in specs]


def min_bytes_received(old_LP: Tensor, new_LP: Tensor, rank: int, num_slots: int, specs=LAYER_SPECS) -> int:
    """Brute force: experts this rank lacks, times their slot bytes."""
    total = 0
    for layer, nbytes in enumerate(slot_bytes(specs)):
        mine = slice(rank * num_slots, (rank + 1) * num_slots)
        lacking = set(new_LP[layer, mine].tolist()) - set(old_LP[layer, mine].tolist())
        total += len(lacking) * nbytes
    return total


# ---------------------------------------------------------------------------- workers


def _random_case(seed: int, world_size: int) -> tuple[Tensor, Tensor, int, int]:
    """Old and new ``(L, P)`` placements with replicas, identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    num_slots = 2 + seed % 3
    num_physical = num_slots * world_size
    num_logical = max(1, num_physical - int(torch.randint(0, 4, (1,), generator=gen)))
    old = random_placement(gen, len(LAYER_SPECS), num_logical, num_physical)
    new = random_placement(gen, len(LAYER_SPECS), num_logical, num_physical)
    Placement.from_physical_to_logical(new, num_logical, world_size)  # every expert has a slot
    return old, new, num_slots, num_logical


def _run_random_migrations(rank: int, world_size: int, device: str) -> None:
    for seed in range(6):
        old, new, num_slots, _ = _random_case(seed, world_size)
        # default budget, a roomy one, and small ones that split rows over many batches
        for budget in (None, 1 << 20, 37 if seed == 0 else 400):
            layers = fill_layers(old, rank, num_slots, device=device)
            keep_refs = [t.data_ptr() for layer in layers for t in layer]
            stats = migrate_experts(old, new, layers, max_buffer_bytes=budget)
            check_layers(layers, new, rank, num_slots)
            assert [t.data_ptr() for layer in layers for t in layer] == keep_refs  # in place
            # no byte more than the experts this rank lacks, and what the plan predicts
            assert stats.bytes_received == min_bytes_received(old, new, rank, num_slots)
            sent, received = plan_migration(old, new, world_size).bytes_per_rank(slot_bytes())
            assert (stats.bytes_sent, stats.bytes_received) == (int(sent[rank]), int(received[rank]))
            totals = torch.tensor([stats.bytes_sent, stats.bytes_received], device=device)
            dist.all_reduce(totals)
            assert totals[0] == totals[1]
    # ranks that disagree (here: an extra tensor on rank 0) all fail with the same error, no hang
    old, new, num_slots, _ = _random_case(2, world_size)
    layers = fill_layers(old, rank, num_slots, device=device)
    extra = [torch.zeros(num_slots, 2, device=device)] if rank == 0 else []
    with pytest.raises(ValueError, match="ranks disagree on tensors per layer, row bytes"):
        migrate_experts(old, new, [layers[0] + extra, layers[1]])
    # identical placements move nothing and change nothing
    old, _, num_slots, _ = _random_case(1, world_size)
    layers = fill_layers(old, rank, num_slots, device=device)
    stats = migrate_experts(old, old.clone(), layers)
    assert (stats.bytes_sent, stats.bytes_received) == (0, 0)
    check_layers(layers, old, rank, num_slots)


def _run_adam_follows_expert(rank: int, world_size: int, device: str) -> None:
    """Move weights with AdamW (amsgrad) state; the next step matches an unmoved reference."""
    num_slots, num_logical = 3, 2 * world_size + 1
    num_physical = num_slots * world_size
    gen = torch.Generator().manual_seed(7)
    old = random_placement(gen, 1, num_logical, num_physical)[0]
    new = random_placement(gen, 1, num_logical, num_physical)[0]
    # reference: the logical experts (E, 4, 3) on the same device, so the same kernels run
    ref = torch.nn.Parameter(torch.randn(num_logical, 4, 3, generator=gen).to(device))
    grads = [torch.randn(num_logical, 4, 3, generator=gen).to(device) for _ in range(2)]
    mine = slice(rank * num_slots, (rank + 1) * num_slots)
    old_mine, new_mine = old[mine].to(device), new[mine].to(device)

    def make_opt(p: torch.nn.Parameter) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p], lr=0.1, betas=(0.8, 0.9), weight_decay=0.01, amsgrad=True)

    ref_opt = make_opt(ref)
    w = torch.nn.Parameter(ref.detach()[old_mine].clone())  # physical (S, 4, 3)
    opt = make_opt(w)
    for p, o, g in ((ref, ref_opt, grads[0]), (w, opt, grads[0][old_mine])):
        p.grad = g
        o.step()
    state = optimizer_state_tensors(opt, [w])
    assert len(state) == 3  # exp_avg, exp_avg_sq, max_exp_avg_sq
    migrate_experts(old, new, [[w, *state]])
    for p, o, g in ((ref, ref_opt, grads[1]), (w, opt, grads[1][new_mine])):
        p.grad = g
        o.step()
    assert torch.equal(w.detach(), ref.detach()[new_mine])
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert torch.equal(opt.state[w][key], ref_opt.state[ref][key][new_mine]), key
    assert float(opt.state[w]["step"]) == float(ref_opt.state[ref]["step"]) == 2.0


def _run_all(rank: int, world_size: int, device: str = "cpu") -> None:
    _run_random_migrations(rank, world_size, device)
    _run_adam_follows_expert(rank, world_size, device)


@pytest.mark.parametrize("world_size", [2, 4])
def test_migration_gloo(world_size: int) -> None:
    spawn(_run_all, world_size=world_size)


def _nccl_entry(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    try:
        _run_all(rank, world_size, f"cuda:{rank}")
    finally:
        dist.destroy_process_group()


@requires_gpus(2)
def test_migration_nccl() -> None:
    mp.start_processes(_nccl_entry, args=(2, free_port()), nprocs=2, join=True, start_method="spawn")


# ---------------------------------------------------------------------------- single process


def test_single_process_is_a_local_permutation() -> None:
    gen = torch.Generator().manual_seed(3)
    old = random_placement(gen, 2, 5, 8)
    new = random_placement(gen, 2, 5, 8)
    for budget in (None, 11):
        layers = fill_layers(old, 0, 8)
        stats = migrate_experts(old, new, layers, max_buffer_bytes=budget)
        check_layers(layers, new, 0, 8)
        assert (stats.bytes_sent, stats.bytes_received) == (0, 0)
        assert isinstance(stats, MigrationStats) and stats.seconds >= 0.0


def test_swap_of_two_slots_and_one_dimensional_placement() -> None:
    t = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    migrate_experts(torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1]), [[t]])
    assert t.tolist() == [[2.0, 2.0], [1.0, 1.0], [2.0, 2.0]]


def test_bad_inputs_raise() -> None:
    p2l = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="S=2 local slots"):
        migrate_experts(p2l, p2l, [[torch.zeros(3, 4)]])
    with pytest.raises(ValueError, match="L=1 layers"):
        migrate_experts(p2l, p2l, [[], []])
    with pytest.raises(ValueError, match="contiguous"):
        migrate_experts(p2l, p2l, [[torch.zeros(4, 2).t()]])
    with pytest.raises(ValueError, match="max_buffer_bytes"):
        migrate_experts(p2l, p2l, [[torch.zeros(2)]], max_buffer_bytes=0)
    with pytest.raises(ValueError, match="not initialized"):
        migrate_experts(p2l, p2l, [[torch.zeros(2)]], group=object())  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- optimizer state


def test_optimizer_state_tensors_by_optimizer() -> None:
    w = torch.nn.Parameter(torch.randn(3, 4))
    v = torch.nn.Parameter(torch.randn(3))
    sgd = torch.optim.SGD([w, v], lr=0.1, momentum=0.9)
    assert optimizer_state_tensors(sgd, [w, v]) == []  # before the first step
    w.grad, v.grad = torch.ones(3, 4), torch.ones(3)
    sgd.step()
    got = optimizer_state_tensors(sgd, [w, v])
    assert [t is sgd.state[p]["momentum_buffer"] for t, p in zip(got, [w, v], strict=True)] == [True, True]
    plain = torch.optim.SGD([w], lr=0.1)  # no momentum: nothing to move
    plain.step()
    assert optimizer_state_tensors(plain, [w]) == []
    rms = torch.optim.RMSprop([w], lr=0.1, momentum=0.5)
    rms.step()
    assert [tuple(t.shape) for t in optimizer_state_tensors(rms, [w])] == [(3, 4), (3, 4)]
    with pytest.raises(ValueError, match="not in the param_groups of SGD"):
        optimizer_state_tensors(plain, [v])


@pytest.mark.skipif(not hasattr(torch.optim, "Adafactor"), reason="torch.optim.Adafactor needs torch >= 2.5")
def test_factored_state_raises() -> None:
    w = torch.nn.Parameter(torch.randn(3, 4, 5))
    opt = torch.optim.Adafactor([w])
    w.grad = torch.ones(3, 4, 5)
    opt.step()
    with pytest.raises(ValueError, match="Adafactor state 'col_var'"):
        optimizer_state_tensors(opt, [w])
