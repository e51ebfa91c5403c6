"""ExpertParallelMoE on several GPUs: equivalence, host synchronisations, throughput, slot cost.

Run (one process per GPU; prints a table on rank 0)::

    PYTHONPATH=. torchrun --nproc-per-node 4 benchmarks/moe_gpu.py
    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/moe_gpu.py --small   # CPU/gloo smoke test

Sections:
1. Equivalence under NCCL: a random placement with replicas; outputs and gradients
   (input, gate, logical expert grads after ``sync_replica_grads``) against ``DenseMoE`` on
   the global batch, on rank 0. fp32 (``bmm`` backend) and bf16 (``auto``: grouped GEMM).
2. Host synchronisations in one forward+backward, counted with
   ``torch.cuda.set_sync_debug_mode("warn")``, in train mode (load recording on) and eval
   mode (off), and in ``sync_replica_grads``.
3. Tokens/s of forward+backward on N GPUs against the same layer on one GPU (a one-rank
   group: all P slots, no collectives) at equal tokens per GPU.
4. Step time (forward+backward+``sync_replica_grads``) with 0, 25% and 50% extra slots at
   equal tokens, per expert backend (goal: under 3% apart for the default backend); also
   without the sync, the sync alone (as a share of the P = E step: its floor when nothing
   hides it), and with the sync forced to the former single all-reduce, to separate the
   terms; and the bytes each rank sends in the sync. The three P are timed in turn in each
   of ``--rounds`` rounds; the table gives medians and the ratios of each round.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_eplb._grouped import resolve_backend
from lightning_eplb._overlap import ReplicaSyncOverlap, warm_up
from lightning_eplb._replica_sync import ReplicaIndex
from lightning_eplb.dense import DenseMoE
from lightning_eplb.moe import ExpertParallelMoE
from lightning_eplb.placement import Placement


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", action="store_true", help="tiny sizes (CPU/gloo smoke test)")
    parser.add_argument("--cpu", action="store_true", help="use gloo on CPU even if CUDA is available")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=1408)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per GPU per step")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--backends", default="auto,bmm", help="expert backends for the slot-cost table")
    parser.add_argument("--sections", default="1,2,3,4", help="which sections to run, e.g. 1,4")
    parser.add_argument(
        "--overlap-modes",
        default="overlap",
        help="stack rows besides 'after': 'overlap', 'overlap:N' for an NCCL sync group limited to N CTAs, "
        "'overlap:hp' for one on a high-priority stream",
    )
    parser.add_argument(
        "--stack", type=int, default=4, help="section 4: layers of the stacked rows (0: none)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="section 4: rounds over P = E, +25%%, +50%% (the three timed in turn in each round; "
        "medians and per-round ratios reported)",
    )
    parser.add_argument(
        "--accumulate",
        type=int,
        default=1,
        help="section 4 stack rows: micro-batches per optimizer step (gradient accumulation; "
        "the replica sync runs once per step, on the last micro-batch)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="section 4: torch.profiler kernel table for P = E and the +25%% slots",
    )
    args = parser.parse_args()
    if args.small:
        args.hidden, args.ffn, args.experts, args.top_k, args.tokens = 64, 96, 8, 2, 256
        args.iters, args.warmup, args.rounds = 3, 1, 2
    return args


def init() -> torch.device:
    use_cuda = torch.cuda.is_available() and not ARGS.cpu
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def even_placement(num_logical: int, num_physical: int, num_ranks: int) -> Placement:
    """Rank ``r`` holds its ``E/N`` experts and replicas of the first ``R/N`` experts of rank
    ``r+1``: under uniform routing every rank then gets the same tokens, whatever ``R``."""
    own, extra = num_logical // num_ranks, (num_physical - num_logical) // num_ranks
    rows = []
    for r in range(num_ranks):
        nxt = (r + 1) % num_ranks
        rows.append(
            torch.cat([torch.arange(r * own, (r + 1) * own), torch.arange(nxt * own, nxt * own + extra)])
        )
    return Placement.from_physical_to_logical(torch.cat(rows), num_logical, num_ranks)


def random_placement(num_logical: int, num_physical: int, num_ranks: int, seed: int) -> Placement:
    gen = torch.Generator().manual_seed(seed)
    extra = torch.randint(0, num_logical, (num_physical - num_logical,), generator=gen)
    p2l = torch.cat([torch.arange(num_logical), extra])[torch.randperm(num_physical, generator=gen)]
    return Placement.from_physical_to_logical(p2l, num_logical, num_ranks)


def make_layer(
    device: torch.device,
    dtype: torch.dtype,
    redundant: int,
    backend: str,
    group: dist.ProcessGroup | None = None,
) -> ExpertParallelMoE:
    torch.manual_seed(0)  # same gate on every rank
    layer = ExpertParallelMoE(
        ARGS.hidden,
        ARGS.ffn,
        ARGS.experts,
        ARGS.top_k,
        redundant,
        process_group=group,
        init_seed=0,
        expert_backend=backend,
    )
    return layer.to(device=device, dtype=dtype)


def even_layer(device: torch.device, dtype: torch.dtype, redundant: int, backend: str) -> ExpertParallelMoE:
    """A layer under :func:`even_placement` (equal tokens per rank under uniform routing)."""
    layer = make_layer(device, dtype, redundant, backend)
    n = dist.get_world_size()
    even = even_placement(ARGS.experts, ARGS.experts + redundant, n)
    layer.set_placement(
        even.physical_to_logical[0], even.logical_to_physical[0], even.logical_replica_count[0]
    )
    return layer


def rel_err(got: Tensor, want: Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------- 1. equivalence
def check_equivalence(device: torch.device, dtype: torch.dtype, backend: str) -> dict[str, float]:
    rank, n = dist.get_rank(), dist.get_world_size()
    redundant = max(n, ARGS.experts // 4) // n * n
    layer = make_layer(device, dtype, redundant, backend)
    placement = random_placement(ARGS.experts, ARGS.experts + redundant, n, seed=1)
    logical = layer.gather_logical(layer.expert_tensors())
    layer.set_placement(
        placement.physical_to_logical[0], placement.logical_to_physical[0], placement.logical_replica_count[0]
    )
    layer.load_logical_experts(logical)
    dense = DenseMoE.from_expert_parallel(layer)
    gen = torch.Generator().manual_seed(2)
    num_tokens = n * min(ARGS.tokens, 512)
    x = torch.randn(num_tokens, ARGS.hidden, generator=gen).to(device, dtype)
    g = torch.randn(num_tokens, ARGS.hidden, generator=gen).to(device, torch.float32)
    x_local = x[rank::n].clone().requires_grad_()
    y_local = layer(x_local)
    (y_local.float() * g[rank::n]).sum().backward()
    dist.all_reduce(layer.gate.weight.grad)
    layer.sync_replica_grads()
    y_parts = [torch.empty_like(y_local) for _ in range(n)]
    dist.all_gather(y_parts, y_local.detach().contiguous())
    xg_parts = [torch.empty_like(x_local) for _ in range(n)]
    dist.all_gather(xg_parts, x_local.grad.contiguous())
    expert_grads = [t * n for t in layer.gather_logical([p.grad for p in layer.expert_tensors()])]
    if rank != 0:
        return {}
    y = torch.empty_like(x)
    x_grad = torch.empty_like(x)
    for r in range(n):
        y[r::n], x_grad[r::n] = y_parts[r], xg_parts[r]
    x_ref = x.clone().requires_grad_()
    y_ref = dense(x_ref)
    (y_ref.float() * g).sum().backward()
    errs = {
        "output": rel_err(y, y_ref),
        "input grad": rel_err(x_grad, x_ref.grad),
        "gate grad": rel_err(layer.gate.weight.grad, dense.gate.weight.grad),
    }
    for name, got, want in zip(("w1", "w3", "w2"), expert_grads, (dense.w1, dense.w3, dense.w2), strict=True):
        errs[f"{name} grad"] = rel_err(got, want.grad)
    return errs


# ---------------------------------------------------------------------------- 2. host syncs
def count_syncs(fn: Callable[[], None], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def sync_counts(device: torch.device, dtype: torch.dtype) -> dict[str, int | None]:
    n = dist.get_world_size()
    layer = make_layer(device, dtype, redundant=n, backend="auto")
    x = torch.randn(ARGS.tokens, ARGS.hidden, device=device, dtype=dtype, requires_grad=True)

    def fwd_bwd() -> None:
        layer(x).float().square().mean().backward()

    fwd_bwd()  # warm up (first-call allocations, NCCL communicators)
    layer.sync_replica_grads()
    out: dict[str, int | None] = {}
    # alternate the modes so a one-off sync (a first call, a lazy allocation) shows as such
    for rnd in (1, 2):
        layer.eval()
        out[f"forward+backward, eval (no recording), round {rnd}"] = count_syncs(fwd_bwd, device)
        layer.train()
        out[f"forward+backward, train (recording), round {rnd}"] = count_syncs(fwd_bwd, device)
    out["sync_replica_grads"] = count_syncs(layer.sync_replica_grads, device)
    out["reset_expert_load"] = count_syncs(layer.reset_expert_load, device)
    return out


# ---------------------------------------------------------------------------- 3./4. timing
def profile_table(layer: ExpertParallelMoE, device: torch.device, dtype: torch.dtype, rows: int = 25) -> str:
    """Rank 0's kernels (self device time per step) over a few forward+backward+sync steps."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(3 + dist.get_rank())
    x = torch.randn(ARGS.tokens, ARGS.hidden, generator=gen).to(device, dtype).requires_grad_()
    gy = torch.randn(ARGS.tokens, ARGS.hidden, generator=gen).to(device, dtype)
    layer.train()

    def one() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(gy)
        layer.sync_replica_grads()
        layer.reset_expert_load()

    for _ in range(3):
        one()
    sync(device)
    steps = 5
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            one()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def timed(
    step: Callable[[], None], device: torch.device, warmup: int | None = None, iters: int | None = None
) -> float:
    """Mean seconds of ``step()`` over ``iters`` calls after ``warmup`` (default: the
    command line's), max over ranks."""
    warmup = ARGS.warmup if warmup is None else warmup
    iters = ARGS.iters if iters is None else iters
    for _ in range(warmup):
        step()
    sync(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    elapsed = torch.tensor([(time.perf_counter() - start) / max(iters, 1)], device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def step_time(
    layer: ExpertParallelMoE,
    device: torch.device,
    dtype: torch.dtype,
    with_sync: bool | str = True,
    warmup: int | None = None,
    iters: int | None = None,
) -> float:
    """Mean seconds of forward+backward(+sync_replica_grads if ``with_sync``), max over ranks;
    ``with_sync="alone"``: of ``sync_replica_grads`` alone, on the gradients of one backward
    (the floor of what the replica sync adds, when nothing runs beside it)."""
    gen = torch.Generator().manual_seed(3 + dist.get_rank())
    x = torch.randn(ARGS.tokens, ARGS.hidden, generator=gen).to(device, dtype).requires_grad_()
    gy = torch.randn(ARGS.tokens, ARGS.hidden, generator=gen).to(device, dtype)
    layer.train()

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(gy)
        if with_sync:
            layer.sync_replica_grads()
        layer.reset_expert_load()

    if with_sync == "alone":
        step()  # the gradients the sync then works on, summed in place again on every call
        return timed(layer.sync_replica_grads, device, warmup, iters)
    return timed(step, device, warmup, iters)


_GROUPS: dict[str, dist.ProcessGroup] = {}


def by_rounds(
    times: list[list[float]], base: list[float] | None = None
) -> tuple[list[float], list[list[float]]]:
    """Median time per P over rounds, and every round's ratios to the first P (ratios taken
    within a round, so slow drift of the machine cancels); with ``base`` (one time per round),
    every round's extra time over that round's ``base`` instead."""
    if base is None:
        ratios = [[t / ts[0] - 1 for t in ts[1:]] for ts in zip(*times, strict=True)]
    else:
        ratios = [[t / b for t in ts[1:]] for ts, b in zip(zip(*times, strict=True), base, strict=True)]
    return [statistics.median(ts) for ts in times], [list(r) for r in zip(*ratios, strict=True)]


def row(label: str, times: list[list[float]], base: list[float] | None = None) -> str:
    """A table row: median ms per P, then the median ratio (and its range over rounds); with
    ``base``, the time as a fraction of ``base`` (the same round's P = E step)."""
    medians, ratios = by_rounds(times, base)
    cells = [f"{t * 1e3:.2f}" for t in medians]
    for r in ratios:
        spread = f" ({min(r):+.1%}..{max(r):+.1%})" if len(r) > 1 else ""
        cells.append(f"{statistics.median(r):+.1%}{spread}")
    return f"| {label} | " + " | ".join(cells) + " |"


def stack_time(
    layers: list[ExpertParallelMoE],
    device: torch.device,
    dtype: torch.dtype,
    mode: str,
    warmup: int | None = None,
    iters: int | None = None,
) -> float:
    """Mean seconds of ``--accumulate`` forward+backward passes and one replica sync of a
    residual stack, max over ranks;
    the sync after the backward (``mode="after"``), or started from gradient hooks as
    EplbCallback does (``"overlap"``; ``"overlap:N"``: its NCCL communicator limited to ``N``
    CTAs, so that it takes fewer SMs from the backward's GEMMs)."""
    gen = torch.Generator().manual_seed(3 + dist.get_rank())
    x = torch.randn(ARGS.tokens, ARGS.hidden, generator=gen).to(device, dtype)
    gy = torch.randn(ARGS.tokens, ARGS.hidden, generator=gen).to(device, dtype)
    overlap = mode != "after"
    if overlap and mode not in _GROUPS:  # one group per mode, reused over rounds
        options = None
        if ":" in mode and device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            if mode.endswith(":hp"):  # the exchange on a high-priority NCCL stream
                options.is_high_priority_stream = True
            else:
                options.config.max_ctas = int(mode.split(":")[1])
        _GROUPS[mode] = dist.new_group(ranks=list(range(dist.get_world_size())), pg_options=options)
        warm_up(_GROUPS[mode])
    group = _GROUPS.get(mode)
    scheduler = ReplicaSyncOverlap(layers, group) if overlap else None

    def step() -> None:
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        for micro in range(ARGS.accumulate):
            h = x
            for layer in layers:
                layer.train()
                layer.forward_calls = 0
                h = h + layer(h)
            if scheduler is not None and micro == ARGS.accumulate - 1:
                scheduler.arm()
            h.backward(gy)
        done = scheduler.finish() if scheduler is not None else set()
        for layer in layers:
            if id(layer) not in done:
                layer.sync_replica_grads()
            layer.reset_expert_load()

    try:
        return timed(step, device, warmup, iters)
    finally:
        if scheduler is not None:
            scheduler.remove()


def emit(lines: list[str]) -> None:
    """Print a finished section on rank 0 at once, so a slow later section loses nothing."""
    if dist.get_rank() == 0 and lines:
        print("\n".join(lines), flush=True)


def main() -> None:
    device = init()
    rank, n = dist.get_rank(), dist.get_world_size()
    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    probe = torch.empty(1, ARGS.hidden, device=device, dtype=low)
    auto = resolve_backend("auto", probe, ARGS.hidden, ARGS.ffn)
    lines = [
        f"# ExpertParallelMoE on {n} x {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}"
        f" (torch {torch.__version__}): H={ARGS.hidden} F={ARGS.ffn} E={ARGS.experts} top_k={ARGS.top_k}"
        f" tokens/GPU={ARGS.tokens} iters={ARGS.iters}; backend auto = {auto} for {str(low).split('.')[-1]}",
        "",
        "## 1. equivalence with DenseMoE (relative error, norm of difference / norm of reference)",
        "| dtype | backend | output | input grad | gate grad | w1 grad | w3 grad | w2 grad | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    sections = {int(x) for x in ARGS.sections.split(",")}
    for dtype, backend, tol in ((torch.float32, "bmm", 1e-4), (low, "auto", 3e-2)) if 1 in sections else ():
        errs = check_equivalence(device, dtype, backend)
        if rank == 0:
            verdict = "PASS" if max(errs.values()) < tol else f"FAIL (tol {tol:g})"
            cells = " | ".join(f"{v:.1e}" for v in errs.values())
            lines.append(f"| {str(dtype).split('.')[-1]} | {backend} | {cells} | {verdict} |")

    emit(lines if 1 in sections else lines[:1])
    lines = []
    counts = sync_counts(device, low) if 2 in sections else {}
    lines = [
        "",
        "## 2. host synchronisations (CUDA sync debug mode warnings)",
        "| call | syncs |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {'n/a (CPU)' if v is None else v} |" for k, v in counts.items()]

    if 2 in sections:
        emit(lines)
    solo_groups = [dist.new_group([r]) for r in range(n)]
    redundant = 0
    one = (
        1.0
        if 3 not in sections
        else step_time(make_layer(device, low, redundant, "auto", group=solo_groups[rank]), device, low)
    )
    many = 1.0 if 3 not in sections else step_time(make_layer(device, low, redundant, "auto"), device, low)
    lines = [
        "",
        f"## 3. forward+backward+sync throughput, {ARGS.tokens} tokens per GPU, P = E",
        "| setup | step ms | tokens/s (all GPUs) | per-GPU efficiency |",
        "| --- | --- | --- | --- |",
        f"| 1 GPU, all {ARGS.experts} slots, no collectives | {one * 1e3:.2f} | {ARGS.tokens / one:,.0f} | 1.00 |",
        f"| {n} GPUs, expert parallel | {many * 1e3:.2f} | {n * ARGS.tokens / many:,.0f} | {one / many:.2f} |",
    ]

    if 3 in sections:
        emit(lines)
    if 4 not in sections:
        dist.destroy_process_group()
        return
    extras = [round(ARGS.experts * frac / n) * n for frac in (0.0, 0.25, 0.5)]  # R, a multiple of N
    lines = [
        "",
        f"## 4. step time with extra slots at equal tokens per rank ({n} GPUs; rank r holds its E/N experts "
        "and R/N replicas of rank r+1's)",
        f"(stack rows: {ARGS.accumulate} micro-batch(es) per step, one sync; {ARGS.rounds} rounds, P timed in "
        "turn within each; medians, and each ratio's median and range over the rounds' own ratios)",
        "| backend | " + " | ".join(f"P={ARGS.experts + r} ms" for r in extras) + " | +25% | +50% |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    if ARGS.profile:
        for redundant in extras[:2]:
            table = profile_table(even_layer(device, low, redundant, "auto"), device, low)
            emit(["", f"### profile, P={ARGS.experts + redundant}, rank 0, 5 steps", table])
    later = {"warmup": 2, "iters": ARGS.iters}  # rounds after the first: the layers are warm
    if ARGS.stack > 0:
        modes = ("after", *ARGS.overlap_modes.split(","))
        # a stack's layers are copies of one layer per P (drawing weights on the CPU dominates
        # the set-up; the timing does not depend on them), made where a stack is timed and
        # dropped after it: one stack at a time on the GPU, so deep stacks fit
        firsts = {r: even_layer(device, low, r, "auto") for r in extras}

        def stack_of(redundant: int) -> list[ExpertParallelMoE]:
            first = firsts[redundant]
            first.zero_grad(set_to_none=True)  # (copies would take its gradients along)
            return [first] + [copy.deepcopy(first) for _ in range(ARGS.stack - 1)]

        times: dict[str, list[list[float]]] = {mode: [[] for _ in extras] for mode in modes}
        for rnd in range(ARGS.rounds):
            for i, redundant in enumerate(extras):  # P in turn within each round
                stack = stack_of(redundant)
                for mode in modes:
                    try:
                        t = stack_time(stack, device, low, mode, **(later if rnd else {}))
                    except (AttributeError, RuntimeError) as err:  # e.g. no NCCL config in this torch
                        emit([f"({mode}: {err!r})"])
                        t = float("nan")
                    times[mode][i].append(t)
                del stack
        identical: list[str] = []
        for redundant in extras:
            # one more step each way, plus a second plain one: the layer the backward reaches
            # first bit for bit, and the whole stack against the run-to-run difference of the
            # plain path (0 since the dispatch's backward has no atomics: the GPU backward
            # is reproducible, so both differences are expected to be 0)
            stack = stack_of(redundant)
            grads = []
            for mode in ("after", "overlap", "after"):
                stack_time(stack, device, low, mode, warmup=0, iters=1)
                grads.append([p.grad.float().clone() for layer in stack for p in layer.expert_tensors()])
            plain, over, again = grads
            top = slice(-3, None)  # the last layer's w1, w3, w2: first in the backward
            same = all(torch.equal(a, b) for a, b in zip(plain[top], over[top], strict=True))

            def diff(x: list[Tensor], y: list[Tensor]) -> float:
                return max(
                    float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                    for a, b in zip(x, y, strict=True)
                )

            identical.append(
                f"top layer {same}, stack {diff(over, plain):.1e} vs plain-plain {diff(again, plain):.1e}"
            )
        del firsts, stack, grads
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for mode in modes:
            label = "sync after backward" if mode == "after" else "overlapped sync"
            if mode.endswith(":hp"):
                label += ", sync communicator on a high-priority stream"
            elif ":" in mode:
                label += f", sync communicator max_ctas={mode.split(':')[1]}"
            lines.append(row(f"auto, {ARGS.stack}-layer stack, {label}", times[mode]))
        lines.append(
            f"(overlapped vs after-backward expert gradients, max relative difference, per P: {identical})"
        )
        emit(lines)
        lines = []
    # rows: the step as the callback runs it; without the replica-gradient sync; with the sync
    # forced to one all-reduce of every replicated expert (the former path)
    variants = (
        ("", True, None),
        (", no sync", False, None),
        (", sync alone", "alone", None),
        (", all-reduce sync", True, 1),
    )
    sent: dict[int, tuple[float, float]] = {}
    step_p_e: list[float] = []  # the P = E step with the sync, per round
    for backend in [b for b in ARGS.backends.split(",") if b]:
        for label, with_sync, max_p2p_holders in variants:
            layers = {r: even_layer(device, low, r, backend) for r in extras}
            for redundant, layer in layers.items():
                if max_p2p_holders is not None:  # benchmark-only: rebuild the private sync plan
                    layer._replicas = ReplicaIndex.build(
                        layer.physical_to_logical.cpu(),
                        layer.logical_replica_count.cpu(),
                        rank,
                        layer.num_local_experts,
                        max_p2p_holders=max_p2p_holders,
                    )
                row_bytes = sum(p[0].numel() for p in layer.expert_tensors()) * layer.w1.element_size()
                if max_p2p_holders is None:
                    sent[redundant] = (
                        layer._replicas.sent_rows * row_bytes,
                        layer._replicas.all_reduce_rows * row_bytes,
                    )
            times_p: list[list[float]] = [[] for _ in extras]
            for rnd in range(ARGS.rounds):
                for i, redundant in enumerate(extras):
                    times_p[i].append(step_time(layers[redundant], device, low, with_sync, **(later if rnd else {})))
            if with_sync == "alone":  # as a share of the P = E step with the sync (0 there)
                lines.append(row(f"{backend}{label} (share of the P={ARGS.experts} step)", times_p, step_p_e))
            else:
                lines.append(row(f"{backend}{label}", times_p))
            if not label:
                step_p_e = times_p[0]
            emit(lines)
            lines = []
            del layers
    lines = [
        "",
        f"replica-gradient sync, MB sent by rank {rank} per step (point-to-point plan / one all-reduce): "
        + ", ".join(f"R={r}: {a / 1e6:.1f} / {b / 1e6:.1f}" for r, (a, b) in sent.items()),
    ]
    emit(lines)
    dist.destroy_process_group()


if __name__ == "__main__":
    ARGS = parse_args()
    main()
